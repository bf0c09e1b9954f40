"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, Qwen3 decoder under ``model.language_model``): tokens,
grids and M-RoPE as Qwen2.5-VL (`qwen2_vl`), so the same adapter fields; ``positions="renumber"`` is refused
for the same reason. A video is cut into one ``<|vision_start|><|video_pad|>*n<|vision_end|>`` run per
temporal patch (two input frames), with its timestamp as text in between, so each temporal patch is its
own group.

DeepStack: the vision encoder's intermediate features are added to the hidden states at the vision
positions after each of the first ``len(deepstack_visual_indexes)`` decoder layers. The stock text model
does this between layers, on the full-length hidden states a layer returns, so with MoD every vision token,
kept or skipped, receives its DeepStack features exactly as in the dense model; MoD changes nothing about it.
(Under PRD the layers that receive them are dense anyway: ``R(i) > 0.85`` for layers 0-8 of Qwen3-VL-8B's 36,
and DeepStack feeds layers 0-2; with another schedule a MoD layer among them still sees the features on
the kept tokens, and the skipped ones carry theirs on.)
"""

from .base import Adapter, register
from .qwen2_vl import QWEN_VL_FIELDS

QWEN3_VL = register(Adapter(name="Qwen3-VL", model_types=("qwen3_vl",), **QWEN_VL_FIELDS))

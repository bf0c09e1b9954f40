"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, a
Qwen2-style decoder under ``model.language_model``, the vision encoder under ``model.visual``).

Dynamic resolution: an image of ``grid_t x grid_h x grid_w`` patches (``image_grid_thw``) becomes one run
of ``grid_t * grid_h * grid_w / merge_size**2`` ``<|image_pad|>`` placeholders between
``<|vision_start|>`` and ``<|vision_end|>``, so every image (and every sample) has its own count; a video
(``video_grid_thw``, ``temporal_patch_size`` frames per temporal patch) is one run of ``<|video_pad|>``
placeholders. The image and video placeholders are routable; the start/end markers and the text are not.

Positions (M-RoPE): the model computes [3, B, T] (temporal, height, width) position ids from the prompt and
the grids (``get_rope_index``; decoding steps add the stored ``rope_deltas``), and its rotary embedding
folds the three axes into one (cos, sin) pair per token ([B, T, head_dim]) before the layers see it. A MoD
layer with ``positions="original"`` gathers the kept tokens' own (cos, sin), so each keeps its 3-D
position exactly. ``positions="renumber"`` is refused: renumbering the kept tokens 0..k-1 through the
rotary embedding gives every axis the same 1-D index, which erases the (h, w) grid of the image tokens
that stay and is not what the model was trained on (no faithful 3-D renumbering is defined).

Groups (``selection="group"``): one per image (a run of placeholders) and one per frame of a video, a
frame being one temporal patch (``temporal_patch_size`` input frames): a video is one run of
``grid_t`` frames of ``grid_h * grid_w / merge_size**2`` placeholders each, sized from the call's
``video_grid_thw`` (without it, e.g. from `routing_context` called bare, the whole video is one group).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PretrainedConfig

from .base import Adapter, register


def video_frame_sizes(config: PretrainedConfig, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """Placeholders per temporal patch of each video ([videos]) from ``video_grid_thw`` [videos, 3]."""
    grid = inputs.get("video_grid_thw")
    if grid is None:
        return None
    merge = config.vision_config.spatial_merge_size
    return grid[:, 1] * grid[:, 2] // merge**2

RENUMBER_REFUSED = (
    "M-RoPE gives each token (temporal, height, width) positions computed by the model from the image grids; "
    "renumbering the kept tokens 0..k-1 would give all three axes one 1-D index and erase the image grid"
)
# what the Qwen VL families share (Qwen3-VL's adapter reuses it)
QWEN_VL_FIELDS = dict(
    vision_token_attrs=("image_token_id", "video_token_id"),
    vision_tower_attr="visual",
    renumber_refused=RENUMBER_REFUSED,
)

QWEN2_VL = register(
    Adapter(
        name="Qwen2-VL / Qwen2.5-VL",
        model_types=("qwen2_vl", "qwen2_5_vl"),
        video_token_attr="video_token_id",
        video_frame_sizes=video_frame_sizes,
        **QWEN_VL_FIELDS,
    )
)

"""What a source layout is (a key map plus a config map), the registry of layouts, and the pieces of a
config map the LLaVA-family layouts share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import transformers
from transformers import PretrainedConfig, ProcessorMixin

from ..config import MoDConfig
from .loader import CheckpointError, Rule, Source


@dataclass
class Options:
    """What the user passed: ``--vision-tower DIR``."""

    vision_tower: str | None = None


@dataclass
class Target:
    """What a layout's config map makes of a source checkpoint.

    rules: the key map of the source checkpoint's tensors.
    extra_sources: further tensors (the ``--vision-tower`` directory), after the checkpoint's own.
    derivable: target key -> target key it is copied from when the source lacks it (a tied ``lm_head``).
    zero_if_absent: target key -> why it is zero when the source lacks it.
    mod_config / mod_layers: for a MoD source, its config and the layers it wraps (checked against the
        schedule the config gives).
    notes: what the user should know about the import (printed and kept in ``import_report.json``).
    """

    config: PretrainedConfig
    model_class: type
    processor: ProcessorMixin
    rules: list[Rule]
    extra_sources: list[Source] = field(default_factory=list)
    derivable: dict[str, str] = field(default_factory=dict)
    zero_if_absent: dict[str, str] = field(default_factory=dict)
    mod_config: MoDConfig | None = None
    mod_layers: list[int] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """A source layout: the `architectures` and `model_type` values of its config.json, and its config map."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    prepare: Callable[[str, dict[str, Any], Source, Options], Target]


_LAYOUTS: list[Layout] = []
# layouts we know and refuse, with the reason (model_type -> message)
REFUSED = {
    "mod_llava_llama": "gamma-MoD's LLaVA-HR checkpoints use LLaVA-HR's mixed-resolution tower (CLIP-ViT + "
    "ConvNeXt with its adapters), which transformers has no class for",
    "mod_mgm": "gamma-MoD's Mini-Gemini checkpoints use Mini-Gemini's dual tower (CLIP-ViT + ConvNeXt "
    "with patch-info mining), which transformers has no class for",
}


def register(layout: Layout) -> Layout:
    taken = {name for other in _LAYOUTS for name in (*other.architectures, *other.model_types)}
    clash = taken & {*layout.architectures, *layout.model_types}
    if clash:
        raise ValueError(f"{sorted(clash)} already have an importer")
    _LAYOUTS.append(layout)
    return layout


def detect(raw: dict[str, Any], path: str) -> Layout:
    """The layout of a checkpoint from its config.json: its `architectures` first (released LLaVA-1.5
    configs say ``model_type: "llava"``, as transformers' own LLaVA does), then its `model_type`."""
    model_type, architectures = raw.get("model_type"), raw.get("architectures") or []
    if model_type in REFUSED:
        raise CheckpointError(f"{path}: model_type {model_type!r} cannot be imported: {REFUSED[model_type]}")
    for layout in _LAYOUTS:
        if set(architectures) & set(layout.architectures):
            return layout
    if any(hasattr(transformers, name) for name in architectures):
        raise CheckpointError(
            f"{path}: {architectures} is already a transformers layout: load it directly, or retrofit it with "
            "`mllm-mod retrofit`"
        )
    for layout in _LAYOUTS:
        if model_type in layout.model_types:
            return layout
    known = "; ".join(f"{x.name} ({', '.join(x.architectures)})" for x in _LAYOUTS)
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (model_type {model_type!r}, architectures {architectures}); "
        f"importers exist for: {known}"
    )


# -- config-map pieces -----------------------------------------------------------------------------------
# the text-model fields an original config.json carries (it is the text model's config plus mm_* fields)
TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "attention_bias", "attention_dropout", "mlp_bias", "sliding_window", "use_sliding_window",
    "max_window_layers", "bos_token_id", "eos_token_id", "tie_word_embeddings",
)  # fmt: skip
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}


def text_config(raw: dict[str, Any], decoder: str, vocab_size: int, pad_token_id: int | None) -> PretrainedConfig:
    """The transformers text config (Llama, Mistral or Qwen2) of an original config.json."""
    import transformers as tf

    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
    fields = {k: raw[k] for k in TEXT_FIELDS if k in raw}
    if fields.get("rope_scaling") is None:
        fields.pop("rope_scaling", None)
    return classes[decoder](**fields, vocab_size=vocab_size, pad_token_id=pad_token_id)


def require(raw: dict[str, Any], path: str, name: str, allowed: tuple[Any, ...], default: Any = None) -> Any:
    """The value of config field `name`, refused (naming the field and value) unless in `allowed`."""
    value = raw.get(name, default)
    if value not in allowed:
        raise CheckpointError(f"{path}/config.json: {name} = {value!r} is not supported (supported: {list(allowed)})")
    return value


def select_strategy(raw: dict[str, Any], path: str) -> str:
    feature = require(raw, path, "mm_vision_select_feature", tuple(SELECT_STRATEGY), "patch")
    return SELECT_STRATEGY[feature]

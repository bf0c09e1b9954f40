"""Every transformers convention mllm-mod relies on that changed, or may change, between releases.

One place, so that the next rename is one edit here. Each hook is detected from the installed library
(a signature, an attribute), never from a version number, and each is exercised by the default tests on
the locked version and by the drift run on the newest allowed one (README, "Compatibility").

What changed inside the supported range (5.17 .. 5.24):
- the per-layer cache argument: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the old name is a
  deprecated alias until 5.40 on the stock modules: a wrapper that reads only the old name silently gets
  None, as MoD layers did). Model outputs name the field the same way.
- sub-configs of a composite config: ``sub_configs = {name: class}`` in 5.17, ``sub_configs_defaults``
  of ``SubConfigSpec`` in 5.24 (the dict form is gone);
- activation checkpointing: ``TrainingArguments(gradient_checkpointing=...)`` and
  ``model.gradient_checkpointing_enable`` in 5.17; ``activation_checkpointing`` names in 5.24 (the old
  ones deprecated aliases). (Checked at both ends of the range; the release in between that changed each
  was not looked up.)
Conventions that are the same across the range, named here so a change has one home:
- a decoder layer is called with keywords ``attention_mask``, ``position_ids``, ``position_embeddings``
  (``(cos, sin)``, each [B or 1, T, head_dim]) and the cache; its attention takes the same keywords;
- the rotary embedding is called as ``rotary(x, position_ids)`` and returns ``(cos, sin)``; a decoder whose
  layer types have their own RoPE (Gemma 3: local and global bases) takes ``rotary(x, position_ids, layer_type)``
  and hands each layer the (cos, sin) of its type (`rotary_embeddings`);
- a layer-type attention (Gemma 3) names its type in ``self_attn.layer_type`` and its window in
  ``self_attn.sliding_window`` (None on global layers); Mistral-style ones read the window from the config;
- a cache is a `Cache` with one layer object per decoder layer in ``cache.layers``; ``DynamicLayer`` grows
  by concatenation and is the class a MoD layer's compact cache layer replaces; ``StaticLayer`` (of
  ``StaticCache``, ``cache_implementation="static"``) has ``max_cache_len`` and is replaced by the static
  compact cache layer. With a static cache, generate passes each forward a 4-D mask [B, 1, T, max_cache_len]
  (``create_masks_for_generate``) instead of the 2-D padding mask;
- a sliding-window layer's dynamic cache (``DynamicSlidingWindowLayer``, ``is_sliding = True``) keeps the last
  ``window - 1`` tokens after each update, and its mask lets query q attend keys ``kv > q - window``: a MoD
  sliding layer's compact cache drops by the same rule (`cache.MoDCacheLayer.slide`), and `cache.kv_entries`
  reads a stock sliding layer's entries from its K/V length;
- generate compiles its decoding steps on any device when ``CompileConfig._compile_all_devices`` is set
  (transformers' own switch for tests; otherwise only on accelerators).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from transformers import TrainingArguments
from transformers.cache_utils import (
    DynamicLayer,  # noqa: F401  (the cache layer class MoD extends; cache.py and streaming/budget.py import it from here)
    StaticLayer,  # noqa: F401  (the static slot a MoD layer's static compact cache replaces)
)
from transformers.generation import CompileConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

try:  # 5.24 (not in 5.17)
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # 5.17
    SubConfigSpec = None

LEGACY_CACHE_KWARG = "past_key_values"


@functools.cache
def _cache_kwarg_of(forward: Any) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else LEGACY_CACHE_KWARG


def cache_kwarg(module: type | Any = LlamaDecoderLayer) -> str:
    """The keyword under which `module` (a class or an instance; a stock decoder layer or attention) takes its
    KV cache: ``"cache"`` (5.24+) or ``"past_key_values"``."""
    cls = module if isinstance(module, type) else type(module)
    return _cache_kwarg_of(cls.forward)


CACHE_KWARG = cache_kwarg()  # the installed release's name for the model-level cache argument


def pop_cache(kwargs: dict[str, Any], legacy: Any = None) -> Any:
    """Remove the cache from a layer's keyword arguments under either name and return it (or None).

    `legacy`: a value already bound to a ``past_key_values`` parameter. Both names set raises, as stock does."""
    new = kwargs.pop("cache", None)
    old = kwargs.pop(LEGACY_CACHE_KWARG, None) if legacy is None else legacy
    if new is not None and old is not None and new is not old:
        raise ValueError("got both `cache` and `past_key_values`; pass the cache once")
    return new if new is not None else old


def call_cache(arguments: Mapping[str, Any]) -> Any:
    """The cache among a model call's bound arguments (or None), under either name, as a parameter or inside
    the ``**kwargs`` catch-all, whatever the release calls that (``kwargs``; 5.17's Gemma 3: ``lm_kwargs``)."""
    sources = [arguments, *(v for v in arguments.values() if isinstance(v, Mapping))]
    for name in ("cache", LEGACY_CACHE_KWARG):
        for source in sources:
            if source.get(name) is not None:
                return source[name]
    return None


def vision_encoder_layers(tower: Any) -> Any:
    """The encoder layers of a CLIP vision tower: `CLIPVisionModel` (LLaVA's tower in 5.24) wraps them in
    ``vision_model``; the inner `CLIPVisionTransformer` holds them itself."""
    return getattr(tower, "vision_model", tower).encoder.layers


def cache_kwargs(cache: Any, module: type | Any = LlamaDecoderLayer) -> dict[str, Any]:
    """``{name: cache}`` for calling `module` (or a model of this release) with a cache."""
    return {cache_kwarg(module): cache}


@functools.cache
def _takes_layer_type(forward: Any) -> bool:
    return "layer_type" in inspect.signature(forward).parameters


def rotary_embeddings(rotary: Any, x: Any, position_ids: Any, layer_type: str | None = None) -> tuple[Any, Any]:
    """(cos, sin) of `position_ids` from the decoder's rotary embedding: ``rotary(x, position_ids)``, or, where
    the rotary embedding keeps one RoPE per layer type (Gemma 3), the one of `layer_type`."""
    if _takes_layer_type(type(rotary).forward):
        if layer_type is None:
            raise ValueError(f"{type(rotary).__name__} computes RoPE per layer type; the layer named none")
        return rotary(x, position_ids, layer_type)
    return rotary(x, position_ids)


def attention_window(attention: Any) -> int | None:
    """The sliding window of a stock attention module (None: global attention): its own ``sliding_window``
    (Qwen2, Gemma 3: set per layer, None on global layers), else the config's (Mistral)."""
    return getattr(attention, "sliding_window", getattr(attention.config, "sliding_window", None))


def output_cache(output: Any) -> Any:
    """The cache a model returned (``output.cache`` from 5.24, ``output.past_key_values`` before), or None."""
    for name in ("cache", LEGACY_CACHE_KWARG):
        if name in getattr(type(output), "__dataclass_fields__", {}):
            return getattr(output, name)
    return None


def output_fields(cache: Any) -> dict[str, Any]:
    """``{field: cache}`` to build a model output class of this release."""
    return {CACHE_KWARG: cache}


def decode_compile_config(all_devices: bool = False, **options: Any) -> CompileConfig:
    """A `CompileConfig` for ``generate(..., compile_config=...)``: `options` as `torch.compile` takes them;
    `all_devices` also compiles on the CPU (generate otherwise compiles only on accelerators)."""
    config = CompileConfig(**options)
    if all_devices:
        config._compile_all_devices = True
    return config


# -- configs ---------------------------------------------------------------------------------------------
def sub_config_declaration(**model_types: str) -> dict[str, Any]:
    """Class attributes declaring a composite config's sub-configs (name -> default ``model_type``), each
    loaded through `AutoConfig`: ``sub_configs_defaults`` of `SubConfigSpec` where it exists, else ``sub_configs``.
    The config's ``__post_init__`` still turns dicts into configs itself (`resolve_sub_config`), which both
    conventions accept."""
    from transformers import AutoConfig

    if SubConfigSpec is not None:
        return {
            "sub_configs_defaults": {
                name: SubConfigSpec(config_class=AutoConfig, model_type=mt) for name, mt in model_types.items()
            }
        }
    return {"sub_configs": {name: AutoConfig for name in model_types}}


def resolve_sub_config(value: Any, default_model_type: str) -> Any:
    """A sub-config given as a dict (or None) as a config object of its ``model_type``."""
    from transformers import CONFIG_MAPPING

    if value is None:
        return CONFIG_MAPPING[default_model_type]()
    if isinstance(value, dict):
        data = dict(value)
        model_type = data.pop("model_type", default_model_type)
        return CONFIG_MAPPING[model_type](**data)
    return value


# -- training --------------------------------------------------------------------------------------------
_TRAINING_FIELDS = {f for f in inspect.signature(TrainingArguments.__init__).parameters}
CHECKPOINTING_ARG = "activation_checkpointing" if "activation_checkpointing" in _TRAINING_FIELDS else "gradient_checkpointing"


def checkpointing_arguments(enabled: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """`TrainingArguments` fields that switch activation (gradient) checkpointing, in this release's names."""
    out: dict[str, Any] = {CHECKPOINTING_ARG: enabled}
    if kwargs is not None:
        out[f"{CHECKPOINTING_ARG}_kwargs"] = kwargs
    return out


def enable_checkpointing(model: Any, kwargs: dict[str, Any] | None = None) -> None:
    """Activation checkpointing on a `PreTrainedModel`, through this release's method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model: Any) -> None:
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()

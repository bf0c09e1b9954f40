"""The released p-MoD checkpoints (`PmodLlavaLlamaForCausalLM`, ``model_type: pmod_llava_llama``):
the original LLaVA layout (see `llava.py`) with MoD layers wrapped around the stock ones.

Key map, before LLaVA's:
    model.layers.{i}.decoder_layer.*       -> model.language_model.layers.{i}.*  (the wrapped stock layer)
    model.layers.{i}.router.router.weight  -> router of MoD layer i ([1, hidden], float32)
    model.layers.{i}.router.router.bias    -> its bias ([1]; zero where mod_bias_enabled is false)

Config map (p-MoD's ``mod_*`` fields onto `MoDConfig`; any other value is refused, naming the field):
    mod_target_layers "shiftedcos_decay_{max}_{min}" -> schedule "prd", prd_threshold max, prd_min_ratio min
        (p-MoD computes ``cos(i * pi / 31) / 2 + mod_router_factor``: our PRD curve when the factor is 0.5
        and the decoder has 32 layers); "interleave" -> schedule "interleave" from layer 1, ratio = factor;
        "deep_all" -> layers 2 .. L-2, "deep_all_include_last" -> layers 2 .. L-1, ratio = factor
    mod_target_token_type "vision_all" -> candidates "vision"; "all" -> candidates "all"
    mod_weight_norm "tanh_{a}_1" -> norm "tanh", tanh_alpha a; "sigmoid_1_0" -> norm "sigmoid"
    mod_bias_enabled, mod_special_init: booleans (the second only chose the initialisation)
The router reads the layer input; weighting STRing; top-k of trunc(n * ratio); original positions.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import MoDConfig
from ..schedule import mod_layers
from .layout import Layout, Options, Target, register
from .llava import INV_FREQ
from .llava import prepare as prepare_llava
from .loader import MOD_PREFIX, CheckpointError, Rule, Source

WRAPPED = re.compile(r"model\.layers\.(\d+)\.decoder_layer\.")
KNOWN_FIELDS = (
    "mod_target_layers", "mod_target_token_type", "mod_router_factor", "mod_weight_norm",
    "mod_bias_enabled", "mod_special_init", "mod_target_layer_indices",
)  # fmt: skip
PMOD_RULES = [
    Rule(r"model\.layers\.(\d+)\.decoder_layer\.(.*)", r"model.language_model.layers.\1.\2"),
    Rule(r"model\.layers\.(\d+)\.router\.router\.(weight|bias)", MOD_PREFIX + r"layers.\1.router.proj.\2"),
]


def mod_config(raw: dict[str, Any], path: str) -> MoDConfig:
    """p-MoD's ``mod_*`` fields as a `MoDConfig`; a value we do not understand is refused."""
    where = f"{path}/config.json"
    unknown = sorted(k for k in raw if k.startswith("mod_") and k not in KNOWN_FIELDS)
    if unknown:
        raise CheckpointError(f"{where}: unknown p-MoD field(s) {unknown}; refusing to guess what they do")
    layers = raw.get("num_hidden_layers")
    factor = raw.get("mod_router_factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor <= 1.0:
        raise CheckpointError(f"{where}: mod_router_factor = {factor!r} is not a ratio in (0, 1]")
    fields: dict[str, Any] = dict(preset="pmod", router="linear", router_input="hidden", weighting="string")
    fields.update(_schedule(raw.get("mod_target_layers"), float(factor), layers, where))
    fields.update(_candidates(raw.get("mod_target_token_type"), where))
    fields.update(_norm(raw.get("mod_weight_norm"), where))
    for name in ("mod_bias_enabled", "mod_special_init"):
        if not isinstance(raw.get(name), bool):
            raise CheckpointError(f"{where}: {name} = {raw.get(name)!r} is not a boolean")
    return MoDConfig(**fields)


def _schedule(value: Any, factor: float, layers: int, where: str) -> dict[str, Any]:
    match = re.fullmatch(r"(\w+?)_decay_(\d+\.\d+)_(\d+\.\d+)", value) if isinstance(value, str) else None
    if match:
        decay, high, low = match.group(1), float(match.group(2)), float(match.group(3))
        if decay != "shiftedcos":
            raise CheckpointError(f"{where}: mod_target_layers = {value!r}: decay {decay!r} is not supported (shiftedcos)")
        if not math.isclose(factor, 0.5):
            raise CheckpointError(
                f"{where}: mod_router_factor = {factor} with mod_target_layers = {value!r}: p-MoD's curve is then "
                f"cos(i*pi/31)/2 + {factor}; only 0.5 (the PRD curve) is supported"
            )
        if layers != 32:
            raise CheckpointError(
                f"{where}: num_hidden_layers = {layers} with mod_target_layers = {value!r}: p-MoD hard-codes pi/31 "
                "(32 layers) in its curve, mllm-mod's PRD spans the actual depth; only 32 layers import faithfully"
            )
        return dict(schedule="prd", prd_threshold=high, prd_min_ratio=low)
    if value == "interleave":
        return dict(schedule="interleave", interleave_start=1, ratio=factor)
    if value == "deep_all":
        return dict(schedule="constant", layers=list(range(2, layers - 1)), ratio=factor)
    if value == "deep_all_include_last":
        return dict(schedule="deep", deep_start=2, ratio=factor)
    raise CheckpointError(f"{where}: mod_target_layers = {value!r} is not a p-MoD schedule this importer knows")


def _candidates(value: Any, where: str) -> dict[str, Any]:
    table = {"vision_all": "vision", "all": "all"}
    if value not in table:
        raise CheckpointError(
            f"{where}: mod_target_token_type = {value!r} is not supported (vision_all, all; 'vision_hr' routes only "
            "the high-resolution tiles, which MoDConfig cannot express)"
        )
    return dict(candidates=table[value])


def _norm(value: Any, where: str) -> dict[str, Any]:
    match = re.fullmatch(r"(\w+?)_(\d+\.\d+|\d+)_(-?\d+\.\d+|-?\d+)", value) if isinstance(value, str) else None
    if match:
        kind, scale, bias = match.group(1), float(match.group(2)), float(match.group(3))
        if kind == "tanh" and bias == 1.0 and 0.0 < scale < 1.0:
            return dict(norm="tanh", tanh_alpha=scale)
        if kind == "sigmoid" and scale == 1.0 and bias == 0.0:
            return dict(norm="sigmoid")
    raise CheckpointError(
        f"{where}: mod_weight_norm = {value!r} is not supported ('tanh_<a>_1' with 0 < a < 1, 'sigmoid_1_0')"
    )


def prepare(src: str, raw: dict[str, Any], source: Source, options: Options) -> Target:
    config = mod_config(raw, src)  # refuse a bad mod_* value before anything else is read
    target = prepare_llava(src, raw, source, options)
    num_layers = int(raw["num_hidden_layers"])
    wrapped = sorted({int(m.group(1)) for key in source.tensors if (m := WRAPPED.match(key))})
    expected = sorted(mod_layers(config, num_layers))
    if wrapped != expected:
        raise CheckpointError(
            f"{src}: the checkpoint wraps layers {wrapped}, its mod_target_layers = {raw['mod_target_layers']!r} "
            f"gives {expected}"
        )
    listed = raw.get("mod_target_layer_indices")
    if listed is not None and sorted(listed) != expected:
        raise CheckpointError(f"{src}/config.json: mod_target_layer_indices = {listed} disagrees with {expected}")
    target.rules = [INV_FREQ, *PMOD_RULES, *target.rules]
    target.mod_config, target.mod_layers = config, wrapped
    if not raw["mod_bias_enabled"]:
        target.zero_if_absent = {f"{MOD_PREFIX}layers.{i}.router.proj.bias": "mod_bias_enabled is false" for i in wrapped}
    target.notes.append(
        f"p-MoD: {len(wrapped)} MoD layers ({wrapped[0]}..{wrapped[-1]}); routers in float32 (p-MoD ran them in "
        "the model dtype, so under bf16 near-ties may select differently)"
    )
    return target


PMOD = register(
    Layout(
        "p-MoD (LLaVA)", architectures=("PmodLlavaLlamaForCausalLM",), model_types=("pmod_llava_llama",), prepare=prepare
    )
)

"""Budgets at a given prefill cost: each zoo method's budget whose TFLOPs (the `flops.prefill_cost`
accounting that `mllm_mod.efficiency` checks) come closest to a target's, e.g. p-MoD's, for the fidelity
study's equal-TFLOPs arms. The search keeps the paper's other settings: PyramidDrop varies lambda at its
boundaries, VTW varies K, DivPrune varies the retained fraction, DART its reduction ratio at K = 2, VisionZip
its tokens per image at the paper's dominant : contextual split (54 : 10 of 64, 5/32 contextual)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .dart import DARTSpec
from .divprune import DivPruneSpec
from .pdrop import PDropSpec
from .visionzip import VisionZipSpec
from .vtw import VTWSpec


def spec_cost(shape, spec: Any, n_text: int, n_vision: int) -> int:
    """Decoder FLOPs of one sample under `spec` (MoD layers from the first stage on pay their router)."""
    from ...flops import prefill_cost

    layers = shape.layers
    kept = spec.kept_vision(layers, n_vision)
    first = spec.stages(layers)[0].start
    routed = [i >= first for i in range(layers)]
    tokens = [n_text + k for k in kept]
    return prefill_cost(shape, [1.0] * layers, n_text, n_vision, mod_layers=routed, tokens_per_layer=tokens).decoder_flops


def candidates(method: str, num_layers: int, n_vision: int, base: Any = None) -> list[Any]:
    """The specs the search compares: lambda in 0.01 .. 0.99 (step 0.01) at `base`'s boundaries, every K,
    every retained count k / n, DART's reduction ratio in 0 .. 0.99."""
    if method == "pdrop":
        layer_list = base.layer_list if base is not None else None
        return [PDropSpec(layer_list, round(0.01 * i, 2)) for i in range(1, 100)]
    if method == "vtw":
        return [VTWSpec(k) for k in range(1, num_layers)]
    if method == "divprune":
        return [DivPruneSpec(k / n_vision) for k in range(1, n_vision + 1)]
    if method == "dart":
        return [DARTSpec(reduction_ratio=round(0.01 * i, 2)) for i in range(100)]
    if method == "visionzip":  # k tokens per image, contextual = round(k * 10 / 64) as the paper's 54+10, 108+20, 162+30
        split = [(k - round(k * 10 / 64), round(k * 10 / 64)) for k in range(1, n_vision + 1)]
        return [VisionZipSpec(d, c) for d, c in split if d >= 1]
    raise ValueError(f"no budget search for {method!r}")


def matched_spec(method: str, shape, n_text: float, n_vision: int, target_ratios: Sequence[float], base: Any = None):
    """The spec of `method` whose prefill cost is closest to the cost at `target_ratios` (per-layer keep
    ratios, e.g. p-MoD's PRD schedule) for a sample of `n_text` text and `n_vision` vision tokens."""
    from ...flops import prefill_cost

    text = round(n_text)
    target = prefill_cost(shape, list(target_ratios), text, n_vision).decoder_flops
    options = candidates(method, shape.layers, n_vision, base)
    return min(options, key=lambda spec: abs(spec_cost(shape, spec, text, n_vision) - target))

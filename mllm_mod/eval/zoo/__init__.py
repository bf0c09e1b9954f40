"""The training-free zoo on the MoD core, beside FastV and random drop (`mllm_mod.eval.baselines`).

One module per method, all on the staged decision of `staged` (the same gather, compact KV cache and
`mllm_mod.efficiency` accounting as FastV and the trained MoD recipes):

- ``pdrop`` (`pdrop`): PyramidDrop -- stages at ``layer_list`` (paper: 8, 16, 24 of 32), each keeping the
  fraction ``lam`` (lambda, 0.5) of the image tokens still present, ranked by the last instruction token.
- ``vtw`` (`vtw`): Visual Token Withdrawal -- every vision token removed from layer ``withdraw_layer`` (K)
  on; `vtw.calibrate_k` chooses K by the KL divergence of the output on a calibration set.
- ``divprune`` (`divprune`): DivPrune -- a greedy max-min diverse subset (``subset_ratio`` retained, 0.098)
  of the projected vision tokens, before the LLM: every layer sees the shorter sequence.
- ``visionzip`` (`visionzip`): VisionZip -- in the vision encoder, ``dominant`` tokens (CLS + the patches CLS
  attends to most; 54) and ``contextual`` tokens merged from the rest (10); the LLM sees the shorter sequence
  (LLaVA-1.5 and LLaVA-NeXT, each anyres crop zipped on its own; other families refused with the reason).
- ``dart`` (`dart`): DART -- pivots by the key norm of layer K-1 (``pruned_layer`` 2; ``pivot_image_token``
  4, ``pivot_text_token`` 4), each claiming the image tokens least similar to it; ``reduction_ratio`` 0.778.

``apply_zoo(model, "pdrop", lam=0.5)`` or with a spec; ``mllm_mod.unload`` undoes any of them. `matching`
finds each method's budget at a given prefill cost (the study's equal-TFLOPs arms). docs/BASELINES.md has
the table of methods, budgets and what is tested.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .dart import DARTSpec, apply_dart
from .divprune import DivPruneSpec, apply_divprune
from .pdrop import PDropSpec, apply_pdrop
from .visionzip import VisionZipSpec, apply_visionzip
from .vtw import VTWSpec, apply_vtw, calibrate_k

ZOO = ("pdrop", "vtw", "divprune", "dart", "visionzip")
SPECS = {"pdrop": PDropSpec, "vtw": VTWSpec, "divprune": DivPruneSpec, "dart": DARTSpec, "visionzip": VisionZipSpec}
APPLY = {"pdrop": apply_pdrop, "vtw": apply_vtw, "divprune": apply_divprune, "dart": apply_dart, "visionzip": apply_visionzip}
FIELDS = {
    "pdrop": ("layer_list", "lam"),
    "vtw": ("withdraw_layer",),
    "divprune": ("subset_ratio",),
    "dart": ("pruned_layer", "reduction_ratio", "pivot_image_token", "pivot_text_token"),
    "visionzip": ("dominant", "contextual"),
}
INTEGER_FIELDS = ("withdraw_layer", "pruned_layer", "pivot_image_token", "pivot_text_token", "dominant", "contextual")
ZOO_ARGS = tuple(dict.fromkeys(name for names in FIELDS.values() for name in names))  # every budget model arg
ZooSpec = PDropSpec | VTWSpec | DivPruneSpec | DARTSpec | VisionZipSpec


def parse_field(name: str, value: Any) -> Any:
    """A budget field from a model-arg value (strings from ``--model_args`` or the command line)."""
    if name == "layer_list":
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").replace(" ", "").replace(";", ",").split(",") if v]
        return tuple(int(v) for v in value)
    if name in INTEGER_FIELDS:
        return int(value)
    return float(value)


def zoo_spec(method: str, **fields: Any) -> ZooSpec:
    """The spec of `method` (one of `ZOO`) from its budget fields; None values take the paper's defaults;
    a field of another method is refused."""
    if method not in SPECS:
        raise ValueError(f"unknown training-free method {method!r}; choose from {ZOO}")
    given = {k: v for k, v in fields.items() if v is not None and v != ""}
    wrong = sorted(set(given) - set(FIELDS[method]))
    if wrong:
        raise TypeError(f"{method}: {wrong} are not its budget fields; it takes {list(FIELDS[method])}")
    return SPECS[method](**{k: parse_field(k, v) for k, v in given.items()})


def is_zoo_spec(spec: Any) -> bool:
    return isinstance(spec, tuple(SPECS.values()))


def apply_zoo(model: nn.Module, spec: ZooSpec | str, **fields: Any) -> nn.Module:
    """Turn a stock model into a zoo method in place; ``mllm_mod.unload`` undoes it."""
    spec = zoo_spec(spec, **fields) if isinstance(spec, str) else spec
    return APPLY[spec.method](model, spec)


def budget_label(method: str, model_args: dict[str, Any]) -> str | None:
    """``pdrop (layer_list=8,16,24, lam=0.5)`` from a variant's model args: its budget as the paper names it
    (None for a variant that is not a zoo method)."""
    if method not in SPECS:
        return None
    spec = zoo_spec(method, **{k: model_args.get(k) for k in FIELDS[method]})
    return f"{method} ({spec.label()})"


__all__ = [
    "FIELDS",
    "ZOO",
    "ZOO_ARGS",
    "DARTSpec",
    "DivPruneSpec",
    "PDropSpec",
    "VTWSpec",
    "VisionZipSpec",
    "apply_dart",
    "apply_divprune",
    "apply_pdrop",
    "apply_visionzip",
    "apply_vtw",
    "apply_zoo",
    "budget_label",
    "calibrate_k",
    "is_zoo_spec",
    "zoo_spec",
]  # fmt: skip

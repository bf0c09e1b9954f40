"""`MoDConfig`: everything that decides how a model is retrofitted, saved as `mod_config.json`.

A config is plain data. Presets (`pmod`, `videomod`) are named configs; any field can be overridden.
Validation happens here, once, before a model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "mod_config.json"

SCHEDULES = ("prd", "constant", "interleave", "deep")
ROUTERS = ("linear", "shared")
ROUTER_INPUTS = ("hidden", "normed")
NORMS = ("tanh", "sigmoid", "softmax", "none")
WEIGHTINGS = ("string", "output", "mod", "mlp")
SELECTIONS = ("topk", "group")
CANDIDATES = ("vision", "vision_and_prefix", "all", "leading")
INFERENCE = ("topk", "threshold")
POSITIONS = ("original", "renumber")
ROUTER_INITS = ("zeros", "default")
LOSS_TOKENS = ("competing", "all")


@dataclass
class MoDConfig:
    """How vision tokens are routed around decoder layers.

    Schedule (which layers are MoD, and each one's keep ratio):
        schedule: "prd" (p-MoD shifted-cosine decay), "constant" (``ratio`` on ``layers``, or on every
            layer but ``skip_layers``), "interleave" (``ratio`` on every other layer starting at
            ``interleave_start``), "deep" (``ratio`` on layers ``deep_start`` .. L-1).
    Router and scores:
        router: "linear" (one ``Linear(hidden, 1)`` per layer, float32) or "shared" (one
            ``Linear(hidden, 2, bias=False)`` for all MoD layers, gamma-MoD).
        router_init: "zeros" (w = 1 under TanhNorm, p = 0.5 under sigmoid/softmax: the retrofit starts as
            the dense model under STRing) or "default" (PyTorch's Linear init, gamma-MoD's reference).
        router_input: "hidden" (the layer input) or "normed" (the layer's input-norm output).
        norm: how router logits become token weights ``w``: "tanh" (TanhNorm ``alpha*tanh(z)+1``),
            "sigmoid", "softmax" (``p = softmax(logits)[..., 1]``, 2-way routers), "none" (``w = 1``).
    Weighting rule (what a routed token's output is):
        "string": kept ``x + attn + w * mlp``, skipped ``w * x`` (p-MoD);
        "mlp": kept ``x + attn + w * mlp``, skipped ``x`` (gamma-MoD);
        "output": kept ``w * block(x)``, skipped ``x`` (VideoLLM-MoD reference code);
        "mod": kept ``x + w * (block(x) - x)``, skipped ``x`` (the original MoD rule).
    Selection:
        selection: "topk" (per sample, ``trunc(n_candidates * ratio)`` in float32) or "group" (per
            group such as a video frame, ``ceil(ratio * group_size)``).
        candidates: which tokens compete: "vision"; "vision_and_prefix" (vision tokens and the
            prompt before the first one: gamma-MoD's masked routing, question/answer always kept);
            "all" (every real token); "leading" (gamma-MoD's reference code: the first ``leading_tokens``
            real tokens of a row compete, whatever they are, in rows longer than that; the top
            ``ceil(ratio * leading_tokens)`` of them are kept; shorter rows are not routed).
        leading_tokens: the "leading" rule's count (the reference hard-codes 1024 + 35 = 1059: LLaVA-HR's
            1,024 image tokens and a 35-token system prompt).
        inference_candidates: which tokens compete at eval time (None: ``candidates``); gamma-MoD's
            reference routes every token at inference ("all") after training with masked routing.
        inference: at eval time keep the top-k ("topk") or every candidate whose weight is above
            ``threshold`` ("threshold": prefill tokens with ``w > threshold``); training always uses the top-k.
        decode_skip: a generated token skips a MoD layer when its weight is below ``decode_threshold``.
        decode_threshold: a generated token goes through a MoD layer iff ``w >= decode_threshold`` (None:
            ``threshold``); gamma-MoD's reference: prefill 0.005, decoding 0.5.
        weight_all: the weighting rule applies to every token that goes through the layer (gamma-MoD's
            reference scales the MLP branch of forced-keep text too), not only to competing tokens.
        positions: "original" (kept tokens keep their sequence positions, p-MoD) or "renumber"
            (kept tokens are renumbered 0..k-1 within the layer, gamma-MoD reference).
        routing_loss_weight: weight of the 2-way cross-entropy between router logits and the top-k
            decision (shared router only), summed over MoD layers.
        routing_loss_tokens: which tokens the cross-entropy averages over: "competing" or "all" (every
            position of the batch, forced-keep and padding tokens with target 1: gamma-MoD's reference).
    """

    preset: str | None = None
    schedule: str = "prd"
    ratio: float = 0.5
    layers: list[int] | None = None
    skip_layers: list[int] | None = None
    prd_threshold: float = 0.85
    prd_min_ratio: float = 0.15
    interleave_start: int = 1
    deep_start: int | None = None
    router: str = "linear"
    router_init: str = "zeros"
    router_input: str = "hidden"
    norm: str = "tanh"
    tanh_alpha: float = 0.2
    weighting: str = "string"
    selection: str = "topk"
    candidates: str = "vision"
    inference_candidates: str | None = None
    leading_tokens: int = 1059
    inference: str = "topk"
    threshold: float = 0.5
    decode_skip: bool = False
    decode_threshold: float | None = None
    weight_all: bool = False
    positions: str = "original"
    routing_loss_weight: float = 0.0
    routing_loss_tokens: str = "competing"
    # Filled in by `retrofit`/`save_mod`: what the adapter was made for, and with which library versions.
    base_model: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def decode_keep_threshold(self) -> float:
        return self.threshold if self.decode_threshold is None else self.decode_threshold

    def validate(self) -> None:
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("router", self.router, ROUTERS)
        _check_choice("router_input", self.router_input, ROUTER_INPUTS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("candidates", self.candidates, CANDIDATES)
        _check_choice("inference", self.inference, INFERENCE)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("router_init", self.router_init, ROUTER_INITS)
        _check_choice("routing_loss_tokens", self.routing_loss_tokens, LOSS_TOKENS)
        if self.inference_candidates is not None:
            _check_choice("inference_candidates", self.inference_candidates, CANDIDATES)
        if not isinstance(self.leading_tokens, int) or self.leading_tokens < 1:
            raise ValueError(f"leading_tokens must be a positive integer, got {self.leading_tokens!r}")
        if (self.norm == "softmax") != (self.router == "shared"):
            raise ValueError("norm='softmax' goes with the 2-way router='shared' (and only with it)")
        for name in ("threshold", "decode_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0 and self.norm in ("sigmoid", "softmax"):
                raise ValueError(f"{name} must be in [0, 1] for {self.norm} weights, got {value}")
        if self.routing_loss_weight < 0 or (self.routing_loss_weight > 0 and self.router != "shared"):
            raise ValueError("routing_loss_weight must be >= 0, and > 0 only with router='shared'")
        if self.weight_all and self.weighting == "mod":
            raise ValueError("weight_all applies a weighting rule to every token that goes through: use string, mlp or output")
        if self.decode_skip and (self.inference_candidates or self.candidates) == "vision":
            raise ValueError("decode_skip routes generated (text) tokens: use candidates='all' or 'vision_and_prefix'")
        check_ratio(self.ratio, "ratio")
        check_ratio(self.prd_min_ratio, "prd_min_ratio")
        if not 0.0 < self.prd_threshold <= 1.0:
            raise ValueError(f"prd_threshold must be in (0, 1], got {self.prd_threshold}")
        if self.tanh_alpha <= 0.0 or self.tanh_alpha >= 1.0:
            raise ValueError(f"tanh_alpha must be in (0, 1) so that weights stay positive, got {self.tanh_alpha}")
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative layer indices, got {self.layers}")
        if self.layers is not None and self.skip_layers is not None:
            raise ValueError("give either layers (the MoD layers) or skip_layers (the dense ones), not both")

    @classmethod
    def check_fields(cls, keys: Iterable[str]) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(keys) - names
        if unknown:
            raise ValueError(f"unknown MoDConfig fields {sorted(unknown)}; known: {sorted(names)}")

    def replace(self, **overrides: Any) -> MoDConfig:
        self.check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoDConfig:
        cls.check_fields(data)
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MoDConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: not an mllm-mod adapter directory")
        with open(path) as f:
            return cls.from_dict(json.load(f))


PRESETS: dict[str, dict[str, Any]] = {
    # p-MoD: PRD schedule, zero-init linear router, TanhNorm, STRing.
    "pmod": dict(schedule="prd", router="linear", norm="tanh", weighting="string", selection="topk"),
    # VideoLLM-MoD: every other layer at r = 0.2, sigmoid router, output scaled, top-k within each frame.
    "videomod": dict(
        schedule="interleave", ratio=0.2, router="linear", norm="sigmoid", weighting="output", selection="group"
    ),
    # gamma-MoD, as its reference code (Gamma-MOD llava_llama_mod.py; docs/DESIGN.md lists the differences):
    # ARank-chosen layers (the reference hard-codes all but 0, 1, 2 and the last) at r = 0.5; one shared
    # 2-way router on the normed input with PyTorch's init; training: masked routing (image + system prompt
    # compete, question/answer forced to keep), top-k, the MLP branch of every token that goes through scaled
    # by p, routing cross-entropy over every position x 0.01; inference: every token competes, prefill keeps
    # p > 0.005, a generated token goes through iff p >= 0.5; kept tokens renumbered 0..k-1.
    "gmod": dict(
        schedule="constant",
        ratio=0.5,
        skip_layers=[0, 1, 2, -1],
        router="shared",
        router_init="default",
        router_input="normed",
        norm="softmax",
        weighting="mlp",
        weight_all=True,
        candidates="vision_and_prefix",
        inference_candidates="all",
        inference="threshold",
        threshold=0.005,
        decode_skip=True,
        decode_threshold=0.5,
        positions="renumber",
        routing_loss_weight=0.01,
        routing_loss_tokens="all",
    ),
}


def preset(name: str, **overrides: Any) -> MoDConfig:
    """The named recipe as a `MoDConfig`, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    return MoDConfig.from_dict({"preset": name, **PRESETS[name], **overrides})


def as_config(config: MoDConfig | str | dict[str, Any], **overrides: Any) -> MoDConfig:
    if isinstance(config, MoDConfig):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, str):
        return preset(config, **overrides)
    if isinstance(config, dict):
        return MoDConfig.from_dict({**config, **overrides})
    raise TypeError(f"expected a MoDConfig, a preset name or a dict, got {type(config).__name__}")


def check_ratio(value: float, name: str = "ratio") -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")

"""`MoDConfig`: everything that decides how a model is retrofitted, saved as `mod_config.json`.

A config is plain data. Presets (`pmod`, `videomod`) are named configs; any field can be overridden.
Validation happens here, once, before a model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "mod_config.json"

SCHEDULES = ("prd", "constant", "interleave", "deep")
ROUTERS = ("linear", "sigmoid")
NORMS = ("tanh", "sigmoid", "none")
WEIGHTINGS = ("string", "output", "mod")
SELECTIONS = ("topk", "group")
POSITIONS = ("original",)


@dataclass
class MoDConfig:
    """How vision tokens are routed around decoder layers.

    Schedule (which layers are MoD, and each one's keep ratio):
        schedule: "prd" (p-MoD shifted-cosine decay), "constant" (``ratio`` on ``layers``, or on every
            layer), "interleave" (``ratio`` on every other layer starting at ``interleave_start``),
            "deep" (``ratio`` on layers ``deep_start`` .. L-1).
    Router and scores:
        router: "linear" (``Linear(hidden, 1)``, zero-initialised, float32) or "sigmoid" (the same
            linear layer read through a sigmoid, VideoLLM-MoD).
        norm: how router logits become token weights ``w``: "tanh" (TanhNorm ``alpha*tanh(z)+1``),
            "sigmoid", or "none" (``w = 1``, the logits only rank).
    Weighting rule (what a routed token's output is):
        "string": kept ``x + attn + w * mlp``, skipped ``w * x`` (p-MoD);
        "output": kept ``w * block(x)``, skipped ``x`` (VideoLLM-MoD reference code);
        "mod": kept ``x + w * (block(x) - x)``, skipped ``x`` (the original MoD rule).
    Selection:
        "topk": per sample, ``trunc(n_candidates * ratio)`` in float32;
        "group": per group (a video frame), ``ceil(ratio * group_size)``.
    """

    preset: str | None = None
    schedule: str = "prd"
    ratio: float = 0.5
    layers: list[int] | None = None
    prd_threshold: float = 0.85
    prd_min_ratio: float = 0.15
    interleave_start: int = 1
    deep_start: int | None = None
    router: str = "linear"
    norm: str = "tanh"
    tanh_alpha: float = 0.2
    weighting: str = "string"
    selection: str = "topk"
    positions: str = "original"
    # Filled in by `retrofit`/`save_mod`: what the adapter was made for, and with which library versions.
    base_model: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("router", self.router, ROUTERS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("positions", self.positions, POSITIONS)
        check_ratio(self.ratio, "ratio")
        check_ratio(self.prd_min_ratio, "prd_min_ratio")
        if not 0.0 < self.prd_threshold <= 1.0:
            raise ValueError(f"prd_threshold must be in (0, 1], got {self.prd_threshold}")
        if self.tanh_alpha <= 0.0 or self.tanh_alpha >= 1.0:
            raise ValueError(f"tanh_alpha must be in (0, 1) so that weights stay positive, got {self.tanh_alpha}")
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative layer indices, got {self.layers}")

    def replace(self, **overrides: Any) -> MoDConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown MoDConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoDConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown MoDConfig fields {sorted(unknown)}; known: {sorted(names)}")
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
        schedule="interleave", ratio=0.2, router="sigmoid", norm="sigmoid", weighting="output", selection="group"
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

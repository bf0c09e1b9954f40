"""Which decoder layers are MoD, and each layer's keep ratio (1.0 marks a dense layer)."""

from __future__ import annotations

import math

from .config import MoDConfig


def prd_curve(num_layers: int) -> list[float]:
    """p-MoD's shifted cosine ``R(i) = 0.5 * cos(i * pi / (L - 1)) + 0.5``.

    The reference code hard-codes ``pi / 31`` (32 layers); for other depths we use ``L - 1`` so that the
    curve always spans the whole stack, from 1 at the first layer to 0 at the last.
    """
    if num_layers < 2:
        raise ValueError(f"PRD needs at least 2 layers, got {num_layers}")
    return [0.5 * math.cos(i * math.pi / (num_layers - 1)) + 0.5 for i in range(num_layers)]


def mod_layers(config: MoDConfig, num_layers: int) -> dict[int, float]:
    """The MoD layers of a decoder of `num_layers` layers, each with its keep ratio.

    A layer the schedule names is MoD even at ratio 1.0 (it routes, and keeps everything); that is
    what the ratio-1 equivalence tests exercise. Layers not in the result stay the stock layer.
    """
    if config.schedule == "prd":
        curve = prd_curve(num_layers)
        return {i: max(r, config.prd_min_ratio) for i, r in enumerate(curve) if r <= config.prd_threshold}
    if config.schedule == "constant":
        if config.layers is not None:
            chosen = set(config.layers)
        else:
            dense = {i % num_layers for i in (config.skip_layers or []) if -num_layers <= i < num_layers}
            chosen = set(range(num_layers)) - dense
    elif config.schedule == "interleave":
        chosen = set(range(config.interleave_start, num_layers, 2))
    elif config.schedule == "deep":
        start = num_layers // 2 if config.deep_start is None else config.deep_start
        chosen = set(range(start, num_layers))
    else:  # validated in MoDConfig
        raise AssertionError(config.schedule)
    out_of_range = sorted(i for i in chosen if i >= num_layers)
    if out_of_range:
        raise ValueError(f"MoD layers {out_of_range} do not exist in a decoder of {num_layers} layers")
    return {i: config.ratio for i in sorted(chosen)}


def layer_ratios_for(config: MoDConfig, num_layers: int) -> list[float]:
    """Per-layer keep ratio; 1.0 for a dense layer."""
    chosen = mod_layers(config, num_layers)
    return [chosen.get(i, 1.0) for i in range(num_layers)]

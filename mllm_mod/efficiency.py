"""`efficiency(model, batch)`: what MoD did on a real batch, measured, beside the analytic accounting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache import kv_bytes, kv_entries
from .compat import attention_window, output_cache
from .flops import DecoderShape, prefill_cost
from .layer import LayerStats, MoDLayer
from .retrofit import get_state


@dataclass
class EfficiencyReport:
    """Per-sample prefill cost of a batch, dense vs MoD.

    kept_per_layer[l][b]: tokens layer l processed for sample b, measured in the forward (padding
    excluded); kv_entries_per_layer[l][b]: entries the cache holds, measured from the cache tensors
    (padding excluded). `accounting_matches` says both equal what `flops.py` predicts. On a sliding-window
    layer the dense reference is the stock sliding cache (the last ``window - 1`` tokens) and a MoD layer's
    accounted entries are its kept tokens in those positions, counted in the forward from the routing (the
    layer's `LayerStats.cached`), independently of the cache's own trimming.
    """

    layer_ratios: list[float]
    n_text: list[int]
    n_vision: list[int]
    kept_per_layer: list[list[int]]
    kv_entries_per_layer: list[list[int]]
    dense_tflops: list[float]
    mod_tflops: list[float]
    dense_kv_bytes: list[int]
    mod_kv_bytes: list[int]
    allocated_kv_bytes: int
    accounting_matches: bool
    mismatches: list[str] = field(default_factory=list)
    side_flops: list[float] = field(default_factory=list)  # [B] a training-free method's FLOPs outside the decoder

    @property
    def side_tflops(self) -> float:
        """Mean side cost per sample (TFLOPs): what a training-free method computes outside the decoder layers
        to decide (attention rows, distances, the vision-encoder side of VisionZip); 0 for the others."""
        return self.mean(self.side_flops) / 1e12 if self.side_flops else 0.0

    @property
    def tflops_ratio(self) -> float:
        return sum(self.mod_tflops) / sum(self.dense_tflops)

    @property
    def kv_ratio(self) -> float:
        return sum(self.mod_kv_bytes) / sum(self.dense_kv_bytes)

    def mean(self, values: list[float] | list[int]) -> float:
        return sum(values) / len(values)

    def table(self) -> str:
        rows = [
            ("vision tokens / sample", f"{self.mean(self.n_vision):.1f}", "", ""),
            ("text tokens / sample", f"{self.mean(self.n_text):.1f}", "", ""),
            ("prefill TFLOPs / sample", f"{self.mean(self.dense_tflops):.6g}", f"{self.mean(self.mod_tflops):.6g}", f"{self.tflops_ratio:.3f}"),
            ("side TFLOPs / sample (outside the decoder)", "0", f"{self.side_tflops:.6g}", ""),
            ("KV-cache MB / sample", f"{self.mean(self.dense_kv_bytes) / 2**20:.4g}", f"{self.mean(self.mod_kv_bytes) / 2**20:.4g}", f"{self.kv_ratio:.3f}"),
        ]
        out = ["| quantity | dense | MoD | MoD / dense |", "|---|---:|---:|---:|"]
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        out += ["", "| layer | keep ratio | tokens kept (mean) | KV entries (mean) |", "|---:|---:|---:|---:|"]
        for i, r in enumerate(self.layer_ratios):
            kept, kv = self.mean(self.kept_per_layer[i]), self.mean(self.kv_entries_per_layer[i])
            out.append(f"| {i} | {r:.4f} | {kept:.1f} | {kv:.1f} |")
        out.append("")
        out.append("measured = accounting: " + ("yes" if self.accounting_matches else "NO: " + "; ".join(self.mismatches)))
        return "\n".join(out)


def efficiency(model: nn.Module, batch: dict[str, torch.Tensor]) -> EfficiencyReport:
    """Run one prefill of `batch` through the retrofitted `model` and report what it cost."""
    state = get_state(model)
    adapter = state.adapter
    layers = adapter.layers(model)
    shape = DecoderShape.from_config(adapter.text_config(model.config))
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ctx = adapter.routing_context(model, input_ids, None, attention_mask, inputs=batch)
    ctx.stats = []
    from .eval.baselines import drop_decision

    decision = drop_decision(model)  # a training-free method notes its side cost per sample of this forward
    if decision is not None:
        decision.last_side = []
    with torch.no_grad():
        out = model(**batch, mod_routing=ctx, use_cache=True)
    cache = output_cache(out)
    side = list(decision.last_side) if decision is not None and len(decision.last_side) == input_ids.shape[0] else []
    real = attention_mask.bool().cpu()  # [B, T]
    vision = ctx.candidates.cpu() & real if ctx.candidates is not None else torch.zeros_like(real)
    n_vision = vision.sum(1).tolist()
    n_tokens = real.sum(1).tolist()
    n_text = [t - v for t, v in zip(n_tokens, n_vision)]
    stats: dict[int, LayerStats] = {s.layer_idx: s for s in ctx.stats}

    ratios = [layer.ratio if isinstance(layer, MoDLayer) else 1.0 for layer in layers]
    routes = [isinstance(layer, MoDLayer) and n_vision_any(n_vision) for layer in layers]
    kept = [stats[i].kept.tolist() if i in stats else n_tokens for i in range(len(layers))]
    entries = [e.tolist() for e in kv_entries(cache, attention_mask)]  # real entries (padding excluded)
    element = next(layer.keys.element_size() for layer in cache.layers if layer.keys is not None)  # a layer may hold none
    windows = [layer.window if isinstance(layer, MoDLayer) else _window(layer) for layer in layers]
    cached = [stats[i].cached.tolist() if i in stats and stats[i].cached is not None else None for i in range(len(layers))]

    dense_cost = [prefill_cost(shape, [1.0] * len(layers), t, v, element, windows=windows) for t, v in zip(n_text, n_vision)]
    # the formula text + trunc(r * vision) holds for top-k over vision tokens; other rules are data-dependent
    cfg = state.config
    formula = cfg.candidates == "vision" and cfg.selection == "topk" and (model.training or cfg.inference == "topk")
    mod_cost = [
        prefill_cost(
            shape, ratios, t, v, element, mod_layers=routes,
            tokens_per_layer=None if formula else [kept[i][b] for i in range(len(layers))],
            router_outputs=2 if cfg.router == "shared" else 1,
            windows=windows, kv_entries_per_layer=[None if c is None else c[b] for c in cached],
        )
        for b, (t, v) in enumerate(zip(n_text, n_vision))
    ]
    mismatches = []
    for b, cost in enumerate(mod_cost):
        for i, (expected, expected_kv) in enumerate(zip(cost.tokens_per_layer, cost.kv_entries_per_layer)):
            if kept[i][b] != expected or entries[i][b] != expected_kv:
                mismatches.append(
                    f"sample {b} layer {i}: kept {kept[i][b]}, cached {entries[i][b]}, accounting {expected} kept, {expected_kv} cached"
                )
    return EfficiencyReport(
        layer_ratios=ratios,
        n_text=n_text,
        n_vision=n_vision,
        kept_per_layer=kept,
        kv_entries_per_layer=entries,
        dense_tflops=[c.tflops for c in dense_cost],
        mod_tflops=[c.tflops for c in mod_cost],
        dense_kv_bytes=[c.kv_bytes for c in dense_cost],
        mod_kv_bytes=[c.kv_bytes for c in mod_cost],
        allocated_kv_bytes=kv_bytes(cache),
        accounting_matches=not mismatches,
        mismatches=mismatches,
        side_flops=side if side else [0.0] * len(n_text),
    )


def _window(layer: nn.Module) -> int | None:
    """The sliding window of a decoder layer that is not a MoD layer (None: global attention, or no attention
    module to read it from)."""
    attention = getattr(layer, "self_attn", None)
    return None if attention is None else attention_window(attention)


def n_vision_any(n_vision: list[int]) -> bool:
    return any(n > 0 for n in n_vision)


@contextlib.contextmanager
def dense(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put the stock layers back (for timing the dense model with the same weights)."""
    layers = get_state(model).adapter.layers(model)
    wrapped = {i: layer for i, layer in enumerate(layers) if isinstance(layer, MoDLayer)}
    for i, layer in wrapped.items():
        layers[i] = layer.base_layer
    try:
        yield model
    finally:
        for i, layer in wrapped.items():
            layers[i] = layer

"""A bounded KV cache for long streams: drop (or pool) the oldest frames past a token budget.

The cache holds one layer object per decoder layer: transformers' `DynamicLayer` for dense layers
(K/V ``[B, H, S, hd]``, one entry per cached token) and `MoDCacheLayer` for MoD layers (only the kept
tokens, with per-entry ``index``/``filled``/``valid`` and the count ``seen``). Eviction removes a span
``[start, stop)`` of *cache slots* from every layer at once and renumbers what follows, keeping the
invariant every attention mask relies on: dense layers hold exactly ``seen`` entries, and a MoD
layer's ``index`` are slot numbers in that same space. The real positions (RoPE) are no longer the
slot numbers after an eviction, so the caller passes explicit ``position_ids`` (`inference.py` does).

Pooling replaces a frame's entries in each layer by their mean key and value, one entry per layer
(keys carry their rotary phase, so the pooled key is an approximation: a summary of the frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from ..cache import MoDCacheLayer
from ..compat import DynamicLayer

POLICIES = ("drop", "pool")


@dataclass
class CacheBudget:
    """At most `max_tokens` cache slots (tokens of the full sequence) are kept.

    policy: "drop" evicts the oldest segments (frames and the turns between them); "pool" first pools
    old frames to one slot each (oldest first) and drops the oldest segments only when pooling all
    of them is not enough.
    The first segment (the prompt: BOS and anything before the first frame) is never evicted.
    """

    max_tokens: int
    policy: str = "drop"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class CachedSpan:
    """A segment as it sits in the cache: `slots` entries starting at `start`; `pooled` once pooled."""

    kind: str
    start: int
    slots: int
    frame: int = -1
    pooled: bool = False


def cache_slots(cache: Cache) -> int:
    """Slots in the cache (every layer agrees; see the module docstring)."""
    return cache.get_seq_length()


def drop_slots(cache: Cache, start: int, stop: int) -> None:
    """Remove slots ``[start, stop)`` from every layer and renumber the later ones."""
    _rewrite(cache, start, stop, pool=False)


def pool_slots(cache: Cache, start: int, stop: int) -> None:
    """Replace slots ``[start, stop)`` of every layer by one slot holding their mean key and value."""
    _rewrite(cache, start, stop, pool=True)


def _rewrite(cache: Cache, start: int, stop: int, pool: bool) -> None:
    removed = stop - start - (1 if pool else 0)
    if stop <= start or removed <= 0:
        return
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        if isinstance(layer, MoDCacheLayer):
            _rewrite_mod(layer, start, stop, pool)
        elif isinstance(layer, DynamicLayer):
            k, v = layer.keys, layer.values  # [B, H, S, hd]
            mid_k = k[:, :, start:stop].mean(dim=2, keepdim=True) if pool else k[:, :, :0]
            mid_v = v[:, :, start:stop].mean(dim=2, keepdim=True) if pool else v[:, :, :0]
            layer.keys = torch.cat([k[:, :, :start], mid_k, k[:, :, stop:]], dim=2)
            layer.values = torch.cat([v[:, :, :start], mid_v, v[:, :, stop:]], dim=2)
        else:
            raise TypeError(f"cannot evict from a {type(layer).__name__}; use the default DynamicCache")


def _rewrite_mod(layer: MoDCacheLayer, start: int, stop: int, pool: bool) -> None:
    index = layer.index  # [B, S]
    inside = (index >= start) & (index < stop)  # [B, S]
    counts = inside.sum(dim=1)  # [B]
    if bool((counts != counts[0]).any()):
        raise ValueError("samples of the batch keep different numbers of entries in the evicted span")
    k, v = layer.keys, layer.values  # [B, H, S, hd]
    rows = torch.arange(index.shape[0], device=index.device)[:, None]  # [B, 1]
    keep = (~inside).nonzero()[:, 1].view(index.shape[0], -1)  # [B, S']: surviving entries, in order
    new_k, new_v = k[rows, :, keep].transpose(1, 2), v[rows, :, keep].transpose(1, 2)  # [B, H, S', hd]
    new_index = index.gather(1, keep)  # [B, S']
    new_filled, new_valid = layer.filled.gather(1, keep), layer.valid.gather(1, keep)
    shift = stop - start - (1 if pool else 0)
    new_index = torch.where(new_index >= stop, new_index - shift, new_index)
    if pool and int(counts[0]) > 0:
        span = inside.nonzero()[:, 1].view(index.shape[0], -1)  # [B, n] entries of the span
        weight = layer.valid.gather(1, span).to(k.dtype)[:, None, :, None]  # [B, 1, n, 1]
        denom = weight.sum(dim=2, keepdim=True).clamp(min=1)
        pooled_k = (k[rows, :, span].transpose(1, 2) * weight).sum(dim=2, keepdim=True) / denom  # [B, H, 1, hd]
        pooled_v = (v[rows, :, span].transpose(1, 2) * weight).sum(dim=2, keepdim=True) / denom
        at = int((new_index < start).sum(dim=1)[0])  # entries before the span (equal across the batch)
        cat = lambda a, mid, b: torch.cat([a, mid, b], dim=-2)
        new_k = cat(new_k[:, :, :at], pooled_k, new_k[:, :, at:])
        new_v = cat(new_v[:, :, :at], pooled_v, new_v[:, :, at:])
        one = torch.ones(index.shape[0], 1, dtype=torch.bool, device=index.device)
        new_index = torch.cat([new_index[:, :at], torch.full_like(new_index[:, :1], start), new_index[:, at:]], dim=1)
        new_filled = torch.cat([new_filled[:, :at], one, new_filled[:, at:]], dim=1)
        new_valid = torch.cat([new_valid[:, :at], one, new_valid[:, at:]], dim=1)
    layer.keys, layer.values = new_k.contiguous(), new_v.contiguous()
    layer.index, layer.filled, layer.valid = new_index, new_filled, new_valid
    layer.seen -= shift


def make_room(cache: Cache, spans: list[CachedSpan], incoming: int, budget: CacheBudget) -> list[CachedSpan]:
    """Evict the oldest spans (never the first) until ``incoming`` more slots fit; returns the new spans.

    With ``policy="pool"``, old frames are first pooled to one slot each, oldest first; whatever is
    still missing is then freed by dropping the oldest spans. Raises if even a cache emptied of all
    but the first span cannot take `incoming` slots.
    """
    spans = [CachedSpan(s.kind, s.start, s.slots, s.frame, s.pooled) for s in spans]
    protected = spans[0].slots if spans else 0
    if protected + incoming > budget.max_tokens:
        raise ValueError(
            f"a segment of {incoming} tokens does not fit a cache budget of {budget.max_tokens} tokens "
            f"({protected} held by the prompt)"
        )
    total = sum(s.slots for s in spans)

    def shift_after(i: int, freed: int) -> None:
        for later in spans[i:]:
            later.start -= freed

    if budget.policy == "pool":
        for i, span in enumerate(spans[1:], start=1):
            if total + incoming <= budget.max_tokens:
                break
            if span.kind == "frame" and not span.pooled and span.slots > 1:
                pool_slots(cache, span.start, span.start + span.slots)
                freed = span.slots - 1
                span.slots, span.pooled = 1, True
                shift_after(i + 1, freed)
                total -= freed
    while total + incoming > budget.max_tokens and len(spans) > 1:
        span = spans.pop(1)
        drop_slots(cache, span.start, span.start + span.slots)
        shift_after(1, span.slots)
        total -= span.slots
    return spans

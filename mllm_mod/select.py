"""Candidate selection: which routed tokens a MoD layer keeps.

Everything here works on [B, T] tensors and returns a boolean keep mask; gathering and scattering
(in `layer.py`) only ever see that mask, so new selection rules never touch them. Non-candidates
(text, padding) are always kept. Ties are broken by position (stable sorts), so a sample selects the
same tokens whatever padding surrounds it in a batch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch


def keep_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """``trunc(n * ratio)`` computed in float32, as p-MoD does. `n` is an integer tensor."""
    ratio32 = torch.tensor(ratio, dtype=torch.float32, device=n.device)
    return torch.trunc(n.to(torch.float32) * ratio32).to(torch.long)


def keep_count_host(n: int, ratio: float) -> int:
    """`keep_count` of one count, on the host: the same float32 product, truncated (no device op).

    Both factors are rounded to float32; their product is exact in float64 (24 + 24 bits), so rounding it
    once to float32 is the float32 multiplication the device does."""
    return math.trunc(_float32(_float32(float(n)) * _float32(ratio)))


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def kept_in_order(
    scores: torch.Tensor, candidates: torch.Tensor, kept_len: int, inf: torch.Tensor | float = torch.inf
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection as a gather index, in one stable sort and one top-k: ([B, Tk] token indices in
    original order, [B, Tk] each slot's rank in its row).

    Non-candidates rank first (they are always kept, in position order), then candidates by score, ties
    by position (stable sort), so the first ``T - n_b + k_b`` ranks of row b are exactly the keep set of
    `topk_per_sample` with ``k_b = trunc(n_b * ratio)``. `kept_len` is the longest row's count; in shorter
    rows the slots ranked beyond their own count are fillers (the next-best candidates), to be masked.
    `inf`: +inf, as a 0-dim tensor on the device when the caller has one (a float costs a kernel per call).
    """
    key = torch.where(candidates, scores, inf)  # [B, T]
    by_rank = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :kept_len]  # [B, Tk]
    # distinct indices, so the smallest-first top-k is an ascending sort (one kernel, no ties to break)
    order, rank = torch.topk(by_rank, kept_len, dim=1, largest=False, sorted=True)  # [B, Tk]: original order; slot ranks
    return order, rank


def group_keep_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ceil(ratio * n)`` in float32 (VideoLLM-MoD's per-frame count; gamma-MoD's reference "leading" rule)."""
    ratio32 = torch.tensor(ratio, dtype=torch.float32, device=n.device)
    return torch.ceil(n.to(torch.float32) * ratio32).to(torch.long)


def topk_per_sample(
    scores: torch.Tensor, candidates: torch.Tensor, ratio: float, count: Callable[[torch.Tensor, float], torch.Tensor] = keep_count
) -> torch.Tensor:
    """Keep the ``count(n_b, ratio)`` best-scoring candidates of each sample (by default
    ``trunc(n_b * ratio)``), and every non-candidate."""
    # scores, candidates: [B, T]
    k = count(candidates.sum(dim=1), ratio)  # [B]
    masked = scores.masked_fill(~candidates, float("-inf"))  # [B, T]
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # [B, T]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ~candidates | (rank < k[:, None])  # [B, T]


def topk_per_group(scores: torch.Tensor, candidates: torch.Tensor, groups: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep ``ceil(ratio * size)`` best candidates within each group (e.g. each video frame).

    `groups` [B, T] holds a group id per token (any integers; -1 or a non-candidate means no group).
    """
    batch, length = scores.shape
    none = torch.iinfo(torch.long).max
    routed = candidates & (groups >= 0)  # [B, T]: a candidate outside every group is not routed
    gid = torch.where(routed, groups.long(), none)  # [B, T]
    by_score = torch.sort(scores.masked_fill(~routed, float("-inf")), dim=1, descending=True, stable=True).indices
    by_group = torch.sort(gid.gather(1, by_score), dim=1, stable=True).indices
    order = by_score.gather(1, by_group)  # [B, T]: grouped, best first within a group
    sorted_gid = gid.gather(1, order).contiguous()  # [B, T], non-decreasing per row
    first = torch.searchsorted(sorted_gid, sorted_gid, side="left")  # [B, T]
    last = torch.searchsorted(sorted_gid, sorted_gid, side="right")
    rank_in_group = torch.arange(length, device=scores.device).expand(batch, length) - first
    keep_sorted = (sorted_gid != none) & (rank_in_group < group_keep_count(last - first, ratio))
    keep = torch.zeros_like(routed).scatter_(1, order, keep_sorted)
    return ~routed | keep  # [B, T]

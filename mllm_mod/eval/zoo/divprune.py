"""DivPrune (arXiv 2503.02175): a diverse subset of the projected vision tokens, chosen before the LLM.

The rule, as the paper and its reference code (vbdi/divprune, ``DivPrune``) state it: of a sample's ``n``
projected vision tokens (the LLM's input embeddings at the image positions), keep
``k = round(subset_ratio * n)`` (Python's ``round``; the reference's ``SUBSET_RATIO``, the fraction
*retained*, default 0.098: 56 of LLaVA-1.5's 576) chosen greedily for max-min diversity under the cosine
distance ``d(i, j) = 1 - cos(x_i, x_j)``: the first token is the one farthest from its nearest other token
(``argmax_j`` of the second-smallest ``d(., j)``, the smallest being ``d(j, j) = 0``), each next one the token
whose distance to its nearest already-chosen token is largest (``argmax_j min_{i chosen} d(i, j)``; ties: the
lowest index). Distances are computed in float32 here, and a chosen token is never chosen again (the
reference could re-pick one only when every remaining token duplicates a chosen one, e.g. the identical
patches of a padded image, where its pick depends on rounding noise; here the next such duplicate is taken).

Where: before the LLM. The LLM sees the shorter sequence -- text plus the kept tokens, in their original
order, at positions ``0 ..`` of that sequence -- in every layer: here every decoder layer is a MoD layer
keeping the same set with renumbered positions, which is that shorter sequence's forward (pinned by the
test against a forward of the stock decoder on the shortened embeddings), and `mllm_mod.efficiency` counts
it as what it is: text + k tokens and KV entries in every layer. A sample's vision tokens of several images
are pooled into one selection (the reference selects per image; one image per sample is the same).

M-RoPE families (Qwen2-VL / Qwen2.5-VL / Qwen3-VL): the shorter sequence keeps its tokens' own gathered
(t, h, w) positions (`staged.sequence_positions`; pinned by the test against the stock decoder on the shortened
embeddings at the gathered 3-D ``position_ids``).

Side cost (outside the decoder, measured per sample, `side_flops`): the n x n distance matrix ``2 n^2 D``
and the greedy loop ``k n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .staged import Stage, StageInput, install, sequence_positions

PAPER_SUBSET_RATIO = 0.098


@dataclass(frozen=True)
class DivPruneSpec:
    """DivPrune: `subset_ratio` the fraction of the vision tokens retained (the reference's SUBSET_RATIO)."""

    subset_ratio: float = PAPER_SUBSET_RATIO
    method: str = "divprune"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.subset_ratio) <= 1.0:
            raise ValueError(f"divprune: subset_ratio (the fraction retained) must be in (0, 1], got {self.subset_ratio!r}")

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(0, float(self.subset_ratio))]

    def kept_vision(self, num_layers: int, n_vision: int) -> list[int]:
        """Vision tokens each layer processes for a sample of `n_vision`: the subset, in every layer."""
        return [keep_count(n_vision, self.subset_ratio)] * num_layers

    def label(self) -> str:
        """The budget as the paper names it, for reports."""
        return f"subset_ratio={self.subset_ratio:g} retained"

    def budget(self) -> dict[str, object]:
        return {"subset_ratio": self.subset_ratio}


def keep_count(n: int, subset_ratio: float) -> int:
    return min(n, round(subset_ratio * n))


def max_min_subset(features: torch.Tensor, k: int) -> torch.Tensor:
    """[k] indices (in the order chosen) of a greedy max-min diverse subset of `features` [N, D] under the
    cosine distance."""
    n = features.shape[0]
    if k <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    x = features.float()
    x = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - x @ x.T  # [N, N]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    chosen = []
    nearest = torch.topk(distance, 2, dim=0, largest=False).values[1]  # [N] distance to the nearest other token
    chosen.append(int(torch.argmax(nearest)))
    closest = distance[chosen[0]].clone()  # [N] distance of each token to its nearest chosen one
    closest[chosen[0]] = float("-inf")
    for _ in range(1, k):
        nxt = int(torch.argmax(closest))
        chosen.append(nxt)
        closest = torch.minimum(closest, distance[nxt])
        closest[chosen] = float("-inf")
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def side_flops(n: int, width: int, k: int) -> int:
    """FLOPs of the selection outside the decoder: the n x n cosine similarities of D-wide tokens ``2 n^2 D``
    and the greedy loop's k updates of the n nearest-chosen distances ``k n`` (norms not counted)."""
    return 2 * n * n * width + k * n


def rule(spec: DivPruneSpec, seen: StageInput) -> torch.Tensor:
    """Each sample's DivPrune subset of its vision tokens, from the input embeddings of the first layer."""
    keep = torch.zeros_like(seen.vision)
    for b in range(seen.vision.shape[0]):
        where = seen.vision[b].nonzero()[:, 0]  # [n]
        k = keep_count(len(where), spec.subset_ratio)
        chosen = max_min_subset(seen.hidden[b, where], k)
        keep[b, where[chosen]] = True
        seen.side[b] += side_flops(len(where), seen.hidden.shape[-1], k)
    return keep


def apply_divprune(model: nn.Module, spec: DivPruneSpec | None = None, **fields) -> nn.Module:
    """Turn a stock model into DivPrune in place (``mllm_mod.unload`` undoes it)."""
    spec = spec or DivPruneSpec(**fields)
    return install(model, spec, spec.stages(0), rule, positions=sequence_positions(model))

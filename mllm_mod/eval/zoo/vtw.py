"""Visual Token Withdrawal (VTW, arXiv 2405.05803): every vision token withdrawn from layer K on.

The rule, as the paper and its reference code (lzhxmu/VTW, ``VTWLlamaModel``) apply it: layers ``0 .. K-1``
run on the whole prompt; before layer K the vision tokens are removed from the hidden states, so layers
``K .. L-1`` run on the text tokens only and their KV cache never holds a vision token. The text tokens keep
their original positions (the reference's default ``pe_type = "keep"`` slices ``position_ids``).

K (the reference's ``--k``): given directly, or chosen on a calibration set as the paper does
(`calibrate_k`, the reference's ``--findk``): for each candidate K from 5 (the reference's first) to L - 1,
the KL divergence ``KL(p_K || p)`` between the next-token distribution at the prompt's last token with
withdrawal at K (p_K) and without (p) -- the reference's ``KLDivLoss(log_softmax(full), softmax(vtw))`` --
averaged over the calibration samples; K is the first candidate whose mean is ``<= eta`` (the reference's
eta: 0.003 for LLaVA-1.5-7B, 0.0005 for 13B, 0.0001 for LLaVA-NeXT-7B). The default K without calibration
is the reference's 15 of 32 layers scaled to the depth: ``floor(15 * L / 32 + 1/2)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .staged import Stage, StageInput, install

PAPER_LAYERS = 32
PAPER_K = 15  # the reference's default (its search result for LLaVA-1.5-7B)
PAPER_ETA = 0.003  # the reference's threshold for LLaVA-1.5-7B
FIRST_CANDIDATE = 5  # the reference searches K = 5 .. L - 1


def scaled_k(num_layers: int) -> int:
    return max(1, min(num_layers - 1, math.floor(PAPER_K * num_layers / PAPER_LAYERS + 0.5)))


@dataclass(frozen=True)
class VTWSpec:
    """VTW: `withdraw_layer` the paper's K, the first layer without vision tokens (None: 15 of 32 scaled)."""

    withdraw_layer: int | None = None
    method: str = field(default="vtw")

    def __post_init__(self) -> None:
        if self.withdraw_layer is not None and int(self.withdraw_layer) < 1:
            raise ValueError(f"vtw: withdraw_layer K must be >= 1 (layers 0 .. K-1 see the vision tokens), got {self.withdraw_layer!r}")

    def layer(self, num_layers: int) -> int:
        k = scaled_k(num_layers) if self.withdraw_layer is None else int(self.withdraw_layer)
        if k >= num_layers:
            raise ValueError(f"vtw: withdraw_layer K={k} does not exist in a decoder of {num_layers} layers")
        return k

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(self.layer(num_layers), 0.0)]

    def kept_vision(self, num_layers: int, n_vision: int) -> list[int]:
        """Vision tokens each layer processes for a sample of `n_vision`: all before K, none from K on."""
        k = self.layer(num_layers)
        return [n_vision] * k + [0] * (num_layers - k)

    def label(self) -> str:
        """The budget as the paper names it, for reports."""
        return f"K={self.withdraw_layer if self.withdraw_layer is not None else '15 of 32, scaled'}"

    def budget(self) -> dict[str, object]:
        return {} if self.withdraw_layer is None else {"withdraw_layer": int(self.withdraw_layer)}


def rule(spec: VTWSpec, seen: StageInput) -> torch.Tensor:
    """No vision token is kept."""
    return torch.zeros_like(seen.vision)


def apply_vtw(model: nn.Module, spec: VTWSpec | None = None, **fields) -> nn.Module:
    """Turn a stock model into VTW in place (``mllm_mod.unload`` undoes it)."""
    from ...adapters import adapter_for

    spec = spec or VTWSpec(**fields)
    num_layers = len(adapter_for(model).layers(model))
    return install(model, spec, spec.stages(num_layers), rule, positions="original")


@dataclass
class Calibration:
    """The result of `calibrate_k`: the chosen K, and the mean KL divergence of each candidate K."""

    k: int
    eta: float
    kl: dict[int, float]

    def table(self) -> str:
        rows = ["| K | mean KL(p_K || p) |", "|---:|---:|"] + [f"| {k} | {v:.6g} |" for k, v in self.kl.items()]
        return "\n".join(rows) + f"\n\nK = {self.k} (the first with mean KL <= eta = {self.eta:g})"


def last_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """[B, V] float32 logits at each row's last token (left padding: the last column)."""
    with torch.no_grad():
        return model(**batch).logits[:, -1].float()


def calibrate_k(
    model: nn.Module, batches: Iterable[dict], eta: float = PAPER_ETA, first: int = FIRST_CANDIDATE
) -> Calibration:
    """Choose K on calibration batches (left-padded processor outputs of a stock model) as VTW's reference
    does: the first candidate K in ``first .. L - 1`` whose KL divergence ``KL(p_K || p)`` at the prompt's
    last token, averaged over the samples, is ``<= eta``; the last layer when none is. `first` is clamped to
    ``L - 1`` for decoders of fewer than ``first + 1`` layers. The model is left as it was."""
    import mllm_mod

    from ...adapters import adapter_for

    num_layers = len(adapter_for(model).layers(model))
    candidates = range(max(1, min(first, num_layers - 1)), num_layers)
    batches = list(batches)
    full = [torch.log_softmax(last_logits(model, b), dim=-1) for b in batches]  # log p per batch, [B, V]
    kl: dict[int, float] = {}
    for k in candidates:
        apply_vtw(model, VTWSpec(withdraw_layer=k))
        try:
            per_sample = []
            for batch, log_p in zip(batches, full):
                log_q = torch.log_softmax(last_logits(model, batch), dim=-1)  # log p_K
                per_sample.append((log_q.exp() * (log_q - log_p)).sum(dim=-1))  # [B] KL(p_K || p)
        finally:
            mllm_mod.unload(model)
        kl[k] = float(torch.cat(per_sample).mean())
    return Calibration(first_under(kl, eta, num_layers - 1), eta, kl)


def first_under(kl: dict[int, float], eta: float, last: int) -> int:
    """The first candidate K (in increasing order) whose mean KL is ``<= eta``; `last` when none is."""
    return next((k for k in sorted(kl) if kl[k] <= eta), last)

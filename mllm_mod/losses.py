"""Routing losses: gamma-MoD's 2-way cross-entropy between the router and the top-k decision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import MoDConfig
from .layer import RouterRecord


def routing_loss(records: list[RouterRecord], config: MoDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, agreement) over the MoD layers of one forward.

    loss: sum over layers of the cross-entropy of the router logits [N, 2] against the top-k decision
    (1 = kept, 0 = skipped), times ``routing_loss_weight``; N: the competing tokens, or with
    ``routing_loss_tokens="all"`` every position of the batch (forced-keep and padding tokens count with
    target 1, a mean over B * T: gamma-MoD's reference).
    agreement: fraction of competing tokens whose threshold decision (``p >= threshold``, what
    inference uses) matches the top-k decision of training.
    """
    if not records:
        raise ValueError("no router records: routing losses need a training-mode forward with a shared router")
    losses, agree, total = [], 0, 0
    for record in records:
        cand = record.candidates  # [B, T]
        scored = cand if config.routing_loss_tokens == "competing" else torch.ones_like(cand)  # [B, T]
        logits = record.logits[scored].float()  # [N, 2]
        target = record.keep[scored].long()  # [N]: non-competing tokens were kept (target 1)
        losses.append(F.cross_entropy(logits, target, reduction="mean") if target.numel() else logits.sum() * 0)
        agree += int(((record.weights[cand] >= config.threshold) == record.keep[cand]).sum())
        total += int(cand.sum())
    loss = torch.stack(losses).sum() * config.routing_loss_weight
    return loss, torch.tensor(agree / max(total, 1))

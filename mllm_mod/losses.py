"""Routing losses: gamma-MoD's 2-way cross-entropy between the router and the top-k decision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import MoDConfig
from .layer import RouterRecord


def routing_loss(records: list[RouterRecord], config: MoDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, agreement) over the MoD layers of one forward.

    loss: sum over layers of the cross-entropy of the router logits [N, 2] of the competing tokens
    against the top-k decision (1 = kept, 0 = skipped), times ``routing_loss_weight``.
    agreement: fraction of competing tokens whose threshold decision (``p >= threshold``, what
    inference uses) matches the top-k decision of training.
    """
    if not records:
        raise ValueError("no router records: routing losses need a training-mode forward with a shared router")
    losses, agree, total = [], 0, 0
    for record in records:
        cand = record.candidates  # [B, T]
        logits = record.logits[cand]  # [N, 2]
        target = record.keep[cand].long()  # [N]
        losses.append(F.cross_entropy(logits, target, reduction="mean") if target.numel() else logits.sum() * 0)
        agree += int(((record.weights[cand] >= config.threshold) == record.keep[cand]).sum())
        total += int(cand.sum())
    loss = torch.stack(losses).sum() * config.routing_loss_weight
    return loss, torch.tensor(agree / max(total, 1))

"""Routers score tokens; score normalisation turns scores into the weights the weighting rule uses."""

from __future__ import annotations

import torch
from torch import nn

from .config import MoDConfig


class Router(nn.Module):
    """``Linear(hidden, classes)`` over every token of a layer's input, initialised to zero.

    classes = 1: a per-layer scalar score (p-MoD, VideoLLM-MoD); classes = 2: gamma-MoD's 2-way
    skip/keep router (no bias), shared by all MoD layers. Zero init gives ``w = 1`` under TanhNorm and
    ``p = 0.5`` under sigmoid/softmax. Parameters stay float32 whatever the model is cast to: small
    logit differences decide the top-k, and bf16 would collapse them.
    """

    def __init__(self, hidden_size: int, classes: int = 1, bias: bool = True, device=None) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, classes, bias=bias, device=device, dtype=torch.float32)
        if self.proj.weight.device.type != "meta":
            nn.init.zeros_(self.proj.weight)
            if bias:
                nn.init.zeros_(self.proj.bias)

    def _apply(self, fn, recurse: bool = True):  # keep float32 through model.to(dtype) / .half()
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [B, T, D] -> [B, T, classes] logits, computed in float32
        return self.proj(hidden_states.float())


def token_weights(logits: torch.Tensor, config: MoDConfig) -> torch.Tensor:
    """Weights ``w`` [B, T] from router logits [B, T, classes] (float32)."""
    if config.norm == "softmax":
        return torch.softmax(logits, dim=-1)[..., 1]  # p(keep)
    z = logits.squeeze(-1)  # [B, T]
    if config.norm == "tanh":
        return config.tanh_alpha * torch.tanh(z) + 1.0  # TanhNorm: w in (1 - a, 1 + a), 1 at z = 0
    if config.norm == "sigmoid":
        return torch.sigmoid(z)
    return torch.ones_like(z)


def build_router(config: MoDConfig, hidden_size: int, device=None) -> Router:
    if config.router == "shared":
        return Router(hidden_size, classes=2, bias=False, device=device)
    return Router(hidden_size, device=device)

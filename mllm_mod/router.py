"""Routers score tokens; score normalisation turns scores into the weights the weighting rule uses."""

from __future__ import annotations

import torch
from torch import nn

from .config import MoDConfig


class Router(nn.Module):
    """``Linear(hidden, 1)`` scoring every token of a layer's input, initialised to zero.

    Its parameters stay float32 whatever the model is cast to (p-MoD keeps router weights in fp32):
    small logit differences decide the top-k, and bf16 would collapse them.
    """

    def __init__(self, hidden_size: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=True, device=device, dtype=torch.float32)
        if self.proj.weight.device.type != "meta":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def _apply(self, fn, recurse: bool = True):  # keep float32 through model.to(dtype) / .half()
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [B, T, D] -> [B, T] logits, computed in float32
        return self.proj(hidden_states.float()).squeeze(-1)


def token_weights(logits: torch.Tensor, config: MoDConfig) -> torch.Tensor:
    """Weights ``w`` [B, T] from router logits [B, T] (float32)."""
    if config.norm == "tanh":
        return config.tanh_alpha * torch.tanh(logits) + 1.0  # TanhNorm: w in (1 - a, 1 + a), 1 at z = 0
    if config.norm == "sigmoid":
        return torch.sigmoid(logits)
    return torch.ones_like(logits)


def build_router(config: MoDConfig, hidden_size: int, device: torch.device | str | None = None) -> Router:
    # "linear" and "sigmoid" routers share the module; the difference is the normalisation in `config.norm`.
    return Router(hidden_size, device=device)

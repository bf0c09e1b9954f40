"""Routers score tokens; score normalisation turns scores into the weights the weighting rule uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoDConfig


class Router(nn.Module):
    """``Linear(hidden, classes)`` over every token of a layer's input, initialised to zero (or, with
    ``zero_init=False``, PyTorch's default Linear init: gamma-MoD's reference).

    classes = 1: a per-layer scalar score (p-MoD, VideoLLM-MoD); classes = 2: gamma-MoD's 2-way
    skip/keep router (no bias), shared by all MoD layers. Zero init gives ``w = 1`` under TanhNorm and
    ``p = 0.5`` under sigmoid/softmax.

    Routing is float32 end to end (DESIGN.md section 6, invariant 8): small logit differences decide the
    top-k, and bf16 keeps ~3 significant digits (TanhNorm weights in (0.8, 1.2) would take ~50 values, and
    all be exactly 1 at initialisation). So:
    - parameters stay float32 through ``model.to(dtype)`` / ``.half()`` / ``.bfloat16()``, bit for bit: a
      cast that would change their dtype only moves them (device changes still apply);
    - the forward runs with autocast disabled (CPU and CUDA), on a float32 copy of the input, on the router's
      own device (a layer on another device of a ``device_map`` gets its logits back on its device).
    The logits are float32 [B, T, classes].
    """

    def __init__(self, hidden_size: int, classes: int = 1, bias: bool = True, device=None, zero_init: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, classes, bias=bias, device=device, dtype=torch.float32)  # PyTorch's init
        if zero_init and self.proj.weight.device.type != "meta":
            nn.init.zeros_(self.proj.weight)
            if bias:
                nn.init.zeros_(self.proj.bias)

    def _apply(self, fn, recurse: bool = True):
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype != torch.float32:
                return t.to(device=out.device)  # the dtype cast is refused, the move is not
            return out

        return super()._apply(keep_float32, recurse)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight, bias = self.proj.weight, self.proj.bias  # [C, D], [C]
        x = hidden_states  # [B, T, D]
        # conversions only where they convert: each is a kernel launch on the hot path (tests/test_launch_budget.py)
        if x.dtype != torch.float32 or x.device != weight.device:
            x = x.to(device=weight.device, dtype=torch.float32)
        if weight.dtype != torch.float32:  # stored in bf16 under DeepSpeed (`store_routers_as`)
            weight, bias = weight.float(), None if bias is None else bias.float()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            logits = F.linear(x, weight, bias)  # [B, T, C] float32
        return logits if logits.device == hidden_states.device else logits.to(hidden_states.device)
def fresh_weight(config: MoDConfig) -> float:
    """The token weight ``w`` a fresh (zero-initialised) router gives: 1 under TanhNorm, 0.5 under sigmoid or
    softmax. Where it is not 1, an untrained retrofit changes every kept token's output (``videomod``'s
    "output" rule halves it), so the model needs training before it is evaluated."""
    return float(token_weights(torch.zeros(1, 1, 2 if config.norm == "softmax" else 1), config))


def store_routers_as(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every router's parameters in `dtype`, deliberately bypassing the float32 guard of `Router._apply`.

    For DeepSpeed bf16 only: its ZeRO partitions flatten the parameters of a group into one buffer of one dtype
    (ZeRO-3 asserts it; ZeRO-2 silently re-types the routers) and keep the float32 master weights in the
    optimizer. The router forward still computes in float32 from these weights (`Router.forward` upcasts),
    so logits, weights, top-k and the routing loss stay float32; only the stored weights are rounded.
    """
    for module in model.modules():
        if isinstance(module, Router):
            for param in module.parameters():
                param.data = param.data.to(dtype)


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
    zero = config.router_init == "zeros"
    if config.router == "shared":
        return Router(hidden_size, classes=2, bias=False, device=device, zero_init=zero)
    return Router(hidden_size, device=device, zero_init=zero)

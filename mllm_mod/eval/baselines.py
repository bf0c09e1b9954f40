"""Training-free token-dropping baselines built on the MoD core: FastV and random drop.

Both keep layers ``0 .. K-1`` as they are and, from layer ``K`` on, run every layer on the text tokens
plus the same ``trunc(R * n_vision)`` vision tokens of each sample; the other vision tokens are dropped
for the remaining layers (nobody attends to them, and those layers' KV cache never holds them).

- FastV: the kept vision tokens are those that receive the most attention from the last prompt token
  in layer ``K - 1`` (the last full layer), averaged over heads.
- random: a uniformly random subset of the same size (seeded), the "same budget" control.

They run on the same machinery as MoD, so comparisons are fair: `apply_baseline` retrofits layers
``K .. L-1`` as MoD layers at ratio ``R`` (same gather, same compact KV cache, same FLOPs accounting and
`mllm_mod.efficiency` check) and replaces each layer's router by a `DecisionRouter` that replays the
decision taken once per forward. How the decision reaches the core without changing it: the layers
select the top-k by TanhNorm weight ``w = alpha * tanh(z) + 1``; the router gives ``z = 0`` (``w = 1``
exactly) to the chosen tokens and ``z < 0`` (``w < 1``) to the others, so the top-k is exactly the chosen
set (the same `topk_per_sample` count), and with the ``"mlp"`` weighting a kept token's output is
``x + attn + 1.0 * mlp``, the stock block, while a dropped token passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BASELINES = ("fastv", "random")
DROPPED_LOGIT = -1.0  # any z < 0 ranks a token below the kept ones (w = 1 + alpha * tanh(z) < 1)


@dataclass(frozen=True)
class DropSpec:
    """A token-dropping baseline: `method` in `BASELINES`, prune from layer `layer` (K) on, keep `ratio`
    (R) of the vision tokens, `seed` for the random method."""

    method: str
    layer: int = 2
    ratio: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in BASELINES:
            raise ValueError(f"unknown baseline {self.method!r}; choose from {BASELINES}")
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"the kept fraction of vision tokens must be in (0, 1], got {self.ratio!r}")
        if int(self.layer) < 1:
            raise ValueError(f"the pruning layer K must be >= 1 (layer K - 1 ranks the tokens), got {self.layer!r}")


class DropDecision:
    """The keep decision of the current forward, taken in a forward pre-hook on the attention of layer
    K - 1 and read by every `DecisionRouter`. `logits` [B, T, 1] is None outside a prefill with vision."""

    def __init__(self, spec: DropSpec) -> None:
        self.spec = spec
        self.logits: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(spec.seed)

    def __call__(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        from ..select import topk_per_sample

        self.logits = None
        ctx = kwargs.get("mod_routing")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, D], normed
        batch, length, _ = hidden.shape
        if ctx is None or ctx.candidates is None:
            return
        real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)  # [B, T]
        if ctx.attention_mask is not None:
            real = ctx.attention_mask[:, -length:].to(hidden.device, torch.bool)
        vision = ctx.candidates.to(hidden.device) & real  # [B, T]
        if not bool(vision.any()):  # a decoding step or a text-only prompt: nothing to drop
            return
        if self.spec.method == "fastv":
            scores = last_token_attention(attn, hidden, kwargs["position_embeddings"], real)  # [B, T]
        else:
            scores = torch.rand(batch, length, generator=self.generator).to(hidden.device)  # [B, T]
        keep = topk_per_sample(scores, vision, self.spec.ratio) & vision  # [B, T]: the kept vision tokens
        logits = torch.where(keep | ~vision, 0.0, DROPPED_LOGIT)  # [B, T]
        self.logits = logits.to(torch.float32)[..., None]  # [B, T, 1]


class DecisionRouter(nn.Module):
    """Stands in for a MoD layer's router: returns the logits of the current `DropDecision`."""

    def __init__(self, decision: DropDecision) -> None:
        super().__init__()
        self.decision = decision

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.decision.logits
        if logits is None or logits.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(
                f"{self.decision.spec.method}: no drop decision for this forward (layer K - 1 did not see the "
                "vision tokens); chunked prefill is not supported by the token-dropping baselines"
            )
        return logits  # [B, T, 1]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def last_token_attention(
    attn: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], real: torch.Tensor
) -> torch.Tensor:
    """Head-averaged attention probabilities [B, T] from each sample's last real token to every token,
    recomputed from the attention module's own projections and RoPE (any attention backend).

    hidden [B, T, D]: the normed layer input; position_embeddings: (cos, sin) [B or 1, T, hd]; real [B, T].
    Llama-style attention (Llama, Mistral, Qwen2): q/k projections, half-rotation RoPE, no q/k norms.
    """
    if hasattr(attn, "q_norm") or not hasattr(attn, "k_proj"):
        raise NotImplementedError(f"FastV scoring supports Llama-style attention, not {type(attn).__name__}")
    batch, length, _ = hidden.shape
    hd = attn.head_dim
    rows = torch.arange(batch, device=hidden.device)
    last = length - 1 - real.flip(1).to(torch.int8).argmax(dim=1)  # [B] position of the last real token
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # [B, T, hd]
    q = attn.q_proj(hidden[rows, last]).view(batch, -1, hd)  # [B, H, hd]
    q = q * cos[rows, last][:, None] + rotate_half(q) * sin[rows, last][:, None]
    k = attn.k_proj(hidden).view(batch, length, -1, hd).transpose(1, 2)  # [B, Hkv, T, hd]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, H, T, hd]
    logits = torch.einsum("bhd,bhtd->bht", q.float(), k.float()) * attn.scaling  # [B, H, T]
    visible = real & (torch.arange(length, device=hidden.device)[None, :] <= last[:, None])  # [B, T]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)  # [B, T]


def baseline_config(spec: DropSpec, num_layers: int):
    """The `MoDConfig` of the baseline: MoD layers K .. L-1 at ratio R, top-k of the vision tokens,
    TanhNorm weights (w = 1 for a kept token) and the "mlp" rule (a dropped token passes unchanged)."""
    from ..config import MoDConfig

    if spec.layer >= num_layers:
        raise ValueError(f"pruning layer K={spec.layer} does not exist in a decoder of {num_layers} layers")
    return MoDConfig(
        preset=spec.method,
        schedule="constant",
        layers=list(range(spec.layer, num_layers)),
        ratio=float(spec.ratio),
        router="linear",
        norm="tanh",
        weighting="mlp",
        selection="topk",
        candidates="vision",
        inference="topk",
        positions="original",
    )


def apply_baseline(model: nn.Module, spec: DropSpec | str, **fields: Any) -> nn.Module:
    """Turn a stock model into the FastV or random-drop baseline, in place; ``mllm_mod.unload`` undoes it.

    ``apply_baseline(model, "fastv", layer=2, ratio=0.5)`` or with a `DropSpec`.
    """
    from ..adapters import adapter_for
    from ..retrofit import mod_layer_map, retrofit

    spec = DropSpec(spec, **fields) if isinstance(spec, str) else spec
    layers = adapter_for(model).layers(model)
    config = baseline_config(spec, len(layers))
    ranking_attention = layers[spec.layer - 1].self_attn  # a stock layer: K - 1 < K stays dense
    retrofit(model, config)
    decision = DropDecision(spec)
    for layer in mod_layer_map(model).values():
        layer.router = DecisionRouter(decision)
    handle = ranking_attention.register_forward_pre_hook(decision, with_kwargs=True)
    model.mod_state.hooks.append(handle)  # removed by unload with the core's own hooks
    return model

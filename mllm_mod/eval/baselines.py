"""Training-free token-dropping baselines built on the MoD core: FastV and random drop (the zoo -- PyramidDrop,
VTW, DivPrune, DART -- is `mllm_mod.eval.zoo`, on the same decision machinery; docs/BASELINES.md).

Both keep layers ``0 .. K-1`` as they are and, from layer ``K`` on, prune the fraction ``R`` of each
sample's vision tokens (FastV's names: K the pruning layer, R the fraction *pruned*): every later layer
runs on the text tokens plus the same ``trunc((1 - R) * n_vision)`` kept vision tokens; the pruned ones
are dropped for the remaining layers (nobody attends to them, and those layers' KV cache never holds them).

- FastV: the kept vision tokens are those that receive the most attention from the ranking token in layer
  ``K - 1`` (the last full layer), averaged over heads. The ranking token is the last token of the prompt:
  by default each row's last real token; a caller scoring a continuation after a prompt (loglikelihood)
  names the prompt's last token with `ranking_at`, so every option of a question sees the same kept set.
- random: a uniformly random subset of the same size, drawn per sample from a generator seeded by the
  sample's prompt tokens (up to the ranking token) and the spec's seed: the same sample keeps the same
  tokens whatever its batch, padding or request order.

The decision is taken once per prefill (a forward that sees vision tokens). Cached generation reuses it
through the compact KV cache; uncached recomputation (``generate(use_cache=False)``: every step forwards
the whole sequence again, with ``use_cache=False``) is recognised because its rows extend the last
decision's rows token for token, and ranks at the same prompt token, so it equals cached generation.

They run on the same machinery as MoD, so comparisons are fair: `apply_baseline` retrofits layers
``K .. L-1`` as MoD layers keeping ``1 - R`` (same gather, same compact KV cache, same FLOPs accounting and
`mllm_mod.efficiency` check) and replaces each layer's router by a `DecisionRouter` that replays the
decision taken once per forward. How the decision reaches the core without changing it: the layers
select the top-k by TanhNorm weight ``w = alpha * tanh(z) + 1``; the router gives ``z = 0`` (``w = 1``
exactly) to the chosen tokens and ``z < 0`` (``w < 1``) to the others, so the top-k is exactly the chosen
set (the same `topk_per_sample` count), and with the ``"mlp"`` weighting a kept token's output is
``x + attn + 1.0 * mlp``, the stock block, while a dropped token passes through unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BASELINES = ("fastv", "random")
DROPPED_LOGIT = -1.0  # any z < 0 ranks a token below the kept ones (w = 1 + alpha * tanh(z) < 1)
RENAMED = {  # spellings refused, with what to write instead
    "keep_ratio": "prune_ratio=R, the fraction of vision tokens pruned (FastV's R; keep_ratio=0.25 is prune_ratio=0.75)",
    "ratio": "prune_ratio=R, the fraction of vision tokens pruned (FastV's R)",
    "layer": "prune_layer=K, the first layer that sees the pruned sequence (FastV's K)",
}


@dataclass(frozen=True)
class DropSpec:
    """A token-dropping baseline: `method` in `BASELINES`; from layer `prune_layer` (FastV's K) on, the
    fraction `prune_ratio` (FastV's R) of the vision tokens is pruned; `seed` for the random method."""

    method: str
    prune_layer: int = 2
    prune_ratio: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in BASELINES:
            raise ValueError(f"unknown baseline {self.method!r}; choose from {BASELINES}")
        if not 0.0 <= float(self.prune_ratio) < 1.0:
            raise ValueError(
                f"prune_ratio R (the fraction of vision tokens pruned) must be in [0, 1), got {self.prune_ratio!r}"
            )
        if int(self.prune_layer) < 1:
            raise ValueError(f"prune_layer K must be >= 1 (layer K - 1 ranks the tokens), got {self.prune_layer!r}")
        if int(self.seed) < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")

    @property
    def keep_ratio(self) -> float:
        """The fraction of vision tokens kept, ``1 - R`` (the MoD core's ratio)."""
        return 1.0 - float(self.prune_ratio)

    @classmethod
    def from_fields(cls, method: str, **fields: Any) -> DropSpec:
        """`DropSpec(method, **fields)`, refusing the old spellings (`keep_ratio`, `ratio`, `layer`) with
        what to write instead."""
        for name in fields:
            if name in RENAMED:
                raise TypeError(f"{method}: {name}= is not a baseline field (it was ambiguous); use {RENAMED[name]}")
        return cls(method, **fields)


def last_real(real: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token; real [B, T] bool."""
    length = real.shape[1]
    return length - 1 - real.flip(1).to(torch.int8).argmax(dim=1)


def sample_seed(tokens: torch.Tensor, seed: int) -> int:
    """A 63-bit generator seed from a sample's token ids [N] and the spec's seed (stable across runs and
    machines, unlike Python's salted `hash`)."""
    digest = hashlib.blake2b(
        tokens.to("cpu", torch.int64).numpy().tobytes(), digest_size=8, key=int(seed).to_bytes(8, "little")
    )
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


class DropDecision:
    """The keep decision of the current forward, taken in a forward pre-hook on the attention of layer
    K - 1 and read by every `DecisionRouter`. `logits` [B, T, 1] is None outside a prefill with vision.

    `see_forward` (a pre-hook on the whole model) notes each forward's `input_ids` and `use_cache`;
    `rank_at` [B], set through `ranking_at`, names each row's ranking token for the next forwards;
    `prefill` remembers the last decision's (input_ids [B, T0], ranking tokens [B]) for uncached
    recomputation.
    """

    def __init__(self, spec: DropSpec) -> None:
        self.spec = spec
        self.logits: torch.Tensor | None = None
        self.rank_at: torch.Tensor | None = None
        self.input_ids: torch.Tensor | None = None
        self.uncached = False
        self.prefill: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_side: list[float] = []  # [B] side FLOPs of each sample of the last prefill
        self.side_flops = 0.0  # summed over every sample of every prefill decided
        self.side_samples = 0

    def add_side(self, per_sample: Sequence[float], new_forward: bool) -> None:
        """Note the side FLOPs (computed outside the decoder layers) of each sample of this forward; a method
        deciding in several places of one forward (PyramidDrop's stages) adds with ``new_forward=False``."""
        if new_forward or len(self.last_side) != len(per_sample):
            self.last_side = [0.0] * len(per_sample)
            self.side_samples += len(per_sample)
        self.last_side = [a + float(b) for a, b in zip(self.last_side, per_sample)]
        self.side_flops += float(sum(per_sample))

    def side_summary(self) -> dict[str, float | None]:
        """The mean side cost per decided sample (TFLOPs), for reports."""
        mean = self.side_flops / self.side_samples if self.side_samples else None
        return {"side_tflops_per_sample": None if mean is None else mean / 1e12}

    def see_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids if torch.is_tensor(ids) else None  # [B, T] or None (inputs_embeds)
        self.uncached = kwargs.get("use_cache") is False

    def ranking_tokens(self, real: torch.Tensor) -> torch.Tensor:
        """[B] index of each row's ranking token in this forward: the one `ranking_at` named, else the
        last decision's when this forward recomputes its rows uncached, else each row's last real token."""
        batch, length = real.shape
        if self.rank_at is not None:
            at = self.rank_at.to(real.device)
            if at.shape != (batch,) or bool(((at < 0) | (at >= length)).any()):
                raise ValueError(f"ranking_at: {at.tolist()} are not one index per row of a [{batch}, {length}] batch")
            if not bool(real[torch.arange(batch, device=real.device), at].all()):
                raise ValueError(f"ranking_at: a ranking token in {at.tolist()} is padding")
            return at
        ids = self.input_ids
        if self.uncached and self.prefill is not None and ids is not None:
            before, at = self.prefill
            if (
                ids.shape[0] == before.shape[0]
                and ids.shape[1] > before.shape[1]
                and torch.equal(ids[:, : before.shape[1]], before)
            ):
                return at.to(real.device)  # a step of uncached generation: the same prompt as the prefill
        return last_real(real)

    def random_scores(self, real: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """[B, T] uniform scores, drawn per sample over its prompt (real tokens up to the ranking token)
        from a generator seeded by those tokens, so padding and batch neighbours change nothing."""
        if self.input_ids is None:
            raise ValueError("random drop seeds each sample from its token ids: call the model with input_ids")
        batch, length = real.shape
        ids = self.input_ids[:, -length:].cpu()  # [B, T]
        prompt = (real & (torch.arange(length, device=real.device)[None, :] <= at[:, None])).cpu()  # [B, T]
        scores = torch.zeros(batch, length)
        for b in range(batch):
            generator = torch.Generator().manual_seed(sample_seed(ids[b][prompt[b]], self.spec.seed))
            scores[b, prompt[b]] = torch.rand(int(prompt[b].sum()), generator=generator)
        return scores.to(real.device)

    @staticmethod
    def prefill_tokens(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(hidden [B, T, D], real [B, T], vision [B, T]) of a hooked module's call -- its hidden states, its
        real (non-padding) tokens and real vision tokens -- or None when there is nothing to drop (no routing
        context, a decoding step, a text-only prompt)."""
        ctx = kwargs.get("mod_routing")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, D]
        batch, length, _ = hidden.shape
        if ctx is None or ctx.candidates is None:
            return None
        real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)  # [B, T]
        if ctx.attention_mask is not None:
            real = ctx.attention_mask[:, -length:].to(hidden.device, torch.bool)
        vision = ctx.candidates.to(hidden.device) & real  # [B, T]
        return (hidden, real, vision) if bool(vision.any()) else None

    def __call__(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        from ..select import topk_per_sample

        self.logits = None
        seen = self.prefill_tokens(args, kwargs)
        if seen is None:
            return
        hidden, real, vision = seen  # hidden: the normed input of layer K - 1
        length = hidden.shape[1]
        at = self.ranking_tokens(real)  # [B]
        if self.spec.method == "fastv":
            scores = token_attention(attn, hidden, kwargs["position_embeddings"], real, at)  # [B, T]
            self.add_side(ranking_row_flops(attn, real, at), new_forward=True)
        else:
            scores = self.random_scores(real, at)  # [B, T]
            self.add_side([0.0] * real.shape[0], new_forward=True)
        keep = topk_per_sample(scores, vision, self.spec.keep_ratio) & vision  # [B, T]: the kept vision tokens
        logits = torch.where(keep | ~vision, 0.0, DROPPED_LOGIT)  # [B, T]
        self.logits = logits.to(torch.float32)[..., None]  # [B, T, 1]
        if self.input_ids is not None:
            self.prefill = (self.input_ids[:, -length:], at)

    @contextlib.contextmanager
    def ranking_at(self, positions: torch.Tensor | Sequence[int]) -> Iterator[None]:
        """Rank by the tokens at `positions` (one index per row of the next forwards' [B, T] batch)."""
        self.rank_at = torch.as_tensor(positions, dtype=torch.long)
        try:
            yield
        finally:
            self.rank_at = None


def drop_decision(model: nn.Module) -> DropDecision | None:
    """The `DropDecision` of a baseline model (None for any other model)."""
    from ..retrofit import is_retrofitted, mod_layer_map

    if not is_retrofitted(model):
        return None
    routers = [layer.router for layer in mod_layer_map(model).values()]
    return next((r.decision for r in routers if isinstance(r, DecisionRouter)), None)


@contextlib.contextmanager
def ranking_at(model: nn.Module, positions: torch.Tensor | Sequence[int]) -> Iterator[None]:
    """For a baseline model, rank the vision tokens by the tokens at `positions` ([B], one per row, e.g.
    each row's last prompt token when scoring continuations); nothing for any other model."""
    decision = drop_decision(model)
    with decision.ranking_at(positions) if decision is not None else contextlib.nullcontext():
        yield


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


def token_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    real: torch.Tensor,
    query: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention probabilities [B, T] from each row's token at `query` [B] to every token,
    recomputed from the attention module's own projections and RoPE (any attention backend).

    hidden [B, T, D]: the normed layer input; position_embeddings: (cos, sin) [B or 1, T, hd]; real [B, T].
    Llama-style attention (Llama, Mistral, Qwen2): q/k projections, half-rotation RoPE, no q/k norms.
    """
    require_llama_attention(attn, "fastv", "the ranking")
    batch, length, _ = hidden.shape
    hd = attn.head_dim
    rows = torch.arange(batch, device=hidden.device)
    last = query  # [B] position of the ranking token
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


def require_llama_attention(attn: nn.Module, method: str, what: str) -> None:
    """Refuse a ranking that recomputes `attn`'s scores Llama-style (q/k projections, half-rotation RoPE, no
    q/k norms: Llama, Mistral, Qwen2) where the attention is not of that kind (Gemma 3 and Qwen3 normalize
    their queries and keys)."""
    if hasattr(attn, "q_norm") or not hasattr(attn, "k_proj"):
        reason = "normalizes its queries and keys (q_norm, k_norm)" if hasattr(attn, "q_norm") else "has no k_proj"
        raise NotImplementedError(
            f"{method}: {what} recomputes the attention Llama-style (q/k projections, RoPE, no q/k norms), and "
            f"{type(attn).__name__} {reason}; not implemented"
        )


def ranking_row_flops(attn: nn.Module, real: torch.Tensor, query: torch.Tensor) -> list[float]:
    """[B] FLOPs `token_attention` computes for each sample outside the decoder's own work: the ranking
    token's query ``2 D (H hd)``, the keys of the sample's real tokens ``2 T D (Hkv hd)`` and its score row over
    the tokens up to the ranking token ``2 T' (H hd)`` (softmax, RoPE and norms not counted, as in `flops.py`)."""
    hidden, q_dim, kv_dim = attn.q_proj.in_features, attn.q_proj.out_features, attn.k_proj.out_features
    length = real.shape[1]
    visible = (real & (torch.arange(length, device=real.device)[None, :] <= query[:, None])).sum(dim=1).tolist()
    tokens = real.sum(dim=1).tolist()
    return [float(2 * hidden * q_dim + 2 * t * hidden * kv_dim + 2 * v * q_dim) for t, v in zip(tokens, visible)]


def baseline_config(spec: DropSpec, num_layers: int):
    """The `MoDConfig` of the baseline: MoD layers K .. L-1 keeping 1 - R, top-k of the vision tokens,
    TanhNorm weights (w = 1 for a kept token) and the "mlp" rule (a dropped token passes unchanged)."""
    if spec.prune_layer >= num_layers:
        raise ValueError(f"prune_layer K={spec.prune_layer} does not exist in a decoder of {num_layers} layers")
    return drop_config(spec.method, list(range(spec.prune_layer, num_layers)), spec.keep_ratio)


def drop_config(method: str, layers: list[int], ratio: float, **rules: Any):
    """The `MoDConfig` of a method that drops vision tokens by a decision router: MoD `layers` keeping
    `ratio`, top-k of the vision tokens (unless `rules` say otherwise), TanhNorm weights (w = 1 for a kept
    token) and the "mlp" rule (a dropped token passes unchanged)."""
    from ..config import MoDConfig

    fields = {"router": "linear", "norm": "tanh", "weighting": "mlp", "selection": "topk", "inference": "topk", "positions": "original"}
    return MoDConfig(preset=method, schedule="constant", layers=layers, ratio=ratio, candidates="vision", **{**fields, **rules})


def apply_baseline(model: nn.Module, spec: DropSpec | str, **fields: Any) -> nn.Module:
    """Turn a stock model into the FastV or random-drop baseline, in place; ``mllm_mod.unload`` undoes it.
    A zoo method's name or spec (``"pdrop"``, ``"vtw"``, ``"divprune"``, ``"dart"``) goes to `mllm_mod.eval.zoo.apply_zoo`.

    ``apply_baseline(model, "fastv", prune_layer=2, prune_ratio=0.5)`` (FastV's K and R: prune half of the
    vision tokens from layer 2 on) or with a `DropSpec`.
    """
    from ..adapters import adapter_for
    from ..retrofit import mod_layer_map, retrofit
    from .zoo import ZOO, apply_zoo, is_zoo_spec

    if is_zoo_spec(spec) or spec in ZOO:  # PyramidDrop, VTW, DivPrune: `mllm_mod.eval.zoo`
        return apply_zoo(model, spec, **fields)
    spec = DropSpec.from_fields(spec, **fields) if isinstance(spec, str) else spec
    layers = adapter_for(model).layers(model)
    config = baseline_config(spec, len(layers))
    ranking_attention = layers[spec.prune_layer - 1].self_attn  # a stock layer: K - 1 < K stays dense
    if spec.method == "fastv":  # refused before anything is installed, not in the first forward
        require_llama_attention(ranking_attention, "fastv", f"the ranking in layer {spec.prune_layer - 1}")
    retrofit(model, config)
    decision = DropDecision(spec)
    for layer in mod_layer_map(model).values():
        layer.router = DecisionRouter(decision)
    handles = [
        model.register_forward_pre_hook(decision.see_forward, with_kwargs=True),
        ranking_attention.register_forward_pre_hook(decision, with_kwargs=True),
    ]
    model.mod_state.hooks.extend(handles)  # removed by unload with the core's own hooks
    return model

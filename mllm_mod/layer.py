"""The MoD wrapper around a stock pre-norm decoder layer: score -> select -> gather -> run -> scatter.

The wrapped layer is kept as ``base_layer`` and its own submodules do the work (input norm, attention
through transformers' attention registry, post-attention norm, MLP), so every attention backend,
weight format and checkpoint key of the stock model is untouched. Only the kept tokens go through the
layer; they keep their original positions (RoPE sees the real indices, with gaps; or renumbered
positions, gamma-MoD's variant) and attend causally to the kept subset, and to the layer's own compact
cache when generating.

Cost on the hot path (what `mllm_mod.bench.count_ops` pins in tests/test_launch_budget.py): what every
layer of a forward shares (token masks, host-side counts, causal templates) is computed once per forward
on the `RoutingContext`; top-k over vision tokens takes its kept length from host-side counts (one host
sync per forward) and its kept indices from two sorts (`select.kept_in_order`); a chunk with nothing
cached before it needs no index arithmetic for its mask. A decoding step -- one new token after a
cached prefix, with ``decode_skip`` off -- is never routed (a lone vision placeholder arriving as a
one-token chunk is processed like text): it runs the stock block against the compact cache with the
cache's key padding mask extended by one column, and no host sync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import compat
from .cache import MoDCacheLayer, StaticMoDCacheLayer, mod_cache_layer
from .config import MoDConfig
from .masks import EAGER_LIKE, FLASH_LIKE, allowed_pairs, backend_mask, causal_in_order, check_window
from .router import Router, build_router, token_weights
from .select import group_keep_count, keep_count, keep_count_host, kept_in_order, topk_per_group, topk_per_sample

logger = logging.getLogger(__name__)

BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# sandwich norms (Gemma 2 / 3): the attention output is normed by `post_attention_layernorm` before the
# residual add, the MLP branch reads `pre_feedforward_layernorm(h)` and is normed by `post_feedforward_layernorm`
SANDWICH_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass
class LayerStats:
    """What one MoD layer did in one forward, per sample ([B] tensors on the CPU)."""

    layer_idx: int
    tokens: torch.Tensor  # real tokens of the chunk (padding excluded)
    candidates: torch.Tensor  # tokens that competed
    kept: torch.Tensor  # real tokens that went through the layer
    cached: torch.Tensor | None = None  # of those, the ones a later query can still attend (a sliding window cut them)


@dataclass
class RouterRecord:
    """Router outputs and the decision of one MoD layer, kept for the routing loss (training only)."""

    layer_idx: int
    logits: torch.Tensor  # [B, T, C] float32
    weights: torch.Tensor  # [B, T]
    candidates: torch.Tensor  # [B, T] bool
    keep: torch.Tensor  # [B, T] bool (the top-k decision)


@dataclass
class RoutingContext:
    """Per-forward routing inputs, made by the adapter from `input_ids` and passed to every layer.

    candidates [B, T]: vision tokens of the current chunk (the adapter's answer; the config's
        ``candidates`` rule may widen it).
    groups [B, T]: group id per token for per-group selection (video frames), -1 outside groups.
    blocks [B, T]: bidirectional attention block of each token of the chunk (Gemma 3: one per image, as the
        stock model's mask from ``token_type_ids``), -1 outside; None where attention is causal only. A MoD
        layer's mask lets kept tokens of one block attend each other both ways, by original index.
    attention_mask [B, S]: the 2-D padding mask of past + current tokens (1 = real), or None; or the 4-D
        mask [B, 1, T, S] generate passes with a static cache (`chunk_tokens` reads the chunk's padding from it).
    stats: when a list, each MoD layer appends its `LayerStats` (used by `efficiency`).
    records: when a list, each MoD layer appends its `RouterRecord` (used by the routing loss).
    """

    candidates: torch.Tensor | None
    groups: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    stats: list[LayerStats] | None = field(default=None)
    records: list[RouterRecord] | None = field(default=None)
    _host: torch.Tensor | None = field(default=None, repr=False)
    _shared: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def shared(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """A value every MoD layer of this forward shares (masks, templates), made by the first that asks."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def token_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """[B, T] bool: real (non-padding) tokens of the current chunk; None when no mask was given."""
        if self.attention_mask is None:
            return None
        return self.shared(("tokens", length, device), lambda: chunk_tokens(self.attention_mask, length, device))

    def vision(self, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, T] bool: candidate (vision) tokens of the chunk that are real tokens; None without candidates."""
        if self.candidates is None or token_mask is None:
            return self.candidates
        return self.shared(("vision", token_mask.device), lambda: self.candidates & token_mask)

    def constant(self, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 0-dim tensor on the device, made once per forward (``torch.where(c, t, 1.0)`` would make one per call)."""
        return self.shared(("constant", value, dtype, device), lambda: torch.full((), value, dtype=dtype, device=device))

    def host_lists(self, token_mask: torch.Tensor | None, batch: int) -> tuple[list[int], bool]:
        """`host_counts` as Python values: vision tokens per sample, and whether the chunk has any padding."""
        if "lists" not in self._shared:
            n_vision, n_padding = self.host_counts(token_mask, batch).tolist()
            self._shared["lists"] = (n_vision, any(n_padding))
        return self._shared["lists"]

    def host_counts(self, token_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[2, B] on the CPU: candidate (vision) tokens and padding tokens of the chunk per sample.

        Read from the device once per forward (every layer of a forward sees the same chunk), so the
        layers need no further host synchronisation for the common rules: sizes follow from these counts.
        """
        if self._host is None:
            vision = self.vision(token_mask)
            flags = [t for t in (vision, None if token_mask is None else ~token_mask) if t is not None]
            counts = torch.stack(flags).sum(dim=2).cpu() if flags else torch.zeros(0, batch, dtype=torch.long)  # [n, B]
            zeros = torch.zeros(batch, dtype=torch.long)
            n_vision = counts[0] if vision is not None else zeros
            n_padding = counts[-1] if token_mask is not None else zeros
            self._host = torch.stack([n_vision, n_padding])
        return self._host


@dataclass
class Route:
    """What a MoD layer's routing decided for one chunk.

    order [B, Tk]: indices of the tokens the layer runs on (kept tokens in original order, and in rows
        that keep fewer than Tk, filler slots);
    filled [B, Tk]: the slot holds a kept token (None: every slot does);
    weights [B, T]: the weighting rule's w (1 where a token did not compete), in the hidden states' dtype;
    competing [B, T]: tokens that competed.
    """

    order: torch.Tensor
    filled: torch.Tensor | None
    weights: torch.Tensor
    competing: torch.Tensor

    @property
    def length(self) -> int:
        return self.order.shape[1]


def combine(x: torch.Tensor, xk: torch.Tensor, h: torch.Tensor, m: torch.Tensor, route: Route, rule: str) -> torch.Tensor:
    """The layer's output [B, T, D]: kept tokens from x, h = x + attn, m = mlp(norm(h)) ([B, Tk, D]), the
    others as the weighting rule says for skipped tokens, scattered back to full length.

    ``route.weights`` is 1 on tokens that did not compete, so for them `string`, `mlp` and `output` give
    the stock block's ``h + m`` exactly (``1 * m == m``); `mod` selects it explicitly.
    """
    index = route.order[..., None].expand(-1, -1, x.shape[-1])  # [B, Tk, D]
    w = route.weights[..., None]  # [B, T, 1]
    wk = w.gather(1, route.order[..., None])  # [B, Tk, 1]
    if rule in ("string", "mlp"):
        out_k = torch.addcmul(h, wk, m)  # h + w * m: only the MLP branch is reweighted
    elif rule == "output":
        out_k = wk * (h + m)
    else:  # "mod"
        dense = h + m
        out_k = torch.where(route.competing.gather(1, route.order)[..., None], xk + wk * (dense - xk), dense)
    if route.filled is not None:  # filler slots hold skipped tokens: their skipped value
        out_k = torch.where(route.filled[..., None], out_k, xk * wk if rule == "string" else xk)
    out = x * w if rule == "string" else x.clone()  # [B, T, D]: skipped tokens (STRing scales them by w)
    return out.scatter_(1, index, out_k)


class MoDLayer(nn.Module):
    """A decoder layer in which only the selected routed tokens (and every non-routed token) are computed.

    `shared_router`: a router owned elsewhere (gamma-MoD's one router for all layers); it is referenced,
    not registered, so its parameters appear once in the model's state dict.
    `rotary`: the decoder's rotary embedding, needed only for ``positions="renumber"``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layer_idx: int,
        ratio: float,
        config: MoDConfig,
        hidden_size: int,
        shared_router: Router | None = None,
        rotary: nn.Module | None = None,
    ):
        super().__init__()
        missing = [name for name in BLOCK_PARTS if not hasattr(base_layer, name)]
        if missing:
            raise TypeError(
                f"{type(base_layer).__name__} is not a pre-norm decoder layer (missing {missing}); "
                "MoD layers wrap Llama-, Mistral- and Qwen2-style layers"
            )
        if config.positions == "renumber" and rotary is None:
            raise ValueError("positions='renumber' needs the decoder's rotary embedding")
        self.base_layer = base_layer
        self.sandwich = all(hasattr(base_layer, name) for name in SANDWICH_PARTS)  # Gemma 2 / 3 norms
        self.layer_type = getattr(base_layer.self_attn, "layer_type", None)  # per-type RoPE (Gemma 3)
        self.window = compat.attention_window(base_layer.self_attn)  # None: global attention
        if shared_router is None:
            self.router = build_router(config, hidden_size, device=next(base_layer.parameters()).device)
        else:
            object.__setattr__(self, "router", shared_router)  # not a submodule of this layer
        object.__setattr__(self, "rotary", rotary)
        self.layer_idx = layer_idx
        self.ratio = ratio
        self.mod_config = config
        self.gradient_checkpointing = False  # set by HF's gradient_checkpointing_enable
        self._cache_kwarg: str | None = None  # the wrapped attention's name for its cache keyword

    def _cache_kwargs(self, cache: Any) -> dict[str, Any]:
        """The cache keyword of the wrapped attention (its own name for it in this transformers release)."""
        if self._cache_kwarg is None:  # looked up once (a signature read; a compiled step would trace it)
            self._cache_kwarg = compat.cache_kwarg(self.base_layer.self_attn)
        return {self._cache_kwarg: cache}

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, ratio={self.ratio:.6f}, weighting={self.mod_config.weighting!r}"

    # -- routing ---------------------------------------------------------------------------------
    @property
    def candidate_rule(self) -> str:
        """Which tokens compete now: ``config.candidates`` in training, ``inference_candidates`` (if set) at eval."""
        cfg = self.mod_config
        return cfg.inference_candidates if not self.training and cfg.inference_candidates else cfg.candidates

    def competing(self, ctx: RoutingContext, token_mask: torch.Tensor, past: int, has_vision: bool) -> torch.Tensor | None:
        """[B, T] tokens that compete for this layer under `candidate_rule`, or None (all kept)."""
        cfg, rule = self.mod_config, self.candidate_rule
        vision = ctx.candidates & token_mask if ctx.candidates is not None else None
        if not has_vision:  # a text-only chunk: a generated token, or a prompt without images
            if past > 0 and cfg.decode_skip:
                return token_mask
            if rule not in ("all", "leading") or past > 0:
                return None
        if rule == "vision":
            return vision
        if rule == "all":
            return token_mask
        if rule == "leading":  # the first `leading_tokens` real tokens of rows longer than that (prefill only)
            if past > 0:
                return None
            index = token_mask.long().cumsum(dim=1)  # [B, T]: 1-based index among the row's real tokens
            return token_mask & (index <= cfg.leading_tokens) & (index[:, -1:] > cfg.leading_tokens)
        # "vision_and_prefix": masked routing, the prompt before the first vision token competes too
        prefix = (vision.cumsum(dim=1) == 0) & vision.any(dim=1, keepdim=True) & token_mask if past == 0 else False
        return vision | prefix

    def kept_rows(self, n_keep: torch.Tensor, ctx: RoutingContext, token_mask: torch.Tensor, decoding: bool) -> torch.Tensor:
        """Kept tokens per row ([B], CPU) of the device counts `n_keep` [B]. For top-k over vision tokens
        the count is known ahead from the forward's host-side counts (no device sync); other rules read
        `n_keep` back."""
        cfg = self.mod_config
        if self.candidate_rule == "vision" and cfg.selection == "topk" and not decoding and (self.training or cfg.inference == "topk"):
            n_vision = ctx.host_counts(token_mask, len(n_keep))[0]  # [B]
            return token_mask.shape[1] - n_vision + keep_count(n_vision, self.ratio)  # padding rows keep their padding
        return n_keep.cpu()

    def select(self, weights: torch.Tensor, candidates: torch.Tensor, ctx: RoutingContext, decoding: bool) -> torch.Tensor:
        """Keep mask [B, T] from token weights [B, T]; non-candidates are always kept. Thresholds as
        gamma-MoD's reference: a prefill token is kept when ``w > threshold``, a generated one when
        ``w >= decode_threshold`` (it skips the layer when below)."""
        cfg = self.mod_config
        if decoding:
            return ~candidates | (weights >= cfg.decode_keep_threshold)
        if not self.training and cfg.inference == "threshold":
            return ~candidates | (weights > cfg.threshold)
        if cfg.selection == "group":
            if ctx.groups is None:
                raise ValueError(f"MoD layer {self.layer_idx} routes per group but the adapter gave no groups")
            return topk_per_group(weights, candidates, ctx.groups, self.ratio)
        if self.candidate_rule == "leading":  # the reference keeps ceil(ratio * leading_tokens) of them
            return topk_per_sample(weights, candidates, self.ratio, count=group_keep_count)
        return topk_per_sample(weights, candidates, self.ratio)

    # -- the stock block on the kept tokens --------------------------------------------------------
    def block(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        position_ids: torch.Tensor | None,
        cache: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``h = x + attn(norm1(x))`` and ``m = mlp(norm2(h))``, both [B, Tk, D]; with sandwich norms
        (Gemma 2 / 3) ``h = x + post_attn_norm(attn(norm1(x)))`` and ``m = post_ff_norm(mlp(pre_ff_norm(h)))``,
        so ``h + m`` is the stock layer's output and the weighting rules scale the whole MLP branch."""
        base = self.base_layer
        attn, _ = base.self_attn(
            hidden_states=base.input_layernorm(x),
            position_embeddings=(cos, sin),
            attention_mask=mask,
            position_ids=position_ids,
            **self._cache_kwargs(cache),
            **kwargs,
        )
        if self.sandwich:
            h = x + base.post_attention_layernorm(attn)
            return h, base.post_feedforward_layernorm(base.mlp(base.pre_feedforward_layernorm(h)))
        h = x + attn
        return h, base.mlp(base.post_attention_layernorm(h))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        mod_routing: RoutingContext | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # the cache arrives as `cache` (transformers 5.24+) or `past_key_values`: take it under either name
        past_key_values = compat.pop_cache(kwargs)
        self._run_base_pre_hooks(hidden_states)
        x = hidden_states  # [B, T, D]
        batch, length, dim = x.shape
        device = x.device
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
            past_key_values = None  # as the stock layers do: no cache under gradient checkpointing
        cache_layer = mod_cache_layer(past_key_values, self.layer_idx, self.window) if past_key_values is not None else None
        if isinstance(cache_layer, StaticMoDCacheLayer) and self.window is not None and cache_layer.max_cache_len > self.window:
            raise NotImplementedError(
                f"MoD layer {self.layer_idx} has a {self.window}-token sliding window, shorter than the static cache "
                f"({cache_layer.max_cache_len}): a static MoD cache keeps no window (its fixed-shape decoding step "
                "attends every slot); use the default dynamic cache"
            )
        if isinstance(cache_layer, StaticMoDCacheLayer) and cache_layer.allocated:  # decoding with fixed shapes
            return self._static_step(x, position_ids, position_embeddings, mod_routing, cache_layer, past_key_values, kwargs)
        past = cache_layer.seen if cache_layer is not None else 0
        ctx = mod_routing
        if ctx is None:
            logger.debug("MoD layer %d: no routing context (no input_ids?); running dense", self.layer_idx)
            ctx = RoutingContext(candidates=None)
        token_mask = ctx.token_mask(length, device)  # [B, T] real tokens, or None (no mask given)

        # 1. route: which tokens compete and which this layer keeps
        if length == 1 and past > 0 and not self.mod_config.decode_skip:  # a decoding step: never routed
            route, chunk_valid = None, token_mask  # no host sync: whether the token is padding stays on the device
        else:
            n_vision, padded = ctx.host_lists(token_mask, batch)  # vision tokens per sample; any padding (one sync per forward)
            route = self.route(x, ctx, token_mask, past, n_vision)
            chunk_valid = token_mask if padded else None  # [B, T], or None: no padding

        # 2. gather the kept tokens ([B, Tk, ...]) and book their cache entries
        if route is None:
            order, kept_len, filled, q_valid = None, length, None, chunk_valid
            xk, pos_k = x, position_ids
            cos, sin = self._positions(position_embeddings, None, q_valid, cache_layer, x, ctx)  # [B or 1, T, hd]
        else:
            order, kept_len, filled = route.order, route.length, route.filled
            q_valid = _both(chunk_valid.gather(1, order) if chunk_valid is not None else None, filled)  # [B, Tk]
            xk = x.gather(1, order[..., None].expand(batch, kept_len, dim))  # [B, Tk, D]
            cos, sin = self._positions(position_embeddings, order, q_valid, cache_layer, x, ctx)  # [B, Tk, hd]
            pos_k = None  # the attention reads positions from (cos, sin); gapped ids would look packed to flash
        if cache_layer is not None:  # before the attention appends K/V: the mask below reads the full entries
            index = None if order is None else (order + past if past else order)
            cache_layer.record(length, kept_len, batch, device, index=index, filled=filled, valid=q_valid)

        # 3. run the stock block on the kept tokens
        if kept_len == 0:  # every token of the chunk skips this layer (a skipped decoding step)
            h = m = x[:, :0]
        else:
            mask = self._attention_mask(attention_mask, ctx, route, q_valid, past, length, cache_layer, x)
            if checkpointing:
                h, m = self._gradient_checkpointing_func(self.block, xk, mask, cos, sin, pos_k, None)
            else:
                h, m = self.block(xk, mask, cos, sin, pos_k, past_key_values, **kwargs)

        # 4. combine and scatter back to full length
        out = h + m if route is None else combine(x, xk, h, m, route, self.mod_config.weighting)  # [B, T, D]
        if ctx.stats is not None:
            n_cand = route.competing.sum(dim=1).cpu() if route is not None else torch.zeros(batch, dtype=torch.long)
            stats = LayerStats(self.layer_idx, _count(token_mask, batch, length), n_cand, _count(q_valid, batch, kept_len))
            if self.window is not None and past + length >= self.window:  # kept tokens of index > seen - window
                kept_index = past + (order if order is not None else torch.arange(length, device=device).expand(batch, length))
                stats.cached = _count(_both(q_valid, kept_index > past + length - self.window), batch, kept_len)
            ctx.stats.append(stats)
        self._run_base_hooks(hidden_states, out)
        return out

    def _static_step(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        ctx: RoutingContext | None,
        cache_layer: StaticMoDCacheLayer,
        cache: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """A decoding step against a static compact cache: the stock block on the new token, attending all C
        slots of the layer's cache with its validity mask (the unfilled tail masked). Fixed shapes, no host
        sync, no Python state that changes from step to step (what torch.compile guards on)."""
        batch, length = x.shape[:2]
        if length != 1 or self.mod_config.decode_skip:
            raise NotImplementedError(
                f"MoD layer {self.layer_idx}: a static MoD cache decodes one token per step, never routed "
                f"(got {length} tokens, decode_skip={self.mod_config.decode_skip}); use the default dynamic cache"
            )
        token_mask = ctx.token_mask(1, x.device) if ctx is not None else None  # [B, 1], or None: a real token
        cache_layer.record(1, 1, batch, x.device, valid=token_mask)
        k_valid = cache_layer.key_valid()  # [B, C], this token's slot included
        implementation = self.base_layer.self_attn.config._attn_implementation
        mask = backend_mask(k_valid[:, None, :], k_valid, implementation, x.dtype)  # allowed [B, 1, C]
        if self.mod_config.positions == "renumber":  # the valid entries before this one
            positions = (k_valid.sum(dim=1, keepdim=True) - 1).clamp(min=0)  # [B, 1]
            cos, sin = compat.rotary_embeddings(self.rotary, x, positions, self.layer_type)  # [B, 1, hd]
        else:
            cos, sin = position_embeddings
        h, m = self.block(x, mask, cos, sin, position_ids, cache, **kwargs)
        out = h + m  # [B, 1, D]
        if ctx is not None and ctx.stats is not None:
            real = _count(token_mask, batch, length)
            ctx.stats.append(LayerStats(self.layer_idx, real, torch.zeros(batch, dtype=torch.long), real))
        self._run_base_hooks(x, out)
        return out

    def route(
        self, x: torch.Tensor, ctx: RoutingContext, token_mask: torch.Tensor | None, past: int, n_vision: list[int]
    ) -> Route | None:
        """Score and select the chunk's tokens; None when nothing competes (the layer runs every token).
        n_vision: the chunk's real vision tokens per sample."""
        cfg = self.mod_config
        batch, length = x.shape[:2]
        has_vision = any(n_vision)
        real = token_mask if token_mask is not None else ctx.shared(("real", length, x.device), lambda: torch.ones(batch, length, dtype=torch.bool, device=x.device))
        rule = self.candidate_rule
        if rule == "vision":  # `competing` for this rule, with the forward's shared vision mask
            candidates = ctx.vision(token_mask) if has_vision else None
        else:
            candidates = self.competing(ctx, real, past, has_vision)
        if candidates is None:
            return None
        router_in = self.base_layer.input_layernorm(x) if cfg.router_input == "normed" else x
        logits = self.router(router_in)  # [B, T, C] float32
        weights = token_weights(logits, cfg)  # [B, T]
        decoding = past > 0 and ctx.candidates is not None and not has_vision
        if rule == "vision" and cfg.selection == "topk" and not decoding and ctx.records is None and (
            self.training or cfg.inference == "topk"
        ):  # top-k over vision tokens: the kept counts follow from the host-side counts, no sync
            rows = [length - n + keep_count_host(n, self.ratio) for n in n_vision]  # padding rows keep their padding
            kept_len = max(rows)
            order, rank = kept_in_order(weights, candidates, kept_len, ctx.constant(torch.inf, weights.dtype, x.device))  # [B, Tk]
            filled = None if min(rows) == kept_len else rank < torch.tensor(rows, device=x.device)[:, None]
        else:
            keep = self.select(weights, candidates, ctx, decoding)  # [B, T]
            if ctx.records is not None:
                ctx.records.append(RouterRecord(self.layer_idx, logits, weights, candidates, keep))
            n_keep = keep.sum(dim=1)  # [B] on the device
            rows = self.kept_rows(n_keep, ctx, real, decoding)  # [B] CPU
            kept_len = int(rows.max())
            # kept positions first, in original order; the tail of each row (filler slots) is masked
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :kept_len]  # [B, Tk]
            uniform = bool((rows == kept_len).all())
            filled = None if uniform else torch.arange(kept_len, device=x.device)[None, :] < n_keep[:, None]
        if cfg.weight_all:  # every token that goes through is reweighted (gamma-MoD's reference), forced-keep text too
            w = weights
        else:  # [B, T]: non-competitors are not reweighted
            w = torch.where(candidates, weights, ctx.constant(1.0, weights.dtype, x.device))
        return Route(order, filled, w if w.dtype == x.dtype else w.to(x.dtype), candidates)

    def _positions(
        self,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        order: torch.Tensor | None,
        q_valid: torch.Tensor | None,
        cache_layer: MoDCacheLayer | None,
        x: torch.Tensor,
        ctx: RoutingContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [B, Tk, hd] of the kept tokens (`order` None: every token of the chunk, in place):
        their original ones, or renumbered 0..k-1 (decoding positions follow the layer's shorter cache)."""
        if self.mod_config.positions == "renumber":
            valid = cache_layer.valid if cache_layer is not None else None  # entries before this chunk
            before = valid.sum(dim=1, keepdim=True) if valid is not None else 0
            if cache_layer is not None and cache_layer.window is not None:  # and those the window dropped
                dropped = cache_layer.dropped()
                before = before + (dropped[:, None] if isinstance(dropped, torch.Tensor) else dropped)
            shape = order.shape if order is not None else x.shape[:2]
            counted = q_valid if q_valid is not None else torch.ones(shape, dtype=torch.bool, device=x.device)
            positions = (before + counted.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, Tk]
            return compat.rotary_embeddings(self.rotary, x, positions, self.layer_type)
        if order is None:
            return position_embeddings
        batch, kept_len = order.shape
        cos, sin = position_embeddings  # [B or 1, T, hd]
        hd = cos.shape[-1]
        both = ctx.shared(("rope", id(cos)), lambda: torch.cat([cos, sin], dim=-1))  # [B or 1, T, 2 hd], once per forward
        picked = both.expand(batch, -1, -1).gather(1, order[..., None].expand(batch, kept_len, 2 * hd))  # [B, Tk, 2 hd]
        return picked[..., :hd], picked[..., hd:]

    def _attention_mask(
        self,
        stock_mask: Any,
        ctx: RoutingContext,
        route: Route | None,
        q_valid: torch.Tensor | None,
        past: int,
        length: int,
        cache_layer: MoDCacheLayer | None,
        x: torch.Tensor,
    ) -> Any:
        """The mask of the kept tokens' attention, in the backend's format (None: plain causal)."""
        implementation = self.base_layer.self_attn.config._attn_implementation
        window = self.window
        check_window(implementation, window, past + length)
        if ctx.blocks is not None and implementation in FLASH_LIKE:
            raise NotImplementedError(
                f"MoD layer {self.layer_idx}: bidirectional image blocks (Gemma 3's token_type_ids) need a mask by "
                f"original index; {implementation} takes only a key padding mask. Use attn_implementation='sdpa' or 'eager'"
            )
        if window is not None and past + length <= window:
            window = None  # no key is ever farther than the window
        device, kept_len = x.device, length if route is None else route.length
        if past == 0 and route is None:  # every token and nothing cached: the stock layer's own mask is the right one
            if isinstance(stock_mask, torch.Tensor) and stock_mask.dim() == 4 and stock_mask.shape[-1] > length:
                return stock_mask[..., :length]  # a static cache's mask spans its whole length; the keys are the chunk's
            return stock_mask
        blocks = ctx.blocks  # [B, T] bidirectional blocks of the chunk (Gemma 3's images), or None
        if past == 0 and window is None and blocks is None:  # kept tokens in original order, nothing cached before them
            if q_valid is None:
                if implementation in EAGER_LIKE:
                    causal = ctx.shared(("causal", length, x.dtype, device), lambda: _additive_causal(length, x.dtype, device))
                    return causal[..., :kept_len, :kept_len]  # [1, 1, Tk, Tk]
                return None  # sdpa's and flash's own causal kernels
            if implementation in FLASH_LIKE:
                return backend_mask(None, q_valid, implementation, x.dtype)
            tril, eye = ctx.shared(("tril", length, device), lambda: _tril_eye(length, device))
            allowed = causal_in_order(q_valid, tril[:kept_len, :kept_len], eye[:kept_len, :kept_len])  # [B, Tk, Tk]
            return backend_mask(allowed, q_valid, implementation, x.dtype)
        if kept_len == 1 and window is None:  # one query after the cache: it attends every valid entry and itself
            k_valid = cache_layer.key_valid() if cache_layer is not None else q_valid  # [B, S + 1] or None
            if k_valid is None:
                return None
            return backend_mask(k_valid[:, None, :], k_valid, implementation, x.dtype)  # allowed [B, 1, S + 1]
        # the general rule, by original indices (chunks after a cache, sliding windows, bidirectional blocks)
        order = route.order if route is not None else torch.arange(length, device=device).expand(x.shape[0], length)
        q_index = past + order  # [B, Tk]
        k_valid = q_valid if q_valid is not None else torch.ones_like(order, dtype=torch.bool)
        k_index = q_index
        q_block = k_block = None if blocks is None else blocks.gather(1, order)  # [B, Tk]
        if cache_layer is not None:  # the cache already holds this chunk's bookkeeping
            k_index, k_valid = cache_layer.index, cache_layer.valid  # [B, S + Tk]
            if q_block is not None:  # cached entries precede every query: causality alone decides them
                k_block = torch.nn.functional.pad(q_block, (k_index.shape[1] - kept_len, 0), value=-1)  # [B, S + Tk]
        allowed = allowed_pairs(q_index, k_index, k_valid, window, q_block, k_block)  # [B, Tk, S + Tk]
        return backend_mask(allowed, k_valid, implementation, x.dtype)

    def _run_base_pre_hooks(self, hidden_states: torch.Tensor) -> None:
        """Forward pre-hooks placed on the wrapped layer run as if it were called, so that hook pairs
        (DeepSpeed ZeRO-3's gather/release, which keeps a stack of running modules) stay balanced.
        Their return values are ignored: the inputs of a MoD layer are not the wrapped layer's to change."""
        base = self.base_layer
        for hook_id, hook in base._forward_pre_hooks.items():
            if hook_id in base._forward_pre_hooks_with_kwargs:
                hook(base, (hidden_states,), {})
            else:
                hook(base, (hidden_states,))

    def _run_base_hooks(self, hidden_states: torch.Tensor, out: torch.Tensor) -> None:
        """Forward hooks placed on the wrapped layer (e.g. transformers' `output_hidden_states` recorder)
        see the full-length input and output, as if the stock layer had run."""
        base = self.base_layer
        for hook_id, hook in base._forward_hooks.items():
            if hook_id in base._forward_hooks_with_kwargs:
                hook(base, (hidden_states,), {}, out)
            else:
                hook(base, (hidden_states,), out)


def chunk_tokens(mask: torch.Tensor, length: int, device: torch.device) -> torch.Tensor | None:
    """[B, T] bool: the real (non-padding) tokens of the current chunk of `length` tokens, from the model's
    attention mask: a 2-D padding mask [B, S] (its last T columns), or the 4-D mask [B, 1, T, S] (bool, or
    additive float) generate passes with a static cache. In the 4-D mask the chunk's last query (a real
    token: prompts are left-padded) attends every real key up to its own column, the last one it attends;
    the chunk is the T columns ending there. A one-token chunk is taken as real (None: no padding)."""
    if mask.dim() == 2:
        return mask[:, -length:].to(device=device, dtype=torch.bool)
    if length == 1:
        return None
    keys = mask[:, 0, -1]  # [B, S]: what the last query attends
    keys = keys if keys.dtype == torch.bool else keys == 0
    last = keys.shape[1] - 1 - keys.flip(1).to(torch.int8).argmax(dim=1)  # [B]: the last query's own column
    columns = last[:, None] - (length - 1) + torch.arange(length, device=keys.device)  # [B, T]
    return keys.gather(1, columns.clamp(min=0)).to(device)


def _count(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """[B] on the CPU: True entries per row of `mask` [B, L] (None: all L)."""
    return mask.sum(dim=1).cpu() if mask is not None else torch.full((batch,), length)


def _both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a & b, where None stands for all True."""
    return b if a is None else a if b is None else a & b


def _tril_eye(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, T] bool templates: slot i may see slot j <= i; slot i is slot j."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril(), torch.eye(length, dtype=torch.bool, device=device)


def _additive_causal(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] additive causal mask for eager attention."""
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]

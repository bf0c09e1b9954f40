"""The MoD wrapper around a stock pre-norm decoder layer: score -> select -> gather -> run -> scatter.

The wrapped layer is kept as ``base_layer`` and its own submodules do the work (input norm, attention
through transformers' attention registry, post-attention norm, MLP), so every attention backend,
weight format and checkpoint key of the stock model is untouched. Only the kept tokens go through the
layer; they keep their original positions (RoPE sees the real indices, with gaps; or renumbered
positions, gamma-MoD's variant) and attend causally to the kept subset, and to the layer's own compact
cache when generating.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import compat
from .cache import MoDCacheLayer, mod_cache_layer
from .config import MoDConfig
from .masks import SDPA_LIKE, allowed_pairs, backend_mask
from .router import Router, build_router, token_weights
from .select import keep_count, topk_per_group, topk_per_sample

logger = logging.getLogger(__name__)

BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class LayerStats:
    """What one MoD layer did in one forward, per sample ([B] tensors on the CPU)."""

    layer_idx: int
    tokens: torch.Tensor  # real tokens of the chunk (padding excluded)
    candidates: torch.Tensor  # tokens that competed
    kept: torch.Tensor  # real tokens that went through the layer


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
    attention_mask [B, S]: the 2-D padding mask of past + current tokens (1 = real), or None.
    stats: when a list, each MoD layer appends its `LayerStats` (used by `efficiency`).
    records: when a list, each MoD layer appends its `RouterRecord` (used by the routing loss).
    """

    candidates: torch.Tensor | None
    groups: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    stats: list[LayerStats] | None = field(default=None)
    records: list[RouterRecord] | None = field(default=None)
    _host: torch.Tensor | None = field(default=None, repr=False)

    def host_counts(self, token_mask: torch.Tensor) -> torch.Tensor:
        """[2, B] on the CPU: candidate (vision) tokens and padding tokens of the chunk per sample.

        Read from the device once per forward (every layer of a forward sees the same chunk), so the
        layers need no further host synchronisation for the common rules: sizes follow from these counts.
        """
        if self._host is None:
            vision = self.candidates & token_mask if self.candidates is not None else torch.zeros_like(token_mask)
            self._host = torch.stack([vision.sum(dim=1), (~token_mask).sum(dim=1)]).cpu()
        return self._host


def combine_kept(
    x: torch.Tensor, h: torch.Tensor, m: torch.Tensor, w: torch.Tensor, routed: torch.Tensor, rule: str
) -> torch.Tensor:
    """Output of tokens that went through the layer. x, h = x + attn, m = mlp(norm(h)): [B, Tk, D]."""
    dense = h + m  # the stock block's output
    wd = w.to(x.dtype)[..., None]  # [B, Tk, 1]
    if rule in ("string", "mlp"):
        out = h + wd * m  # only the MLP branch is reweighted
    elif rule == "output":
        out = wd * dense
    else:  # "mod"
        out = x + wd * (dense - x)
    return torch.where(routed[..., None], out, dense)  # tokens that did not compete: the ordinary block


def combine_skipped(x: torch.Tensor, w: torch.Tensor, rule: str) -> torch.Tensor:
    """Output of tokens that skip the layer ([B, T, D]); STRing scales them by w, other rules pass x."""
    return x * w.to(x.dtype)[..., None] if rule == "string" else x


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
        if shared_router is None:
            self.router = build_router(config, hidden_size, device=next(base_layer.parameters()).device)
        else:
            object.__setattr__(self, "router", shared_router)  # not a submodule of this layer
        object.__setattr__(self, "rotary", rotary)
        self.layer_idx = layer_idx
        self.ratio = ratio
        self.mod_config = config
        self.gradient_checkpointing = False  # set by HF's gradient_checkpointing_enable

    def _cache_kwargs(self, cache: Any) -> dict[str, Any]:
        """The cache keyword of the wrapped attention (its own name for it in this transformers release)."""
        return compat.cache_kwargs(cache, self.base_layer.self_attn)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, ratio={self.ratio:.6f}, weighting={self.mod_config.weighting!r}"

    # -- routing ---------------------------------------------------------------------------------
    def competing(self, ctx: RoutingContext, token_mask: torch.Tensor, past: int, has_vision: bool) -> torch.Tensor | None:
        """[B, T] tokens that compete for this layer under ``config.candidates``, or None (all kept)."""
        cfg = self.mod_config
        vision = ctx.candidates & token_mask if ctx.candidates is not None else None
        if not has_vision:  # a text-only chunk: a generated token, or a prompt without images
            if past > 0 and cfg.decode_skip:
                return token_mask
            if cfg.candidates != "all" or past > 0:
                return None
        if cfg.candidates == "vision":
            return vision
        if cfg.candidates == "all":
            return token_mask
        # "vision_and_prefix": masked routing, the prompt before the first vision token competes too
        prefix = (vision.cumsum(dim=1) == 0) & vision.any(dim=1, keepdim=True) & token_mask if past == 0 else False
        return vision | prefix

    def kept_rows(self, n_keep: torch.Tensor, ctx: RoutingContext, token_mask: torch.Tensor, decoding: bool) -> torch.Tensor:
        """Kept tokens per row ([B], CPU) of the device counts `n_keep` [B]. For top-k over vision tokens
        the count is known ahead from the forward's host-side counts (no device sync); other rules read
        `n_keep` back."""
        cfg = self.mod_config
        if cfg.candidates == "vision" and cfg.selection == "topk" and not decoding and (self.training or cfg.inference == "topk"):
            n_vision = ctx.host_counts(token_mask)[0]  # [B]
            return token_mask.shape[1] - n_vision + keep_count(n_vision, self.ratio)  # padding rows keep their padding
        return n_keep.cpu()

    def select(self, weights: torch.Tensor, candidates: torch.Tensor, ctx: RoutingContext, decoding: bool) -> torch.Tensor:
        """Keep mask [B, T] from token weights [B, T]; non-candidates are always kept."""
        cfg = self.mod_config
        if decoding or (not self.training and cfg.inference == "threshold"):
            return ~candidates | (weights >= cfg.threshold)
        if cfg.selection == "group":
            if ctx.groups is None:
                raise ValueError(f"MoD layer {self.layer_idx} routes per group but the adapter gave no groups")
            return topk_per_group(weights, candidates, ctx.groups, self.ratio)
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
        """Returns ``h = x + attn(norm1(x))`` and ``m = mlp(norm2(h))``, both [B, Tk, D]."""
        base = self.base_layer
        attn, _ = base.self_attn(
            hidden_states=base.input_layernorm(x),
            position_embeddings=(cos, sin),
            attention_mask=mask,
            position_ids=position_ids,
            **self._cache_kwargs(cache),
            **kwargs,
        )
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
        cfg = self.mod_config
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
            past_key_values = None  # as the stock layers do: no cache under gradient checkpointing
        cache_layer = mod_cache_layer(past_key_values, self.layer_idx) if past_key_values is not None else None
        past = cache_layer.seen if cache_layer is not None else 0
        ctx = mod_routing
        if ctx is None:
            logger.debug("MoD layer %d: no routing context (no input_ids?); running dense", self.layer_idx)
            ctx = RoutingContext(candidates=None)
        token_mask = _chunk_padding_mask(ctx, batch, length, device)  # [B, T] real tokens

        # 1. score and select
        n_vision, n_padding = ctx.host_counts(token_mask)  # [B] each, on the CPU (one sync per forward)
        has_vision = bool(n_vision.any())
        candidates = self.competing(ctx, token_mask, past, has_vision)
        routed = candidates is not None
        if routed:
            router_in = self.base_layer.input_layernorm(x) if cfg.router_input == "normed" else x
            logits = self.router(router_in)  # [B, T, C] float32
            weights = token_weights(logits, cfg)  # [B, T]
            decoding = past > 0 and ctx.candidates is not None and not has_vision
            keep = self.select(weights, candidates, ctx, decoding)  # [B, T]
            if ctx.records is not None:
                ctx.records.append(RouterRecord(self.layer_idx, logits, weights, candidates, keep))
            n_keep = keep.sum(dim=1)  # [B] on the device
            rows = self.kept_rows(n_keep, ctx, token_mask, decoding)  # [B] CPU
            kept_len, uniform = int(rows.max()), bool((rows == rows[0]).all())
            # kept positions first, in original order; the tail of each row (filler slots) is masked
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :kept_len]  # [B, Tk]
            filled = torch.arange(kept_len, device=device)[None, :] < n_keep[:, None]  # [B, Tk]
        else:
            kept_len, uniform = length, True
            order = torch.arange(length, device=device).expand(batch, length)  # [B, T]
            filled = torch.ones(batch, length, dtype=torch.bool, device=device)
        all_valid = uniform and not bool(n_padding.any())  # no filler slot and no padding in the chunk
        q_index = past + order  # [B, Tk] original sequence index
        q_valid = filled & token_mask.gather(1, order)  # [B, Tk]

        # 2. gather and run the stock block on the kept tokens
        gather_d = order[..., None].expand(batch, kept_len, dim)  # [B, Tk, D]
        if kept_len == 0:  # every token of the chunk skips this layer (a skipped decoding step)
            h = m = x[:, :0]
        else:
            xk = x.gather(1, gather_d) if routed else x  # [B, Tk, D]
            cos, sin = self._positions(position_embeddings, order, q_valid, cache_layer, x)  # [B, Tk, hd]
            pos_k = position_ids.expand(batch, -1).gather(1, order) if position_ids is not None else None
            k_index, k_valid = q_index, q_valid
            if cache_layer is not None and cache_layer.index is not None:
                k_index = torch.cat([cache_layer.index, q_index], dim=1)  # [B, S + Tk]
                k_valid = torch.cat([cache_layer.valid, q_valid], dim=1)
            mask = self._attention_mask(q_index, k_index, k_valid, x.dtype, plain_causal=(past == 0 and all_valid))
            if checkpointing:
                h, m = self._gradient_checkpointing_func(self.block, xk, mask, cos, sin, pos_k, None)
            else:
                h, m = self.block(xk, mask, cos, sin, pos_k, past_key_values, **kwargs)
        if cache_layer is not None:
            cache_layer.record(q_index, filled, q_valid, length)

        # 3. combine and scatter back to full length
        if routed:
            out = combine_skipped(x, weights, cfg.weighting)  # [B, T, D]
            if kept_len:
                out_k = combine_kept(xk, h, m, weights.gather(1, order), candidates.gather(1, order), cfg.weighting)
                out_k = torch.where(filled[..., None], out_k, out.gather(1, gather_d))  # fillers keep their value
                out = out.scatter(1, gather_d, out_k)  # [B, T, D]
        else:
            out = h + m
        if ctx.stats is not None:
            n_cand = candidates.sum(dim=1) if routed else torch.zeros(batch, dtype=torch.long)
            ctx.stats.append(LayerStats(self.layer_idx, token_mask.sum(1).cpu(), n_cand.cpu(), q_valid.sum(1).cpu()))
        self._run_base_hooks(hidden_states, out)
        return out

    def _positions(
        self,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        order: torch.Tensor,
        q_valid: torch.Tensor,
        cache_layer: MoDCacheLayer | None,
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [B, Tk, hd] of the kept tokens: their original ones, or renumbered 0..k-1."""
        batch = order.shape[0]
        if self.mod_config.positions == "renumber":
            before = cache_layer.valid.sum(dim=1, keepdim=True) if cache_layer is not None and cache_layer.valid is not None else 0
            positions = (before + q_valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, Tk]
            return self.rotary(x, positions)
        cos, sin = position_embeddings  # [B or 1, T, hd]
        index = order[..., None].expand(-1, -1, cos.shape[-1])  # [B, Tk, hd]
        return cos.expand(batch, -1, -1).gather(1, index), sin.expand(batch, -1, -1).gather(1, index)

    def _attention_mask(
        self, q_index: torch.Tensor, k_index: torch.Tensor, k_valid: torch.Tensor, dtype: torch.dtype, plain_causal: bool
    ) -> torch.Tensor | None:
        attn = self.base_layer.self_attn
        implementation = attn.config._attn_implementation
        # Qwen2 sets it per layer on the attention module; Mistral reads it from the config
        window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        if plain_causal and window is None and implementation in SDPA_LIKE:
            return None  # nothing is masked but the future: let sdpa use its causal kernels
        return backend_mask(allowed_pairs(q_index, k_index, k_valid, window), k_valid, implementation, dtype)

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


def _chunk_padding_mask(ctx: RoutingContext, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B, T] bool: real (non-padding) tokens of the current chunk."""
    if ctx.attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return ctx.attention_mask[:, -length:].to(device=device, dtype=torch.bool)

"""Analytic prefill FLOPs and KV-cache bytes of a decoder, dense and MoD, from the model's real shapes.

Convention (the one `torch.utils.flop_counter.FlopCounterMode` and most papers use): a multiply-add is
2 FLOPs; attention counts the full ``Tq x Tk`` score and value products (no discount for the causal
mask); norms, RoPE, softmax, gathers and scatters are not counted. A layer that processes ``n`` tokens:

    projections  2 n D (H hd) + 2 * 2 n D (Hkv hd) + 2 n (H hd) D
    attention    2 * 2 n n H hd
    gated MLP    3 * 2 n D I
    router       2 T D      (MoD layers score all T tokens)

The LM head (``2 T D V``) is reported separately: generation computes it for the last position only.

Sliding windows (Gemma 3's local layers, Mistral, Qwen2 with ``use_sliding_window``): eager and sdpa compute
the full rectangle whatever the mask hides, so a window changes no FLOPs here (FlopCounterMode agrees); it
changes the KV cache. After an n-token prefill a sliding layer keeps the tokens a later query can attend,
original index ``> n - window``, the last ``window - 1`` (transformers' `DynamicSlidingWindowLayer`; MoD's
compact cache drops by the same rule): a dense sliding layer ``min(n, window - 1)`` entries, a MoD sliding
layer the kept tokens among those positions (`window_entries`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .select import group_keep_count, keep_count


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int

    @classmethod
    def from_config(cls, text_config) -> DecoderShape:
        heads = text_config.num_attention_heads
        return cls(
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            vocab=text_config.vocab_size,
            layers=text_config.num_hidden_layers,
        )

    def layer_flops(self, tokens: int, keys: int | None = None) -> int:
        """FLOPs of one decoder layer over `tokens` queries attending `keys` keys (default: the same)."""
        keys = tokens if keys is None else keys
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * tokens * self.hidden * (2 * q_dim + 2 * kv_dim)
        attention = 4 * tokens * keys * q_dim
        mlp = 6 * tokens * self.hidden * self.intermediate
        return projections + attention + mlp

    def router_flops(self, tokens: int, outputs: int = 1) -> int:
        return 2 * tokens * self.hidden * outputs  # Linear(D, C); the bias add is not a multiply-add

    def lm_head_flops(self, tokens: int) -> int:
        return 2 * tokens * self.hidden * self.vocab

    def kv_bytes_per_entry(self, bytes_per_element: int) -> int:
        return 2 * self.kv_heads * self.head_dim * bytes_per_element


def kept_tokens(ratios: list[float], n_text: int, n_vision: int, tokens_per_frame: int | None = None) -> list[int]:
    """Tokens each layer processes for one sample (dense layers: all): text + trunc(ratio * n_vision), or
    with `tokens_per_frame` (per-frame top-k, VideoLLM-MoD) text + frames * ceil(ratio * tokens_per_frame)."""
    if tokens_per_frame is not None and n_vision % tokens_per_frame:
        raise ValueError(f"{n_vision} vision tokens are not whole frames of {tokens_per_frame}")

    def vision(r: float) -> int:
        if r == 1.0:
            return n_vision
        if tokens_per_frame is None:
            return int(keep_count(torch.tensor(n_vision), r))
        return n_vision // tokens_per_frame * int(group_keep_count(torch.tensor(tokens_per_frame), r))

    return [n_text + vision(r) for r in ratios]


def window_entries(
    kept: int, n_text: int, n_vision: int, window: int | None, text_after: int | None = None
) -> int:
    """KV entries a layer that processed `kept` of a sample's ``n_text + n_vision`` tokens holds after the
    prefill: all `kept` without a window or when the sample fits it (``n <= window - 1``); else the kept tokens
    among the last ``window - 1`` positions: all of them for a dense layer (``kept == n``); for a MoD layer the
    text there plus its kept vision tokens there, which depend on where the router's picks fall. This counts
    them as spread evenly over the vision tokens (``floor(k * v_in / n_vision)``, k the kept vision tokens,
    v_in the vision tokens in the window), on the layout text (``n_text - text_after``), vision, then
    `text_after` text tokens (default: all text after the vision). A measured count (`efficiency`) replaces
    this estimate."""
    total = n_text + n_vision
    if window is None or total <= window - 1:
        return kept
    tail = window - 1  # positions a later query can attend
    if kept >= total:
        return tail
    after = n_text if text_after is None else text_after
    vision_in = min(max(tail - after, 0), n_vision)
    text_in = tail - vision_in  # the text after the vision, and text before it once the window reaches there
    vision_kept = min(max(kept - n_text, 0), n_vision)
    return text_in + (vision_kept * vision_in // n_vision if n_vision else 0)


@dataclass
class PrefillCost:
    """Cost of one sample's prefill through the decoder, per layer and in total."""

    tokens_per_layer: list[int]
    flops_per_layer: list[int]
    lm_head_flops: int
    kv_entries_per_layer: list[int]
    kv_bytes: int

    @property
    def decoder_flops(self) -> int:
        return sum(self.flops_per_layer)

    @property
    def tflops(self) -> float:
        return self.decoder_flops / 1e12


def prefill_cost(
    shape: DecoderShape,
    ratios: list[float],
    n_text: int,
    n_vision: int,
    bytes_per_element: int = 2,
    mod_layers: list[bool] | None = None,
    tokens_per_layer: list[int] | None = None,
    tokens_per_frame: int | None = None,
    router_outputs: int = 1,
    windows: list[int | None] | None = None,
    kv_entries_per_layer: list[int | None] | None = None,
    text_after: int | None = None,
) -> PrefillCost:
    """Prefill cost for one sample of `n_text` text and `n_vision` vision tokens.

    `ratios`: per-layer keep ratio (all 1.0 = dense). `mod_layers`: which layers route (and so pay for a
    router); by default the layers with ratio < 1. `tokens_per_layer`: measured kept tokens, for rules
    whose count is data-dependent (threshold routing, routed text); by default text + trunc(r * vision).
    `tokens_per_frame`: count per-frame top-k instead (see `kept_tokens`). `router_outputs`: the router's
    width (1 for p-MoD / VideoLLM-MoD, 2 for gamma-MoD's shared 2-way router). `windows`: each layer's
    sliding window (None: global): its KV entries are those a later query can attend (`window_entries`, with
    `text_after`); `kv_entries_per_layer`: measured entries (None where the formula applies), for MoD layers
    whose window cut the sample (which kept tokens fall in the window is the router's choice).
    """
    if len(ratios) != shape.layers:
        raise ValueError(f"{len(ratios)} ratios for a decoder of {shape.layers} layers")
    mod_layers = [r < 1.0 for r in ratios] if mod_layers is None else mod_layers
    total = n_text + n_vision
    tokens = kept_tokens(ratios, n_text, n_vision, tokens_per_frame) if tokens_per_layer is None else tokens_per_layer
    flops = [shape.layer_flops(t) + (shape.router_flops(total, router_outputs) if routed else 0) for t, routed in zip(tokens, mod_layers)]
    windows = [None] * shape.layers if windows is None else windows
    measured = [None] * shape.layers if kv_entries_per_layer is None else kv_entries_per_layer
    entries = [
        m if m is not None else window_entries(t, n_text, n_vision, w, text_after)
        for t, w, m in zip(tokens, windows, measured)
    ]
    return PrefillCost(
        tokens_per_layer=tokens,
        flops_per_layer=flops,
        lm_head_flops=shape.lm_head_flops(total),
        kv_entries_per_layer=entries,
        kv_bytes=sum(entries) * shape.kv_bytes_per_entry(bytes_per_element),
    )

"""Attention masks for the kept subset of a MoD layer, in the format each attention backend takes.

Causality is decided by each token's original sequence index, not by its slot in the gathered
tensor, so the same rule serves prefill (gathered kept tokens), decoding against a compact cache,
left padding, and the filler slots that make a batch rectangular (`allowed_pairs`). Two common cases
need no indices, because kept tokens are gathered in original order and every cached entry precedes
a new chunk: a chunk with nothing cached before it (`causal_in_order`: slot order is index order) and
one decoding token (it may attend every valid entry: the key padding mask alone).

Bidirectional blocks (Gemma 3: the tokens of one image attend each other both ways) are told by each
token's block id, gathered with it, so a kept image token sees the other kept tokens of its image, later
ones included, as in the dense model's mask; they take the general rule (`allowed_pairs`).

A sliding window counts original positions. sdpa and eager get it in their [B, 1, Tq, Tk] masks;
flash-attention kernels take a 2-D key padding mask and apply the window to slot distances, which are
shorter than original distances once tokens were skipped, so flash + window is refused as soon as the
window could bite (`check_window`).
"""

from __future__ import annotations

import torch

EAGER_LIKE = ("eager",)
SDPA_LIKE = ("sdpa",)
FLASH_LIKE = ("flash_attention_2", "flash_attention_3")
SUPPORTED = EAGER_LIKE + SDPA_LIKE + FLASH_LIKE


def allowed_pairs(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    k_valid: torch.Tensor,
    sliding_window: int | None = None,
    q_block: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, Tq, Tk]: query i may attend key j.

    q_index [B, Tq], k_index [B, Tk]: original sequence indices; k_valid [B, Tk]: real keys (not
    padding, not filler). q_block [B, Tq], k_block [B, Tk]: bidirectional blocks (Gemma 3's images):
    a query also attends the later keys of its own block (id >= 0), as transformers' ``blockwise_overlay``
    ORed with causality; the sliding window is ANDed after, over original distances (``kv > q - window``).
    A query row that would attend nothing (a padding or filler query) attends its own key instead, so no
    row is all masked (softmax over nothing gives NaN, and NaN leaks through ``0 * NaN`` in the next
    layer). Such rows are never read.
    """
    qi = q_index[:, :, None]  # [B, Tq, 1]
    kj = k_index[:, None, :]  # [B, 1, Tk]
    order = kj <= qi  # [B, Tq, Tk]
    if q_block is not None:
        order = order | ((q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0))
    allowed = k_valid[:, None, :] & order  # [B, Tq, Tk]
    if sliding_window is not None:
        allowed &= (qi - kj) < sliding_window
    empty = ~allowed.any(dim=-1, keepdim=True)  # [B, Tq, 1]
    return allowed | (empty & (kj == qi))


def causal_in_order(valid: torch.Tensor, tril: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Boolean [B, Tk, Tk] for a chunk of kept tokens in original order with nothing cached before them:
    slot i attends the valid slots j <= i, and always itself (a padding or filler query then attends
    something, as in `allowed_pairs`; its row is never read). valid [B, Tk]; tril, eye [Tk, Tk] bool."""
    return (valid[:, None, :] & tril) | eye


def check_window(implementation: str, window: int | None, length: int) -> None:
    """Refuse flash-attention with a sliding window shorter than the sequence (`length` tokens so far)."""
    if implementation in FLASH_LIKE and window is not None and length > window:
        raise NotImplementedError(
            f"MoD layers with {implementation} and a sliding window ({window} tokens) cannot follow original "
            f"positions on a {length}-token sequence: flash kernels take a 2-D key padding mask and apply the "
            "window to the gathered slots, not to original positions. Use attn_implementation='sdpa' or "
            "'eager' (their masks follow original positions), or sequences no longer than the window."
        )


def backend_mask(
    allowed: torch.Tensor | None,
    k_valid: torch.Tensor | None,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """`allowed` [B, Tq, Tk] (None: plain causal, nothing masked) in the backend's own format.
    k_valid [B, Tk]: the valid keys (None: all of them)."""
    if implementation in FLASH_LIKE:
        # flash kernels take a 2-D key padding mask and apply causality bottom-right aligned, which is
        # what gathered order gives: kept tokens are in original order, fillers are masked keys.
        return None if k_valid is None else k_valid.to(torch.int32)  # [B, Tk]
    if allowed is None:
        if implementation in SDPA_LIKE:
            return None  # is_causal path
        raise AssertionError("eager attention needs an explicit mask")
    if implementation in SDPA_LIKE:
        return allowed[:, None]  # [B, 1, Tq, Tk], True = attend
    if implementation in EAGER_LIKE:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]  # additive [B, 1, Tq, Tk]
    raise NotImplementedError(
        f"attention implementation {implementation!r} is not supported by MoD layers; use one of {SUPPORTED}"
    )

"""MoD attention masks on the CPU: the index-free fast forms equal the rule by original indices, and
flash-attention with a sliding window is refused where the window would count gathered slots (issue 13)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

import mllm_mod
from mllm_mod.masks import allowed_pairs, backend_mask, causal_in_order, check_window


def kept_chunk(seed: int = 0, batch: int = 3, length: int = 12, kept: int = 7):
    """Kept tokens of a chunk in original order, with left padding and filler slots."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(length, generator=gen)[:kept].sort().values for _ in range(batch)])  # [B, Tk]
    valid = torch.rand(batch, kept, generator=gen) > 0.3  # [B, Tk]
    valid[:, -1] = True
    return order, valid


def test_causal_in_order_equals_the_rule_by_original_index():
    order, valid = kept_chunk()
    kept = order.shape[1]
    tril = torch.ones(kept, kept, dtype=torch.bool).tril()
    eye = torch.eye(kept, dtype=torch.bool)
    fast = causal_in_order(valid, tril, eye)  # [B, Tk, Tk]
    by_index = allowed_pairs(order, order, valid)
    real = valid[:, :, None].expand_as(fast)  # rows of real queries are the ones ever read
    assert torch.equal(fast[real], by_index[real])
    assert fast.any(dim=-1).all()  # no query attends nothing (NaN)


def test_sliding_window_counts_original_positions():
    order = torch.tensor([[0, 1, 5, 9, 10]])  # gathered slots 0..4
    valid = torch.ones_like(order, dtype=torch.bool)
    allowed = allowed_pairs(order, order, valid, sliding_window=4)
    assert allowed[0, 3].tolist() == [False, False, False, True, False]  # index 9 sees 9 only (5 is 4 away)
    assert allowed[0, 4].tolist() == [False, False, False, True, True]  # slot distance 2, index distance 5
    sdpa = backend_mask(allowed, valid, "sdpa", torch.float32)
    assert sdpa.shape == (1, 1, 5, 5) and torch.equal(sdpa[:, 0], allowed)


def test_flash_takes_a_key_padding_mask():
    _, valid = kept_chunk()
    flash = backend_mask(None, valid, "flash_attention_2", torch.float16)
    assert flash.dtype == torch.int32 and torch.equal(flash.bool(), valid)
    assert backend_mask(None, None, "flash_attention_2", torch.float16) is None


def test_flash_with_a_window_is_refused_only_where_it_would_bite():
    check_window("flash_attention_2", 24, 24)  # the window covers the whole sequence: exact
    check_window("sdpa", 24, 100)  # sdpa and eager masks follow original positions
    check_window("flash_attention_2", None, 100)
    with pytest.raises(NotImplementedError, match="sliding window .* original positions"):
        check_window("flash_attention_2", 24, 25)


def test_flash_with_a_window_refused_at_the_first_forward():
    """A Mistral decoder switched to flash-attention-2 after retrofit: the first MoD layer refuses before any
    kernel runs (flash-attn itself is not needed to see it)."""
    from mllm_mod.tiny import tiny_model

    model, processor = tiny_model("llava_next", num_layers=2, attn="sdpa", decoder="mistral", sliding_window=24)
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=0.5)
    inputs = make_inputs(processor, n=1)
    assert inputs["input_ids"].shape[1] > 24
    layer = model.model.language_model.layers[0]
    layer.base_layer.self_attn.config._attn_implementation = "flash_attention_2"
    x = torch.randn(1, inputs["input_ids"].shape[1], 32)
    rope = model.model.language_model.rotary_emb(x, torch.arange(x.shape[1])[None])
    ctx = mllm_mod.adapter_for(model).routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    with pytest.raises(NotImplementedError, match="flash_attention_2 and a sliding window"), torch.no_grad():
        layer(x, position_embeddings=rope, mod_routing=ctx)

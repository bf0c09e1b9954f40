"""Invariants 2-4 of DESIGN.md section 6 with real routing (ratio < 1, trained-like routers)."""

from __future__ import annotations

import pytest
import torch

import mllm_mod
from mllm_mod import compat
from conftest import build, make_inputs, randomize_routers
from logits import assert_batch_equals_single, assert_cached_equals_uncached, assert_logits_close, single
from mllm_mod.cache import MoDCacheLayer, kv_entries
from mllm_mod.layer import MoDLayer
from mllm_mod.select import keep_count
from mllm_mod.compat import output_cache

FAMILIES = ["llava", "llava_next", "llava_onevision"]


def pmod_model(family: str, attn: str = "sdpa"):
    model, processor = build(family, attn)
    mllm_mod.retrofit(model, "pmod")  # 4 layers: layer 0 dense, 1-3 at 0.75, 0.25, 0.15
    randomize_routers(model)
    return model, processor


def test_pmod_on_four_layers():
    model, _ = pmod_model("llava")
    assert mllm_mod.layer_ratios(model) == pytest.approx([1.0, 0.75, 0.25, 0.15])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached(family, attn):
    model, processor = pmod_model(family, attn)
    inputs = make_inputs(processor)
    assert_cached_equals_uncached(model, inputs, 6, "cached == uncached (pmod)")


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(family):
    model, processor = pmod_model(family)
    batch = make_inputs(processor, n=3)
    alone = [single(batch, i) for i in range(3)]
    assert_batch_equals_single(model, batch, alone, 6, "left-padded batch == alone (pmod)")
    with torch.no_grad():  # every real prompt position too, not only the generated steps
        batch_logits = model(**batch).logits  # [B, T, V]
        for i, one in enumerate(alone):
            real = batch["attention_mask"][i].bool()
            assert_logits_close(batch_logits[i, real], model(**one).logits[0], "left-padded batch == alone (pmod)")


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_holds_text_plus_kept_vision(family):
    model, processor = pmod_model(family)
    inputs = make_inputs(processor)
    n_vision = torch.isin(inputs["input_ids"], torch.tensor(mllm_mod.adapter_for(model).vision_token_ids(model.config)))
    n_vision = (n_vision & inputs["attention_mask"].bool()).sum(1)  # [B]
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    entries = kv_entries(cache)
    ratios = mllm_mod.layer_ratios(model)
    for idx, r in enumerate(ratios):
        layer = cache.layers[idx]
        if r == 1.0:
            assert not isinstance(layer, MoDCacheLayer)
            assert entries[idx].tolist() == [length] * 3
        else:
            assert isinstance(layer, MoDCacheLayer)
            expected = length - n_vision + keep_count(n_vision, r)  # text (incl. padding) + kept vision
            assert entries[idx].tolist() == expected.tolist(), f"layer {idx}"
            assert layer.keys.shape[-2] == int(expected.max())  # tensor holds no more than the longest sample
            assert layer.get_seq_length() == length  # positions stay those of the full sequence
    assert cache.get_seq_length() == length


def test_skipped_token_is_exactly_w_times_x():
    model, processor = pmod_model("llava")
    layer: MoDLayer = model.model.language_model.layers[3]
    inputs = make_inputs(processor, n=1)
    captured = {}
    layer.register_forward_hook(lambda m, a, k, o: captured.update(x=a[0] if a else k["hidden_states"], out=o, ctx=k["mod_routing"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    x, out, ctx = captured["x"], captured["out"], captured["ctx"]  # [1, T, D]
    w = 0.2 * torch.tanh(layer.router(x).squeeze(-1)) + 1.0  # [1, T] TanhNorm, by hand
    keep = mllm_mod.select.topk_per_sample(w, ctx.candidates, layer.ratio)
    skipped = ctx.candidates & ~keep
    n_vision = int(ctx.candidates.sum())
    assert int(skipped.sum()) == n_vision - int(n_vision * 0.15) > 0
    torch.testing.assert_close(out[skipped], (w[..., None] * x)[skipped], atol=0, rtol=0)


def test_string_kept_token_scales_only_the_mlp_branch():
    """A kept vision token: x + attn + w * mlp, checked against the stock layer's own pieces."""
    model, processor = pmod_model("llava", "eager")
    layer: MoDLayer = model.model.language_model.layers[1]
    inputs = make_inputs(processor, n=1)
    captured = {}
    layer.register_forward_hook(lambda m, a, k, o: captured.update(x=a[0], out=o, k=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    x, out, kw = captured["x"], captured["out"], captured["k"]
    ctx = kw["mod_routing"]
    w = 0.2 * torch.tanh(layer.router(x).squeeze(-1)) + 1.0
    keep = mllm_mod.select.topk_per_sample(w, ctx.candidates, layer.ratio)[0]  # [T]
    idx = keep.nonzero().squeeze(1)
    base = layer.base_layer
    xk = x[:, idx]
    cos, sin = (t[:, idx] for t in kw["position_embeddings"])
    n = len(idx)
    causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        attn, _ = base.self_attn(base.input_layernorm(xk), (cos, sin), causal)
        h = xk + attn
        m = base.mlp(base.post_attention_layernorm(h))
    wk = w[:, idx, None]
    vision = ctx.candidates[:, idx, None]
    expected = torch.where(vision, h + wk * m, h + m)
    torch.testing.assert_close(out[:, idx], expected, atol=1e-5, rtol=1e-5)


def test_no_image_tokens_runs_dense(caplog):
    model, processor = build("llava")
    processor.tokenizer.padding_side = "left"
    text = processor.tokenizer(["USER : what color is red ? ASSISTANT :"], return_tensors="pt")
    with torch.no_grad():
        dense = model(**text).logits
    mllm_mod.retrofit(model, "pmod")
    randomize_routers(model)
    with caplog.at_level("DEBUG", logger="mllm_mod"), torch.no_grad():
        mod = model(**text).logits
    torch.testing.assert_close(mod, dense, atol=1e-5, rtol=1e-5)
    assert "no vision tokens in this batch" in caplog.text


def test_trainable_parameters_only_change():
    """Invariant 6: with only routers trainable, a step changes routers and nothing else."""
    model, processor = pmod_model("llava")
    for name, p in model.named_parameters():
        p.requires_grad_(".router." in name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = make_inputs(processor, padding_side="right")
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    model.train()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    routers = {n for n in before if ".router." in n}
    assert changed == routers


def test_gradient_checkpointing_matches_plain_backward():
    model, processor = pmod_model("llava")
    inputs = make_inputs(processor, padding_side="right")
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    model.train()
    model(**inputs, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compat.enable_checkpointing(model, {"use_reentrant": False})  # this release's method (5.24 renamed it)
    mod_layers = [m for m in model.modules() if isinstance(m, MoDLayer)]
    assert mod_layers and all(m.gradient_checkpointing for m in mod_layers)
    calls = []
    for m in mod_layers:
        m._gradient_checkpointing_func = _counting(m._gradient_checkpointing_func, calls)
    model(**inputs, labels=labels).loss.backward()
    assert len(calls) == len(mod_layers)
    assert any(".router." in n for n in grads)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def _counting(func, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    return wrapped


def test_hooks_on_the_wrapped_layer_run_in_balanced_pairs():
    """Pre-hooks and hooks placed on a wrapped layer (DeepSpeed ZeRO-3 places such pairs) both run once."""
    model, processor = pmod_model("llava")
    base = model.model.language_model.layers[2].base_layer
    calls = []
    base.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    base.register_forward_hook(lambda m, a, o: calls.append(("post", tuple(o.shape))))
    inputs = make_inputs(processor)
    with torch.no_grad():
        model(**inputs)
    assert calls == ["pre", ("post", (3, inputs["input_ids"].shape[1], 32))]

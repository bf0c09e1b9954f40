"""A sliding-window MoD layer's compact cache keeps what the stock sliding cache would (transformers'
`DynamicSlidingWindowLayer`: the last ``window - 1`` tokens), counted by original index, and the accounting
(`flops.py`, `efficiency.py`) counts the window on both sides.

On the tiny Gemma 3 (window 12, prompts 28-45 tokens, left-padded, bidirectional image blocks), a tiny
LLaVA-NeXT-Mistral (window 24, prompts 70-104 tokens) and a tiny LLaVA-NeXT-Qwen2 with ``use_sliding_window``
(layer 0 global, 1-3 sliding): at ratio 1 every layer's cache holds the stock sliding cache's real entries and
no more slots, through a decode longer than the window; at ratio < 1 cached == uncached and a left-padded batch
== each sample alone at the logit level over a decode of more than ``window`` steps, no MoD layer holds more
slots than the stock layer, and the cache's entries and efficiency's KV ratio equal the accounting."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, randomize_routers
from logits import assert_batch_equals_single, assert_cached_equals_uncached, single
from test_gemma3 import gemma_inputs

import mllm_mod
from mllm_mod.cache import MoDCacheLayer, kv_entries
from mllm_mod.compat import attention_window, output_cache
from mllm_mod.efficiency import dense, efficiency
from mllm_mod.flops import DecoderShape, prefill_cost, window_entries
from mllm_mod.tiny import gemma3_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def family_model(name: str, attn: str = "sdpa"):
    """(model, left-padded inputs, window) of a tiny windowed model whose prompts are longer than the window."""
    if name == "gemma3":
        return gemma3_model(attn=attn), gemma_inputs(), 12
    kwargs = {"sliding_window": 24}
    if name == "qwen2":  # layer 0 global, 1-3 sliding
        kwargs.update(use_sliding_window=True, max_window_layers=1)
    model, processor = tiny_model("llava_next", num_layers=4, attn=attn, decoder=name, **kwargs)
    return model, dict(make_inputs(processor, 3)), 24


def alone(name: str, inputs: dict) -> list[dict]:
    if name == "gemma3":
        return [gemma_inputs([i]) for i in range(3)]
    return [single(inputs, i) for i in range(3)]


def windows_of(model) -> list[int | None]:
    layers = mllm_mod.adapter_for(model).layers(model)
    return [attention_window((layer.base_layer if isinstance(layer, mllm_mod.MoDLayer) else layer).self_attn) for layer in layers]


def generate_cache(model, inputs: dict, new_tokens: int):
    """Greedy decode of `new_tokens`; (the cache, the 2-D mask of the sequence it holds)."""
    out = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True
    )
    cache = output_cache(out)
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(out.sequences), new_tokens - 1, dtype=torch.long)], dim=1)
    return cache, mask


FAMILIES = ["gemma3", "mistral", "qwen2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_ratio_one_holds_the_stock_sliding_cache(name):
    """Every layer MoD at ratio 1: after a prompt longer than the window and a decode of more than `window`
    steps, each layer holds the stock cache's real entries (the same K/V where no row is padded) in no more slots."""
    model, inputs, window = family_model(name)
    assert min(inputs["attention_mask"].sum(1).tolist()) > window and any(w == window for w in windows_of(model))
    steps = window + 3
    with torch.no_grad():
        stock, mask = generate_cache(model, inputs, steps)
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    with torch.no_grad():
        mod, mod_mask = generate_cache(model, inputs, steps)
    assert torch.equal(mask, mod_mask)
    for i, (ours, theirs, w) in enumerate(zip(mod.layers, stock.layers, windows_of(model))):
        assert isinstance(ours, MoDCacheLayer) and ours.window == w
        assert getattr(theirs, "is_sliding", False) == (w is not None)
        assert ours.keys.shape[-2] <= theirs.keys.shape[-2], i
    assert [e.tolist() for e in kv_entries(mod, mask)] == [e.tolist() for e in kv_entries(stock, mask)]
    full = inputs["attention_mask"].bool().all(dim=1)  # unpadded rows hold the very same entries, slot for slot
    for ours, theirs in zip(mod.layers, stock.layers):
        if ours.window is not None:
            assert ours.keys.shape == theirs.keys.shape
            torch.testing.assert_close(ours.keys[full], theirs.keys[full], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.values[full], theirs.values[full], atol=1e-5, rtol=1e-5)


def routed(name: str, attn: str = "sdpa", **overrides):
    model, inputs, window = family_model(name, attn)
    mllm_mod.retrofit(model, "pmod", **overrides)
    randomize_routers(model)
    return model, inputs, window


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_equals_uncached_past_the_window(name):
    model, inputs, window = routed(name)
    assert_cached_equals_uncached(model, inputs, window + 2, f"cached == uncached past the window (pmod, {name})")


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_alone_past_the_window(name):
    """Left padding: each row compacts to its own kept entries in the window (rows that keep fewer get invalid
    slots in front), and decodes as the sample alone."""
    model, inputs, window = routed(name)
    assert_batch_equals_single(model, inputs, alone(name, inputs), window + 2, f"left-padded batch == alone past the window (pmod, {name})")


@pytest.mark.parametrize("name", FAMILIES)
def test_no_more_slots_than_the_stock_cache_and_entries_as_accounted(name):
    model, inputs, window = routed(name)
    windows = windows_of(model)
    report = efficiency(model, inputs)  # entries after the prefill == the accounting (window on both sides)
    assert report.accounting_matches, report.mismatches
    layers = mllm_mod.adapter_for(model).layers(model)
    assert any(isinstance(layers[i], mllm_mod.MoDLayer) and layers[i].ratio < 1 and w for i, w in enumerate(windows))
    # the dense reference is the stock sliding cache, measured: the same weights with the stock layers back
    with dense(model), torch.no_grad():
        stock = output_cache(model(**inputs, use_cache=True))
    stock_entries = [e.tolist() for e in kv_entries(stock, inputs["attention_mask"])]
    shape = DecoderShape.from_config(mllm_mod.adapter_for(model).text_config(model.config))
    per_entry = shape.kv_bytes_per_entry(stock.layers[0].keys.element_size())
    assert [sum(e[b] for e in stock_entries) * per_entry for b in range(3)] == report.dense_kv_bytes
    assert [sum(e[b] for e in report.kv_entries_per_layer) * per_entry for b in range(3)] == report.mod_kv_bytes
    measured = sum(map(sum, report.kv_entries_per_layer)) / sum(map(sum, stock_entries))
    assert measured == pytest.approx(report.kv_ratio, abs=1e-12) and report.kv_ratio < 1
    for b, t in enumerate(inputs["attention_mask"].sum(1).tolist()):  # stock sliding layers: min(n, window - 1)
        assert [e[b] for e in stock_entries] == [t if w is None else min(t, w - 1) for w in windows]
    # through a decode past the window, no MoD layer holds more slots than the stock layer
    with torch.no_grad():
        mod, _ = generate_cache(model, inputs, window + 2)
        with dense(model):
            stock, _ = generate_cache(model, inputs, window + 2)
    for i, (ours, theirs) in enumerate(zip(mod.layers, stock.layers)):
        assert ours.keys.shape[-2] <= theirs.keys.shape[-2], i


def test_renumbered_positions_count_the_entries_the_window_dropped():
    """gamma-MoD renumbers kept tokens 0..k-1; the window drops old entries, the count goes on (Mistral)."""
    model, inputs, window = family_model("mistral")
    mllm_mod.retrofit(model, "gmod", threshold=0.5, decode_threshold=0.5)
    randomize_routers(model, scale=2.0)
    assert_cached_equals_uncached(model, inputs, window + 2, "cached == uncached past the window (gmod, renumber, mistral)")


def test_window_entries_formula():
    """`window_entries` on hand-counted layouts; `prefill_cost` with windows (the dense side is the stock cache)."""
    # 100 tokens: 20 text before, 60 vision, 20 text after; window 31 (30 positions a later query attends)
    assert window_entries(100, 40, 60, 31, text_after=20) == 30  # dense: the last window - 1
    assert window_entries(70, 40, 60, None, text_after=20) == 70  # no window
    assert window_entries(70, 40, 60, 200, text_after=20) == 70  # the sample fits the window
    assert window_entries(70, 40, 60, 31, text_after=20) == 20 + 30 * 10 // 60  # 20 text + kept vision spread evenly
    assert window_entries(70, 40, 60, 21, text_after=20) == 20  # the window holds text only
    assert window_entries(70, 40, 60, 91, text_after=20) == 20 + 10 + 30  # reaches the text before: 30 kept vision
    shape = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10, layers=3)
    windows = [31, None, 31]
    stock = prefill_cost(shape, [1.0] * 3, 40, 60, windows=windows, text_after=20)
    assert stock.kv_entries_per_layer == [30, 100, 30]
    assert stock.flops_per_layer == prefill_cost(shape, [1.0] * 3, 40, 60).flops_per_layer  # the window costs no FLOPs
    mod = prefill_cost(shape, [1.0, 0.5, 0.5], 40, 60, windows=windows, text_after=20, kv_entries_per_layer=[None, None, 27])
    assert mod.kv_entries_per_layer == [30, 70, 27]
    assert mod.kv_bytes == (30 + 70 + 27) * shape.kv_bytes_per_entry(2)


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_the_plugin_meter_counts_what_the_prefill_processed_and_holds(name):
    """lmms-eval's meter reads the prompt's costs from a cache: past the window it must still count every kept
    token a layer processed (FLOPs) and only the entries it holds (KV), as `efficiency` measures them."""
    from mllm_mod.eval.meter import prompt_tokens_per_layer, windowed

    model, inputs, window = routed(name)
    report = efficiency(model, inputs)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        generated, _ = generate_cache(model, inputs, window + 2)
    assert windowed(cache) and windowed(generated)
    processed = [t.tolist() for t in prompt_tokens_per_layer(cache, inputs["attention_mask"])]
    assert processed == report.kept_per_layer
    assert [e.tolist() for e in kv_entries(cache, inputs["attention_mask"])] == report.kv_entries_per_layer
    assert processed != report.kv_entries_per_layer  # the window did drop prompt entries: the two counts differ

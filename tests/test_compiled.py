"""`compile_layers`: torch.compile of the stock decoder layers keeps every MoD invariant it touches.

The first test captures graphs with a recording backend that runs them eagerly (fast: no inductor);
the others compile with inductor (C++ on the CPU: about a minute here), so they are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import mllm_mod
from mllm_mod.adapters import adapter_for
from mllm_mod.compiled import VARIANTS_PER_LAYER, compile_layers
from mllm_mod.layer import MoDLayer
from mllm_mod.tiny import tiny_model

def routed_model(num_layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = tiny_model("llava", num_layers=num_layers)
    model.eval()
    mllm_mod.retrofit(model, "pmod")
    with torch.no_grad():  # trained-like routers: scattered kept sets, not a prefix
        for name, p in model.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn_like(p) * 0.02)
    return model


def test_every_layer_runs_compiled_code_past_dynamos_recompile_limit(one_thread):
    """12 layers (more than dynamo's default 8 graphs per function): each layer's stock compute is
    captured, the MoD layers' through `block`, and nothing falls back to eager."""
    model = routed_model(num_layers=12)
    layers = adapter_for(model).layers(model)
    n_mod = sum(isinstance(layer, MoDLayer) for layer in layers)
    assert 0 < n_mod < 12
    ids = torch.randint(10, 100, (2, 40))
    ids[:, 8:33] = model.config.image_token_id
    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        eager = model(input_ids=ids, pixel_values=pixels).logits  # [B, T, V]

    captured: list[set[str]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        captured.append({node.name for node in gm.graph.nodes if node.op == "placeholder"})
        return gm.forward  # run the captured graph as it is

    compile_layers(model, backend=recording_backend)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    mod_blocks = [names for names in captured if "l_cos_" in names]  # MoDLayer.block(x, mask, cos, ...)
    stock = [names for names in captured if "l_cos_" not in names]  # a dense layer's own forward
    assert len(mod_blocks) == n_mod and len(stock) == 12 - n_mod, (len(mod_blocks), len(stock))
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_equal_eager_for_logits_padding_and_cached_generation(one_thread):
    model = routed_model()
    image_id = model.config.image_token_id
    ids = torch.randint(10, 100, (2, 40))
    ids[:, 8:33] = image_id  # 25 image tokens per sample (the tiny tower's count)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sample
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_logits = model(**inputs).logits  # [B, T, V]
        eager_tokens = model.generate(**inputs, **gen)

    counters.clear()
    compile_layers(model)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **gen)
        uncached = model.generate(**inputs, **gen, use_cache=False)
    # one graph per layer and call variant (prefill, padded prefill, decoding); dynamic shapes, so not
    # one per kept count
    assert 6 <= counters["stats"]["unique_graphs"] <= VARIANTS_PER_LAYER * 6, counters["stats"]
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, eager_tokens) and torch.equal(uncached, eager_tokens)

    layers = adapter_for(model).layers(model)
    assert any(isinstance(layer, MoDLayer) for layer in layers)
    for layer in layers:  # the stock compute compiled, the MoD wrapper (routing) eager
        stock = layer.base_layer if isinstance(layer, MoDLayer) else layer
        assert stock._compiled_call_impl is not None
        if isinstance(layer, MoDLayer):  # its stock parts run through the compiled `block`
            assert layer._compiled_call_impl is None and "block" in vars(layer)
    # state-dict keys are unchanged (no `_orig_mod.`), so saving and reloading the adapter still works
    assert not any("_orig_mod" in key for key in model.state_dict())


@pytest.mark.slow
def test_bench_compile_flag_compiles_dense_and_mod_alike(one_thread):
    from mllm_mod.bench import BenchOptions, markdown, run_benchmark

    options = BenchOptions(
        shape="tiny", device="cpu", dtype="float32", prefill_batches=(2,), decode_batches=(2,), warmup=1,
        repeats=1, sections=("prefill", "kv"), compile=True,
    )
    res = run_benchmark(options, progress=False)
    assert res.kv["mod_measured_bytes"] == res.kv["mod_accounted_bytes"]
    assert res.prefill[0]["mod_ms"] > 0 and res.prefill[0]["dense_ms"] > 0
    assert "stock layers compiled (torch.compile)" in markdown(res)


def test_retrofit_after_compiling_warns_to_compile_after(caplog):
    torch.manual_seed(0)
    model, _ = tiny_model("llava", num_layers=4)
    compile_layers(model)  # a dense model: only marks the layers, nothing is compiled until called
    with caplog.at_level("WARNING", logger="mllm_mod.retrofit"):
        mllm_mod.retrofit(model, "pmod")
    assert "compile_layers(model) after retrofit" in caplog.text

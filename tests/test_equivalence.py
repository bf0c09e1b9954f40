"""DESIGN.md section 6, invariants 1 and 7: ratio 1 with initial routers is the dense model."""

from __future__ import annotations

import pytest
import torch

import mllm_mod
from conftest import build, make_inputs
from logits import assert_logits_close, generate_logits

FAMILIES = ["llava", "llava_next", "llava_next_video", "llava_onevision"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_equals_dense(family, attn):
    model, processor = build(family, attn)
    inputs = make_inputs(processor)  # batch of 3, left padding, different image-token counts (NeXT/OV)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**inputs, output_hidden_states=True)
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    assert mllm_mod.layer_ratios(model) == [1.0] * 4
    assert all(isinstance(layer, mllm_mod.MoDLayer) for layer in model.model.language_model.layers)
    with torch.no_grad():
        mod = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(mod.logits[real], dense.logits[real], atol=1e-5, rtol=1e-5)
    # invariant 7: every layer's hidden state, full length
    assert len(mod.hidden_states) == len(dense.hidden_states) == 5
    for h_mod, h_dense in zip(mod.hidden_states, dense.hidden_states):
        assert h_mod.shape == h_dense.shape
        torch.testing.assert_close(h_mod[real], h_dense[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_generation_equals_dense(family):
    model, processor = build(family, "sdpa")
    inputs = make_inputs(processor)
    dense, dense_logits = generate_logits(model, inputs, 6)
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    mod, mod_logits = generate_logits(model, inputs, 6)
    assert_logits_close(mod_logits, dense_logits, "ratio 1 == dense (generation)")
    assert torch.equal(dense, mod)


def test_unload_restores_original_layers():
    model, processor = build("llava")
    originals = list(model.model.language_model.layers)
    mllm_mod.retrofit(model, "pmod")
    mllm_mod.unload(model)
    assert list(model.model.language_model.layers) == originals
    assert not hasattr(model, "mod_state") and not hasattr(model.config, "mod_config")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_sliding_window(attn):
    """LLaVA-NeXT-Mistral with a window shorter than the prompt: MoD masks apply the window by original index."""
    from mllm_mod.tiny import tiny_model

    model, processor = tiny_model("llava_next", num_layers=4, attn=attn, decoder="mistral", sliding_window=24)
    assert type(model.model.language_model).__name__ == "MistralModel"
    inputs = make_inputs(processor)
    real = inputs["attention_mask"].bool()
    assert inputs["input_ids"].shape[1] > 24
    with torch.no_grad():
        dense = model(**inputs).logits
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    with torch.no_grad():
        mod = model(**inputs).logits
    torch.testing.assert_close(mod[real], dense[real], atol=1e-5, rtol=1e-5)
    mllm_mod.unload(model)
    dense_gen, dense_logits = generate_logits(model, inputs, 5)
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    mod_gen, mod_logits = generate_logits(model, inputs, 5)
    assert_logits_close(mod_logits, dense_logits, "ratio 1 == dense (generation)")
    assert torch.equal(mod_gen, dense_gen)

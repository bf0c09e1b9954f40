"""Invariant 5: retrofit -> save -> reload reproduces logits exactly; wrong bases raise clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mllm_mod
from conftest import build, make_inputs, randomize_routers

RELOAD_SCRIPT = """
import sys, torch, mllm_mod
from mllm_mod.tiny import tiny_model
from conftest import make_inputs
model, processor = tiny_model("{family}", num_layers=4, seed=0)
{load}
inputs = make_inputs(processor)
with torch.no_grad():
    torch.save(model(**inputs).logits, sys.argv[1])
"""


def _reference(family: str, tmp_path):
    model, processor = build(family)
    mllm_mod.retrofit(model, "pmod")
    randomize_routers(model)
    inputs = make_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, processor, logits


def _run_fresh(script: str, out: str) -> torch.Tensor:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    subprocess.run([sys.executable, "-c", script, out], check=True, env=env)
    return torch.load(out)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_adapter_roundtrip_in_fresh_process(family, tmp_path):
    model, _, logits = _reference(family, tmp_path)
    mllm_mod.save_mod(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["mod_adapter.safetensors", "mod_config.json"]
    tensors = load_file(tmp_path / "adapter" / "mod_adapter.safetensors")
    assert set(tensors) == {f"layers.{i}.router.proj.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    saved = json.loads((tmp_path / "adapter" / "mod_config.json").read_text())
    assert saved["preset"] == "pmod" and saved["base_model"]["num_hidden_layers"] == 4
    assert set(saved["versions"]) == {"mllm_mod", "transformers", "torch"}
    load = f"model = mllm_mod.load_mod(model, {str(tmp_path / 'adapter')!r})"
    reloaded = _run_fresh(RELOAD_SCRIPT.format(family=family, load=load), str(tmp_path / "out.pt"))
    assert torch.equal(reloaded, logits)


def test_full_checkpoint_roundtrip_in_fresh_process(tmp_path):
    model, processor, logits = _reference("llava", tmp_path)
    with torch.no_grad():  # a "fine-tuned" base weight must survive too
        model.model.language_model.layers[2].base_layer.mlp.up_proj.weight.mul_(1.5)
        logits = model(**make_inputs(processor)).logits
    model.save_pretrained(tmp_path / "full")
    load = f"model = mllm_mod.from_pretrained({str(tmp_path / 'full')!r})"
    reloaded = _run_fresh(RELOAD_SCRIPT.format(family="llava", load=load), str(tmp_path / "out.pt"))
    assert torch.equal(reloaded, logits)


def test_from_pretrained_rejects_plain_checkpoint(tmp_path):
    model, _ = build("llava")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a full MoD checkpoint"):
        mllm_mod.from_pretrained(tmp_path / "plain")


def test_adapter_from_another_base_model_is_refused(tmp_path):
    model, _ = build("llava")
    mllm_mod.retrofit(model, "pmod")
    mllm_mod.save_mod(model, tmp_path / "adapter")
    other, _ = build("llava", num_layers=6)
    with pytest.raises(ValueError, match=r"different base model \(num_hidden_layers: saved 4 vs model 6\)"):
        mllm_mod.load_mod(other, tmp_path / "adapter")
    wider, _ = build("llava_onevision")
    with pytest.raises(ValueError, match="model_type: saved 'llava' vs model 'llava_onevision'"):
        mllm_mod.load_mod(wider, tmp_path / "adapter")
    assert not hasattr(other, "mod_state")  # nothing was mutated


def test_adapter_onto_a_same_shape_model_with_other_weights_or_vocab_is_flagged(tmp_path, caplog):
    """Same shapes, other weights (another seed): loads with a warning naming the weights digest; same shapes but
    another vocabulary size, or the same decoder under another model type: refused."""
    from mllm_mod.tiny import tiny_model

    model, _ = build("llava", seed=0)
    mllm_mod.retrofit(model, "pmod")
    mllm_mod.save_mod(model, tmp_path / "adapter")
    same, _ = build("llava", seed=0)
    with caplog.at_level("WARNING", logger="mllm_mod"):
        mllm_mod.load_mod(same, tmp_path / "adapter")
    assert "other weights" not in caplog.text
    other, _ = build("llava", seed=5)
    with caplog.at_level("WARNING", logger="mllm_mod"):
        mllm_mod.load_mod(other, tmp_path / "adapter")
    assert "MoD adapter saved from a base with other weights (embedding digest" in caplog.text
    vocab, _ = tiny_model("llava", num_layers=4, words=["extra", "words", "here"])
    assert vocab.config.text_config.vocab_size != model.config.text_config.vocab_size
    with pytest.raises(ValueError, match="vocab_size: saved"):
        mllm_mod.load_mod(vocab, tmp_path / "adapter")
    next_model, _ = build("llava_next")
    with pytest.raises(ValueError, match="model_type: saved 'llava' vs model 'llava_next'"):
        mllm_mod.load_mod(next_model, tmp_path / "adapter")


def test_adapter_with_missing_or_extra_keys_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, _ = build("llava")
    mllm_mod.retrofit(model, "pmod")
    mllm_mod.save_mod(model, tmp_path / "a")
    path = tmp_path / "a" / "mod_adapter.safetensors"
    tensors = load_file(path)
    tensors.pop("layers.3.router.proj.bias")
    tensors["layers.0.router.proj.bias"] = torch.zeros(1)
    save_file(tensors, path)
    fresh, _ = build("llava")
    with pytest.raises(KeyError, match=r"missing \['layers.3.router.proj.bias'\], unexpected \['layers.0.router.proj.bias'\]"):
        mllm_mod.load_mod(fresh, tmp_path / "a")
    assert not hasattr(fresh, "mod_state")  # rolled back


def test_unsupported_model_lists_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    with pytest.raises(ValueError, match=r"'llama' is not supported; supported families: .*LLaVA-1.5 \(llava\), LLaVA-NeXT"):
        mllm_mod.retrofit(lm, "pmod")


def test_retrofit_twice_is_refused_and_router_stays_float32():
    model, _ = build("llava")
    mllm_mod.retrofit(model, "pmod")
    with pytest.raises(ValueError, match="already retrofitted"):
        mllm_mod.retrofit(model, "pmod")
    model.to(torch.bfloat16)
    layer = model.model.language_model.layers[3]
    assert layer.router.proj.weight.dtype == torch.float32
    assert layer.base_layer.mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["pmod", "gmod"])
def test_retrofit_follows_the_models_train_or_eval_mode(preset):
    """New MoD modules must not start in train mode inside an eval model (train-only rules would apply)."""
    model, _ = build("llava")
    mllm_mod.retrofit(model, preset)
    assert not any(m.training for m in model.modules())
    model.train()
    mllm_mod.unload(model)
    mllm_mod.retrofit(model, preset)
    assert all(m.training for m in model.modules())

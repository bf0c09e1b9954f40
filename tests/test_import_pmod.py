"""`mllm-mod import` of a p-MoD release (`pmod_llava_llama`, 32 layers, 24 wrapped, non-zero routers):
logits equal an independent reference of p-MoD's forward, `mllm_mod.from_pretrained` returns the MoD
model, batched generation equals one-by-one, and `mod_*` values we do not understand are refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from logits import assert_batch_equals_single, assert_logits_close, single
from PIL import Image
from test_import_reference import (
    PROMPTS,
    D,
    llava_config,
    pmod_ratio,
    projector_tensors,
    reference_logits,
    source_tokenizer,
    text_tensors,
    write_checkpoint,
    write_tower_dir,
)

from mllm_mod import from_pretrained, import_checkpoint, layer_ratios
from mllm_mod.importers import CheckpointError

LAYERS = 32
PMOD_FIELDS = dict(
    architectures=["PmodLlavaLlamaForCausalLM"],
    model_type="pmod_llava_llama",
    mod_target_layers="shiftedcos_decay_0.85_0.15",
    mod_target_token_type="vision_all",
    mod_router_factor=0.5,
    mod_weight_norm="tanh_0.2_1",
    mod_bias_enabled=True,
    mod_special_init=True,
)
SIZES = [(40, 70), (30, 30), (70, 35)]


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def pmod_tensors(vocab: int, bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """p-MoD's layout: wrapped layers under ``decoder_layer``, routers ``router.router.{weight,bias}``."""
    gen = torch.Generator().manual_seed(seed)
    plain = text_tensors(gen, vocab, LAYERS) | projector_tensors(gen)
    out = {}
    for key, tensor in plain.items():
        parts = key.split(".")
        if key.startswith("model.layers.") and pmod_ratio(int(parts[2])) is not None:
            key = ".".join([*parts[:3], "decoder_layer", *parts[3:]])
        out[key] = tensor
    for i in range(LAYERS):
        if pmod_ratio(i) is not None:
            out[f"model.layers.{i}.router.router.weight"] = torch.randn(1, D, generator=gen) * 0.05  # tanh unsaturated: no ties
            if bias:
                out[f"model.layers.{i}.router.router.bias"] = torch.randn(1, generator=gen) * 0.5
    return out


def write_pmod(root, tower: str, overrides: dict | None = None, bias: bool = True) -> tuple[str, dict, int]:
    tokenizer = source_tokenizer()
    tensors = pmod_tensors(len(tokenizer), bias=bias)
    config = llava_config(len(tokenizer), LAYERS, "openai/clip-vit-large-patch14-336") | PMOD_FIELDS | (overrides or {})
    src = str(root / "src")
    write_checkpoint(src, config, tensors, tokenizer, shards=3)
    return src, tensors, len(tokenizer)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    root = tmp_path_factory.mktemp("tower")
    return str(root / "clip"), write_tower_dir(str(root / "clip"), "clip", layers=2)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tower):
    root = tmp_path_factory.mktemp("pmod")
    src, tensors, vocab = write_pmod(root, tower[0])
    out = str(root / "out")
    report = import_checkpoint(src, out, vision_tower=tower[0], progress=False)
    sd = tensors | {"model.vision_tower.vision_tower." + k: v for k, v in tower[1].items()}
    return out, report, sd, vocab


def test_pmod_logits_equal_the_reference_forward(imported):
    from transformers import AutoProcessor

    out, report, sd, vocab = imported
    model = from_pretrained(out).eval()
    assert report.mod_layers == list(range(8, 32))
    assert layer_ratios(model) == pytest.approx([pmod_ratio(i) or 1.0 for i in range(LAYERS)], abs=1e-6)
    processor = AutoProcessor.from_pretrained(out)
    for prompt, image in list(zip(PROMPTS, _images()))[:2]:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        ref = reference_logits(sd, inputs["input_ids"][0], model.config.image_token_id, inputs["pixel_values"][0], LAYERS, pmod=True)
        assert_logits_close(logits[:, :vocab], ref, "import p-MoD vs reference forward")


def test_pmod_routers_change_the_output(imported):
    """A sanity check on the check above: the same weights without MoD give other logits."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, _, sd, vocab = imported
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=_images()[:1], text=PROMPTS[:1], return_tensors="pt")
    dense = LlavaForConditionalGeneration.from_pretrained(out).eval()  # stock transformers: routers ignored
    with torch.no_grad():
        logits = dense(**inputs).logits[0, :, :vocab]
    ref = reference_logits(sd, inputs["input_ids"][0], dense.config.image_token_id, inputs["pixel_values"][0], LAYERS, pmod=True)
    assert float((logits - ref).abs().max()) > 1e-2


def test_pmod_batched_generation_equals_one_by_one(imported):
    from transformers import AutoProcessor

    out, *_ = imported
    model = from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"
    batch = processor(images=_images()[1:], text=PROMPTS[1:], return_tensors="pt", padding=True)  # lengths differ
    assert_batch_equals_single(model, batch, [single(batch, i) for i in range(2)], 3, "import p-MoD batch vs single")


def test_pmod_without_router_bias(tmp_path, tower):
    src, _, _ = write_pmod(tmp_path, tower[0], {"mod_bias_enabled": False}, bias=False)
    report = import_checkpoint(src, str(tmp_path / "out"), vision_tower=tower[0], progress=False)
    assert len(report.zero_filled) == 24
    model = from_pretrained(str(tmp_path / "out"))
    assert all(float(layer.router.proj.bias.detach().abs().max()) == 0 for layer in model.model.language_model.layers[8:])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"mod_weight_norm": "softmax_1_0"}, r"mod_weight_norm = 'softmax_1_0' is not supported"),
        ({"mod_target_token_type": "vision_hr"}, r"mod_target_token_type = 'vision_hr' is not supported"),
        ({"mod_target_layers": "shiftedlinear_decay_0.85_0.15"}, r"mod_target_layers = 'shiftedlinear_decay_0.85_0.15'"),
        ({"mod_router_factor": 0.6}, r"mod_router_factor = 0.6 with mod_target_layers"),
        ({"mod_target_layers": "interleave"}, r"wraps layers \[8, .*gives \[1, 3, 5"),
        ({"mod_lambda": 0.1}, r"unknown p-MoD field\(s\) \['mod_lambda'\]"),
        ({"mod_bias_enabled": "yes"}, r"mod_bias_enabled = 'yes' is not a boolean"),
    ],
)
def test_pmod_values_we_do_not_understand_are_refused(tmp_path, tower, imported, overrides, match):
    _, report, *_ = imported
    src = tmp_path / "src"  # the imported source's shards and tokenizer, with this case's config.json
    src.mkdir()
    for name in os.listdir(report.source):
        if name != "config.json":
            os.symlink(os.path.join(report.source, name), src / name)
    with open(os.path.join(report.source, "config.json")) as f:
        config = json.load(f) | overrides
    (src / "config.json").write_text(json.dumps(config))
    src = str(src)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        import_checkpoint(src, str(out), vision_tower=tower[0], progress=False)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".importing-" in p]

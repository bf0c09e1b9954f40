"""`mllm-mod import` of original LLaVA-1.5 checkpoints: logits equal an independent reference forward of
the original layout, the processor reproduces the original 'pad' preprocessing, bad inputs are refused
naming the file or field, and nothing is left half-written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from logits import assert_logits_close
from PIL import Image
from test_import_reference import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE,
    PROMPTS,
    llava_config,
    projector_tensors,
    reference_logits,
    source_tokenizer,
    text_tensors,
    tower_tensors,
    write_checkpoint,
    write_tower_dir,
)

from mllm_mod import import_checkpoint
from mllm_mod.importers import CheckpointError

LAYERS = 3
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _image(h: int = 40, w: int = 70, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava_src(tmp_path_factory):
    """An original LLaVA-1.5 checkpoint without its tower (2 safetensors shards) + a local CLIP directory."""
    root = tmp_path_factory.mktemp("llava15")
    tokenizer = source_tokenizer()
    gen = torch.Generator().manual_seed(0)
    tensors = text_tensors(gen, len(tokenizer), LAYERS) | projector_tensors(gen)
    tower = write_tower_dir(str(root / "clip"), "clip", layers=2)
    src = str(root / "src")
    write_checkpoint(src, llava_config(len(tokenizer), LAYERS, "openai/clip-vit-large-patch14-336"), tensors, tokenizer)
    full = tensors | {TOWER_PREFIX + k.removeprefix("vision_model."): v for k, v in tower.items()}
    return dict(root=root, src=src, tower=str(root / "clip"), tensors=full, vocab=len(tokenizer))


@pytest.fixture(scope="module")
def llava_out(llava_src):
    out = str(llava_src["root"] / "out")
    report = import_checkpoint(llava_src["src"], out, vision_tower=llava_src["tower"], progress=False)
    return out, report


def _check_against_reference(out: str, sd: dict, vocab: int, check: str) -> float:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    worst = 0.0
    for i, (prompt, size) in enumerate(zip(PROMPTS, [(40, 70), (30, 30), (70, 35)])):
        inputs = processor(images=[_image(*size, seed=i)], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]  # [T, V']
        ref = reference_logits(sd, inputs["input_ids"][0], model.config.image_token_id, inputs["pixel_values"][0], LAYERS)
        worst = max(worst, assert_logits_close(logits[:, :vocab], ref, check))
        # the appended rows (<image>, <pad>) are the mean of the original ones: never the best next token
        assert bool((logits[:, vocab:].max(-1).values < logits[:, :vocab].max(-1).values).all())
    return worst


def test_llava15_logits_equal_the_original_layout(llava_src, llava_out):
    out, report = llava_out
    _check_against_reference(out, llava_src["tensors"], llava_src["vocab"], "import llava-1.5 vs reference")
    assert report.layout.startswith("LLaVA")
    assert all("inv_freq" in k for k in report.unused if not k.startswith("vision tower:"))
    assert set(report.extended_rows) == {"model.language_model.embed_tokens.weight", "lm_head.weight"}


def test_llava15_directory_is_stock_with_processor(llava_src, llava_out):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

    out, _ = llava_out
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaProcessor)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == llava_src["vocab"]  # appended: 32000 for Vicuna
    assert tok.pad_token == "<pad>" and tok.pad_token_id == llava_src["vocab"] + 1
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
        add_generation_prompt=True,
    )
    assert text.startswith("A chat between a curious human") and text.endswith("USER: <image>\nwhat color ? ASSISTANT:")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert not [f for f in os.listdir(llava_src["root"]) if ".importing-" in f]


def _pad_reference(image: Image.Image) -> torch.Tensor:
    """The original LLaVA-1.5 preprocessing, written from its code's semantics: expand2square with the
    mean colour, CLIP's resize of the short side (bicubic, PIL), centre crop, rescale and normalise."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    canvas = canvas.resize((IMAGE, IMAGE), Image.BICUBIC)
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(40, 70), (70, 35)])
def test_processor_pads_to_square_with_the_mean_like_the_original(llava_out, size):
    from transformers import AutoProcessor

    out, _ = llava_out
    image = _image(*size, seed=3)
    pixels = AutoProcessor.from_pretrained(out)(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    expected = _pad_reference(image)
    # the padded border is the mean colour in both (int(mean * 255), about 0 after normalisation)
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])[:, None, None]
    border = ((expected - fill).abs() < 1e-4).all(0)  # [H, W]
    assert int(border.sum()) >= IMAGE * 4, "the padded image has no border of the mean colour"
    assert float((pixels - fill)[:, border].abs().max()) < 1e-4
    # bicubic resampling: torchvision's kernel vs PIL's differ by a few grey levels at most
    assert float((pixels - expected).abs().mean()) < 0.02, float((pixels - expected).abs().mean())


def test_tower_in_the_checkpoint_and_bin_shards(llava_src, tmp_path):
    """A checkpoint that holds its tower, as .bin shards, with mm_vision_tower naming a local directory."""
    tokenizer = source_tokenizer()
    src = str(tmp_path / "src")
    config = llava_config(llava_src["vocab"], LAYERS, llava_src["tower"])
    write_checkpoint(src, config, llava_src["tensors"], tokenizer, shards=3, fmt="bin")
    out = str(tmp_path / "out")
    report = import_checkpoint(src, out, progress=False)
    assert not any(k.startswith("vision tower:") for k in report.unused)  # the dir gave the config only
    _check_against_reference(out, llava_src["tensors"], llava_src["vocab"], "import llava-1.5 (.bin, tower inside) vs reference")


def test_cli_import(llava_src, tmp_path, capsys):
    from mllm_mod.cli import main

    out = str(tmp_path / "cli")
    assert main(["import", llava_src["src"], "--out", out, "--vision-tower", llava_src["tower"], "--dtype", "float16"]) == 0
    assert "imported" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["text_config"]["dtype"] == "float16"
    assert main(["import", llava_src["src"], "--out", str(tmp_path / "cli2")]) == 2
    assert "mm_vision_tower" in capsys.readouterr().err


# -- bad input -----------------------------------------------------------------------------------------
def _fabricate(root, config_overrides=None, tensors_edit=None, shards=2) -> str:
    tokenizer = source_tokenizer()
    gen = torch.Generator().manual_seed(0)
    tensors = text_tensors(gen, len(tokenizer), 2) | projector_tensors(gen)
    tensors |= tower_tensors(gen, "clip", 2, TOWER_PREFIX)
    if tensors_edit:
        tensors_edit(tensors)
    config = llava_config(len(tokenizer), 2, "openai/clip-vit-large-patch14-336") | (config_overrides or {})
    src = str(root / "src")
    write_checkpoint(src, config, tensors, tokenizer, shards=shards)
    return src


def _refused(tmp_path, src: str, match: str, error=CheckpointError, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        import_checkpoint(src, str(out), progress=False, **kwargs)
    assert not out.exists(), "the output directory was written although the import failed"
    assert not [p for p in os.listdir(tmp_path) if ".importing-" in p], "a temporary directory was left behind"


def test_known_tower_config_from_the_table_needs_matching_shapes(tmp_path):
    # the tower in the checkpoint is tiny but mm_vision_tower names the real CLIP-L/336: the shapes disagree
    src = _fabricate(tmp_path)
    _refused(tmp_path, src, r"model-0000\d-of-00002\.safetensors: tensor model\.mm_projector\.0\.weight has shape \[32, 32\].*needs \[32, 1024\]")


def test_unknown_layout(tmp_path):
    src = _fabricate(tmp_path, {"architectures": ["FooForCausalLM"], "model_type": "foo"})
    _refused(tmp_path, src, r"unknown checkpoint layout \(model_type 'foo'")


def test_gamma_mod_is_refused_with_the_reason(tmp_path):
    src = _fabricate(tmp_path, {"architectures": ["MoDLlavaLlamaForCausalLM"], "model_type": "mod_llava_llama"})
    _refused(tmp_path, src, "mod_llava_llama.*LLaVA-HR.*no class")


def test_missing_vision_tower(tmp_path):
    def drop_tower(t):
        for k in [k for k in t if k.startswith(TOWER_PREFIX)]:
            del t[k]

    src = _fabricate(tmp_path, tensors_edit=drop_tower)
    _refused(tmp_path, src, r"mm_vision_tower is 'openai/clip-vit-large-patch14-336'.*--vision-tower DIR")


def test_missing_shard(tmp_path, llava_src):
    src = _fabricate(tmp_path)
    os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
    _refused(tmp_path, src, r"model-00002-of-00002\.safetensors", error=FileNotFoundError, vision_tower=llava_src["tower"])


def test_truncated_safetensors(tmp_path, llava_src):
    src = _fabricate(tmp_path)
    path = os.path.join(src, "model-00001-of-00002.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    _refused(tmp_path, src, r"model-00001-of-00002\.safetensors: truncated safetensors file", vision_tower=llava_src["tower"])


def test_wrong_shape(tmp_path, llava_src):
    def bad(t):
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)

    src = _fabricate(tmp_path, tensors_edit=bad)
    _refused(tmp_path, src, r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[65, 32\].*needs \[64, 32\]", vision_tower=llava_src["tower"])


def test_unknown_tensor_refused_then_reported(tmp_path, llava_src):
    def extra(t):
        t["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)

    src = _fabricate(tmp_path, tensors_edit=extra)
    _refused(tmp_path, src, r"1 tensor\(s\) the importer cannot place.*lora_A\.weight \(maps to .*which the target model does not have", vision_tower=llava_src["tower"])
    report = import_checkpoint(src, str(tmp_path / "ok"), vision_tower=llava_src["tower"], allow_unused=True, progress=False)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in report.unused


def test_missing_parameter(tmp_path, llava_src):
    src = _fabricate(tmp_path, tensors_edit=lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    _refused(tmp_path, src, r"no tensor in the checkpoint.*layers\.1\.post_attention_layernorm", vision_tower=llava_src["tower"])


def test_unsupported_config_value(tmp_path, llava_src):
    src = _fabricate(tmp_path, {"mm_use_im_start_end": True})
    _refused(tmp_path, src, r"mm_use_im_start_end = True is not supported", vision_tower=llava_src["tower"])


def test_existing_output_is_not_overwritten(tmp_path, llava_src):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        import_checkpoint(llava_src["src"], str(out), vision_tower=llava_src["tower"], progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_llava_next_layout_keeps_the_image_newline(tmp_path, llava_src):
    """LLaVA-NeXT in the original layout (anyres, spatial_unpad): the newline token is kept, the grid
    pinpoints come over, and the imported model runs a batch of non-square images. (The logits against the
    original forward, anyres packing included: test_import_next.py.)"""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    newline = torch.randn(32, generator=torch.Generator().manual_seed(5))
    overrides = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": "(1x1),...,(2x2)"}
    src = _fabricate(tmp_path, overrides, tensors_edit=lambda t: t.__setitem__("model.image_newline", newline))
    out = str(tmp_path / "out")
    import_checkpoint(src, out, vision_tower=llava_src["tower"], progress=False)
    model = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    assert torch.equal(model.model.image_newline.detach(), newline)
    # the range string's (i x j) are (width, height) tiles in the original code: [height, width] here
    assert model.config.image_grid_pinpoints == [[IMAGE, IMAGE], [2 * IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, 2 * IMAGE]]
    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[_image(40, 70), _image(70, 35)], text=PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and logits.shape[:2] == inputs["input_ids"].shape

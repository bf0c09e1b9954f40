"""`mllm-mod import` of a LLaVA-OneVision checkpoint in the LLaVA-NeXT code base's layout (`llava_qwen`):
Qwen2 decoder with a tied (absent) lm_head, SigLIP tower without its last layer and head. Checked against
the reference on the parts the key map decides: the tower's last kept layer, the projector, and the
decoder's logits on text (the anyres packing of the features is transformers' own code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from logits import assert_logits_close
from PIL import Image
from test_import_reference import (
    IMAGE,
    D,
    block_parts,
    projector_tensors,
    rms,
    source_tokenizer,
    text_tensors,
    tower_tensors,
    vit,
    write_checkpoint,
    write_tower_dir,
)

from mllm_mod import import_checkpoint
from mllm_mod.importers import CheckpointError

LAYERS = 2
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def ov_config(vocab: int, tower: str, layers: int = LAYERS, pinpoints=None) -> dict:
    pinpoints = pinpoints or [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]
    return dict(
        architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen", hidden_size=D, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=vocab, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=2, torch_dtype="float32", mm_vision_tower=tower, mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="anyres_max_9", mm_patch_merge_type="spatial_unpad", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_grid_pinpoints=pinpoints,
    )  # fmt: skip


def _ov_source(root, tower_inside: bool, layers: int = LAYERS, pinpoints=None) -> tuple[str, dict, int]:
    tokenizer = source_tokenizer(qwen=True)
    vocab = len(tokenizer) + 4  # Qwen's embedding has spare rows: <image>, <video> fit without resizing
    gen = torch.Generator().manual_seed(1)
    tensors = text_tensors(gen, vocab, layers, qwen=True, tied=True) | projector_tensors(gen)
    tensors["model.image_newline"] = torch.randn(D, generator=gen)
    if tower_inside:  # saved by the original code: 2 kept layers, no head
        tensors |= tower_tensors(gen, "siglip", 2, TOWER_PREFIX)
    src = str(root / "src")
    write_checkpoint(src, ov_config(vocab, str(root / "siglip"), layers, pinpoints), tensors, tokenizer, shards=2)
    return src, tensors, vocab


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    tower = write_tower_dir(str(root / "siglip"), "siglip", layers=3)  # the full tower: one layer more
    src, tensors, vocab = _ov_source(root, tower_inside=False)
    out = str(root / "out")
    report = import_checkpoint(src, out, vision_tower=str(root / "siglip"), progress=False)
    sd = tensors | {"model.vision_tower.vision_tower." + k: v for k, v in tower.items()}
    return out, report, sd, vocab, len(source_tokenizer(qwen=True))


def test_onevision_config_and_tokens(ov):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    out, report, _, vocab, n_tokens = ov
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert model.config.vision_config.num_hidden_layers == 2 and not model.config.vision_config.vision_use_head
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "full"
    assert model.config.vision_aspect_ratio == "anyres_max_9"
    assert model.config.image_token_id == n_tokens and model.config.video_token_id == n_tokens + 1  # 151646 / 151647
    assert model.get_output_embeddings().weight.shape[0] == vocab  # no resize: the spare rows hold them
    assert report.derived == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    assert any("encoder.layers.2." in k and "last layer" in why for k, why in report.unused.items())
    processor = AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n<image>\nwhat ?<|im_end|>\n<|im_start|>assistant\n")
    pixels = processor(images=[Image.fromarray(np.zeros((40, 70, 3), np.uint8))], text=["<image>"], return_tensors="pt")
    assert pixels["pixel_values"].shape[-2:] == (IMAGE, IMAGE)


def test_onevision_parts_equal_the_reference(ov):
    from transformers import LlavaOnevisionForConditionalGeneration

    out, _, sd, _, _ = ov
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tower = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][0]
        projected = model.model.multi_modal_projector(tower)
    ref = vit(sd, TOWER_PREFIX, pixels[0], "siglip", 2)[-1]
    assert_logits_close(tower, ref, "import onevision tower vs reference")
    ref = F.gelu(ref @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
    ref = ref @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]
    assert_logits_close(projected, ref, "import onevision projector vs reference")
    assert torch.equal(model.model.image_newline.detach(), sd["model.image_newline"])
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    x, pos = sd["model.embed_tokens.weight"][ids[0]], torch.arange(6)
    for i in range(LAYERS):
        h, m = block_parts(sd, f"model.layers.{i}.", x, pos, 1e-6)
        x = h + m
    ref = rms(x, sd["model.norm.weight"], 1e-6) @ sd["model.embed_tokens.weight"].T  # tied head
    assert_logits_close(logits, ref, "import onevision decoder vs reference")


def test_onevision_tower_inside_without_config_needs_the_flag(tmp_path):
    src, _, _ = _ov_source(tmp_path, tower_inside=True)  # mm_vision_tower names a directory that does not exist
    with pytest.raises(CheckpointError, match=r"holds the vision tower's weights but not its config.*--vision-tower DIR"):
        import_checkpoint(src, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


# -- end to end with a picture --------------------------------------------------------------------------
E2E_LAYERS = 4
E2E_PINPOINTS = "(1x1),...,(5x5)"  # the range string OneVision releases use ((1x1),...,(6x6)), in tiles
E2E_PINPOINTS_WH = [[i * IMAGE, j * IMAGE] for i in range(1, 6) for j in range(1, 6)]  # (width, height), original
# (width, height): a 5x4 grid, 16 of 20 feature rows kept, then shrunk (over 9 tiles' worth by 1.33x); a
# 2x1 grid with 8 of 10 columns kept, not shrunk
E2E_SIZES_WH = [(150, 100), (70, 40)]


def _picture(size_wh: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size_wh[1], size_wh[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ov_e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov_e2e")
    tower = write_tower_dir(str(root / "siglip"), "siglip", layers=3)
    src, tensors, vocab = _ov_source(root, tower_inside=False, layers=E2E_LAYERS, pinpoints=E2E_PINPOINTS)
    out = str(root / "out")
    import_checkpoint(src, out, vision_tower=str(root / "siglip"), progress=False)
    return dict(out=out, tensors=tensors, tower=tower, vocab=vocab, n_tokens=len(source_tokenizer(qwen=True)))


def _direct_model(ov_e2e):
    """The stock LlavaOnevisionForConditionalGeneration built here from the facts (tiny Qwen2 + SigLIP
    without its last layer and head, layer -1, "full", anyres_max_9, pinpoints as [height, width]) and
    the original tensors renamed here, independently of the importer."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    n = ov_e2e["n_tokens"]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE, patch_size=6, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                vision_use_head=False)  # fmt: skip
    text = Qwen2Config(hidden_size=D, intermediate_size=64, num_hidden_layers=E2E_LAYERS, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                       vocab_size=ov_e2e["vocab"], tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=n, video_token_index=n + 1,
        image_grid_pinpoints=[[h, w] for w, h in E2E_PINPOINTS_WH], vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    src, tower = ov_e2e["tensors"], ov_e2e["tower"]
    state = {}
    for key in model.state_dict():
        if "vision_tower." in key:
            state[key] = tower["vision_model." + key.split("vision_tower.", 1)[1].removeprefix("vision_model.")]
        elif key.startswith("model.language_model."):
            state[key] = src["model." + key.removeprefix("model.language_model.")]
        elif key.startswith("model.multi_modal_projector.linear_"):
            n_, rest = key.removeprefix("model.multi_modal_projector.linear_").split(".", 1)
            state[key] = src[f"model.mm_projector.{2 * (int(n_) - 1)}.{rest}"]
        elif key == "lm_head.weight":
            state[key] = src["model.embed_tokens.weight"]  # tied
        else:
            state[key] = src[key]  # model.image_newline
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("index", range(len(E2E_SIZES_WH)))
def test_onevision_picture_logits_equal_direct_model_and_original_forward(ov_e2e, index):
    """A picture end to end through the imported model: its logits equal (1) the stock model built
    directly from the facts with the same weights, and (2) the reference of the original forward
    (tower per tile, projector, anyres_max_9 packing: unpad, shrink, newline per row), batch 1, fp32."""
    from test_import_reference import PROMPTS, anyres_features, decoder_logits
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_e2e["out"]).eval()
    processor = AutoProcessor.from_pretrained(ov_e2e["out"])
    size = E2E_SIZES_WH[index]
    inputs = processor(images=[_picture(size, index)], text=[PROMPTS[index]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        direct = _direct_model(ov_e2e)(**inputs).logits[0]
    assert_logits_close(logits, direct, "import onevision picture vs stock model built directly")
    sd = ov_e2e["tensors"] | {TOWER_PREFIX + k.removeprefix("vision_model."): v for k, v in ov_e2e["tower"].items()}
    tower = dict(tower="siglip", tower_layers=2, select_layer=-1)
    feats = anyres_features(sd, inputs["pixel_values"][0], size, E2E_PINPOINTS_WH, IMAGE, max_patches=9, **tower)
    ref = decoder_logits(sd, inputs["input_ids"][0], model.config.image_token_id, feats, E2E_LAYERS, eps=1e-6)
    assert_logits_close(logits[:, : ov_e2e["vocab"]], ref[:, : ov_e2e["vocab"]], "import onevision picture vs reference")


def test_onevision_imported_pmod_cached_equals_uncached(ov_e2e):
    """The imported directory retrofitted with the pmod preset (routers made non-trivial): cached
    generation's per-step logits equal uncached recomputation, with a picture in the prompt."""
    from conftest import randomize_routers
    from logits import assert_cached_equals_uncached
    from test_import_reference import PROMPTS
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    import mllm_mod

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_e2e["out"]).eval()
    mllm_mod.retrofit(model, "pmod")
    randomize_routers(model)
    assert min(mllm_mod.layer_ratios(model)) < 1.0
    processor = AutoProcessor.from_pretrained(ov_e2e["out"])
    inputs = processor(images=[_picture(E2E_SIZES_WH[0], 7)], text=[PROMPTS[1]], return_tensors="pt")
    assert_cached_equals_uncached(model, inputs, 4, "import onevision + pmod: cached vs uncached")


@pytest.mark.parametrize("index", range(len(E2E_SIZES_WH)))
def test_onevision_tiles_follow_process_anyres_image(ov_e2e, index):
    """The imported processor's tiles against the original `process_anyres_image` (written in the test,
    SigLIP's normalisation): the same grid, tile order and black padding, bicubic within a few grey levels."""
    from test_import_reference import anyres_tiles
    from transformers import AutoProcessor

    image = _picture(E2E_SIZES_WH[index], 20 + index)
    processor = AutoProcessor.from_pretrained(ov_e2e["out"])
    tiles = processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    expected = anyres_tiles(image, E2E_PINPOINTS_WH, IMAGE, [0.5] * 3, [0.5] * 3)
    assert tiles.shape == expected.shape
    padded = ((expected[1:] + 1).abs() < 1e-4).all(1)  # black is -1 after SigLIP's normalisation
    assert int(padded.sum()) > 0 and float((tiles[1:] + 1).abs().permute(1, 0, 2, 3)[:, padded].max()) < 1e-4
    assert float((tiles - expected).abs().mean()) < 0.02, float((tiles - expected).abs().mean())

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


def ov_config(vocab: int, tower: str) -> dict:
    return dict(
        architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen", hidden_size=D, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=vocab, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=2, torch_dtype="float32", mm_vision_tower=tower, mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="anyres_max_9", mm_patch_merge_type="spatial_unpad", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_grid_pinpoints=[[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]],
    )  # fmt: skip


def _ov_source(root, tower_inside: bool) -> tuple[str, dict, int]:
    tokenizer = source_tokenizer(qwen=True)
    vocab = len(tokenizer) + 4  # Qwen's embedding has spare rows: <image>, <video> fit without resizing
    gen = torch.Generator().manual_seed(1)
    tensors = text_tensors(gen, vocab, LAYERS, qwen=True, tied=True) | projector_tensors(gen)
    tensors["model.image_newline"] = torch.randn(D, generator=gen)
    if tower_inside:  # saved by the original code: 2 kept layers, no head
        tensors |= tower_tensors(gen, "siglip", 2, TOWER_PREFIX)
    src = str(root / "src")
    write_checkpoint(src, ov_config(vocab, str(root / "siglip")), tensors, tokenizer, shards=2)
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

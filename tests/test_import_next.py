"""`mllm-mod import` of a LLaVA-NeXT checkpoint in the original LLaVA code base's layout (``anyres``,
``spatial_unpad``, ``image_grid_pinpoints``, ``model.image_newline``), end to end: the imported model's
logits on pictures whose grid is padded (so unpadding removes feature columns or rows) equal the
reference of the original forward written in `test_import_reference.py` (tower per tile, projector,
the original packing: base tile, unpadded grid, newline per row), and the imported processor's tiles
follow the original `process_anyres_image`.

The grid pinpoints are an asymmetric list: the original code reads each pair as (width, height),
transformers as (height, width), so a wrong import picks other grids and the placeholder count differs.
"""

from __future__ import annotations

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
    anyres_features,
    anyres_tiles,
    best_resolution,
    decoder_logits,
    llava_config,
    projector_tensors,
    source_tokenizer,
    text_tensors,
    tower_tensors,
    write_checkpoint,
    write_tower_dir,
)

from mllm_mod import import_checkpoint

LAYERS = 2
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PINPOINTS_WH = [[2 * IMAGE, IMAGE], [IMAGE, 3 * IMAGE], [2 * IMAGE, 2 * IMAGE]]  # (width, height), as the original reads them
# (width, height) -> grid (columns x rows of tiles), feature map kept by unpadding: 2x1, 3 of 5 rows; 1x3, 11 of 15
# rows; 2x2, 8 of 10 columns. Read as [height, width] without the swap, the first two would pick 3x1 and 1x2.
SIZES_WH = [(100, 36), (35, 70), (50, 70)]


def _image(size_wh: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size_wh[1], size_wh[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    """The checkpoint holds its (fine-tuned) tower; --vision-tower gives the config (its own weights differ
    and must not be used), as for a LLaVA-1.6 release whose mm_vision_tower is not a local directory."""
    root = tmp_path_factory.mktemp("next")
    write_tower_dir(str(root / "clip"), "clip", layers=2, seed=11)
    tokenizer = source_tokenizer()
    gen = torch.Generator().manual_seed(3)
    tensors = text_tensors(gen, len(tokenizer), LAYERS) | projector_tensors(gen)
    tensors |= tower_tensors(gen, "clip", 2, TOWER_PREFIX)
    tensors["model.image_newline"] = torch.randn(32, generator=gen)
    config = llava_config(len(tokenizer), LAYERS, "openai/clip-vit-large-patch14-336") | dict(
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS_WH
    )
    src = str(root / "src")
    write_checkpoint(src, config, tensors, tokenizer, shards=2)
    out = str(root / "out")
    report = import_checkpoint(src, out, vision_tower=str(root / "clip"), progress=False)
    return out, report, tensors, len(tokenizer)


def test_pinpoints_become_height_width(nxt):
    from transformers import AutoConfig

    out, report, _, _ = nxt
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llava_next"
    assert config.image_grid_pinpoints == [[h, w] for w, h in PINPOINTS_WH]
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert not any(k.startswith("vision tower:") for k in report.unused)  # the directory gave the config only


@pytest.mark.parametrize("index", range(len(SIZES_WH)))
def test_llava_next_logits_equal_the_original_forward(nxt, index):
    """Tower on every tile, projector, the original anyres packing and the decoder, against the imported
    LlavaNextForConditionalGeneration on the pixels its processor made (batch 1, fp32)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    out, _, sd, vocab = nxt
    model = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    size = SIZES_WH[index]
    image = _image(size, seed=index)
    grid_w, grid_h = (x // IMAGE for x in best_resolution(size, PINPOINTS_WH))
    inputs = processor(images=[image], text=[PROMPTS[index]], return_tensors="pt")
    tiles = inputs["pixel_values"][0]
    assert tiles.shape[0] == 1 + grid_w * grid_h
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    feats = anyres_features(sd, tiles, size, PINPOINTS_WH, IMAGE)
    ref = decoder_logits(sd, inputs["input_ids"][0], model.config.image_token_id, feats, LAYERS)
    assert_logits_close(logits[:, :vocab], ref, "import llava-next (anyres, unpad) vs reference")
    side = IMAGE // 6
    assert feats.shape[0] < side * side * (1 + grid_w * grid_h) + grid_h * side, "no feature row or column was unpadded"


@pytest.mark.parametrize("index", range(len(SIZES_WH)))
def test_llava_next_tiles_follow_process_anyres_image(nxt, index):
    """The imported processor's tiles against the original preprocessing written from its semantics:
    the same grid and tile order, black padding in the same place, bicubic resampling within a few grey
    levels (torchvision's kernel vs PIL's)."""
    from transformers import AutoProcessor

    out, _, _, _ = nxt
    image = _image(SIZES_WH[index], seed=10 + index)
    tiles = AutoProcessor.from_pretrained(out)(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    expected = anyres_tiles(image, PINPOINTS_WH, IMAGE, CLIP_MEAN, CLIP_STD)
    assert tiles.shape == expected.shape
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])[:, None, None]
    padded = ((expected[1:] - black).abs() < 1e-4).all(1)  # [n, H, W], padding (and black pixels)
    assert int(padded.sum()) > 0 and float((tiles[1:] - black).abs().permute(1, 0, 2, 3)[:, padded].max()) < 1e-4
    assert float((tiles - expected).abs().mean()) < 0.02, float((tiles - expected).abs().mean())


@pytest.mark.slow  # 32 layers: about 10 s on an idle 2-core machine
def test_pmod_llava_next_logits_equal_the_original_forward(tmp_path):
    """The p-MoD-LLaVA-NeXT layout (p-MoD's fields on an anyres checkpoint, 32 layers, 24 wrapped,
    non-zero routers, one single-file safetensors): imported as LlavaNext + MoD, and `mllm_mod.from_pretrained`'s
    logits equal the reference of p-MoD's forward over the original anyres packing. p-MoD routes every
    position of the spliced image features (base tile, unpadded grid and the newline vectors), as the
    placeholders of the imported model are."""
    from test_import_pmod import LAYERS as PMOD_LAYERS
    from test_import_pmod import PMOD_FIELDS, pmod_tensors
    from transformers import AutoProcessor

    from mllm_mod import from_pretrained, layer_ratios

    write_tower_dir(str(tmp_path / "clip"), "clip", layers=2, seed=11)
    tokenizer = source_tokenizer()
    gen = torch.Generator().manual_seed(4)
    tensors = pmod_tensors(len(tokenizer)) | tower_tensors(gen, "clip", 2, TOWER_PREFIX)
    tensors["model.image_newline"] = torch.randn(32, generator=gen)
    config = llava_config(len(tokenizer), PMOD_LAYERS, "openai/clip-vit-large-patch14-336") | PMOD_FIELDS | dict(
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS_WH
    )
    write_checkpoint(str(tmp_path / "src"), config, tensors, tokenizer, shards=1)
    out = str(tmp_path / "out")
    import_checkpoint(str(tmp_path / "src"), out, vision_tower=str(tmp_path / "clip"), progress=False)
    model = from_pretrained(out).eval()
    assert type(model).__name__ == "LlavaNextForConditionalGeneration" and min(layer_ratios(model)) == 0.15
    processor = AutoProcessor.from_pretrained(out)
    size = SIZES_WH[0]
    inputs = processor(images=[_image(size, seed=5)], text=[PROMPTS[0]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    feats = anyres_features(tensors, inputs["pixel_values"][0], size, PINPOINTS_WH, IMAGE)
    ref = decoder_logits(tensors, inputs["input_ids"][0], model.config.image_token_id, feats, PMOD_LAYERS, pmod=True)
    assert_logits_close(logits[:, : len(tokenizer)], ref, "import p-MoD llava-next vs reference")

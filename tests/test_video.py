"""Video input (LLaVA-NeXT-Video, LLaVA-OneVision): per-frame groups, per-frame top-k, and the
invariants of DESIGN.md section 6 with videos in the batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mllm_mod
from conftest import build, randomize_routers
from logits import assert_batch_equals_single, assert_cached_equals_uncached, single
from mllm_mod.adapters import frame_groups
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.efficiency import efficiency
from mllm_mod.compat import output_cache

VIDEO_FAMILIES = ["llava_next_video", "llava_onevision"]
VIDEO_PROMPTS = [
    "USER : <video> what moved first ? ASSISTANT :",
    "USER : <video> which object moved left in the video ? ASSISTANT :",
    "USER : <video> how many objects ? ASSISTANT :",
]
TOKENS_PER_FRAME = {"llava_next_video": 4, "llava_onevision": 9}  # (24/6/2)^2 pooled; ceil(5/2)^2 pooled


def make_video_inputs(processor, n: int = 3, frames: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    videos = [rng.integers(0, 255, (frames, 24, 24, 3), dtype=np.uint8) for _ in range(n)]
    processor.tokenizer.padding_side = "left"
    return processor(text=VIDEO_PROMPTS[:n], videos=videos, return_tensors="pt", padding=True)


# -- frame groups ------------------------------------------------------------------------------------
def test_frame_groups_cut_runs_into_frames_and_skip_trailing_tokens():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)  # runs of 5 and 3
    groups = frame_groups(mask, tokens_per_frame=2, trailing=1)
    g = groups[0].tolist()
    assert g[0] == g[6] == g[10] == -1  # not video
    assert g[1] == g[2] != g[3] == g[4] and g[5] == -1  # run 1: two frames of 2, then the trailing token
    assert g[7] == g[8] and g[9] == -1 and g[7] not in (g[1], g[3])  # run 2: one frame, trailing token
    whole = frame_groups(mask, tokens_per_frame=None)[0].tolist()  # one group per run (images)
    assert whole == [-1, 0, 0, 0, 0, 0, -1, 1, 1, 1, -1]


def test_frame_groups_refuse_a_run_that_is_not_whole_frames():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="not a whole number of 2-token frames"):
        frame_groups(mask, tokens_per_frame=2)


def test_adapter_groups_images_and_frames_of_one_sample_apart():
    model, processor = build("llava_onevision")
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (3, 24, 24, 3), dtype=np.uint8)
    image = rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)
    inputs = processor(text=["USER : <image> <video> what moved ? ASSISTANT :"], images=[image], videos=[video], return_tensors="pt")
    mllm_mod.retrofit(model, "videomod")
    ctx = model.mod_state.adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    ids, counts = torch.unique(ctx.groups[ctx.groups >= 0], return_counts=True)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert sorted(counts.tolist()) == sorted([9, 9, 9, n_image])  # three frames and one image
    assert int((ctx.candidates & (ctx.groups < 0)).sum()) == 1  # the video's newline token: always kept


# -- per-frame routing -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_every_frame_keeps_ceil_r_tokens_in_every_mod_layer(family, ratio):
    model, processor = build(family, num_layers=4)
    mllm_mod.retrofit(model, "videomod", schedule="constant", layers=[1, 2, 3], ratio=ratio)
    randomize_routers(model)
    inputs = make_video_inputs(processor)
    ctx = model.mod_state.adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    tpf = TOKENS_PER_FRAME[family]
    expected = math.ceil(ratio * tpf)
    for idx in (1, 2, 3):
        layer = cache.layers[idx]
        assert isinstance(layer, MoDCacheLayer)
        for b in range(3):
            kept = layer.index[b][layer.filled[b]]  # original positions of the kept entries
            frames = ctx.groups[b][kept]
            frames = frames[frames >= 0]
            ids, counts = torch.unique(frames, return_counts=True)
            assert len(ids) == 4 and counts.tolist() == [expected] * 4, (idx, b, counts)
            # every text token (and the newline token) is kept
            n_real = int(inputs["attention_mask"][b].sum())
            n_video = int((ctx.groups[b] >= 0).sum())
            assert int(layer.valid[b].sum()) == n_real - n_video + 4 * expected
    # the accounting reports the same per-layer counts
    report = efficiency(model, inputs)
    assert report.mismatches == []


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_ratio_one_equals_dense(family):
    model, processor = build(family)
    inputs = make_video_inputs(processor)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**inputs).logits[real]
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0, selection="group")
    with torch.no_grad():
        mod = model(**inputs).logits[real]
    torch.testing.assert_close(mod, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_cached_equals_uncached_and_batch_equals_single(family):
    model, processor = build(family)
    mllm_mod.retrofit(model, "videomod", schedule="constant", layers=[1, 2, 3], ratio=0.5)
    randomize_routers(model)
    inputs = make_video_inputs(processor)
    assert_cached_equals_uncached(model, inputs, 6, "cached == uncached (videomod, video)")
    alone = [single(inputs, b) for b in range(3)]
    assert_batch_equals_single(model, inputs, alone, 6, "left-padded batch == alone (videomod, video)")

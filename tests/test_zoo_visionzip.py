"""VisionZip (`mllm_mod.eval.zoo.visionzip`): the dominant and contextual tokens against a hand-written
reference of the published code's rule on tiny LLaVA-1.5 (a CLIP tower) and on each crop of tiny anyres
LLaVA-NeXT (with the reference's ``restore_image_features_sorted`` layout), the logits of the shorter sequence,
batch == single and cached == uncached generation on the logits, the accounting (tokens, KV entries, the
vision-side FLOPs reported apart) and the refusals for other families."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, make_inputs
from logits import assert_batch_equals_single, assert_cached_equals_uncached
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.compat import output_cache
from mllm_mod.eval.baselines import drop_decision
from mllm_mod.eval.zoo import VisionZipSpec, apply_zoo, zoo_spec
from mllm_mod.retrofit import is_retrofitted
from mllm_mod.tiny import tiny_model

SPEC = VisionZipSpec(dominant=6, contextual=3)  # of 25 patches + CLS: CLS + 5 patches, 3 merged tokens


def reference_zip(model, pixel_values, dominant, contextual):
    """The reference's ``CLIPVisionTower_VisionZip.forward`` step by step over a batch of n images (LLaVA-1.5)
    or crops (LLaVA-NeXT), eager tower with attention maps, ``dominant_num = dominant - 1`` as its
    ``visionzip()`` passes it, then the projector. Returns (``all_indices`` [n, dominant], CLS first then the
    top-k in score order, as the reference returns them; projected tokens [n, dominant + contextual, D])."""
    tower = model.model.vision_tower
    layer_at = model.config.vision_feature_layer  # -2, as the reference hard-codes
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        attn_weights = out.attentions[layer_at]  # [n, H, N, N]
        hidden_states = out.hidden_states[layer_at]  # [n, N, Dv]
        n = hidden_states.shape[0]
        layer = tower.encoder.layers[layer_at]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_at - 1]))
        metric = keys.view(n, keys.shape[1], layer.self_attn.num_heads, -1).mean(2)  # raw keys, mean over heads
        dominant_num = dominant - 1
        cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
        topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros((n, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
        mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(n, dominant_num + 1, -1)
        rest = hidden_states.shape[1] - (dominant_num + 1)
        metric_filtered = metric[mask].view(n, rest, metric.shape[2])
        hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(n, rest, -1)
        metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
        step = max(1, metric_normalized.shape[1] // contextual)
        target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
        target_tokens = metric_normalized[:, target_indices, :]
        others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
        similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
        assign_one_hot = torch.zeros(n, int(others.sum()), contextual)
        assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
        aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, others, :]) / counts
        contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated_hidden
        return all_indices, model.model.multi_modal_projector(torch.cat([dominant_tokens, contextual_tokens], dim=1))


def reference_logits(model, input_ids, features):
    """The stock decoder on text + `features` [K, D] in place of the image's placeholders, at positions 0..
    (the reference's rebuilt ``position_ids``); the logits [1, A, V] of the A tokens after the image."""
    ids = input_ids[0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        sequence = torch.cat([embeds[: image[0]], features, embeds[image[-1] + 1 :]])[None]
        h = model.model.language_model(inputs_embeds=sequence).last_hidden_state
        return model.lm_head(h[:, -(len(ids) - 1 - int(image[-1])) :])


def reference_visionzip(model, inputs, dominant, contextual):
    """LLaVA-1.5: (CLS + dominant indices, logits of the tokens after the image) of one image."""
    all_indices, tokens = reference_zip(model, inputs["pixel_values"], dominant, contextual)
    return sorted(all_indices[0].tolist()), reference_logits(model, inputs["input_ids"], tokens[0])


def reference_restore(image_feature, cur_keep_idx, width, height, side):
    """The reference's ``restore_image_features_sorted`` (``spatial_unpad``; its hard-coded 24 is `side`): the
    grid crops' dominant patches put back on the (height * side, width * side) grid and read in raster order,
    then every crop's CLS, then every crop's contextual tokens; its ``image_newline_expanded`` is unused."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, side * side, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, restore, True)
    restored_features[mask] = image_feature[:, 1:num_keep, :].reshape(-1, feature_dim)
    assert width * height == restored_features.shape[0]
    restored_features = restored_features.view(height, width, side, side, feature_dim).permute(0, 2, 1, 3, 4)
    restored_features = restored_features.reshape(height * side, width * side, feature_dim)
    mask = mask.view(height, width, side, side).permute(0, 2, 1, 3).reshape(height * side, width * side)
    raw_img_feature_merge = image_feature[:, -num_extra:].reshape(-1, feature_dim)
    return torch.cat([restored_features[mask], image_feature[:, 0], raw_img_feature_merge])


def crops_of(model, image_size):
    """Crops (base + grid) of an anyres image, and its grid (rows, cols), as the stock LLaVA-NeXT counts them."""
    config = model.config
    size = config.vision_config.image_size
    crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, size)
    return crops, get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_visionzip_keeps_reference_tokens_and_matches_its_shorter_sequence(attn):
    model, processor = tiny_model("llava", num_layers=4, attn="eager", seed=3)
    model.config.vision_feature_layer = -2  # LLaVA-1.5's layer (the tiny default reads the last)
    inputs = make_inputs(processor, n=1)
    kept_ref, logits_ref = reference_visionzip(model, inputs, SPEC.dominant, SPEC.contextual)
    model.set_attn_implementation(attn)
    apply_zoo(model, SPEC)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    rule = drop_decision(model).rule
    assert rule.dominant_indices[0].tolist() == kept_ref and len(kept_ref) == SPEC.dominant
    cache = output_cache(out)
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0].tolist()
    for i in range(4):  # every layer holds the first dominant + contextual placeholders (the zipped tokens)
        entry = cache.layers[i]
        assert isinstance(entry, MoDCacheLayer)
        held = [p for p in entry.index[0][entry.filled[0]].tolist() if p in set(image)]
        assert held == image[: SPEC.retained]
    torch.testing.assert_close(out.logits[:, -logits_ref.shape[1] :], logits_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image", [0, 1, 2])  # anyres grids 1 x 2, 2 x 2, 2 x 1 (rows x cols)
def test_visionzip_llava_next_keeps_reference_tokens_per_crop_in_its_anyres_layout(image):
    """Tiny LLaVA-NeXT: each crop's dominant indices (base and grid crops) equal the reference's, and the logits
    equal the stock decoder on text + the reference's layout (base crop's tokens, grid crops' dominant patches
    in raster order of the whole grid, their CLS tokens, their contextual tokens) at positions 0.."""
    model, processor = tiny_model("llava_next", num_layers=4, attn="eager", seed=3)
    model.config.vision_feature_layer = -2  # LLaVA-NeXT's layer (the tiny default reads the last)
    inputs = processor(images=[make_images()[image]], text=[PROMPTS[image]], return_tensors="pt")
    crops, (rows, cols) = crops_of(model, inputs["image_sizes"][0])
    assert (rows, cols) == [(1, 2), (2, 2), (2, 1)][image] and crops == rows * cols + 1
    all_indices, tokens = reference_zip(model, inputs["pixel_values"][0, :crops], SPEC.dominant, SPEC.contextual)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    layout = torch.cat([tokens[0], reference_restore(tokens[1:], all_indices[1:], cols, rows, side)])
    assert layout.shape[0] == crops * SPEC.retained
    logits_ref = reference_logits(model, inputs["input_ids"], layout)
    model.set_attn_implementation("sdpa")
    apply_zoo(model, SPEC)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    rule = drop_decision(model).rule
    assert [d.tolist() for d in rule.dominant_indices] == [sorted(i.tolist()) for i in all_indices]
    image_at = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0].tolist()
    cache = output_cache(out)
    for i in range(4):  # every layer holds the image's first crops * (dominant + contextual) placeholders
        entry = cache.layers[i]
        held = [p for p in entry.index[0][entry.filled[0]].tolist() if p in set(image_at)]
        assert held == image_at[: crops * SPEC.retained] and len(held) < len(image_at)
    torch.testing.assert_close(out.logits[:, -logits_ref.shape[1] :], logits_ref, atol=1e-5, rtol=1e-5)


def test_visionzip_accounting_and_side_cost():
    """Text + dominant + contextual tokens and KV entries in every layer, per sample of a left-padded batch;
    the vision-side FLOPs reported apart: CLS row 2 N H hd, key metric N H hd, similarities 2 M C hd, merge M Dv."""
    model, processor = tiny_model("llava", num_layers=4)
    inputs = make_inputs(processor, n=2)
    apply_zoo(model, SPEC)
    report = mllm_mod.efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    for b, t in enumerate(report.n_text):
        assert [k[b] for k in report.kept_per_layer] == [t + SPEC.retained] * 4
        assert [e[b] for e in report.kv_entries_per_layer] == [t + SPEC.retained] * 4
    n, width, hd = 26, 32, 8  # CLS + 25 patches, Dv = H * hd = 32
    merged = n - SPEC.dominant - SPEC.contextual  # 20 remaining, targets 0, 6, 12
    expected = 2 * n * width + n * width + 2 * merged * SPEC.contextual * hd + merged * width
    assert report.side_flops == [expected, expected]
    assert report.side_tflops == pytest.approx(expected / 1e12)
    assert "side TFLOPs" in report.table()


def test_visionzip_llava_next_accounting_and_side_cost():
    """Anyres LLaVA-NeXT, a left-padded batch of three grids: text + crops * (dominant + contextual) tokens and KV
    entries in every layer (measured == accounted), the side cost the LLaVA-1.5 formula per crop."""
    model, processor = tiny_model("llava_next", num_layers=4)
    inputs = make_inputs(processor, n=3)
    apply_zoo(model, SPEC)
    report = mllm_mod.efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    crops = [crops_of(model, size)[0] for size in inputs["image_sizes"]]
    assert crops == [3, 5, 3]
    for b, t in enumerate(report.n_text):
        assert [k[b] for k in report.kept_per_layer] == [t + crops[b] * SPEC.retained] * 4
        assert [e[b] for e in report.kv_entries_per_layer] == [t + crops[b] * SPEC.retained] * 4
    n, width, hd = 26, 32, 8
    merged = n - SPEC.dominant - SPEC.contextual
    per_crop = 2 * n * width + n * width + 2 * merged * SPEC.contextual * hd + merged * width
    assert report.side_flops == [c * per_crop for c in crops]


def test_visionzip_llava_next_batch_equals_single_and_cached_equals_uncached():
    """Three images of different anyres grids (1 x 2, 2 x 2, 2 x 1) in one left-padded batch: each row's
    generation logits equal the prompt alone, and cached == uncached, within 1e-5."""
    model, processor = tiny_model("llava_next", num_layers=4)
    apply_zoo(model, SPEC)
    batch = make_inputs(processor, n=3)
    assert len(set((batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist())) == 3
    images = make_images()
    alone = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(3)]
    assert_batch_equals_single(model, batch, alone, 4, "left-padded batch == alone (visionzip, llava_next)", atol=1e-5)
    assert_cached_equals_uncached(model, batch, 4, "cached == uncached (visionzip, llava_next)", atol=1e-5)
    mllm_mod.unload(model)
    assert "pack_image_features" not in vars(model.model)  # the stock packing again


def test_visionzip_batch_equals_single_and_cached_equals_uncached():
    model, processor = tiny_model("llava", num_layers=4)
    apply_zoo(model, SPEC)
    batch = make_inputs(processor, n=2)
    images = make_images()
    alone = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(2)]
    assert_batch_equals_single(model, batch, alone, 4, "left-padded batch == alone (visionzip)")
    assert_cached_equals_uncached(model, batch, 4, "cached == uncached (visionzip)")


@pytest.mark.parametrize(
    "family,reason",
    [
        ("llava_next_video", "video frames are average-pooled"),
        ("internvl", "pixel-shuffled"),
        ("qwen2_5_vl", "has no CLS token"),
        ("llava_onevision", "has no CLS token"),
    ],
)
def test_visionzip_refuses_other_families_with_the_reason(family, reason):
    model, _ = tiny_model(family, num_layers=2)
    with pytest.raises(NotImplementedError, match=f"visionzip: .*{reason}"):
        apply_zoo(model, "visionzip")
    assert not is_retrofitted(model)  # refused before anything changed


def test_visionzip_budget_names_and_paper_settings():
    from mllm_mod.config import MoDConfig
    from mllm_mod.eval.zoo.matching import matched_spec, spec_cost
    from mllm_mod.flops import DecoderShape, prefill_cost
    from mllm_mod.schedule import layer_ratios_for

    assert VisionZipSpec() == VisionZipSpec(54, 10) and VisionZipSpec().retained == 64
    assert zoo_spec("visionzip", dominant="108", contextual="20") == VisionZipSpec(108, 20)
    assert VisionZipSpec(162, 30).label() == "dominant=162, contextual=30"
    with pytest.raises(TypeError, match="not its budget fields"):
        zoo_spec("visionzip", lam=0.5)
    with pytest.raises(ValueError, match="dominant"):
        VisionZipSpec(0, 10)
    shape = DecoderShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000, layers=32)
    ratios = layer_ratios_for(MoDConfig(preset="pmod"), 32)
    target = prefill_cost(shape, ratios, 64, 576).decoder_flops
    spec = matched_spec("visionzip", shape, 64, 576, ratios)
    assert abs(spec_cost(shape, spec, 64, 576) - target) < 0.02 * target
    assert spec.contextual == round(spec.retained * 10 / 64)


def test_visionzip_through_the_plugin_and_the_command_line(tmp_path):
    import argparse

    from mllm_mod.commands import eval as eval_cmd
    from mllm_mod.eval.lmms_plugin import MoDLMM
    from mllm_mod.eval.report import ModelResult

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["eval", str(tmp_path), "--suite", "synthetic", "--out", str(tmp_path / "o"), "--preset", "visionzip",
                              "--dominant", "108", "--contextual", "20", "--compare", "dense"])  # fmt: skip
    specs = {s.name: s.model_args for s in eval_cmd.specs_from_args(args)}
    assert specs["visionzip"]["dominant"] == 108 and specs["visionzip"]["contextual"] == 20
    assert ModelResult("visionzip", (), {}, {}, specs["visionzip"]).label == "visionzip (dominant=108, contextual=20)"
    model, processor = tiny_model("llava", num_layers=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = MoDLMM(pretrained=str(tmp_path), preset="visionzip", device="cpu", dtype="float32")  # the paper's 54 + 10
    assert drop_decision(lm.model).spec == VisionZipSpec()
    lm = MoDLMM(pretrained=str(tmp_path), preset="visionzip", dominant="12", contextual="4", device="cpu", dtype="float32")
    assert drop_decision(lm.model).spec == VisionZipSpec(dominant=12, contextual=4)  # the budget as the plugin's model args
    with pytest.raises(TypeError, match="dominant"):
        MoDLMM(pretrained=str(tmp_path), preset="pdrop", dominant="12", device="cpu", dtype="float32")

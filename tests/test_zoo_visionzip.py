"""VisionZip (`mllm_mod.eval.zoo.visionzip`): the dominant and contextual tokens against a hand-written
reference of the published code's rule on tiny LLaVA-1.5 (a CLIP tower), the logits of the shorter sequence,
batch == single and cached == uncached generation on the logits, the accounting (tokens, KV entries, the
vision-side FLOPs reported apart) and the refusals for other families."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, make_inputs
from logits import assert_batch_equals_single, assert_cached_equals_uncached

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.compat import output_cache
from mllm_mod.eval.baselines import drop_decision
from mllm_mod.eval.zoo import VisionZipSpec, apply_zoo, zoo_spec
from mllm_mod.retrofit import is_retrofitted
from mllm_mod.tiny import tiny_model

SPEC = VisionZipSpec(dominant=6, contextual=3)  # of 25 patches + CLS: CLS + 5 patches, 3 merged tokens


def reference_visionzip(model, inputs, dominant, contextual):
    """The reference's ``CLIPVisionTower_VisionZip.forward`` step by step (one image, eager tower with
    attention maps; ``dominant_num = dominant - 1`` as its ``visionzip()`` passes it), the projector, then the
    stock decoder on text + those tokens at positions 0.. (its rebuilt ``position_ids``).
    Returns (CLS + dominant indices, last-token logits)."""
    tower = model.model.vision_tower
    layer_at = model.config.vision_feature_layer  # -2, as the reference hard-codes
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        attn_weights = out.attentions[layer_at]  # [1, H, N, N]
        hidden_states = out.hidden_states[layer_at]  # [1, N, Dv]
        layer = tower.encoder.layers[layer_at]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_at - 1]))
        metric = keys.view(1, keys.shape[1], layer.self_attn.num_heads, -1).mean(2)  # raw keys, mean over heads
        dominant_num = dominant - 1
        cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
        topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros((1, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
        mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(1, dominant_num + 1, -1)
        metric_filtered = metric[mask].view(1, hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
        hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(1, hidden_states.shape[1] - (dominant_num + 1), -1)
        metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
        step = max(1, metric_normalized.shape[1] // contextual)
        target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
        target_tokens = metric_normalized[:, target_indices, :]
        others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
        similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
        assign_one_hot = torch.zeros(1, int(others.sum()), contextual)
        assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
        aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, others, :]) / counts
        contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated_hidden
        features = model.model.multi_modal_projector(torch.cat([dominant_tokens, contextual_tokens], dim=1))[0]
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero()[:, 0]
        embeds = model.get_input_embeddings()(ids)
        sequence = torch.cat([embeds[: image[0]], features, embeds[image[-1] + 1 :]])[None]
        decoder = model.model.language_model
        h = decoder(inputs_embeds=sequence).last_hidden_state
        logits = model.lm_head(h[:, -1])
    return sorted(all_indices[0].tolist()), logits


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
    torch.testing.assert_close(out.logits[:, -1], logits_ref, atol=1e-5, rtol=1e-5)


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


def test_visionzip_batch_equals_single_and_cached_equals_uncached():
    model, processor = tiny_model("llava", num_layers=4)
    apply_zoo(model, SPEC)
    batch = make_inputs(processor, n=2)
    images = make_images()
    alone = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(2)]
    assert_batch_equals_single(model, batch, alone, 4, "left-padded batch == alone (visionzip)")
    assert_cached_equals_uncached(model, batch, 4, "cached == uncached (visionzip)")


@pytest.mark.parametrize("family", ["llava_next", "internvl", "qwen2_5_vl", "llava_onevision"])
def test_visionzip_refuses_other_families_with_the_reason(family):
    model, _ = tiny_model(family, num_layers=2)
    with pytest.raises(NotImplementedError, match="visionzip: .*(CLS|anyres|pixel-shuffled)"):
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

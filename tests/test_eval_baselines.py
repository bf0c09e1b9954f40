"""The training-free baselines (FastV, random drop) on the MoD core: the tokens they keep, the logits
they give (against a hand-written pruned forward through the stock layers), their FLOPs accounting and
their compact KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, make_inputs
from logits import assert_batch_equals_single

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.eval.baselines import DropSpec, apply_baseline
from mllm_mod.flops import DecoderShape, prefill_cost
from mllm_mod.retrofit import is_retrofitted
from mllm_mod.select import keep_count
from mllm_mod.tiny import tiny_model
from mllm_mod.compat import output_cache

K, R = 2, 0.5


def reference_fastv(model, inputs, layer: int, ratio: float) -> tuple[list[int], torch.Tensor]:
    """FastV written out on the stock model (one sample, no padding): rank the vision tokens by the
    head-averaged eager attention of the last token in layer K-1, keep the top trunc(R * n), run layers
    K.. on text + kept tokens only (original positions, causal), return (kept vision positions, logits)."""
    image_id = model.config.image_token_id
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[layer - 1][0, :, -1, :].mean(dim=0)  # [T]
    vision = (inputs["input_ids"][0] == image_id).nonzero()[:, 0]  # [Nv]
    k = int(keep_count(torch.tensor(len(vision)), ratio))
    kept_vision = sorted(vision[attention[vision].argsort(descending=True)[:k]].tolist())
    text = (inputs["input_ids"][0] != image_id).nonzero()[:, 0].tolist()
    keep = torch.tensor(sorted(text + kept_vision))  # [Tk]
    decoder = model.model.language_model
    h = out.hidden_states[layer][:, keep]  # [1, Tk, D]: the input of layer K, pruned
    position_ids = keep[None]  # [1, Tk]
    cos_sin = decoder.rotary_emb(h, position_ids)
    n = len(keep)
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]  # [1, 1, Tk, Tk] over the kept tokens
    with torch.no_grad():
        for block in decoder.layers[layer:]:
            h = block(h, attention_mask=causal, position_ids=position_ids, position_embeddings=cos_sin)
        logits = model.lm_head(decoder.norm(h[:, -1]))  # [1, V]
    return kept_vision, logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_keeps_top_attention_tokens_and_matches_pruned_forward(attn):
    model, processor = tiny_model("llava", num_layers=4, attn="eager", seed=3)
    inputs = make_inputs(processor, n=1)
    kept_ref, logits_ref = reference_fastv(model, inputs, K, R)
    model.set_attn_implementation(attn)
    apply_baseline(model, "fastv", layer=K, ratio=R)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    for i, layer in enumerate(cache.layers):
        if i < K:
            assert not isinstance(layer, MoDCacheLayer)
            continue
        held = layer.index[0][layer.filled[0]].tolist()  # original positions the layer's cache holds
        assert [p for p in held if image[p]] == kept_ref  # the kept vision tokens, and only those
        assert len(held) == len(image) - sum(image) + len(kept_ref)  # + every text token
    torch.testing.assert_close(out.logits[:, -1], logits_ref, atol=1e-5, rtol=1e-5)


def test_fastv_accounting_and_compact_kv_cache():
    """FastV at K=2, R=50%: the measured kept tokens and KV entries equal what the accounting predicts,
    and the TFLOPs are the accounting's for those ratios."""
    model, processor = tiny_model("llava_next", num_layers=4)
    inputs = make_inputs(processor, n=3)  # anyres: different vision counts, left padding
    apply_baseline(model, "fastv", layer=K, ratio=R)
    assert mllm_mod.layer_ratios(model) == [1.0, 1.0, R, R]
    report = mllm_mod.efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    shape = DecoderShape.from_config(model.config.text_config)
    element = 4  # float32
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):
        kept = t + int(keep_count(torch.tensor(v), R))
        assert [e[b] for e in report.kv_entries_per_layer] == [t + v, t + v, kept, kept]
        expected = prefill_cost(shape, [1.0, 1.0, R, R], t, v, element)
        assert report.mod_tflops[b] == pytest.approx(expected.tflops, rel=1e-12)
        assert (
            report.mod_kv_bytes[b]
            == expected.kv_bytes
            == sum(expected.kv_entries_per_layer) * shape.kv_bytes_per_entry(element)
        )
    assert report.tflops_ratio < 1 and report.kv_ratio < 1


def test_random_drop_same_budget_seeded_and_unloadable():
    model, processor = tiny_model("llava", num_layers=4)
    inputs = make_inputs(processor, n=2)
    with torch.no_grad():
        dense_logits = model(**inputs).logits

    def kept_sets(spec: DropSpec) -> list[list[int]]:
        apply_baseline(model, spec)
        with torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True))
        layer = cache.layers[K]
        mllm_mod.unload(model)
        return [layer.index[b][layer.valid[b]].tolist() for b in range(2)]

    fastv = kept_sets(DropSpec("fastv", K, R))
    first, again = kept_sets(DropSpec("random", K, R, seed=1)), kept_sets(DropSpec("random", K, R, seed=1))
    other = kept_sets(DropSpec("random", K, R, seed=2))
    assert first == again and first != other  # seeded
    assert [len(s) for s in first] == [len(s) for s in fastv]  # the same budget
    assert first != fastv
    assert not is_retrofitted(model)  # unload removed the MoD layers and the ranking hook
    assert not model.model.language_model.layers[K - 1].self_attn._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dense_logits)


def test_fastv_generation_is_batched_like_single():
    """Cached greedy generation with left padding gives each prompt what it gets alone."""
    model, processor = tiny_model("llava", num_layers=4)
    apply_baseline(model, "fastv", layer=K, ratio=R)
    batch = make_inputs(processor, n=3)
    images = make_images()
    alone = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(3)]
    assert_batch_equals_single(model, batch, alone, 4, "left-padded batch == alone (fastv)")


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="unknown baseline"):
        DropSpec("fastest")
    with pytest.raises(ValueError, match="K must be >= 1"):
        DropSpec("fastv", layer=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DropSpec("random", ratio=0.0)
    model, _ = tiny_model("llava", num_layers=4)
    with pytest.raises(ValueError, match="does not exist"):
        apply_baseline(model, "fastv", layer=4)

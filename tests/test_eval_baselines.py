"""The training-free baselines (FastV, random drop) on the MoD core: the tokens they keep, the logits
they give (against a hand-written pruned forward through the stock layers), their FLOPs accounting,
their compact KV cache, FastV's names (K, R = the fraction pruned), the ranking token of a scored
continuation, cached == uncached generation and batch == single."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, make_inputs
from logits import assert_batch_equals_single, assert_cached_equals_uncached

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.compat import output_cache
from mllm_mod.eval.baselines import DropSpec, apply_baseline, ranking_at
from mllm_mod.flops import DecoderShape, prefill_cost
from mllm_mod.retrofit import is_retrofitted
from mllm_mod.select import keep_count
from mllm_mod.tiny import tiny_model

K, R = 2, 0.5  # FastV's K (pruning layer) and R (fraction of vision tokens pruned); keeps 1 - R = 0.5


def reference_fastv(model, inputs, layer: int, prune: float) -> tuple[list[int], torch.Tensor]:
    """FastV written out on the stock model (one sample, no padding): rank the vision tokens by the
    head-averaged eager attention of the last token in layer K-1, keep the top trunc((1 - R) * n), run layers
    K.. on text + kept tokens only (original positions, causal), return (kept vision positions, logits)."""
    image_id = model.config.image_token_id
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[layer - 1][0, :, -1, :].mean(dim=0)  # [T]
    vision = (inputs["input_ids"][0] == image_id).nonzero()[:, 0]  # [Nv]
    k = int(keep_count(torch.tensor(len(vision)), 1.0 - prune))
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
    apply_baseline(model, "fastv", prune_layer=K, prune_ratio=R)
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
    apply_baseline(model, "fastv", prune_layer=K, prune_ratio=R)
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


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_generation_is_batched_like_single(method):
    """Cached greedy generation with left padding gives each prompt what it gets alone, on the logits: the
    random baseline draws per sample (seeded by its own tokens), not one stream over the padded batch."""
    model, processor = tiny_model("llava", num_layers=4)
    apply_baseline(model, method, prune_layer=K, prune_ratio=R)
    batch = make_inputs(processor, n=3)
    images = make_images()
    alone = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(3)]
    assert_batch_equals_single(model, batch, alone, 4, f"left-padded batch == alone ({method})")


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_uncached_generation_equals_cached(method):
    """``generate(use_cache=False)`` recomputes prompt + generated tokens at each step; it ranks by the same
    prompt token as the cached prefill, so the logits agree (FastV differed by 0.56 when it ranked by the
    newest generated token)."""
    model, processor = tiny_model("llava", num_layers=4)
    apply_baseline(model, method, prune_layer=K, prune_ratio=R)
    assert_cached_equals_uncached(model, make_inputs(processor, n=3), 4, f"cached == uncached ({method})")


def test_scored_continuation_ranks_by_the_last_prompt_token():
    """Loglikelihood scores prompt + continuation in one forward: ranked at the prompt's last token (named
    with `ranking_at`), every option keeps the vision tokens the prompt alone keeps (the reference FastV
    on the prompt), whatever the option's text."""
    model, processor = tiny_model("llava", num_layers=4, attn="eager")
    prompt = processor(images=make_images()[:1], text=PROMPTS[:1], return_tensors="pt")
    kept_ref, _ = reference_fastv(model, prompt, K, R)
    apply_baseline(model, "fastv", prune_layer=K, prune_ratio=R)
    last = prompt["input_ids"].shape[1] - 1
    kept_sets = []
    for option in (" red", " a blue square ."):
        inputs = processor(images=make_images()[:1], text=[PROMPTS[0] + option], return_tensors="pt")
        assert torch.equal(inputs["input_ids"][:, : last + 1], prompt["input_ids"])  # the option only appends
        with torch.no_grad(), ranking_at(model, [last]):
            layer = output_cache(model(**inputs, use_cache=True)).layers[K]
        image = inputs["input_ids"][0] == model.config.image_token_id
        kept_sets.append([p for p in layer.index[0][layer.valid[0]].tolist() if image[p]])
    assert kept_sets == [kept_ref, kept_ref]


def test_random_drop_seeds_per_sample_from_its_prompt():
    """The same sample keeps the same vision tokens whatever its batch neighbours and order; another seed
    draws another subset."""
    model, processor = tiny_model("llava", num_layers=4)

    def kept(seed: int, order: list[int]) -> dict[int, list[int]]:
        apply_baseline(model, DropSpec("random", K, R, seed=seed))
        images = make_images()
        processor.tokenizer.padding_side = "left"
        inputs = processor(
            images=[images[i] for i in order], text=[PROMPTS[i] for i in order], return_tensors="pt", padding=True
        )
        with torch.no_grad():
            layer = output_cache(model(**inputs, use_cache=True)).layers[K]
        mllm_mod.unload(model)
        first = inputs["attention_mask"].long().argmax(dim=1)  # [B] left padding
        return {i: [p - int(first[b]) for p in layer.index[b][layer.valid[b]].tolist()] for b, i in enumerate(order)}

    together, reversed_, alone = kept(1, [0, 1, 2]), kept(1, [2, 1, 0]), kept(1, [1])
    assert together == reversed_ and together[1] == alone[1]
    assert kept(2, [0, 1, 2]) != together


def test_prune_ratio_is_the_fraction_pruned_and_old_spellings_are_refused():
    """FastV's R is the fraction of vision tokens pruned: R = 0.75 keeps trunc(0.25 * n). The ambiguous
    keep_ratio (and the old ratio/layer fields) are refused with what to write instead."""
    from mllm_mod.eval.lmms_plugin import MoDLMM

    model, processor = tiny_model("llava", num_layers=4)
    inputs = make_inputs(processor, n=1)
    apply_baseline(model, "fastv", prune_layer=K, prune_ratio=0.75)
    assert mllm_mod.layer_ratios(model) == [1.0, 1.0, 0.25, 0.25]
    with torch.no_grad():
        layer = output_cache(model(**inputs, use_cache=True)).layers[K]
    image = inputs["input_ids"][0] == model.config.image_token_id
    n_vision = int(image.sum())
    assert sum(bool(image[p]) for p in layer.index[0][layer.valid[0]].tolist()) == int(0.25 * n_vision) < n_vision // 2
    mllm_mod.unload(model)
    with pytest.raises(TypeError, match=r"prune_ratio=R, the fraction of vision tokens pruned"):
        apply_baseline(model, "fastv", keep_ratio=0.25)
    with pytest.raises(TypeError, match="prune_layer=K"):
        apply_baseline(model, "fastv", layer=2)
    with pytest.raises(TypeError, match=r"keep_ratio= is not accepted .* use prune_ratio=R"):
        MoDLMM(pretrained="unused", preset="fastv", keep_ratio=0.5)


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="unknown baseline"):
        DropSpec("fastest")
    with pytest.raises(ValueError, match="K must be >= 1"):
        DropSpec("fastv", prune_layer=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropSpec("random", prune_ratio=1.0)
    model, _ = tiny_model("llava", num_layers=4)
    with pytest.raises(ValueError, match="does not exist"):
        apply_baseline(model, "fastv", prune_layer=4)

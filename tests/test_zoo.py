"""The training-free zoo (`mllm_mod.eval.zoo`): each method's kept set against a hand-written reference of
its published rule on a tiny model (PyramidDrop, VTW, DivPrune), with the logits of that reference's pruned
forward; batch == single and cached == uncached generation on the logits; the measured kept tokens and KV
entries; VTW's K calibration; the budgets through the command line, the lmms plugin and the report."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, make_inputs
from logits import assert_batch_equals_single, assert_cached_equals_uncached

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.compat import output_cache
from mllm_mod.eval.baselines import apply_baseline, drop_decision
from mllm_mod.eval.zoo import DARTSpec, DivPruneSpec, PDropSpec, VTWSpec, apply_zoo, calibrate_k, zoo_spec
from mllm_mod.eval.zoo.pdrop import scaled_layer_list
from mllm_mod.eval.zoo.vtw import first_under, scaled_k
from mllm_mod.retrofit import is_retrofitted
from mllm_mod.tiny import tiny_model

LAYERS = (1, 2, 3)  # PDrop's boundaries on a 4-layer decoder (8, 16, 24 of 32, scaled)
LAM, K, SUBSET = 0.5, 2, 0.3
DART = DARTSpec(pruned_layer=2, reduction_ratio=0.5, pivot_image_token=2, pivot_text_token=2)  # 3 per pivot
SPECS = {"pdrop": PDropSpec(LAYERS, LAM), "vtw": VTWSpec(K), "divprune": DivPruneSpec(SUBSET), "dart": DART}
# generation checks: left-padded batch == alone for every method in the default run (~2 s each); cached ==
# uncached for PyramidDrop (ranking token, three stages, renumbered positions), the others with -m slow
BATCHED = list(SPECS)
GENERATION = ["pdrop"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("vtw", "divprune", "dart")]


def stock_pass(model, inputs):
    """(input embeddings [1, T, D], vision positions [Nv], decoder) of one unpadded sample on the stock model."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    vision = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    return out.hidden_states, vision, model.model.language_model


def run_layers(decoder, blocks, h, positions):
    """The stock blocks on h [1, n, D] at `positions` [n], causal over those n tokens."""
    cos_sin = decoder.rotary_emb(h, positions[None])
    n = h.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        for block in blocks:
            h = block(h, attention_mask=causal, position_ids=positions[None], position_embeddings=cos_sin)
    return h


def last_logits(model, decoder, h):
    with torch.no_grad():
        return model.lm_head(decoder.norm(h[:, -1]))  # [1, V]


def reference_pdrop(model, inputs, layer_list, lam):
    """PyramidDrop as its reference code runs it (one sample, no padding): after the stage ending before
    boundary b, layer b's own (eager) attention on the current pruned sequence, positions 0.. of it, ranks
    the image tokens still present from the last token; the top int(n * lam^s) stay; the sequence is cut."""
    hidden, vision, decoder = stock_pass(model, inputs)
    n = len(vision)
    seq = torch.arange(inputs["input_ids"].shape[1])  # original index of each present token
    h = hidden[layer_list[0]]  # the input of the first boundary layer: layers before it are stock
    kept_sets = []
    for s, b in enumerate(layer_list):
        block = decoder.layers[b]
        positions = torch.arange(len(seq))
        cos_sin = decoder.rotary_emb(h, positions[None])
        causal = torch.full((len(seq), len(seq)), float("-inf")).triu(1)[None, None]
        with torch.no_grad():
            _, weights = block.self_attn(block.input_layernorm(h), position_embeddings=cos_sin, attention_mask=causal)
        attention = weights[0, :, -1, :].mean(dim=0)  # [n present]
        image = torch.isin(seq, vision)
        keep = int(n * lam ** (s + 1))
        top = image.nonzero()[:, 0][attention[image].argsort(descending=True)[:keep]]
        present = sorted(set((~image).nonzero()[:, 0].tolist()) | set(top.tolist()))
        h, seq = h[:, present], seq[present]
        kept_sets.append(sorted(seq[torch.isin(seq, vision)].tolist()))
        end = layer_list[s + 1] if s + 1 < len(layer_list) else len(decoder.layers)
        h = run_layers(decoder, decoder.layers[b:end], h, torch.arange(len(seq)))
    return kept_sets, last_logits(model, decoder, h)


def reference_vtw(model, inputs, k):
    """VTW as its reference code runs it: the vision tokens cut out of the hidden states before layer K,
    the text tokens keeping their original positions."""
    hidden, vision, decoder = stock_pass(model, inputs)
    text = torch.tensor([i for i in range(inputs["input_ids"].shape[1]) if i not in set(vision.tolist())])
    h = run_layers(decoder, decoder.layers[k:], hidden[k][:, text], text)
    return last_logits(model, decoder, h)


def reference_divprune(model, inputs, ratio):
    """DivPrune as its reference code states it (index_select over the chosen rows, min over them, argmax),
    then the stock decoder on the shortened embeddings at positions 0.."""
    hidden, vision, decoder = stock_pass(model, inputs)
    x = hidden[0][0, vision].float()
    x = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - x @ x.T
    terms = round(ratio * len(vision))
    s = torch.empty(terms, dtype=torch.long)
    for i in range(terms):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.index_select(distance, 0, s[:i]).min(dim=0).values
        s[i] = torch.argmax(scores)
    kept = sorted(vision[s].tolist())
    present = sorted(set(range(inputs["input_ids"].shape[1])) - set(vision.tolist()) | set(kept))
    h = run_layers(decoder, decoder.layers, hidden[0][:, present], torch.arange(len(present)))
    return kept, last_logits(model, decoder, h)


def reference_dart(model, inputs, spec):
    """DART as its reference code states it (one unpadded sample): layer K-1's post-RoPE keys (eager
    `self_attn` on its normed input) -> L1 norms -> image pivots and text pivots after the image; for each
    pivot in the order of the Python set of pivot indices, the `share` unclaimed image tokens of lowest cosine
    similarity (final-norm states after layer K-1); then the stock layers K.. on the kept tokens at their
    original positions."""
    hidden, vision, decoder = stock_pass(model, inputs)
    k = spec.pruned_layer
    block = decoder.layers[k - 1]
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length)
    cos, sin = decoder.rotary_emb(hidden[k - 1], positions[None])
    with torch.no_grad():
        x = block.input_layernorm(hidden[k - 1])
        keys = block.self_attn.k_proj(x).view(1, length, -1, block.self_attn.head_dim).transpose(1, 2)  # [1, Hkv, T, hd]
        half = keys.shape[-1] // 2
        keys = keys * cos[:, None] + torch.cat([-keys[..., half:], keys[..., :half]], dim=-1) * sin[:, None]
        keys = keys.permute(0, 2, 1, 3).reshape(1, length, -1)[0]  # [T, Hkv * hd]
        states = decoder.norm(hidden[k])[0]  # [T, D]
    start, n = int(vision[0]), len(vision)
    norms = keys.abs().sum(-1)
    image_indices = (norms[start : start + n].topk(spec.pivot_image_token).indices + start).tolist()
    query_indices = (norms[start + n :].topk(spec.pivot_text_token).indices + start + n).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + n)) - set(image_indices)
    share = int(n * (1 - spec.reduction_ratio) / (spec.pivot_image_token + spec.pivot_text_token))
    for item in list(indices_set):
        valid_list = sorted(valid)
        cos_sim = -torch.nn.functional.cosine_similarity(states[item], states[valid_list], dim=-1)
        top = [valid_list[i] for i in cos_sim.topk(share).indices.tolist()]
        indices_set.update(top)
        valid.difference_update(top)
    indices_set.difference_update(query_indices)
    kept = sorted(indices_set)
    present = torch.tensor(sorted(set(range(length)) - set(vision.tolist()) | set(kept)))
    h = run_layers(decoder, decoder.layers[k:], hidden[k][:, present], present)
    return kept, last_logits(model, decoder, h)


def held_vision(cache, layer, image):
    """The vision positions a layer's compact cache holds (sample 0)."""
    entry = cache.layers[layer]
    assert isinstance(entry, MoDCacheLayer)
    return [p for p in entry.index[0][entry.filled[0]].tolist() if image[p]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pdrop_keeps_reference_sets_and_matches_its_pruned_forward(attn):
    model, processor = tiny_model("llava", num_layers=4, attn="eager", seed=3)
    inputs = make_inputs(processor, n=1)
    kept_ref, logits_ref = reference_pdrop(model, inputs, LAYERS, LAM)
    assert [len(k) for k in kept_ref] == [12, 6, 3]  # int(25 * 0.5^s)
    model.set_attn_implementation(attn)
    apply_zoo(model, SPECS["pdrop"])
    assert mllm_mod.layer_ratios(model) == [1.0, 0.5, 0.25, 0.125]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    assert not isinstance(cache.layers[0], MoDCacheLayer)
    assert [held_vision(cache, b, image) for b in LAYERS] == kept_ref
    torch.testing.assert_close(out.logits[:, -1], logits_ref, atol=1e-5, rtol=1e-5)


def test_vtw_withdraws_every_vision_token_from_layer_k():
    model, processor = tiny_model("llava", num_layers=4, attn="eager", seed=3)
    inputs = make_inputs(processor, n=1)
    logits_ref = reference_vtw(model, inputs, K)
    apply_zoo(model, "vtw", withdraw_layer=K)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    assert all(not isinstance(cache.layers[i], MoDCacheLayer) for i in range(K))
    for i in range(K, 4):
        assert held_vision(cache, i, image) == []
        assert int(cache.layers[i].filled[0].sum()) == len(image) - sum(image)  # every text token
    torch.testing.assert_close(out.logits[:, -1], logits_ref, atol=1e-5, rtol=1e-5)


def test_divprune_is_the_shorter_sequence_of_its_diverse_subset():
    model, processor = tiny_model("llava", num_layers=4, attn="eager", seed=3)
    inputs = make_inputs(processor, n=1)
    kept_ref, logits_ref = reference_divprune(model, inputs, SUBSET)
    assert len(kept_ref) == round(SUBSET * 25) == 8
    apply_zoo(model, "divprune", subset_ratio=SUBSET)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    assert [held_vision(cache, i, image) for i in range(4)] == [kept_ref] * 4  # from the first layer on
    torch.testing.assert_close(out.logits[:, -1], logits_ref, atol=1e-5, rtol=1e-5)


def test_dart_keeps_the_reference_pivots_and_claims():
    model, processor = tiny_model("llava", num_layers=4, attn="eager", seed=3)
    inputs = make_inputs(processor, n=1)
    kept_ref, logits_ref = reference_dart(model, inputs, DART)
    assert len(kept_ref) == 2 + 4 * 3  # image pivots + every pivot's share int(25 * 0.5 / 4)
    apply_zoo(model, DART)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    assert [held_vision(cache, i, image) for i in (2, 3)] == [kept_ref] * 2
    torch.testing.assert_close(out.logits[:, -1], logits_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(SPECS))
def test_measured_kept_tokens_and_kv_entries(method):
    """On anyres LLaVA-NeXT (different vision counts, left padding): the kept tokens and KV entries each
    layer holds are the rule's counts (PDrop int(n * lam^s), VTW none, DivPrune round(r * n) in every
    layer), and the measurement agrees with the cache."""
    model, processor = tiny_model("llava_next", num_layers=4)
    inputs = make_inputs(processor, n=3)
    apply_zoo(model, SPECS[method])
    report = mllm_mod.efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    assert len(set(report.n_vision)) > 1
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):
        expected = {
            "pdrop": [t + v] + [t + int(v * LAM ** s) for s in (1, 2, 3)],
            "vtw": [t + v] * K + [t] * (4 - K),
            "divprune": [t + round(SUBSET * v)] * 4,
            "dart": [t + v] * 2 + [t + 2 + 4 * int(v * 0.5 / 4)] * 2,
        }[method]
        assert [e[b] for e in report.kv_entries_per_layer] == expected
        assert [k[b] for k in report.kept_per_layer] == expected
        assert [t + k for k in SPECS[method].kept_vision(4, v)] == expected  # what the budget search prices
    assert report.tflops_ratio < 1 and report.kv_ratio < 1


@pytest.mark.parametrize("method", BATCHED)
def test_generation_is_batched_like_single(method):
    model, processor = tiny_model("llava", num_layers=4)
    apply_zoo(model, SPECS[method])
    batch = make_inputs(processor, n=2)
    images = make_images()
    alone = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(2)]
    assert_batch_equals_single(model, batch, alone, 4, f"left-padded batch == alone ({method})")


@pytest.mark.parametrize("method", GENERATION)
def test_uncached_generation_equals_cached(method):
    model, processor = tiny_model("llava", num_layers=4)
    apply_zoo(model, SPECS[method])
    assert_cached_equals_uncached(model, make_inputs(processor, n=2), 4, f"cached == uncached ({method})")


def test_vtw_calibration_measures_kl_of_each_k():
    """VTW's K search: KL(p_K || p) at the last prompt token, mean over the samples, for K = first .. L-1
    (checked by hand for one K); the model is left stock."""
    model, processor = tiny_model("llava", num_layers=4)
    batch = make_inputs(processor, n=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits[:, -1], -1)
    cal = calibrate_k(model, [batch], eta=float("inf"), first=1)
    assert list(cal.kl) == [1, 2, 3] and cal.k == 1 and all(v >= 0 for v in cal.kl.values())
    assert not is_retrofitted(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(model(**batch).logits[:, -1], -1), logp)
    apply_zoo(model, "vtw", withdraw_layer=2)
    with torch.no_grad():
        logq = torch.log_softmax(model(**batch).logits[:, -1], -1)
    assert cal.kl[2] == pytest.approx(float((logq.exp() * (logq - logp)).sum(-1).mean()), rel=1e-5, abs=1e-9)


def test_vtw_calibration_takes_the_first_k_under_eta():
    kl = {5: 0.2, 6: 0.01, 7: 0.002, 8: 0.004, 9: 0.001}
    assert first_under(kl, 0.003, 31) == 7  # the reference's eta for LLaVA-1.5-7B
    assert first_under(kl, 0.0001, 31) == 31 and first_under(kl, 1.0, 31) == 5


@pytest.mark.parametrize("method", list(SPECS))
def test_budget_at_pmod_tflops(method):
    """The study's equal-TFLOPs budget: the candidate closest to p-MoD's prefill cost (LLaVA-1.5-7B shape,
    576 vision + 64 text tokens), within 2% of it."""
    from mllm_mod.config import MoDConfig
    from mllm_mod.eval.zoo.matching import candidates, matched_spec, spec_cost
    from mllm_mod.flops import DecoderShape, prefill_cost
    from mllm_mod.schedule import layer_ratios_for

    shape = DecoderShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000, layers=32)
    target = prefill_cost(shape, layer_ratios_for(MoDConfig(preset="pmod"), 32), 64, 576).decoder_flops
    spec = matched_spec(method, shape, 64, 576, layer_ratios_for(MoDConfig(preset="pmod"), 32))
    gap = abs(spec_cost(shape, spec, 64, 576) - target)
    assert gap <= min(abs(spec_cost(shape, c, 64, 576) - target) for c in candidates(method, 32, 576)) + 0
    assert gap < 0.02 * target
    assert spec.method == method and zoo_spec(method, **{k: str(v) for k, v in spec.budget().items()}) == spec


def test_paper_defaults_scaled_to_depth():
    assert scaled_layer_list(32) == (8, 16, 24) and scaled_layer_list(40) == (10, 20, 30)
    assert scaled_layer_list(28) == (7, 14, 21) and scaled_layer_list(4) == LAYERS
    assert scaled_k(32) == 15 and scaled_k(40) == 19 and scaled_k(4) == 2
    assert PDropSpec().lam == 0.5 and DivPruneSpec().subset_ratio == 0.098
    assert PDropSpec().stages(32)[-1].start == 24 and VTWSpec().layer(32) == 15


def test_specs_from_names_unload_and_refusals():
    model, processor = tiny_model("llava", num_layers=4)
    inputs = make_inputs(processor, n=2)
    with torch.no_grad():
        dense = model(**inputs).logits
    for method in SPECS:
        apply_baseline(model, method)  # the baselines' entry point takes the zoo's names too
        assert drop_decision(model) is not None
        mllm_mod.unload(model)
        assert not is_retrofitted(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dense)
    assert zoo_spec("pdrop", layer_list="8;16;24", lam="0.25") == PDropSpec((8, 16, 24), 0.25)
    assert zoo_spec("pdrop", layer_list="[8,16,24]").layer_list == (8, 16, 24)
    assert zoo_spec("vtw", withdraw_layer="15") == VTWSpec(15)
    with pytest.raises(TypeError, match="not its budget fields"):
        zoo_spec("vtw", lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        PDropSpec(lam=1.0)
    with pytest.raises(ValueError, match="increasing"):
        PDropSpec((16, 8))
    with pytest.raises(ValueError, match="does not exist"):
        apply_zoo(model, "pdrop", layer_list="1,2,4")
    with pytest.raises(ValueError, match="subset_ratio"):
        DivPruneSpec(0.0)
    with pytest.raises(ValueError, match="K must be >= 1"):
        VTWSpec(0)


def test_command_line_plugin_and_report_carry_the_budgets(tmp_path):
    import argparse

    from mllm_mod.commands import eval as eval_cmd
    from mllm_mod.eval.lmms_plugin import MoDLMM
    from mllm_mod.eval.report import ModelResult

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers())
    args = parser.parse_args(
        ["eval", str(tmp_path), "--suite", "synthetic", "--out", str(tmp_path / "out"), "--preset", "pdrop", "--lam", "0.25",
         "--compare", "vtw", "--compare", "divprune", "--compare", "fastv", "--withdraw-layer", "2"]
    )  # fmt: skip
    specs = {s.name: s.model_args for s in eval_cmd.specs_from_args(args)}
    assert specs["pdrop"]["preset"] == "pdrop" and specs["pdrop"]["lam"] == 0.25 and "prune_ratio" not in specs["pdrop"]
    assert specs["vtw"]["withdraw_layer"] == 2 and "subset_ratio" not in specs["divprune"]
    assert specs["fastv"]["prune_layer"] == 2
    labels = [ModelResult(name, (), {}, {}, a).label for name, a in specs.items()]
    assert labels[:3] == [
        "pdrop (layer_list=8,16,24 of 32, scaled, lambda=0.25)", "vtw (K=2)", "divprune (subset_ratio=0.098 retained)"
    ]  # fmt: skip

    model, processor = tiny_model("llava", num_layers=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = MoDLMM(pretrained=str(tmp_path), preset="pdrop", layer_list="1;2;3", lam="0.5", device="cpu", dtype="float32")
    assert drop_decision(lm.model).spec == PDropSpec(LAYERS, 0.5)
    with pytest.raises(TypeError, match="budgets of preset"):
        MoDLMM(pretrained=str(tmp_path), preset="fastv", lam="0.5", device="cpu")

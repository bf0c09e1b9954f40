"""gamma-MoD: ARank, the shared router, masked routing, threshold inference, decode skipping, routing loss."""

from __future__ import annotations

import pytest
import torch

import mllm_mod
from conftest import build, make_images, make_inputs
from logits import assert_cached_equals_uncached
from mllm_mod.arank import ARankReport, arank, attention_ranks
from mllm_mod.efficiency import efficiency
from mllm_mod.retrofit import AGREEMENT_KEY, LOSS_KEY, SHARED_ROUTER, mod_state_dict
from mllm_mod import compat
from mllm_mod.compat import output_cache


# -- ARank on hand-built maps ----------------------------------------------------------------------
def test_rank_of_hand_built_maps():
    s = 6
    identity = torch.eye(s)  # all mass on the diagonal: nothing left once it is zeroed
    sink = torch.zeros(s, s)
    sink[:, 0] = 1.0  # every token attends the first one
    uniform = torch.tril(torch.ones(s, s))
    uniform = uniform / uniform.sum(-1, keepdim=True)  # causal average: strictly lower part has rank s-1
    duplicated = torch.tril(torch.ones(s, s))
    duplicated[3:] = duplicated[2]  # rows 3.. copy row 2: rows are 0, e0, e0+e1, then e0+e1+e2 three times
    ranks = attention_ranks(torch.stack([identity, sink, uniform, duplicated]))
    assert ranks.tolist() == [0, 1, s - 1, 3]


def test_rank_uses_float32_default_tolerance():
    m = torch.diag(torch.tensor([0.0, 1.0, 1e-9, 0.5])).roll(1, dims=1)[None]  # off-diagonal singular values
    assert attention_ranks(m).tolist() == [2]  # 1e-9 < 1 * 4 * eps_float32 is numerically zero


def test_arank_end_to_end_reloads_and_drives_retrofit(tmp_path):
    model, processor = build("llava", "sdpa", num_layers=8)
    batches = [make_inputs(processor, n=3, seed=s) for s in range(2)]
    report = arank(model, batches, max_samples=5, progress=False)
    assert report.samples == 5
    assert model.config.text_config._attn_implementation == "sdpa"  # restored after calibration
    longest = int(batches[0]["attention_mask"].sum(1).max())
    assert len(report.layer_arank) == 8 and all(0 < a < longest for a in report.layer_arank)
    assert len(report.head_mean[0]) == 4 and all(sd >= 0 for sd in report.head_std[0])
    report.save(tmp_path)
    assert (tmp_path / "arank.png").stat().st_size > 0
    loaded = ARankReport.load(tmp_path)
    assert loaded == report
    dense = loaded.dense_layers()  # 4 of 32 scaled to 8 layers: 1
    assert len(dense) == 1 and loaded.layer_arank[dense[0]] == max(loaded.layer_arank)
    mllm_mod.retrofit(model, "gmod", arank=tmp_path / "arank.json")
    ratios = mllm_mod.layer_ratios(model)
    assert [i for i, r in enumerate(ratios) if r == 1.0] == dense
    assert loaded.dense_layers(threshold=0.0) == list(range(8))
    with pytest.raises(ValueError, match="covers 8 layers, the model has 4"):
        mllm_mod.retrofit(build("llava")[0], "gmod", arank=loaded)


# -- the shared router and masked routing ----------------------------------------------------------
def gmod_model(family="llava", num_layers=4, **overrides):
    model, processor = build(family, "sdpa", num_layers=num_layers)
    mllm_mod.retrofit(model, "gmod", layers=list(range(1, num_layers)), skip_layers=None, **overrides)
    shared = getattr(model.model.language_model, SHARED_ROUTER)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        shared.proj.weight.copy_(torch.randn(shared.proj.weight.shape, generator=gen) * 2.0)
    return model, processor


def test_one_router_shared_by_every_mod_layer_saved_once(tmp_path):
    model, processor = gmod_model()
    layers = model.model.language_model.layers
    assert layers[1].router is layers[2].router is layers[3].router
    assert set(mod_state_dict(model)) == {"shared_router.proj.weight"}
    names = [n for n, _ in model.named_parameters() if "router" in n]
    assert names == [f"model.language_model.{SHARED_ROUTER}.proj.weight"]
    with torch.no_grad():
        logits = model(**make_inputs(processor)).logits
    mllm_mod.save_mod(model, tmp_path / "ad")
    fresh, _ = build("llava", "sdpa")
    mllm_mod.load_mod(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(**make_inputs(processor)).logits, logits)
    model.save_pretrained(tmp_path / "full")
    full = mllm_mod.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(full(**make_inputs(processor)).logits, logits)
    mllm_mod.unload(model)
    assert not hasattr(model.model.language_model, SHARED_ROUTER)


def _records(model, inputs):
    adapter = mllm_mod.adapter_for(model)
    ctx = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    ctx.records = []
    with torch.no_grad():
        model(**inputs, mod_routing=ctx)
    return ctx, ctx.records


def _multi_turn_batch(processor):
    processor.tokenizer.padding_side = "left"
    texts = [
        "SYSTEM : answer briefly . USER : <image> what color ? ASSISTANT : red </s> USER : how many ? ASSISTANT : 2",
        "USER : <image> is there a star ? ASSISTANT : no",
        "SYSTEM : be exact . USER : <image> which shape is left ? ASSISTANT : circle </s> USER : and the color ? ASSISTANT : blue",
    ]
    return processor(images=make_images(0), text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("training", [False, True])
def test_masked_routing_never_skips_question_or_answer(training):
    """Masked routing in training (the preset); at inference only with ``inference_candidates=None`` (the
    reference routes every token at inference: test_gmod_reference.py)."""
    model, processor = gmod_model(inference_candidates=None, threshold=0.5)
    model.train(training)
    inputs = _multi_turn_batch(processor)
    ctx, records = _records(model, inputs)
    vision = ctx.candidates
    after_image = vision.long().cumsum(1) > 0  # [B, T]
    protected = after_image & ~vision & inputs["attention_mask"].bool()  # question and answer tokens
    assert len(records) == 3
    skipped_any_prefix = False
    for r in records:
        assert not (protected & ~r.keep).any(), f"layer {r.layer_idx} skipped a question/answer token"
        assert not (protected & r.candidates).any()
        prefix = ~after_image & inputs["attention_mask"].bool()
        assert (r.candidates == (vision | prefix)).all()  # system prompt + image compete
        skipped_any_prefix |= bool((prefix & ~r.keep).any())
    if training:  # top-k at r = 0.5 over image + prefix drops half of them
        for r in records:
            n = r.candidates.sum(1)
            assert (r.keep & r.candidates).sum(1).tolist() == (n * 0.5).floor().long().tolist()


@pytest.mark.parametrize("inference", ["topk", "threshold"])
def test_routing_text_when_masking_is_off_keeps_cache_consistent(inference):
    """Text tokens skip layers; the compact cache holds exactly what each layer processed. (Top-k over
    text is not causal, so only threshold routing can also give cached == uncached: next test.)"""
    model, processor = gmod_model(candidates="all", inference=inference)
    inputs = make_inputs(processor)
    ctx, records = _records(model, inputs)
    text = ~ctx.candidates & inputs["attention_mask"].bool()
    assert any((text & ~r.keep).any() for r in records)  # some text tokens skipped a layer
    report = efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches  # the cache holds what each layer processed


def test_threshold_routing_keeps_a_compact_cache_shorter_than_the_sequence():
    """Decode skipping itself (a token skips iff p < threshold) and cached == uncached are pinned in
    test_rules.py::test_gmod_decoding_tokens_skip_a_layer_exactly_when_p_is_below_the_threshold."""
    model, processor = gmod_model(candidates="all", decode_skip=True, threshold=0.5)
    inputs = make_inputs(processor)
    out = model(**inputs, use_cache=True)
    entries = mllm_mod.cache.kv_entries(output_cache(out))
    assert (entries[2] < inputs["input_ids"].shape[1]).all()


@pytest.mark.parametrize("reference", [False, True])
def test_training_lowers_the_routing_loss(reference):
    """The routing loss trains the shared router. With the competing tokens' loss and a 0.5 threshold the
    threshold decision learns to agree with top-k; with the reference's loss over every position and its
    0.005 prefill threshold (a train/inference mismatch of the reference itself) the loss still falls."""
    overrides = {} if reference else {"routing_loss_tokens": "competing", "threshold": 0.5}
    model, processor = gmod_model(**overrides)
    for name, p in model.named_parameters():
        p.requires_grad_("router" in name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    inputs = make_inputs(processor, padding_side="right")
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    model.train()
    history, agreement = [], []
    for _ in range(30):
        out = model(**inputs, labels=labels)
        assert LOSS_KEY in out and AGREEMENT_KEY in out
        loss = out.loss + out[LOSS_KEY]  # the trainer adds it explicitly
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(out[LOSS_KEY].detach()))
        agreement.append(float(out[AGREEMENT_KEY].detach()))
    if reference:
        assert history[-1] < 0.8 * history[0]
    else:
        assert history[-1] < 0.5 * history[0]
        assert agreement[-1] > 0.9
    model.eval()
    with torch.no_grad():
        assert LOSS_KEY not in model(**inputs)  # no routing loss outside training


def test_renumbered_positions_differ_and_stay_cache_consistent():
    """Renumbered positions (the preset's) with one threshold for prefill and decoding: the reference's two
    thresholds (0.005 / 0.5) judge a token differently when uncached recomputation re-prefills it, so only
    equal thresholds can give cached == uncached."""
    model, processor = gmod_model(positions="renumber", threshold=0.5, decode_threshold=0.5)
    inputs = make_inputs(processor)
    assert_cached_equals_uncached(model, inputs, 6, "cached == uncached (gmod renumbered positions)")
    other, _ = gmod_model(positions="original", threshold=0.5, decode_threshold=0.5)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, other(**inputs).logits)


def test_bad_gmod_configs_are_refused():
    with pytest.raises(ValueError, match="decode_skip routes generated"):
        mllm_mod.preset("pmod", decode_skip=True)
    with pytest.raises(ValueError, match="norm='softmax' goes with the 2-way router"):
        mllm_mod.preset("pmod", norm="softmax")
    with pytest.raises(ValueError, match="routing_loss_weight"):
        mllm_mod.preset("pmod", routing_loss_weight=0.01)

"""The routing rules against independent, hand-written computations (DESIGN.md section 6, invariants 2 and 7).

Each expected value here is computed from the stock layer's own parts or by hand, never by the library
function under test.
"""

from __future__ import annotations

import pytest
import torch

import mllm_mod
from conftest import build, make_inputs, randomize_routers
from mllm_mod import compat
from mllm_mod.layer import MoDLayer
from mllm_mod.select import keep_count, topk_per_sample


# -- trunc(n * r) in float32, as p-MoD computes it ---------------------------------------------------------
@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        # 0.7 is 0.699999988 in float32; 90 * that = 62.9999989, which rounds to 63.0 in float32 (its spacing
        # near 63 is 3.8e-6): trunc 63. In float64, 90 * 0.7 = 62.99999999999999: trunc 62.
        (90, 0.7, 63),
        (170, 0.7, 119),
        # PRD layer 10 of 32: 0.5 cos(10 pi / 31) + 0.5 = 0.764482005...; 2365 * r = 1807.99999... in float64
        # (1807), 1808.0 after float32 rounding
        (2365, 0.5 * torch.cos(torch.tensor(10 * torch.pi / 31, dtype=torch.float64)).item() + 0.5, 1808),
        (576, 0.15, 86),  # agree: 86.4 either way
    ],
)
def test_keep_count_truncates_in_float32_where_float64_disagrees(n, ratio, expected):
    assert int(keep_count(torch.tensor([n]), ratio)) == expected
    # the whole top-k keeps that many of n candidates
    scores = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    keep = topk_per_sample(scores, torch.ones(1, n, dtype=torch.bool), ratio)
    assert int(keep.sum()) == expected


# -- each weighting rule against a hand-written forward ---------------------------------------------------
def _capture(layer: MoDLayer) -> dict:
    captured: dict = {}
    layer.register_forward_hook(lambda m, a, k, o: captured.update(x=a[0] if a else k["hidden_states"], out=o, k=k), with_kwargs=True)
    return captured


@pytest.mark.parametrize("rule", ["string", "mlp", "output", "mod"])
def test_weighting_rule_matches_a_hand_written_forward(rule):
    model, processor = build("llava", "eager")
    mllm_mod.retrofit(model, "pmod", weighting=rule)
    randomize_routers(model)
    layer: MoDLayer = model.model.language_model.layers[1]  # ratio 0.75
    captured = _capture(layer)
    with torch.no_grad():
        model(**make_inputs(processor, n=1))
    x, out, kw = captured["x"], captured["out"], captured["k"]  # [1, T, D]
    vision = kw["mod_routing"].candidates  # [1, T]
    z = torch.nn.functional.linear(x.float(), layer.router.proj.weight, layer.router.proj.bias).squeeze(-1)
    w = 0.2 * torch.tanh(z) + 1.0  # [1, T] TanhNorm by hand
    n_vision = int(vision.sum())
    k = int(torch.tensor(n_vision, dtype=torch.float32) * torch.tensor(0.75, dtype=torch.float32))  # 0.75 is exact
    ranked = torch.argsort(w.masked_fill(~vision, float("-inf"))[0], descending=True, stable=True)[:k]
    keep = ~vision[0].clone()
    keep[ranked] = True  # [T]
    idx = keep.nonzero().squeeze(1)
    base = layer.base_layer
    cos, sin = (t[:, idx] for t in kw["position_embeddings"])
    n = len(idx)
    causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        xk = x[:, idx]
        attn, _ = base.self_attn(base.input_layernorm(xk), (cos, sin), causal)
        h = xk + attn
        m = base.mlp(base.post_attention_layernorm(h))
    wk = w[:, idx, None]
    by_rule = {"string": h + wk * m, "mlp": h + wk * m, "output": wk * (h + m), "mod": xk + wk * (h + m - xk)}
    expected_kept = torch.where(vision[:, idx, None], by_rule[rule], h + m)  # text: the ordinary block
    torch.testing.assert_close(out[:, idx], expected_kept, atol=1e-5, rtol=1e-5)
    skipped = vision[0] & ~keep
    assert int(skipped.sum()) == n_vision - k > 0
    expected_skipped = w[0, skipped, None] * x[0, skipped] if rule == "string" else x[0, skipped]
    torch.testing.assert_close(out[0, skipped], expected_skipped, atol=0, rtol=0)


def test_output_hidden_states_are_full_length_with_skipped_tokens_as_the_rule_says():
    """Invariant 7 at ratio < 1: every layer's hidden state is full length; a token a MoD layer skipped leaves
    it as w * x (STRing): hidden_states[i + 1] = w * hidden_states[i] there."""
    model, processor = build("llava", "sdpa")
    mllm_mod.retrofit(model, "pmod")  # layers 1-3 at 0.75, 0.25, 0.15
    randomize_routers(model)
    inputs = make_inputs(processor)
    adapter = mllm_mod.adapter_for(model)
    ctx = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    ctx.records = []
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, mod_routing=ctx)
    hidden = out.hidden_states  # embeddings + one per layer (the last one after the final norm)
    assert len(hidden) == 5 and all(h.shape == hidden[0].shape for h in hidden)
    assert len(ctx.records) == 3
    for record in ctx.records[:-1]:  # the last layer's output is normed before it is returned
        i = record.layer_idx
        skipped = record.candidates & ~record.keep & inputs["attention_mask"].bool()  # [B, T]
        assert bool(skipped.any())
        w = record.weights[skipped][:, None]  # [N, 1]
        torch.testing.assert_close(hidden[i + 1][skipped], w * hidden[i][skipped], atol=0, rtol=0)


# -- gamma-MoD decode skipping ------------------------------------------------------------------------------
def test_gmod_decoding_tokens_skip_a_layer_exactly_when_p_is_below_the_threshold():
    """Each generated token goes through a MoD layer (one more entry in its compact cache) iff its
    p(keep) = softmax(router(norm(x)))[1] >= threshold, computed by hand from the layer input; and cached
    decoding equals uncached recomputation on the logits."""
    from logits import assert_cached_equals_uncached

    model, processor = build("llava", "sdpa")
    mllm_mod.retrofit(model, "gmod", layers=[1, 2, 3], skip_layers=None, candidates="all", decode_skip=True, threshold=0.5)
    router = model.model.language_model.mod_shared_router
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=torch.Generator().manual_seed(3)) * 2.0)
    inputs = make_inputs(processor)
    events: list[tuple[torch.Tensor, torch.Tensor]] = []  # (p >= threshold, cache grew) per decode step and layer
    state: dict[int, torch.Tensor] = {}

    def before(layer, args, kwargs):
        cache = kwargs.get(compat.CACHE_KWARG)
        slot = cache.layers[layer.layer_idx] if cache is not None and len(cache.layers) > layer.layer_idx else None
        state[layer.layer_idx] = slot.filled.sum(1) if getattr(slot, "filled", None) is not None else None

    def after(layer, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
        filled_before = state[layer.layer_idx]
        if x.shape[1] != 1 or filled_before is None:
            return  # prefill
        cache = kwargs[compat.CACHE_KWARG]
        grew = cache.layers[layer.layer_idx].filled.sum(1) - filled_before  # [B]
        normed = layer.base_layer.input_layernorm(x)[:, 0].float()
        p = torch.softmax(normed @ router.proj.weight.T, dim=-1)[:, 1]  # [B]
        events.append((p >= 0.5, grew == 1))

    for layer in model.model.language_model.layers[1:]:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)
    assert_cached_equals_uncached(model, inputs, 8, "cached == uncached (gmod threshold, decode skip)")
    kept = torch.stack([e[0] for e in events])  # [steps * layers, B]
    grew = torch.stack([e[1] for e in events])
    assert kept.numel() == 7 * 3 * 3  # 7 decode steps (the first new token comes from the prefill) x 3 layers x 3 rows
    assert torch.equal(kept, grew)
    assert bool(kept.any()) and bool((~kept).any())  # both decisions happened

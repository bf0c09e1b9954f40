"""gamma-MoD's preset against its reference code (Yaxin9Luo/Gamma-MOD, llava_llama_mod.py), hand-computed cases.

Reference behaviour pinned here (docs/DESIGN.md, "differences from the reference code"):
- training: masked routing (image + system prompt compete, question/answer forced to keep), top-k; the MLP
  branch of every token that goes through the layer is scaled by p, forced-keep text included; the routing
  cross-entropy is a mean over all B * T positions, forced-keep and padding tokens with target 1;
- inference: every token competes; a prefill token goes through when p > 0.005, a generated token when
  p >= 0.5 (it skips the layer, adding nothing to its cache, when p < 0.5);
- kept tokens are renumbered 0..k-1 (decoding continues from the layer's shorter cache);
- the shared router Linear(hidden, 2, bias=False) keeps PyTorch's default init.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm_mod.config import preset
from mllm_mod.layer import RouterRecord
from mllm_mod.losses import routing_loss


def test_routing_loss_averages_over_every_position_with_forced_keep_and_padding_as_target_one():
    gen = torch.Generator().manual_seed(0)
    records = []
    for idx in (1, 2):
        logits = torch.randn(2, 6, 2, generator=gen)  # [B, T, 2]
        candidates = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # padding is not a candidate
        keep = torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)  # non-candidates kept
        records.append(RouterRecord(idx, logits, torch.softmax(logits, -1)[..., 1], candidates, keep))
    config = preset("gmod", routing_loss_tokens="all", routing_loss_weight=0.01)
    loss, _ = routing_loss(records, config)
    by_hand = 0.0
    for r in records:  # mean over B * T = 12 positions, targets 1 = kept
        terms = [-torch.log_softmax(r.logits[b, t], -1)[int(r.keep[b, t])] for b in range(2) for t in range(6)]
        by_hand += float(sum(terms) / 12)
    assert abs(float(loss) - 0.01 * by_hand) < 1e-6
    competing = preset("gmod", routing_loss_tokens="competing", routing_loss_weight=0.01)
    loss_c, _ = routing_loss(records, competing)
    by_hand_c = sum(float(F.cross_entropy(r.logits[r.candidates], r.keep[r.candidates].long())) for r in records)
    assert abs(float(loss_c) - 0.01 * by_hand_c) < 1e-6
    assert abs(float(loss) - float(loss_c)) > 1e-4  # the two conventions differ on these records


def _gmod(**overrides):
    import mllm_mod
    from conftest import build

    model, processor = build("llava", "eager")
    mllm_mod.retrofit(model, "gmod", layers=[1, 2, 3], skip_layers=None, **overrides)
    return model, processor


def test_the_preset_is_the_reference_configuration():
    config = preset("gmod")
    assert (config.threshold, config.decode_keep_threshold, config.positions) == (0.005, 0.5, "renumber")
    assert (config.candidates, config.inference_candidates, config.weight_all) == ("vision_and_prefix", "all", True)
    assert (config.routing_loss_tokens, config.routing_loss_weight, config.router_init) == ("all", 0.01, "default")
    model, _ = _gmod()
    router = model.model.language_model.mod_shared_router
    assert router.proj.bias is None and float(router.proj.weight.detach().abs().min()) > 0  # PyTorch's init, not zeros
    bound = 1 / router.proj.weight.shape[1] ** 0.5  # kaiming-uniform(a=sqrt(5)) of Linear: U(-1/sqrt(D), 1/sqrt(D))
    assert float(router.proj.weight.detach().abs().max()) <= bound


def _layer_by_hand(layer, x, keep, p):
    """The reference's layer on one sample: kept tokens (in order) renumbered 0..k-1, causal attention over
    them, ``h + p * mlp(norm(h))`` for every kept token; skipped tokens pass unchanged. x [1, T, D]."""
    idx = keep[0].nonzero().squeeze(1)
    base = layer.base_layer
    xk = x[:, idx]
    k = len(idx)
    cos, sin = layer.rotary(xk, torch.arange(k)[None])
    causal = torch.full((k, k), torch.finfo(x.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        attn, _ = base.self_attn(base.input_layernorm(xk), (cos, sin), causal)
        h = xk + attn
        out_k = h + p[:, idx, None] * base.mlp(base.post_attention_layernorm(h))
    out = x.clone()
    out[:, idx] = out_k
    return out


def test_training_scales_forced_keep_text_and_inference_keeps_p_above_0005():
    import mllm_mod
    from conftest import make_inputs

    model, processor = _gmod()
    router = model.model.language_model.mod_shared_router
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=torch.Generator().manual_seed(4)) * 3.0)
    inputs = make_inputs(processor, n=1)
    layer = model.model.language_model.layers[2]
    seen: dict = {}
    layer.register_forward_hook(lambda m, a, k, o: seen.update(x=a[0] if a else k["hidden_states"], out=o), with_kwargs=True)
    adapter = mllm_mod.adapter_for(model)
    for training in (True, False):
        model.train(training)
        ctx = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
        ctx.records = []
        with torch.no_grad():
            model(**inputs, mod_routing=ctx)
        record = next(r for r in ctx.records if r.layer_idx == 2)
        x = seen["x"]
        p = torch.softmax(layer.base_layer.input_layernorm(x).float() @ router.proj.weight.T, dim=-1)[..., 1]  # [1, T]
        torch.testing.assert_close(record.weights, p, atol=1e-6, rtol=1e-6)
        vision = ctx.candidates
        if training:  # masked routing: image tokens and the prompt before them compete, the rest is kept
            competing = vision | (vision.long().cumsum(1) == 0)
            assert torch.equal(record.candidates, competing)
            n = int(competing.sum())
            assert int((record.keep & competing).sum()) == int(torch.tensor(n, dtype=torch.float32) * 0.5)
        else:  # every token competes; kept iff p > 0.005
            assert bool(record.candidates.all())
            assert torch.equal(record.keep, p > 0.005)
            assert bool((~record.keep).any())  # some tokens fall below 0.005 with these router weights
        expected = _layer_by_hand(layer, x, record.keep, p.to(x.dtype))
        torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)



def _training_record(model, inputs, layer_idx: int = 2) -> RouterRecord:
    import mllm_mod

    model.train(True)
    ctx = mllm_mod.adapter_for(model).routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    ctx.records = []
    with torch.no_grad():
        model(**inputs, mod_routing=ctx)
    return next(r for r in ctx.records if r.layer_idx == layer_idx)


def _check_leading(record: RouterRecord, real: torch.Tensor, n0: int) -> None:
    """The first n0 real tokens of each row longer than n0 compete; ceil(n0 / 2) of them are kept (the best
    weights, ties by position); other rows are not routed."""
    keep = -(-n0 // 2)
    for b, n in enumerate(real.sum(1).tolist()):
        index = real[b].long().cumsum(0)
        expected = real[b] & (index <= n0) if n > n0 else torch.zeros_like(real[b])
        assert torch.equal(record.candidates[b], expected), b
        assert bool(record.keep[b][~expected].all())  # everything else goes through
        if n > n0:
            w = record.weights[b].masked_fill(~expected, float("-inf"))
            top = torch.sort(w, descending=True, stable=True).indices[:keep]
            assert torch.equal(expected & record.keep[b], torch.zeros_like(expected).index_fill(0, top, True))


def test_the_reference_leading_positions_rule_routes_the_first_n_real_tokens_of_long_rows():
    """``candidates="leading"``: the reference's hard-coded training rule (the first 1024 + 35 positions
    compete and the top ceil(0.5 * 1059) = 530 are kept: exactly 529 dropped; text-only rows longer than
    that too), with ``leading_tokens`` sized for tiny prompts. A row no longer than it is not routed."""
    from conftest import build, make_inputs

    def leading_model(n0: int):
        import mllm_mod

        model, processor = build("llava", "eager")
        mllm_mod.retrofit(model, "gmod", layers=[1, 2, 3], skip_layers=None, candidates="leading", leading_tokens=n0)
        router = model.model.language_model.mod_shared_router
        with torch.no_grad():
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=torch.Generator().manual_seed(5)) * 3.0)
        return model, processor

    assert preset("gmod").leading_tokens == 1059 and -(-1059 // 2) == 530
    n0 = 37  # rows of 35 and 38 real tokens: row 0 is not routed; row 1 keeps ceil(18.5) = 19 of its first 37
    model, processor = leading_model(n0)
    inputs = make_inputs(processor, n=2)  # left padded
    real = inputs["attention_mask"].bool()
    assert real.sum(1).tolist() == [35, 38]
    record = _training_record(model, inputs)
    _check_leading(record, real, n0)
    assert int((record.candidates & ~record.keep).sum()) == 37 - 19  # trunc(18.5) would drop 19
    text = processor.tokenizer(["a b c d e f g h", "a b"], return_tensors="pt", padding=True)  # text only: routed too
    real_text = text["attention_mask"].bool()
    n_text = int(real_text.sum(1).max()) - 1
    model, _ = leading_model(n_text)
    record = _training_record(model, dict(text))
    _check_leading(record, real_text, n_text)
    assert bool(record.candidates.any())
    with pytest.raises(ValueError, match="leading_tokens"):
        preset("gmod", candidates="leading", leading_tokens=0)

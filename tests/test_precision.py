"""DESIGN.md section 6, invariant 8: routing is float32 end to end under mixed precision.

Router logits, token weights, top-k and the routing loss stay float32 under bf16 autocast (how the HF
Trainer runs ``bf16=True`` on a float32 model) and in a model cast with ``.to(torch.bfloat16)``; casting
leaves router parameters bit for bit; the kept set on the same layer inputs equals a float32 forward's.
"""

from __future__ import annotations

import pytest
import torch

import mllm_mod
from conftest import build, make_inputs, randomize_routers
from mllm_mod.layer import MoDLayer
from mllm_mod.retrofit import mod_state_dict
from mllm_mod.router import token_weights
from mllm_mod.select import topk_per_sample


def trained_like(model, seed: int = 1) -> None:
    """Router weights of a trained scale (small, ~N(0, 0.02)) with a bias: bf16 rounding moves them."""
    randomize_routers(model, seed=seed, scale=0.02)


def records_and_inputs(model, inputs, dtype: torch.dtype | None):
    """Router records of one forward plus each MoD layer's input hidden states, under bf16 autocast
    (`dtype`) or not; every layer is MoD, so layer 0 sees the embeddings themselves."""
    adapter = mllm_mod.adapter_for(model)
    ctx = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    ctx.records = []
    layer_inputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: layer_inputs.__setitem__(m.layer_idx, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(**inputs, mod_routing=ctx)
    finally:
        for h in handles:
            h.remove()
    return ctx, ctx.records, layer_inputs


@pytest.mark.parametrize("preset", ["pmod", "gmod"])
def test_bf16_autocast_routes_in_float32_with_the_fp32_kept_set(preset):
    model, processor = build("llava", "sdpa")
    overrides = dict(schedule="constant", ratio=0.5, layers=[0, 1, 2, 3], skip_layers=None)
    if preset == "gmod":
        overrides.update(inference="topk")  # compare top-k decisions; threshold routing is compared below
    mllm_mod.retrofit(model, preset, **overrides)
    if preset == "gmod":
        router = model.model.language_model.mod_shared_router
        with torch.no_grad():
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    else:
        trained_like(model)
    inputs = make_inputs(processor)
    ctx, records, layer_inputs = records_and_inputs(model, inputs, torch.bfloat16)
    assert len(records) == 4
    for record in records:
        assert record.logits.dtype == torch.float32 and record.weights.dtype == torch.float32, record.layer_idx
        layer: MoDLayer = model.model.language_model.layers[record.layer_idx]
        # the same layer input, routed in float32 outside autocast, by hand
        x = layer_inputs[record.layer_idx].float()
        router_in = layer.base_layer.input_layernorm(x) if layer.mod_config.router_input == "normed" else x
        with torch.no_grad():
            logits = torch.nn.functional.linear(router_in, layer.router.proj.weight, layer.router.proj.bias)
        torch.testing.assert_close(record.logits, logits, atol=1e-6, rtol=1e-6)
        keep = topk_per_sample(token_weights(logits, layer.mod_config), record.candidates, layer.ratio)
        assert torch.equal(record.keep, keep), f"layer {record.layer_idx}: kept set differs from float32 routing"
    # layer 0 reads the embeddings, identical with and without autocast: its kept set equals an fp32 forward's
    _, fp32_records, _ = records_and_inputs(model, inputs, None)
    assert torch.equal(records[0].keep, fp32_records[0].keep)
    # and the weights differ from one another: not collapsed to a handful of bf16 values
    w = records[0].weights[ctx.candidates & inputs["attention_mask"].bool()]  # the vision tokens' weights
    assert w.unique().numel() > 0.9 * w.numel()


def test_casting_the_model_leaves_router_parameters_bit_identical():
    model, _ = build("llava", "sdpa")
    mllm_mod.retrofit(model, "pmod")
    trained_like(model)
    before = {k: v.clone() for k, v in mod_state_dict(model).items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.float()):
        cast(model)
        after = mod_state_dict(model)
        for key, value in before.items():
            assert after[key].dtype == torch.float32 and torch.equal(after[key], value), key
    assert model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # cast back by .float()
    model.to(torch.bfloat16)
    assert model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # the rest is cast


def test_bf16_model_routes_like_its_float32_routers_on_the_same_inputs():
    """A model cast to bf16: router parameters stay float32 and the router reads the bf16 layer input in float32."""
    model, processor = build("llava", "sdpa")
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=0.5, layers=[0, 1, 2, 3], skip_layers=None)
    trained_like(model)
    model.to(torch.bfloat16)
    inputs = make_inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    _, records, layer_inputs = records_and_inputs(model, inputs, None)
    for record in records:
        layer = model.model.language_model.layers[record.layer_idx]
        assert record.logits.dtype == torch.float32
        x = layer_inputs[record.layer_idx].float()
        with torch.no_grad():
            logits = torch.nn.functional.linear(x, layer.router.proj.weight, layer.router.proj.bias)
        keep = topk_per_sample(token_weights(logits, layer.mod_config), record.candidates, layer.ratio)
        assert torch.equal(record.keep, keep), record.layer_idx


@pytest.mark.parametrize("preset", ["pmod", "gmod"])
def test_a_bf16_autocast_training_step_trains_the_routers(preset):
    """One Trainer-style bf16 step on the CPU (autocast on a float32 model): routers get float32 gradient,
    the routing loss (gmod) is float32, and the step changes the router weights."""
    model, processor = build("llava", "sdpa")
    mllm_mod.retrofit(model, preset, **({"layers": [1, 2, 3], "skip_layers": None} if preset == "gmod" else {}))
    trained_like(model) if preset == "pmod" else None
    inputs = make_inputs(processor, padding_side="right")
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    before = {k: v.clone() for k, v in mod_state_dict(model).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=labels)
        loss = out.loss
        if preset == "gmod":
            assert out["mod_routing_loss"].dtype == torch.float32
            loss = loss + out["mod_routing_loss"]
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if "router" in k}
    assert grads and all(g is not None and g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads.values())
    optimizer.step()
    after = mod_state_dict(model)
    assert all(after[k].dtype == torch.float32 and not torch.equal(after[k], before[k]) for k in before)


def test_routers_stored_in_bf16_for_deepspeed_still_route_in_float32():
    """DeepSpeed bf16 stores every parameter in bf16 (`store_routers_as`); the router forward upcasts them."""
    from mllm_mod.router import store_routers_as

    model, processor = build("llava", "sdpa")
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=0.5, layers=[0, 1, 2, 3], skip_layers=None)
    trained_like(model)
    store_routers_as(model, torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in mod_state_dict(model).values())
    _, records, layer_inputs = records_and_inputs(model, make_inputs(processor), torch.bfloat16)
    for record in records:
        layer = model.model.language_model.layers[record.layer_idx]
        assert record.logits.dtype == torch.float32
        weight, bias = (p.float() for p in (layer.router.proj.weight, layer.router.proj.bias))
        with torch.no_grad():
            logits = torch.nn.functional.linear(layer_inputs[record.layer_idx].float(), weight, bias)
        torch.testing.assert_close(record.logits, logits, atol=1e-6, rtol=1e-6)
        keep = topk_per_sample(token_weights(logits, layer.mod_config), record.candidates, layer.ratio)
        assert torch.equal(record.keep, keep), record.layer_idx

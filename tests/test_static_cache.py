"""The static compact cache (issue 18, item 3): MoD layers decode with fixed shapes.

With ``generate(..., cache_implementation="static")`` (or a cache from `static_mod_cache`) every MoD layer
holds a `StaticMoDCacheLayer`: its kept prompt entries plus a decoding budget, allocated once, the unfilled
tail masked. Checked at the logit level (DESIGN.md section 6, invariants 3, 4 and 9): static == uncached ==
the dynamic compact cache, on a left-padded batch of 3; the static layers hold exactly the dynamic cache's
entries; and a compiled decoding step (torch.compile, ``dynamic=False``) never recompiles after the first.

The compile test uses a recording backend that runs the captured graphs as they are (dynamo's tracing and
guards are what decide recompiles; inductor's C++ compile on the CPU would add about a minute).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import mllm_mod
from conftest import build, make_inputs, randomize_routers
from logits import assert_logits_close, generate_logits
from mllm_mod.cache import StaticMoDCacheLayer, kv_entries, static_mod_cache
from mllm_mod.compat import CACHE_KWARG, decode_compile_config, output_cache
from mllm_mod.retrofit import mod_layer_map

NEW_TOKENS = 8


def routed_model(num_layers: int = 4):
    """A tiny LLaVA with pmod (PRD: layer 0 dense, the rest MoD), trained-like routers, and a left-padded batch of 3."""
    model, processor = build("llava", "sdpa", num_layers=num_layers)
    mllm_mod.retrofit(model, "pmod")
    randomize_routers(model)
    model.eval()
    return model, make_inputs(processor)


@pytest.fixture(scope="module")
def routed(one_thread):
    return routed_model()


def test_static_cache_equals_uncached_and_the_dynamic_cache(routed):
    model, inputs = routed
    assert not inputs["attention_mask"].bool().all()  # left padding
    static, static_logits = generate_logits(model, inputs, NEW_TOKENS, cache_implementation="static")
    dynamic, dynamic_logits = generate_logits(model, inputs, NEW_TOKENS)
    uncached, uncached_logits = generate_logits(model, inputs, NEW_TOKENS, use_cache=False)
    assert_logits_close(static_logits, uncached_logits, "static MoD cache == uncached")
    assert_logits_close(static_logits, dynamic_logits, "static MoD cache == dynamic MoD cache")
    assert torch.equal(static, uncached) and torch.equal(static, dynamic)

    # a cache built by hand (what a decoding loop of one's own passes) does the same
    cache = static_mod_cache(model, inputs["input_ids"].shape[1], NEW_TOKENS)
    by_hand, by_hand_logits = generate_logits(model, inputs, NEW_TOKENS, **{CACHE_KWARG: cache})
    assert_logits_close(by_hand_logits, dynamic_logits, "static_mod_cache == dynamic MoD cache")
    assert torch.equal(by_hand, dynamic)
    assert all(isinstance(cache.layers[i], StaticMoDCacheLayer) for i in mod_layer_map(model))


def test_static_layers_hold_the_dynamic_entries_in_a_fixed_capacity(routed):
    model, inputs = routed
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    static = output_cache(model.generate(**inputs, cache_implementation="static", **gen))
    dynamic = output_cache(model.generate(**inputs, **gen))
    prompt = inputs["input_ids"].shape[1]
    mod = mod_layer_map(model)
    assert len(mod) == 3
    for idx, (s, d) in enumerate(zip(static.layers, dynamic.layers)):
        if idx not in mod:
            continue
        assert isinstance(s, StaticMoDCacheLayer)
        entries = d.keys.shape[-2]  # the dynamic compact cache: Tk prompt entries + 4 decoding steps
        assert s.capacity == s.keys.shape[-2] >= entries  # allocated once at the prefill: Tk + budget
        assert s.capacity == entries - 4 + (s.max_cache_len - prompt)
        assert s.kept_length() == entries and s.seen == d.seen == prompt + 4
        assert torch.equal(s.valid[:, :entries], d.valid) and not s.valid[:, entries:].any()  # the tail is masked
        assert torch.equal(s.index[:, :entries], d.index) and torch.equal(s.filled[:, :entries], d.filled)
        torch.testing.assert_close(s.keys[:, :, :entries], d.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(s.values[:, :, :entries], d.values, rtol=0, atol=1e-5)
    for i in mod:  # invariant 4: the same K/V entries per sample
        assert torch.equal(kv_entries(static)[i], kv_entries(dynamic)[i])


class _StepCounter(LogitsProcessor):
    """Reads a counter after each generation step (a logits processor runs once per step)."""

    def __init__(self, read) -> None:
        self.read, self.after_step = read, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.after_step.append(self.read())
        return scores


def test_compiled_decoding_never_recompiles_after_the_first_step(one_thread):
    """16 decoding steps of a torch.compile'd forward (dynamic=False, as CUDA graphs need): graphs are captured
    at the first step only, and the logits equal the eager dynamic cache's."""
    model, inputs = routed_model(num_layers=2)  # layer 0 dense, layer 1 MoD: tracing time grows with layers
    graphs: list[int] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward  # run the captured graph as it is

    config = decode_compile_config(all_devices=True, backend=recording_backend, dynamic=False, mode=None)
    steps = _StepCounter(lambda: len(graphs))
    compiled, compiled_logits = generate_logits(
        model, inputs, 17, cache_implementation="static", compile_config=config, logits_processor=LogitsProcessorList([steps])
    )
    # after_step[0]: the prefill (eager); [1]: the first decoding step (captures); [2:]: 15 more steps
    assert steps.after_step[0] == 0 and steps.after_step[1] > 0, steps.after_step
    assert steps.after_step[1:] == [steps.after_step[1]] * 16, f"recompiles after the first decoding step: {steps.after_step}"
    eager, eager_logits = generate_logits(model, inputs, 17)
    assert_logits_close(compiled_logits, eager_logits, "compiled static MoD decoding == eager dynamic cache")
    assert torch.equal(compiled, eager)


def test_decoding_that_routes_is_refused_with_a_static_cache(one_thread):
    """A decoding step that may skip a MoD layer (decode_skip, gamma-MoD's rule) changes the cache's length
    data-dependently: the static cache says so instead of decoding wrongly."""
    model, processor = build("llava", "sdpa", num_layers=2)
    mllm_mod.retrofit(model, "pmod", candidates="vision_and_prefix", decode_skip=True)
    with pytest.raises(NotImplementedError, match="static MoD cache"):
        generate_logits(model, make_inputs(processor), 3, cache_implementation="static")


def test_renumbered_positions_follow_the_static_cache(one_thread):
    """gmod's renumbered positions (decoding positions follow the layer's own valid entries), with decoding
    not routed (``decode_skip=False``): the static cache gives the dynamic cache's logits."""
    model, processor = build("llava", "sdpa")
    mllm_mod.retrofit(model, "gmod", layers=[1, 2, 3], skip_layers=None, decode_skip=False)
    randomize_routers(model, scale=0.3)
    model.eval()
    inputs = make_inputs(processor)
    static, static_logits = generate_logits(model, inputs, 6, cache_implementation="static")
    dynamic, dynamic_logits = generate_logits(model, inputs, 6)
    assert_logits_close(static_logits, dynamic_logits, "static MoD cache == dynamic MoD cache (gmod, renumbered)")
    assert torch.equal(static, dynamic)

"""Invariant checks at the logit level (DESIGN.md section 6, invariant 9).

Greedy tokens of a random tiny model hide errors: tokens survived logits that were off by 0.3 when a
transformers release renamed the cache argument. Every cached/uncached, batch/single and dense/MoD
generation comparison goes through `assert_logits_close`, which also records the worst difference per
check so that `pytest` prints them at the end of the run (conftest.pytest_terminal_summary).
"""

from __future__ import annotations

import torch

LOGIT_ATOL = 1e-4  # fp32, max |diff| of raw logits
WORST: dict[str, float] = {}  # check name -> worst max |diff| seen in this run (printed by conftest)


def generate_logits(model, inputs: dict, new_tokens: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of exactly `new_tokens` tokens; (sequences [B, T + N], raw logits [B, N, V])."""
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # no row stops early, so every row has N steps of logits
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1).float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, check: str, atol: float = LOGIT_ATOL) -> float:
    """max |actual - expected| <= atol, recorded under `check`; returns the difference."""
    assert actual.shape == expected.shape, f"{check}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0
    WORST[check] = max(WORST.get(check, 0.0), diff)
    assert diff <= atol, f"{check}: logits differ by {diff:.3g} (> {atol:g})"
    return diff


def assert_cached_equals_uncached(
    model, inputs: dict, new_tokens: int, check: str, atol: float = LOGIT_ATOL, **kwargs
) -> torch.Tensor:
    """Per-step logits of cached generation == uncached recomputation (and so the tokens); returns the tokens."""
    cached, cached_logits = generate_logits(model, inputs, new_tokens, use_cache=True, **kwargs)
    uncached, uncached_logits = generate_logits(model, inputs, new_tokens, use_cache=False, **kwargs)
    assert_logits_close(cached_logits, uncached_logits, check, atol)
    assert torch.equal(cached, uncached), f"{check}: tokens differ"
    return cached


def single(inputs: dict, i: int) -> dict:
    """Sample `i` of a left-padded batch of one image (or video) per prompt, alone, its padding removed."""
    one = {k: v[i : i + 1] for k, v in inputs.items()}
    real = one["attention_mask"][0].bool()
    return {k: (v[:, real] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}


def assert_batch_equals_single(
    model, batch: dict, alone: list[dict], new_tokens: int, check: str, atol: float = LOGIT_ATOL, **kwargs
) -> None:
    """Each row of a left-padded batch generates what the sample alone does, compared on per-step logits."""
    tokens, logits = generate_logits(model, batch, new_tokens, **kwargs)  # [B, N, V]
    for i, one in enumerate(alone):
        one_tokens, one_logits = generate_logits(model, one, new_tokens, **kwargs)
        assert_logits_close(logits[i : i + 1], one_logits, f"{check}", atol)
        assert torch.equal(tokens[i, -new_tokens:], one_tokens[0, -new_tokens:]), f"{check}: sample {i} tokens differ"


def assert_prompt_equals_single(model, batch: dict, alone: list[dict], check: str) -> None:
    """Every real prompt position of each row of a left-padded batch has the logits of the sample alone."""
    with torch.no_grad():
        logits = model(**batch).logits  # [B, T, V]
        for i, one in enumerate(alone):
            assert_logits_close(logits[i, batch["attention_mask"][i].bool()], model(**one).logits[0], check)


def assert_ratio_one_equals_dense(model, inputs: dict, check: str, new_tokens: int = 4) -> None:
    """Retrofit `model` (a stock model) with every layer MoD at ratio 1: its prompt logits, every layer's
    full-length hidden states (invariant 7) and its generation logits equal the dense model's."""
    import mllm_mod

    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**inputs, output_hidden_states=True)
    dense_tokens, dense_logits = generate_logits(model, inputs, new_tokens)
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    layers = mllm_mod.adapter_for(model).layers(model)
    assert all(isinstance(layer, mllm_mod.MoDLayer) for layer in layers)
    with torch.no_grad():
        mod = model(**inputs, output_hidden_states=True)
    assert_logits_close(mod.logits[real], dense.logits[real], check)
    assert len(mod.hidden_states) == len(dense.hidden_states) == len(layers) + 1  # full length, every layer
    for h_mod, h_dense in zip(mod.hidden_states, dense.hidden_states):
        assert h_mod.shape == h_dense.shape
        torch.testing.assert_close(h_mod[real], h_dense[real], atol=1e-5, rtol=1e-5)
    mod_tokens, mod_logits = generate_logits(model, inputs, new_tokens)
    assert_logits_close(mod_logits, dense_logits, f"{check}, generation")
    assert torch.equal(mod_tokens, dense_tokens)

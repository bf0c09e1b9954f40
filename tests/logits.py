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


def assert_cached_equals_uncached(model, inputs: dict, new_tokens: int, check: str, **kwargs) -> torch.Tensor:
    """Per-step logits of cached generation == uncached recomputation (and so the tokens); returns the tokens."""
    cached, cached_logits = generate_logits(model, inputs, new_tokens, use_cache=True, **kwargs)
    uncached, uncached_logits = generate_logits(model, inputs, new_tokens, use_cache=False, **kwargs)
    assert_logits_close(cached_logits, uncached_logits, check)
    assert torch.equal(cached, uncached), f"{check}: tokens differ"
    return cached


def single(inputs: dict, i: int) -> dict:
    """Sample `i` of a left-padded batch of one image (or video) per prompt, alone, its padding removed."""
    one = {k: v[i : i + 1] for k, v in inputs.items()}
    real = one["attention_mask"][0].bool()
    return {k: (v[:, real] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}


def assert_batch_equals_single(model, batch: dict, alone: list[dict], new_tokens: int, check: str, **kwargs) -> None:
    """Each row of a left-padded batch generates what the sample alone does, compared on per-step logits."""
    tokens, logits = generate_logits(model, batch, new_tokens, **kwargs)  # [B, N, V]
    for i, one in enumerate(alone):
        one_tokens, one_logits = generate_logits(model, one, new_tokens, **kwargs)
        assert_logits_close(logits[i : i + 1], one_logits, f"{check}")
        assert torch.equal(tokens[i, -new_tokens:], one_tokens[0, -new_tokens:]), f"{check}: sample {i} tokens differ"

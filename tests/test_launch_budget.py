"""The launch budget of a MoD layer (issue 18), pinned on the CPU: how many ops a MoD layer dispatches
beyond the dense layer it wraps, counted with `torch.profiler` (`mllm_mod.bench.count_ops`). On a GPU at
batch 1 and in decoding each op is a kernel launch of ~5 us, which is what decides the speed there.

A 16-layer tiny LLaVA with every layer MoD at ratio 0.5, fp32, sdpa (the issue's setting): whole-model
prefill and one decode step, dense vs MoD, divided by the number of MoD layers.
"""

from __future__ import annotations

import pytest
import torch

from mllm_mod.bench import BenchOptions, BenchResults, bench_ops, build_model, count_ops, ops_markdown

PREFILL_NO_PADDING = 20  # extra ops per MoD layer, batch 1, no padding
PREFILL_LEFT_PADDED = 30  # batch 1 and batch 3, left-padded
DECODE_STEP = 6  # one decode step, batch 3, left-padded
STATIC_DECODE_STEP = 1  # one decode step with the static compact cache, against the dense model's StaticCache


@pytest.fixture(scope="module")
def ops_rows(one_thread):
    options = BenchOptions(
        shape="tiny", device="cpu", dtype="float32", num_layers=16, overrides={"schedule": "constant", "ratio": 0.5},
        prefill_batches=(1, 3), decode_batches=(3,),
    )
    model, n_vision = build_model(options)
    results = BenchResults(options={}, device_name="CPU", layer_ratios=[])
    bench_ops(model, options, n_vision, results)
    print("\n" + ops_markdown(results))
    return {(r["phase"], r["batch"], r["padded"]): r for r in results.ops}


def test_prefill_stays_within_the_launch_budget(ops_rows):
    row = ops_rows[("prefill", 1, False)]
    assert row["mod_layers"] == 16
    assert row["per_mod_layer"] <= PREFILL_NO_PADDING, row["per_mod_layer"]
    for batch in (1, 3):
        padded = ops_rows[("prefill", batch, True)]
        assert padded["per_mod_layer"] <= PREFILL_LEFT_PADDED, (batch, padded["per_mod_layer"])


def test_a_decode_step_costs_about_what_a_dense_one_does(ops_rows):
    row = ops_rows[("decode", 3, True)]
    assert row["per_mod_layer"] <= DECODE_STEP, row["per_mod_layer"]
    # no host sync in a decoding step: `.item()` / `bool(t)` / `.cpu()` of a scalar read back
    assert row["mod_by_op"].get("aten::_local_scalar_dense", 0) == row["dense_by_op"].get("aten::_local_scalar_dense", 0)


def test_a_static_cache_decode_step_costs_what_the_dense_static_one_does(ops_rows):
    row = ops_rows[("decode_static", 3, True)]
    assert row["per_mod_layer"] <= STATIC_DECODE_STEP, row["per_mod_layer"]
    assert row["mod_by_op"].get("aten::_local_scalar_dense", 0) == row["dense_by_op"].get("aten::_local_scalar_dense", 0)


def test_count_ops_counts_kernels_not_views():
    x = torch.randn(4, 8)
    counts = count_ops(lambda: (x.view(8, 4).t().unsqueeze(0) * 2).sum())
    assert not {"aten::view", "aten::t", "aten::unsqueeze", "aten::transpose", "aten::as_strided"} & set(counts)
    assert 2 <= sum(counts.values()) <= 3, counts  # the mul and the sum (each counted at its leaves)
    assert count_ops(lambda: x.to(torch.float32)) == {"aten::to": 1}  # a no-op conversion on the path counts
    assert "aten::to" not in count_ops(lambda: x.gather(1, torch.zeros(4, 1, dtype=torch.long)))  # ... inside an op not

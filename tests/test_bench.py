"""The speed benchmark runs end to end (tiny shape on the CPU) and its exact parts are exact."""

from __future__ import annotations

from mllm_mod.bench import BenchOptions, markdown, run_benchmark
from mllm_mod.cli import main


def test_benchmark_runs_and_its_exact_parts_hold():
    options = BenchOptions(
        shape="tiny", device="cpu", dtype="float32", prefill_batches=(1, 3), train_batch=2,
        decode_batches=(2,), new_tokens=2, warmup=0, repeats=1,
    )
    res = run_benchmark(options, progress=False)
    assert res.correctness["ratio1_max_abs_logit_diff"] == 0.0  # ratio 1 is the dense model
    assert res.correctness["mod_cached_equals_uncached"] == "2/2 samples"
    assert res.kv["mod_measured_bytes"] == res.kv["mod_accounted_bytes"]  # KV bytes equal the accounting
    assert res.kv["dense_measured_bytes"] == res.kv["dense_accounted_bytes"]
    assert res.kv["mod_measured_bytes"] < res.kv["dense_measured_bytes"]
    assert [r["batch"] for r in res.prefill] == [1, 3]
    for row in res.prefill:
        assert row["dense_ms"] > 0 and row["mod_ms"] > 0 and row["ideal_ms"] > 0
    kept = sorted(res.layer_cost_ms[3])
    assert kept[-1] == 25 + 64 and len(kept) > 1  # the full length and the schedule's kept counts
    assert len(res.train) == 2 and all(r["mod_ms"] > 0 for r in res.train)
    table = markdown(res)
    assert "| prefill ms, batch 3 |" in table and "MoD measured / accounted: 1.0000" in table


def test_bench_cli_writes_report(tmp_path, capsys):
    args = ["bench", "--shapes", "tiny", "--sections", "prefill,kv", "--prefill-batches", "2", "--decode-batches", "2"]
    assert main([*args, "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert "prefill ms, batch 2" in (tmp_path / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks.png").stat().st_size > 0 and (tmp_path / "results.json").exists()
    assert main(["bench", "--shapes", "llava-99b"]) == 2
    assert "unknown shape 'llava-99b'" in capsys.readouterr().err


def test_layer_cost_table_on_gemma3():
    """The per-layer cost table takes its RoPE through `compat.rotary_embeddings`: Gemma 3's rotary embedding
    computes one RoPE per layer type (the tiny model's last layer is global, its first ones sliding)."""
    import torch

    import mllm_mod
    from mllm_mod.bench import Timer, layer_cost_table
    from mllm_mod.tiny import gemma3_model

    model = gemma3_model()
    mllm_mod.retrofit(model, "pmod")
    table = layer_cost_table(model, 2, [5, 20], Timer(torch.device("cpu"), warmup=0, repeats=1))
    assert sorted(table) == [5, 20] and all(ms > 0 for ms in table.values())

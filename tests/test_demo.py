"""`mllm-mod demo` end to end: a quick run with tiny settings (default test run), and the real demo
(slow), which must show learning: dense clearly above chance on the learnable families, MoD close."""

from __future__ import annotations

import json

import pytest
import torch

from mllm_mod.demo import DemoSettings, run


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # the demo sets its own thread count
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["pmod", "gmod"])
def test_demo_pipeline_runs_end_to_end(tmp_path, capsys, preset):
    settings = DemoSettings(n_samples=40, families=("color", "count"), dense_epochs=1.0, mod_epochs=1.0, batch_size=8, num_workers=0)
    assert run(out=str(tmp_path), settings=settings, preset=preset) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["families"]) == {"color", "count"}
    assert results["families"]["color"]["chance"] == pytest.approx(1 / 6)
    assert 0 < results["tflops_ratio"] < 1 and 0 < results["kv_ratio"] < 1
    expected = {"pmod": [1.0, 0.75, 0.25, 0.15], "gmod": [1.0, 0.5, 0.5, 0.5]}[preset]
    assert results["layer_ratios"] == pytest.approx(expected) and results["preset"] == preset
    train = results["train"]
    assert train["dense_base"]["global_step"] == 5 and train["mod"]["mod"] and not train["dense"]["mod"]
    # the fair arm: the dense model continued with the MoD arm's extra training (same steps, vision tower frozen)
    assert train["dense"]["global_step"] == train["mod"]["global_step"] == 5
    assert train["dense"]["trainable"]["frozen"] == train["mod"]["trainable"]["frozen"] > 0
    assert set(results["mean"]) == {"dense_base", "dense", "mod"}
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert f"| family | chance | dense (1 ep) | dense (1 + 1 ep) | MoD {preset} (1 + 1 ep) |" in out
    assert "max |logit difference|" in out
    logged = [json.loads(line) for line in (tmp_path / "mod" / "train_log.jsonl").read_text().splitlines()]
    # gamma-MoD's routing loss is added by the trainer and logged beside the LM loss; p-MoD has none
    assert any("routing_loss" in row for row in logged) == (preset == "gmod")


@pytest.mark.slow
def test_demo_learns(tmp_path):
    assert run(out=str(tmp_path)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    fams = results["families"]
    assert fams["color"]["dense"] >= fams["color"]["chance"] + 0.3
    assert results["mean"]["dense"] >= results["mean_chance"] + 0.15
    assert results["mean"]["mod"] >= results["mean"]["dense"] - 0.1
    dense = results["train"]["dense"]
    assert dense["last_loss"] < 0.5 * dense["first_loss"]

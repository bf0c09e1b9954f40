"""Suites as data, the offline reachability check, mirrors through `include:`, the report and the CLI."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from mllm_mod.eval.report import ModelResult, write_report
from mllm_mod.eval.suites import MIRROR_PREFIX, SUITES, check, leaf_tasks, write_mirror_tasks

PMOD14 = [
    "ok_vqa",
    "scienceqa_img",
    "mme",
    "seedbench",
    "pope_full",
    "realworldqa",
    "gqa",
    "ai2d",
    "textvqa_val",
    "chartqa",
    "docvqa_val",
    "infovqa_val",
    "mmbench_en_dev",
    "mmmu_val",
]


def test_suites_are_the_published_lists():
    assert [t.task for t in SUITES["pmod14"]] == PMOD14
    assert [t.task for t in SUITES["gmod9"]] == (
        ["textvqa_val", "vqav2_val", "gqa", "scienceqa_img", "pope", "mme", "mmbench_en_dev", "mmmu_val", "mmvet"]
    )
    assert [t.task for t in SUITES["video"]] == (
        [
            "videomme",
            "mvbench",
            "egoschema_subset",
            "nextqa_mc_test",
            "perceptiontest_val_mc",
            "longvideobench_val_v",
            "mlvu_dev",
        ]
    )
    metrics = {t.task: t.metric for t in SUITES["pmod14"]}
    assert metrics["docvqa_val"] == metrics["infovqa_val"] == "anls"
    assert metrics["chartqa"] == "relaxed_overall" and metrics["mme"] == "mme_perception_score"
    assert metrics["pope_full"] == "pope_f1_score" and metrics["seedbench"] == "seed_image"


def test_every_suite_metric_is_declared_by_its_task():
    from mllm_mod.eval.suites import load_config

    for suite in SUITES.values():
        for entry in suite:
            for leaf in leaf_tasks(entry.task):
                declared = [m["metric"] for m in load_config(leaf).get("metric_list", [])]
                assert entry.metric in declared or entry.task == "mvbench", (leaf, entry.metric, declared)


def test_missing_datasets_reported_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    reach = check("pmod14", tmp_path)
    assert time.perf_counter() - start < 30
    missing = {m.task for m in reach.missing}
    assert {"gqa", "mmmu_val", "ok_vqa_val2014", "pope_random"} <= missing
    message = reach.message(str(tmp_path))
    assert "save_to_disk('" + str(tmp_path / "gqa") + "')" in message and "--data-root" in message


def test_cli_reports_missing_datasets_and_exits_2(tmp_path, capsys):
    from mllm_mod.commands.eval import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", str(tmp_path), "--suite", "gmod9", "--out", str(tmp_path / "o"), "--limit", "2"])
    assert args.limit == 2 and args.func(args) == 2
    assert "mmvet" in capsys.readouterr().err


def test_mirror_is_wired_under_a_new_name(tmp_path):
    """A save_to_disk mirror of `gqa` under --data-root becomes task mllm_mod_mirror_gqa, which includes
    the built-in YAML and loads the mirror from disk."""
    import datasets
    from lmms_eval.utils import load_yaml_config

    datasets.DatasetDict({"testdev": datasets.Dataset.from_dict({"question": ["q"]})}).save_to_disk(
        str(tmp_path / "gqa")
    )
    reach = check("gmod9", tmp_path)
    assert reach.mirrored == {"gqa": str(tmp_path / "gqa")}
    names = write_mirror_tasks(reach.mirrored, tmp_path / "tasks")
    config = load_yaml_config(str(tmp_path / "tasks" / f"{MIRROR_PREFIX}gqa.yaml"), mode="simple")
    assert names == {"gqa": "mllm_mod_mirror_gqa"} and config["task"] == "mllm_mod_mirror_gqa"
    assert config["dataset_path"] == str(tmp_path / "gqa") and config["dataset_kwargs"] == {"load_from_disk": True}
    assert config["metric_list"][0]["metric"] == "exact_match"  # the rest comes from the built-in


def test_report_files(tmp_path):
    results = [
        ModelResult(
            "mod",
            {"a": 0.5, "b": 1.0},
            {"a": "acc", "b": "anls"},
            {
                "prefill_tflops_per_sample": 1.0,
                "kv_bytes_per_sample": 2**21,
                "prefill_latency_s_per_batch": 0.25,
                "decode_tokens_per_s": 10,
            },
        ),
        ModelResult("dense", {"a": 0.25, "b": None}, {"a": "acc", "b": "anls"}, {}),
    ]
    md = write_report(results, tmp_path, {"suite": "x"})
    text = md.read_text()
    assert (
        "| a (acc) | b (anls) | average | prefill TFLOPs/sample | KV MiB/sample | prefill ms/batch | gen tok/s |"
        in text
    )
    assert "| mod | 0.5 | 1 | 0.75 | 1 | 2 | 250 | 10.0 |" in text and "| dense | 0.25 | n/a | n/a | n/a |" in text
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["models"][0]["average"] == 0.75 and payload["models"][1]["average"] is None
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_synthetic_suite_report_mod_vs_dense_vs_fastv(tmp_path, monkeypatch):
    """`mllm-mod eval base --suite synthetic --preset pmod --compare dense --compare fastv`: one report,
    three models, every number measured in the run; MoD's and FastV's prefill FLOPs and prompt KV bytes
    are below dense, and each model's FLOPs are the accounting's for its layer ratios."""
    from mllm_mod.cli import main
    from mllm_mod.eval.synthetic import vocabulary
    from mllm_mod.tiny import tiny_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    out = tmp_path / "report"
    argv = ["eval", str(tmp_path / "base"), "--suite", "synthetic", "--preset", "pmod", "--compare", "dense"]
    argv += ["--compare", "fastv", "--out", str(out), "--limit", "1", "--dtype", "float32", "--max-new-tokens", "3"]
    assert main([*argv, "--batch-size", "2"]) == 0
    models = {m["name"]: m for m in json.loads((out / "results.json").read_text())["models"]}
    assert list(models) == ["pmod", "dense", "fastv"]
    mod, dense, fastv = (models[k]["efficiency"] for k in ("pmod", "dense", "fastv"))
    assert 0 < mod["prefill_tflops_per_sample"] < dense["prefill_tflops_per_sample"]
    assert 0 < fastv["prefill_tflops_per_sample"] < dense["prefill_tflops_per_sample"]
    assert 0 < mod["kv_bytes_per_sample"] < dense["kv_bytes_per_sample"]
    assert 0 < fastv["kv_bytes_per_sample"] < dense["kv_bytes_per_sample"]
    assert models["fastv"]["model_args"]["prune_layer"] == 2 and models["fastv"]["model_args"]["keep_ratio"] == 0.5
    for m in models.values():
        assert all(v is not None for v in m["scores"].values()) and m["average"] is not None
        assert m["efficiency"]["samples"] > 0 and m["efficiency"]["decode_tokens_per_s"] > 0
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in models)
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_presets_and_checkpoints_side_by_side():
    """gmod beside pmod and dense in one report: the model variants `mllm-mod eval` asks lmms-eval for."""
    from mllm_mod.cli import build_parser
    from mllm_mod.commands.eval import specs_from_args

    argv = ["eval", "ckpt/gmod", "--suite", "synthetic", "--out", "r", "--compare", "dense", "--compare", "pmod"]
    args = build_parser().parse_args([*argv, "--compare", "fastv", "--compare-checkpoint", "ckpt/pmod_ft"])
    specs = {spec.name: spec.model_args for spec in specs_from_args(args)}
    assert list(specs) == ["gmod", "dense", "pmod", "fastv", "pmod_ft"]
    assert specs["dense"]["dense"] is True and specs["pmod"]["preset"] == "pmod" and "keep_ratio" not in specs["pmod"]
    assert specs["fastv"]["keep_ratio"] == 0.5 and specs["pmod_ft"]["pretrained"] == "ckpt/pmod_ft"
    clash = build_parser().parse_args([*argv[:6], "--compare-checkpoint", "other/gmod"])
    with pytest.raises(ValueError, match="share a name"):
        specs_from_args(clash)

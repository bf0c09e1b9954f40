"""Suites as data, the offline reachability check, mirrors through `include:`, the report and the CLI."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from mllm_mod.eval.report import ModelResult, markdown, write_report
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


def reported_keys(leaf: str) -> set[str]:
    """The ``metric,filter`` keys lmms-eval 0.7.x reports for a task (`lmms_eval.evaluator_utils` names them
    ``f"{metric},{filter_key}"``; a task without a ``filter_list`` gets the one filter ``none``)."""
    from mllm_mod.eval.suites import load_config

    config = load_config(leaf)
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    return {f"{m['metric']},{f}" for m in config.get("metric_list", []) for f in filters}


def test_every_suite_key_is_reported_by_its_task():
    """Each suite entry's ``metric,filter`` key is one lmms-eval 0.7.x reports for every leaf task it runs,
    read from the installed task YAMLs (AI2D reports ``exact_match,flexible-extract``, not ``,none``)."""
    for suite in SUITES.values():
        for entry in suite:
            for leaf in leaf_tasks(entry.task):
                assert f"{entry.metric},{entry.filter}" in reported_keys(leaf), (leaf, entry, reported_keys(leaf))
    assert reported_keys("ai2d") == {"exact_match,flexible-extract"}
    assert "mme_perception_score,none" in reported_keys("mme")


def test_metric_value_reads_the_filtered_key():
    """With local mirrors, AI2D ran and lmms-eval reported ``exact_match,flexible-extract``: the suite
    entry's score is that value, not n/a."""
    from mllm_mod.eval.runner import metric_value

    (ai2d,) = [e for e in SUITES["pmod14"] if e.task == "ai2d"]
    results = {
        f"{MIRROR_PREFIX}ai2d": {"exact_match,flexible-extract": 0.62, "exact_match_stderr,flexible-extract": 0.1}
    }
    assert metric_value(results, [f"{MIRROR_PREFIX}ai2d"], ai2d) == 0.62
    (pope,) = [e for e in SUITES["pmod14"] if e.task == "pope_full"]  # a group: the mean of its leaves
    leaves = {t: {"pope_f1_score,none": v} for t, v in zip(["pope_adv", "pope_pop", "pope_random"], [0.7, 0.8, 0.9])}
    assert metric_value(leaves, list(leaves), pope) == pytest.approx(0.8)
    assert metric_value(leaves, [*leaves, "pope_missing"], pope) is None


def test_report_puts_every_metric_on_0_100():
    """MME perception (0-2000), GPT scores (0-100) and accuracies (0-1) average on one 0-100 scale: MME / 20,
    accuracies x 100; the rule is written under the table; results.json keeps the raw values."""
    from mllm_mod.eval.suites import SuiteTask

    tasks = (
        SuiteTask("mme", "mme_perception_score", "none", 2000.0),
        SuiteTask("mmbench_en_dev", "gpt_eval_score", "none", 100.0),
        SuiteTask("ai2d", "exact_match", "flexible-extract", 1.0),
    )
    result = ModelResult("mod", tasks, {"mme": 1500.0, "mmbench_en_dev": 64.0, "ai2d": 0.56})
    assert result.percent == pytest.approx({"mme": 75.0, "mmbench_en_dev": 64.0, "ai2d": 56.0})
    assert result.average == pytest.approx(65.0)  # the raw mean would be 521.5, decided by MME alone
    text = markdown([result])
    assert "| mod | 75.0 | 64.0 | 56.0 | 65.0 |" in text
    assert "`mme_perception_score` / 20 (reported 0-2000)" in text
    assert "`gpt_eval_score` as reported (0-100)" in text and "`exact_match` x 100 (reported 0-1)" in text


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
    from mllm_mod.eval.suites import SuiteTask

    tasks = (SuiteTask("a", "acc"), SuiteTask("b", "anls"))
    results = [
        ModelResult(
            "mod",
            tasks,
            {"a": 0.5, "b": 1.0},
            {
                "prefill_tflops_per_sample": 1.0,
                "kv_bytes_per_sample": 2**21,
                "prefill_latency_s_per_batch": 0.25,
                "decode_tokens_per_s": 10,
            },
        ),
        ModelResult("dense", tasks, {"a": 0.25, "b": None}, {}),
        ModelResult(
            "fastv", tasks, {"a": 0.5, "b": 0.5}, {}, {"preset": "fastv", "prune_layer": 2, "prune_ratio": 0.75}
        ),
    ]
    md = write_report(results, tmp_path, {"suite": "x"})
    text = md.read_text()
    assert (
        "| a (acc) | b (anls) | average | prefill TFLOPs/sample | KV MiB/sample | prefill ms/batch | gen tok/s |"
        in text
    )
    assert "| mod | 50.0 | 100.0 | 75.0 | 1 | 2 | 250 | 10.0 |" in text and "| dense | 25.0 | n/a | n/a | n/a |" in text
    assert "| fastv (K=2, R=0.75) | 50.0 | 50.0 | 50.0 |" in text  # the baseline's K and pruned fraction R
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["models"][0]["average"] == 75.0 and payload["models"][1]["average"] is None
    assert payload["models"][0]["scores"] == {"a": 0.5, "b": 1.0}  # raw, as lmms-eval reported them
    assert payload["models"][0]["scores_0_100"] == {"a": 50.0, "b": 100.0}
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
    assert models["fastv"]["model_args"]["prune_layer"] == 2 and models["fastv"]["model_args"]["prune_ratio"] == 0.5
    for m in models.values():
        assert all(v is not None for v in m["scores"].values()) and m["average"] is not None
        assert m["efficiency"]["samples"] > 0 and m["efficiency"]["decode_tokens_per_s"] > 0
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in ("pmod", "dense")) and "| fastv (K=2, R=0.5) |" in text
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_presets_and_checkpoints_side_by_side():
    """gmod beside pmod and dense in one report: the model variants `mllm-mod eval` asks lmms-eval for."""
    from mllm_mod.cli import build_parser
    from mllm_mod.commands.eval import specs_from_args

    argv = ["eval", "ckpt/gmod", "--suite", "synthetic", "--out", "r", "--compare", "dense", "--compare", "pmod"]
    args = build_parser().parse_args([*argv, "--compare", "fastv", "--compare-checkpoint", "ckpt/pmod_ft"])
    specs = {spec.name: spec.model_args for spec in specs_from_args(args)}
    assert list(specs) == ["gmod", "dense", "pmod", "fastv", "pmod_ft"]
    assert specs["dense"]["dense"] is True and specs["pmod"]["preset"] == "pmod" and "prune_ratio" not in specs["pmod"]
    assert (
        specs["fastv"]["prune_ratio"] == 0.5
        and specs["fastv"]["prune_layer"] == 2
        and specs["pmod_ft"]["pretrained"] == "ckpt/pmod_ft"
    )
    clash = build_parser().parse_args([*argv[:6], "--compare-checkpoint", "other/gmod"])
    with pytest.raises(ValueError, match="share a name"):
        specs_from_args(clash)


def test_cli_takes_fastv_names_and_refuses_keep_ratio(capsys):
    """FastV's K and R (the fraction of vision tokens pruned) as --prune-layer / --prune-ratio; the old
    --keep-ratio (the fraction kept) is refused with a message naming the new flag."""
    from mllm_mod.cli import build_parser
    from mllm_mod.commands.eval import specs_from_args

    argv = ["eval", "base", "--suite", "synthetic", "--out", "r", "--preset", "fastv"]
    (spec,) = specs_from_args(build_parser().parse_args([*argv, "--prune-layer", "3", "--prune-ratio", "0.75"]))
    assert spec.model_args["prune_layer"] == 3 and spec.model_args["prune_ratio"] == 0.75
    assert "keep_ratio" not in spec.model_args
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--keep-ratio", "0.25"])
    assert "--prune-ratio 0.75" in capsys.readouterr().err

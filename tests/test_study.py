"""The fidelity study: seeded random routing, compute matching of FastV to pmod, and the --quick study
end to end (every arm runs, the results schema, resuming without redoing an arm)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mllm_mod import layer_ratios, retrofit
from mllm_mod.data import localized
from mllm_mod.eval.zoo.pdrop import PDropSpec
from mllm_mod.efficiency import efficiency
from mllm_mod.flops import DecoderShape, prefill_cost
from mllm_mod.study import (
    ARMS,
    MATCH_TOLERANCE,
    TRAINING_FREE_ARMS,
    ZOO_ARMS,
    FastVBudget,
    SeededRandomRouter,
    Study,
    StudySettings,
    apply_random_routing,
    budget_match,
    matched_fastv,
    matched_prune_ratio,
    pmod_ratios,
)
from mllm_mod.tiny import tiny_model


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # the study sets its own thread count
    yield
    torch.set_num_threads(threads)


def prompts(processor, n: int, seed: int = 0, texts: list[str] | None = None):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in range(n)]
    texts = texts or [f"USER : <image> {'what color is the object ? ' * (i + 1)}ASSISTANT :" for i in range(n)]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def kept_logits(model) -> dict[int, torch.Tensor]:
    """Per MoD layer, the router logits of the last forward (captured by hooks)."""
    from mllm_mod.retrofit import mod_layer_map

    out: dict[int, torch.Tensor] = {}
    for idx, layer in mod_layer_map(model).items():
        layer.router.register_forward_hook(lambda m, a, o, idx=idx: out.__setitem__(idx, o.detach()))
    return out


def test_random_routing_is_seeded_per_sample_whatever_the_batch():
    model, processor = tiny_model("llava", num_layers=4, seed=0)
    apply_random_routing(model, seed=5)
    assert all(isinstance(layer.router, SeededRandomRouter) for layer in model.model.language_model.layers[1:])
    captured = kept_logits(model)
    batch = prompts(processor, 3)  # different lengths: left padding differs per row
    with torch.no_grad():
        model(**batch)
        together = {i: t.clone() for i, t in captured.items()}
        for b in range(3):
            alone = {k: v[b : b + 1] for k, v in batch.items()}
            real = alone["attention_mask"][0].bool()
            alone = {k: (v[:, real] if k in ("input_ids", "attention_mask") else v) for k, v in alone.items()}
            model(**alone)
            for idx in captured:
                row = together[idx][b][batch["attention_mask"][b].bool()]  # [T_b, 1]
                torch.testing.assert_close(captured[idx][0], row, rtol=0, atol=0)
    # a different seed, another layer or another picture draws other scores
    first = together[1][0]
    assert not torch.equal(first, together[2][0])
    other, _ = tiny_model("llava", num_layers=4, seed=0)
    apply_random_routing(other, seed=6)
    captured_other = kept_logits(other)
    with torch.no_grad():
        other(**batch)
    assert not torch.equal(captured_other[1][0], first)
    # TanhNorm weights stay 1 to within 1e-4: the arm is pmod with a random top-k
    assert float(together[3].abs().max()) <= 5e-4


def test_random_routing_keeps_pmods_counts_and_its_logits_match_pmod_at_ratio_one():
    model, processor = tiny_model("llava", num_layers=4, seed=0)
    batch = prompts(processor, 2)
    reference, _ = tiny_model("llava", num_layers=4, seed=0)
    retrofit(reference, "pmod")
    apply_random_routing(model, seed=0)
    assert layer_ratios(model) == pytest.approx(pmod_ratios(4)) and layer_ratios(reference) == pytest.approx(
        pmod_ratios(4)
    )
    report = efficiency(model, batch)
    assert report.accounting_matches, report.mismatches
    assert report.kept_per_layer == efficiency(reference, batch).kept_per_layer
    # at ratio 1 every token is kept: random scores change nothing but w = 1 +- 1e-4
    dense, _ = tiny_model("llava", num_layers=4, seed=0)
    from mllm_mod.retrofit import mod_layer_map

    for layer in mod_layer_map(model).values():
        layer.ratio = 1.0
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[real], dense(**batch).logits[real], rtol=0, atol=1e-3)


def test_fastv_prune_ratio_matches_pmods_prefill_cost():
    model, _ = tiny_model("llava", num_layers=4, seed=0, hidden_size=64, intermediate_size=128)
    shape = DecoderShape.from_config(model.config.text_config)
    ratios = pmod_ratios(4)
    for n_text, n_vision in ((17.0, 144), (30.4, 576)):
        prune = matched_prune_ratio(shape, n_text, n_vision, layer=1, target_ratios=ratios)
        keep = int(torch.trunc(torch.tensor((1 - prune) * n_vision, dtype=torch.float32)))

        def cost(k: int, n_text: float = n_text, n_vision: int = n_vision) -> int:
            ratios_k = [1.0] + [(k + 0.5) / n_vision] * 3
            return prefill_cost(
                shape, ratios_k, round(n_text), n_vision, mod_layers=[False, True, True, True]
            ).decoder_flops

        target = prefill_cost(shape, ratios, round(n_text), n_vision).decoder_flops
        assert abs(cost(keep) - target) <= min(abs(cost(keep - 1) - target), abs(cost(keep + 1) - target))
        assert abs(cost(keep) - target) / target < 0.01
        # one accounting: the zoo's spec_cost prices FastV's budget exactly as the MoD-ratio formula above
        from mllm_mod.eval.zoo.matching import spec_cost

        budget = matched_fastv(shape, n_text, n_vision, layer=1, target_ratios=ratios)
        assert budget == FastVBudget(1, keep)
        for k in (keep - 1, keep, keep + 1):
            assert spec_cost(shape, FastVBudget(1, k), round(n_text), n_vision) == cost(k)
        assert budget_match(shape, budget, n_text, n_vision, ratios)["matched"]


def test_every_zoo_method_is_a_training_free_arm_at_its_closest_budget():
    from mllm_mod.eval.zoo import ZOO
    from mllm_mod.eval.zoo.matching import matched_spec, spec_cost

    assert set(ZOO) <= set(ARMS) and set(ZOO_ARMS) == set(ZOO) and set(ZOO) <= set(TRAINING_FREE_ARMS)
    model, _ = tiny_model("llava", num_layers=4, seed=0, hidden_size=64, intermediate_size=128)
    shape = DecoderShape.from_config(model.config.text_config)
    ratios = pmod_ratios(4)
    dense = prefill_cost(shape, [1.0] * 4, 11, 144).decoder_flops
    for method in ZOO:
        spec = matched_spec(method, shape, 11.0, 144, ratios)
        match = budget_match(shape, spec, 11.0, 144, ratios)
        assert match["method"] == method and match["label"] == spec.label()
        assert match["predicted_tflops_ratio"] == pytest.approx(spec_cost(shape, spec, 11, 144) / dense)
        gap = abs(match["predicted_tflops_ratio"] - match["target_tflops_ratio"])
        assert match["matched"] == (gap <= MATCH_TOLERANCE)  # an unreachable budget is reported, not hidden


def test_settings_are_checked_and_loaded_from_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown study arms"):
        StudySettings(arms=("dense", "nope"))
    with pytest.raises(ValueError, match="dense"):
        StudySettings(arms=("pmod", "fastv"))
    with pytest.raises(ValueError, match="base_batch_size"):
        StudySettings(base_batch_size=0)
    path = tmp_path / "study.yaml"
    path.write_text("seeds: 2\nbase_epochs: 1.5\n")
    loaded = StudySettings.load(path, base=StudySettings.quick())
    assert loaded.seeds == 2 and loaded.base_epochs == 1.5 and loaded.n_train == StudySettings.quick().n_train
    path.write_text("nope: 1\n")
    with pytest.raises(ValueError, match="unknown study settings"):
        StudySettings.load(path)


def test_mod_overrides_reach_pmod_random_routing_and_the_matched_budget(tmp_path):
    overrides = {"schedule": "constant", "layers": [1, 2, 3], "ratio": 0.15}
    settings = StudySettings(mod_overrides=overrides)
    assert pmod_ratios(4, settings.mod_overrides) == pytest.approx([1.0, 0.15, 0.15, 0.15])
    assert pmod_ratios(4) == pytest.approx([1.0, 0.75, 0.25, 0.15])  # the preset's PRD without overrides
    model, _ = tiny_model("llava", num_layers=4, seed=0)
    apply_random_routing(model, seed=0, **overrides)
    assert layer_ratios(model) == pytest.approx([1.0, 0.15, 0.15, 0.15])
    with pytest.raises((TypeError, ValueError), match="nope"):
        StudySettings(mod_overrides={"nope": 1})
    with pytest.raises(ValueError, match="tanh_alpha"):
        StudySettings(mod_overrides={"tanh_alpha": 1.5})
    # the overrides are part of what a resumed directory must match; an older directory (no such key) reads
    # as the default
    study = Study(tmp_path / "s", settings)
    study.check_settings()
    Study(tmp_path / "s", StudySettings(mod_overrides=dict(overrides))).check_settings()
    with pytest.raises(ValueError, match="mod_overrides"):
        Study(tmp_path / "s", StudySettings()).check_settings()
    saved = json.loads((tmp_path / "s" / "settings.json").read_text())
    del saved["mod_overrides"]
    (tmp_path / "s" / "settings.json").write_text(json.dumps(saved))
    Study(tmp_path / "s", StudySettings()).check_settings()
    with pytest.raises(ValueError, match="mod_overrides"):
        Study(tmp_path / "s", settings).check_settings()


def test_quick_study_runs_every_arm_and_resumes(tmp_path, monkeypatch):
    from mllm_mod.cli import main

    assert main(["study", "--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["arms"]) == set(ARMS) and results["complete"]
    assert set(results) >= {"arms", "settings", "versions"}
    families = set(results["settings"]["chance"])
    assert families == set(localized.families())
    for name, arm in results["arms"].items():
        assert set(arm) >= {
            "accuracy_mean",
            "accuracy_std",
            "per_family",
            "blank_control",
            "tflops_ratio",
            "kv_ratio",
            "seeds",
        }
        assert set(arm["per_family"]) == families and len(arm["seeds"]) == 1
        assert 0.0 <= arm["accuracy_mean"] <= 1.0 and arm["blank_control"] is not None
        assert all(s["accounting_matches"] for s in arm["seeds"])
        if name == "dense":
            assert arm["tflops_ratio"] == arm["kv_ratio"] == 1.0
        else:
            assert 0.2 < arm["tflops_ratio"] < 0.8 and 0.2 < arm["kv_ratio"] < 0.8
    arms = results["arms"]
    # equal compute: random routing is pmod's budget exactly, FastV is matched to it by the accounting
    assert arms["random_routing"]["tflops_ratio"] == pytest.approx(arms["pmod"]["tflops_ratio"])
    for name in ("fastv", "fastv_ft", "random_drop"):
        assert arms[name]["tflops_ratio"] == pytest.approx(arms["pmod"]["tflops_ratio"], abs=0.01)
    # every zoo method ran as a training-free arm; its measured cost is its budget's predicted cost, and a
    # method that cannot reach pmod's TFLOPs says so
    for name in (*ZOO_ARMS, "fastv", "fastv_ft", "random_drop"):
        budget = arms[name]["seeds"][0]["budget"]
        assert budget["method"] == ("fastv" if name in ("fastv", "fastv_ft", "random_drop") else name)
        assert arms[name]["tflops_ratio"] == pytest.approx(budget["predicted_tflops_ratio"], abs=0.02)
        if budget["matched"]:
            assert arms[name]["tflops_ratio"] == pytest.approx(arms["pmod"]["tflops_ratio"], abs=0.02)
        else:
            assert "cannot reach pmod's TFLOPs" in (tmp_path / "study.md").read_text()
    # equal training: every trained arm ran the same number of steps with the vision tower frozen
    trained = [
        arms[a]["seeds"][0]["train"]
        for a in ("dense", "pmod", "pmod_c50", "pmod_c30", "gmod", "random_routing", "fastv_ft")
    ]
    assert len({t["global_step"] for t in trained}) == 1 and trained[0]["global_step"] > 0
    assert len({t["trainable"]["frozen"] for t in trained}) == 1
    assert all(arms[a]["seeds"][0]["train"] is None for a in TRAINING_FREE_ARMS)
    for name in ("study.md", "pareto.png", "patches.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "| pmod | 1 |" in (tmp_path / "study.md").read_text()
    # the depth profile: the dense arm with vision withdrawn from each layer K = 1 .. L-1, per family
    depth = results["depth"]
    assert list(depth) == ["1", "2", "3"]
    assert all(set(d["per_family"]) == families and d["seeds"] == [0] and 0 <= d["mean"] <= 1 for d in depth.values())
    assert "| withdrawn from layer 3 | 1 |" in (tmp_path / "study.md").read_text()

    # the cross-check of a training-free arm: the plugin applies the seed's DivPrune budget to the dense weights
    from mllm_mod.study import cross_check

    check = cross_check(tmp_path, arm="divprune", per_family=2, batch_size=8)
    assert check["model_args"] == {"preset": "divprune", **arms["divprune"]["seeds"][0]["budget"]["budget"]}
    assert set(check["study_scorer"]) == set(check["lmms_eval"]) == families
    assert check["max_abs_difference"] == 0.0
    assert json.loads((tmp_path / "cross_check_divprune.json").read_text()) == check

    # an arm does not depend on what ran before it in the process: gmod (its router starts random) run
    # alone, after the global RNG moved, gives what it gave after the other arms
    gmod_path = tmp_path / "seed0" / "arms" / "gmod.json"
    before = json.loads(gmod_path.read_text())
    gmod_path.unlink()
    torch.rand(1000)
    Study(tmp_path, dataclasses.replace(StudySettings.quick(), arms=("gmod",))).run()
    after = json.loads(gmod_path.read_text())
    assert after["train"]["train_loss"] == before["train"]["train_loss"]
    assert (after["accuracy"], after["routing"]) == (before["accuracy"], before["routing"])
    gmod_path.write_text(json.dumps(before))  # the first run's file (its timings) for the resume check below

    # resume: nothing is redone, the report is rewritten from the saved arms
    def refuse(*args, **kwargs):
        raise AssertionError("a finished arm was run again")

    monkeypatch.setattr(Study, "run_arm", refuse)
    monkeypatch.setattr(Study, "base", refuse)
    again = json.loads(json.dumps(Study(tmp_path, StudySettings.quick()).run()))
    assert again["arms"] == results["arms"] and again["depth"] == results["depth"]
    # a study made before the depth profile gets it on its next run, without redoing an arm
    monkeypatch.undo()
    monkeypatch.setattr(Study, "run_arm", refuse)
    profile = json.loads((tmp_path / "seed0" / "depth.json").read_text())
    (tmp_path / "seed0" / "depth.json").unlink()
    assert json.loads(json.dumps(Study(tmp_path, StudySettings.quick()).run()))["depth"] == results["depth"]
    assert json.loads((tmp_path / "seed0" / "depth.json").read_text()) == profile
    with pytest.raises(ValueError, match="other settings"):
        Study(tmp_path, StudySettings(**{**StudySettings.quick().to_dict(), "n_train": 40})).run()


def test_seeds_side_by_side_give_the_results_of_one_process(tmp_path):
    """`--jobs 2`: one spawned process per seed, logging to seed*/log.txt; each seed's results are those of a
    one-process study of the same seeds (the seeds are independent and each runs on one thread)."""
    from mllm_mod.cli import main

    small = {"families": ["count"], "arms": ["dense", "random_drop"]}
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(small))  # YAML reads JSON
    for out, jobs in (("two", "2"), ("one", "1")):
        args = ["study", "--out", str(tmp_path / out), "--quick", "--config", str(config), "--seeds", "2", "--jobs", jobs]
        assert main(args) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["complete"] and all(len(arm["seeds"]) == 2 for arm in two["arms"].values())
    for seed in (0, 1):
        log = (tmp_path / "two" / f"seed{seed}" / "log.txt").read_text()
        assert f"seed {seed} dense: accuracy" in log and f"seed {1 - seed} dense" not in log
        assert not (tmp_path / "one" / f"seed{seed}" / "log.txt").exists()
    for arm in small["arms"]:
        for seed in (0, 1):
            a, b = two["arms"][arm]["seeds"][seed], one["arms"][arm]["seeds"][seed]
            assert a["seed"] == b["seed"] == seed
            assert a["per_family"] == b["per_family"] and a["blank_control"] == b["blank_control"]
            assert a["tflops_ratio"] == b["tflops_ratio"]
            if a["train"] is not None:  # the bite: the same training loss to the last bit
                assert a["train"]["train_loss"] == b["train"]["train_loss"]
    assert two["depth"] == one["depth"]


def test_a_failed_seed_is_named_with_its_traceback_in_its_log(tmp_path):
    """Three seeds on two processes, each failing inside its run (a base without its processor): the first
    failure is raised naming the seed and its log, the log holds the traceback, nothing is left running."""
    from mllm_mod.study import Study

    settings = dataclasses.replace(StudySettings.quick(), families=("count",), arms=("dense",), seeds=3)
    study = Study(tmp_path, settings)
    study.check_settings()
    study.data()
    for seed in range(3):  # a finished-looking base with no model or processor in it
        base = tmp_path / f"seed{seed}" / "base"
        base.mkdir(parents=True)
        (base / "train_summary.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"study seed ([012]) failed \(exit code 1; see .*seed\1/log.txt\)") as error:
        study.run(jobs=2)
    seed = int(str(error.value).split()[2])
    log = (tmp_path / f"seed{seed}" / "log.txt").read_text()
    assert "Traceback" in log and "base" in log
    import multiprocessing

    assert not multiprocessing.active_children()


def test_cross_check_takes_the_arms_budget_and_refuses_arms_without_weights(tmp_path):
    from mllm_mod.study import cross_check_method

    arms = tmp_path / "seed0" / "arms"
    arms.mkdir(parents=True)
    (arms / "fastv.json").write_text(json.dumps({"fastv": {"prune_layer": 1, "prune_ratio": 0.59375, "seed": 0}}))
    shape = DecoderShape(hidden=64, intermediate=128, heads=4, kv_heads=4, head_dim=16, vocab=200, layers=4)
    pdrop = budget_match(shape, PDropSpec(layer_list=(1, 2, 3), lam=0.61), 12.0, 144, [1.0, 0.75, 0.25, 0.15])
    (arms / "pdrop.json").write_text(json.dumps({"budget": pdrop}))  # as the study records it
    assert cross_check_method(tmp_path, 0, "dense") is None
    assert cross_check_method(tmp_path, 0, "fastv") == ("fastv", {"prune_layer": 1, "prune_ratio": 0.59375})
    method = cross_check_method(tmp_path, 0, "pdrop")
    assert method == ("pdrop", {"lam": 0.61, "layer_list": "1,2,3"})
    from mllm_mod.eval.zoo import zoo_spec

    assert zoo_spec(*method[:1], **method[1]) == PDropSpec(layer_list=(1, 2, 3), lam=0.61)  # the plugin's parse
    with pytest.raises(ValueError, match="keeps the weights of the dense arm only"):
        cross_check_method(tmp_path, 0, "pmod")
    with pytest.raises(FileNotFoundError, match="divprune arm for seed 0"):
        cross_check_method(tmp_path, 0, "divprune")


def test_aggregate_takes_mean_and_std_over_seeds_and_the_table_says_partial():
    from mllm_mod.study import aggregate, study_table

    def run(seed: int, acc: dict[str, float], blank: float) -> dict:
        return {"seed": seed, "accuracy": sum(acc.values()) / len(acc), "per_family": acc, "blank_control": blank,
                "tflops_ratio": 0.5 + 0.01 * seed, "kv_ratio": 0.6, "accounting_matches": True}  # fmt: skip

    arm = aggregate([run(0, {"a": 0.4, "b": 0.6}, 0.3), run(1, {"a": 0.6, "b": 0.8}, 0.4)])
    assert arm["accuracy_mean"] == pytest.approx(0.6) and arm["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert arm["per_family"]["a"] == pytest.approx({"mean": 0.5, "std": 0.1414}, abs=1e-4)
    assert arm["blank_control"] == pytest.approx(0.35) and arm["tflops_ratio"] == pytest.approx(0.505)
    results = {
        "arms": {"pmod": arm},
        "settings": {"chance": {"a": 0.5, "b": 0.25}, "mean_chance": 0.375},
        "complete": False,
    }
    table = study_table(results)
    assert table.startswith("Study PARTIAL") and "| pmod | 2 | 0.600 ± 0.141 |" in table
    assert "routers keep" not in table  # no arm recorded routing


def test_routing_is_averaged_per_layer_over_the_seeds_that_route_it():
    from mllm_mod.study import aggregate, study_table

    def layer(kept: float, obj: float | None, named: float | None) -> dict:
        return {"kept": kept, "object_recall": obj, "named_recall": named, "images": 128}

    def run(seed: int, routing: dict | None) -> dict:
        out = {"seed": seed, "accuracy": 0.5, "per_family": {"a": 0.5}, "blank_control": None, "tflops_ratio": 0.3,
               "kv_ratio": 0.3, "accounting_matches": True}  # fmt: skip
        return {**out, "routing": routing} if routing is not None else out

    # ARank's layers differ per seed; a seed run before routing was recorded has none
    arm = aggregate([
        run(0, {"0": layer(0.5, 0.4, 0.2), "2": layer(0.2, 0.1, None)}),
        run(1, {"0": layer(0.3, 0.6, 0.4), "1": layer(0.1, 0.3, 0.5)}),
        run(2, None),
    ])  # fmt: skip
    routing = arm["routing"]
    assert list(routing) == ["0", "1", "2"] and [routing[k]["seeds"] for k in routing] == [2, 1, 1]
    assert routing["0"]["kept"] == pytest.approx(0.4) and routing["0"]["named_recall"] == pytest.approx(0.3)
    assert routing["2"]["named_recall"] is None and routing["1"]["object_recall"] == pytest.approx(0.3)
    assert [s.get("routing") is not None for s in arm["seeds"]] == [True, True, False]
    table = study_table({"arms": {"gmod": arm}, "settings": {"chance": {"a": 0.5}, "mean_chance": 0.5}})
    assert "| gmod | 0 | 2 | 0.400 | 0.500 | 0.300 |" in table and "| gmod | 2 | 1 | 0.200 | 0.100 |  |" in table

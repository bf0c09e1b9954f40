"""lmms-eval on an imported directory: a p-MoD release in its original layout (32 layers, 24 wrapped,
non-zero routers, a word tokenizer that knows the synthetic tasks' words) is imported with `mllm-mod
import`, then evaluated by the stock lmms-eval CLI with ``--model mllm_mod --model_args pretrained=DIR``
and by `mllm-mod eval DIR --suite synthetic`, offline on the local synthetic tasks.

The answers of the colour tasks are rewritten from the imported model's own greedy answers and
likelihoods, computed here one sample at a time (`test_eval_plugin.rig_answers`): exact_match and acc
are exactly 0.5 iff the plugin loads the MoD model from the directory and generates and scores as
`mllm_mod.from_pretrained(DIR)` does.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_eval_plugin import OFFLINE, rig_answers, run_lmms_eval
from test_import_pmod import LAYERS, PMOD_FIELDS, pmod_tensors
from test_import_reference import llava_config, source_tokenizer, write_checkpoint, write_tower_dir

import mllm_mod
from mllm_mod.eval.synthetic import SYNTHETIC_TASKS, vocabulary, write_tasks

N_DOCS = 2


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import_eval")
    write_tower_dir(str(root / "clip"), "clip", layers=2)
    tokenizer = source_tokenizer(words=vocabulary())
    tensors = pmod_tensors(len(tokenizer))
    config = llava_config(len(tokenizer), LAYERS, "openai/clip-vit-large-patch14-336") | PMOD_FIELDS
    write_checkpoint(str(root / "src"), config, tensors, tokenizer, shards=3)
    out = root / "pmod-imported"
    mllm_mod.import_checkpoint(str(root / "src"), str(out), vision_tower=str(root / "clip"), progress=False)
    return root, out


@pytest.fixture(scope="module")
def rigged(imported):
    from transformers import AutoProcessor

    root, out = imported
    model = mllm_mod.from_pretrained(out).eval()
    assert min(mllm_mod.layer_ratios(model)) < 1.0
    processor = AutoProcessor.from_pretrained(out)
    task_dir = write_tasks(root / "synthetic", n=N_DOCS)
    expected = rig_answers(model, processor, root / "synthetic")
    return str(task_dir), expected


@pytest.mark.slow
def test_lmms_eval_cli_on_an_imported_pmod_directory(imported, rigged, tmp_path):
    """``python -m lmms_eval --model mllm_mod --model_args pretrained=DIR``: the result file's scores are
    the reference's, and every generation equals the imported MoD model's own."""
    _, out = imported
    tasks, expected = rigged
    results_dir = tmp_path / "out"
    args = [
        sys.executable, "-m", "lmms_eval", "--model", "mllm_mod", "--force_simple",
        "--model_args", f"pretrained={out},dtype=float32,max_new_tokens=8",
        "--tasks", "mllm_mod_color,mllm_mod_color_mc", "--include_path", tasks, "--batch_size", "2",
        "--output_path", str(results_dir), "--log_samples", "--verbosity", "DEBUG",
    ]  # fmt: skip
    results = run_lmms_eval(args, results_dir, {**os.environ, **OFFLINE}, timeout=600)
    assert results["mllm_mod_color"]["exact_match,none"] == 0.5
    assert results["mllm_mod_color_mc"]["acc,none"] == 0.5
    (samples,) = list(results_dir.glob("**/*_samples_mllm_mod_color.jsonl"))
    with open(samples) as f:
        rows = [json.loads(line) for line in f]
    got = {r["doc_id"]: (r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0]).strip() for r in rows}
    assert [got[i] for i in range(N_DOCS)] == expected["generations"]


@pytest.mark.slow
def test_mllm_mod_eval_on_an_imported_pmod_directory(imported, tmp_path, monkeypatch):
    """`mllm-mod eval DIR --suite synthetic --compare dense`: one report, the imported MoD model and the
    same weights dense; MoD's prefill FLOPs below dense's (its routers came from the p-MoD checkpoint)."""
    from mllm_mod.cli import main

    _, out = imported
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    report = tmp_path / "report"
    argv = ["eval", str(out), "--suite", "synthetic", "--compare", "dense", "--out", str(report), "--limit", "1"]
    assert main([*argv, "--dtype", "float32", "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    payload = json.loads((report / "results.json").read_text())
    models = {m["name"]: m for m in payload["models"]}
    assert list(models) == ["pmod-imported", "dense"]
    assert set(models["pmod-imported"]["scores"]) == set(models["dense"]["scores"])
    assert len(models["dense"]["scores"]) == len(SYNTHETIC_TASKS)
    mod, dense = models["pmod-imported"]["efficiency"], models["dense"]["efficiency"]
    assert 0 < mod["prefill_tflops_per_sample"] < dense["prefill_tflops_per_sample"]
    assert "| pmod-imported |" in (report / "report.md").read_text()


@pytest.mark.slow
def test_train_an_imported_pmod_directory(imported, tmp_path):
    """`mllm_mod.train` on the imported directory as it is (a full MoD checkpoint, no preset): it starts
    from p-MoD's routers, a few steps change them, and the result reloads with `mllm_mod.from_pretrained`."""
    import torch

    from mllm_mod.data.synth import generate
    from mllm_mod.train import load_config, train

    _, out = imported
    synth = tmp_path / "synth"
    generate(synth, 12, seed=0, only=["color"], progress=False)
    before = mllm_mod.mod_state_dict(mllm_mod.from_pretrained(out))
    settings = dict(
        model=str(out), data=str(synth / "train.json"), image_folder=str(synth), output_dir=str(tmp_path / "run"),
        batch_size=2, num_workers=0, gradient_checkpointing=False, lr=1e-2, max_steps=2, logging_steps=1,
        save_steps=1000, progress=False, bf16=False,
    )  # fmt: skip
    result = train(load_config(**settings))
    assert result.mod and result.global_step == 2
    reloaded = mllm_mod.from_pretrained(tmp_path / "run")
    after = mllm_mod.mod_state_dict(reloaded)
    assert mllm_mod.layer_ratios(reloaded) == mllm_mod.layer_ratios(mllm_mod.from_pretrained(out))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

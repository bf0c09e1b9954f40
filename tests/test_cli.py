"""The `mllm-mod` command: retrofit, profile (accounting and timing), demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

import mllm_mod
from conftest import build, make_inputs
from mllm_mod.cli import main


def test_profile_config_only_7b(capsys):
    assert main(["profile", "llava-1.5-7b", "--config-only"]) == 0
    out = capsys.readouterr().out
    assert "MoD layers: 24, vision KV fraction 0.5369" in out
    assert "| prefill TFLOPs / sample | 8.504 | 4.928 | 0.579 |" in out


@pytest.fixture()
def tiny_dir(tmp_path):
    model, processor = build("llava")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    return tmp_path


def test_retrofit_adapter_and_full(tiny_dir, capsys):
    base = str(tiny_dir / "base")
    assert main(["retrofit", base, "--preset", "pmod", "--set", "prd_min_ratio=0.25", "--out", str(tiny_dir / "ad")]) == 0
    assert "retrofitted 3/4 layers (pmod)" in capsys.readouterr().out
    saved = json.loads((tiny_dir / "ad" / "mod_config.json").read_text())
    assert saved["prd_min_ratio"] == 0.25
    assert main(["retrofit", base, "--out", str(tiny_dir / "full"), "--full"]) == 0
    model = mllm_mod.from_pretrained(tiny_dir / "full")
    assert mllm_mod.layer_ratios(model) == pytest.approx([1.0, 0.75, 0.25, 0.15])
    assert os.path.isfile(tiny_dir / "full" / "tokenizer.json")  # the processor travels with the model


def test_profile_times_dense_and_mod(tiny_dir, capsys):
    out_json = tiny_dir / "p.json"
    args = ["profile", str(tiny_dir / "base"), "--batch-sizes", "1,2", "--repeats", "1", "--n-vision", "25", "--json", str(out_json)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prefill ms, batch 2" in out and "samples/s, batch 1" in out
    result = json.loads(out_json.read_text())
    assert [t["batch"] for t in result["timings"]] == [1, 2]
    assert all(t["dense_ms"] > 0 and t["mod_ms"] > 0 for t in result["timings"])


def test_console_script_installed():
    exe = shutil.which("mllm-mod") or os.path.join(os.path.dirname(os.sys.executable), "mllm-mod")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "retrofit" in done.stdout and "profile" in done.stdout and "demo" in done.stdout


def test_bad_input_gives_a_clear_error(tiny_dir, capsys):
    base = str(tiny_dir / "base")
    assert main(["retrofit", base, "--set", "ratioo=0.5", "--out", str(tiny_dir / "x")]) == 2
    assert "unknown MoDConfig fields ['ratioo']" in capsys.readouterr().err
    assert main(["retrofit", base, "--set", "schedule=constant", "ratio=1.5", "--out", str(tiny_dir / "x")]) == 2
    assert "ratio must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["profile", "llava-13b", "--config-only"]) == 2
    err = capsys.readouterr().err
    assert "'llava-13b' is neither a model directory nor one of [" in err and "'llava-1.5-7b', 'llava-next-7b'" in err
    assert not (tiny_dir / "x").exists()


def test_arank_then_retrofit_from_the_report(tiny_dir, capsys):
    """The gamma-MoD journey: calibrate on the user's own LLaVA JSON, then convert the redundant layers."""
    from PIL import Image

    from conftest import make_images

    images = tiny_dir / "imgs"
    images.mkdir()
    records = []
    for i, img in enumerate(make_images(seed=1)):
        img.save(images / f"{i}.png")
        records.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color is the object ?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    (tiny_dir / "calib.json").write_text(json.dumps(records))
    base, out = str(tiny_dir / "base"), tiny_dir / "arank"
    args = ["arank", base, "--data", str(tiny_dir / "calib.json"), "--image-folder", str(images), "--out", str(out)]
    assert main([*args, "--samples", "2", "--batch-size", "2"]) == 0
    report = mllm_mod.ARankReport.load(out)
    assert report.samples == 2 and report.num_layers == 4 and (out / "arank.png").exists()
    assert f"highest-ARank layers (stay dense): {report.dense_layers()}" in capsys.readouterr().out
    retro = ["retrofit", base, "--preset", "gmod", "--arank", str(out / "arank.json"), "--dense-layers", "2"]
    assert main([*retro, "--out", str(tiny_dir / "ad")]) == 0
    saved = json.loads((tiny_dir / "ad" / "mod_config.json").read_text())
    assert saved["layers"] == report.mod_layers(keep_dense=2) and len(saved["layers"]) == 2
    # a missing image names the sample and the path
    Image.new("RGB", (4, 4)).save(images / "unused.png")
    (images / "0.png").unlink()
    assert main([*args, "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "s0" in err and "0.png" in err


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import mllm_mod.commands.eval as eval_command

    def missing(args):
        raise ModuleNotFoundError("No module named 'lmms_eval'")

    monkeypatch.setattr(eval_command, "run_eval", missing)
    assert main(["eval", "ckpt", "--suite", "synthetic", "--out", "r"]) == 2
    assert "install it with: pip install 'mllm-mod[eval]'" in capsys.readouterr().err

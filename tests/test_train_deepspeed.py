"""Real 2-process DeepSpeed runs on the CPU (DeepSpeed's CPU accelerator, gloo): a tiny p-MoD LLaVA is
fine-tuned with ZeRO-3 (default test run, launched with torchrun) and ZeRO-2 (slow, launched with the
`deepspeed` launcher, which passes --local_rank), the loss goes down, and the saved model reloads with
`mllm_mod.from_pretrained` and generates."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mllm_mod
from mllm_mod.data.synth import generate, vocabulary
from mllm_mod.tiny import tiny_model

BIN = Path(sys.executable).parent
if importlib.util.find_spec("deepspeed") is None:  # the train extra is part of the test extra: fail, never skip
    raise ImportError("deepspeed is not installed: pip install -e '.[train]'")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    generate(root / "data", 40, seed=0, only=["color", "shape"], progress=False)
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(rig: Path, stage: str, launcher: str, bf16: bool = False) -> Path:
    """bf16: DeepSpeed's bf16 mode (routers stored bf16 for ZeRO's one-dtype buffers, routed in float32)."""
    out = rig / f"out_{stage}{'_bf16' if bf16 else ''}"
    args = [
        "-m", "mllm_mod.train", "--model", str(rig / "base"), "--data", str(rig / "data" / "train.json"),
        "--image-folder", str(rig / "data"), "--output-dir", str(out), "--preset", "pmod", "--deepspeed", stage,
        "max_steps=6", "batch_size=4", "lr=1e-3", "num_workers=0", "save_steps=3", "progress=false",
        "gradient_checkpointing=true", f"bf16={str(bf16).lower()}",
        *(["hf.use_cpu=true"] if bf16 else []),  # transformers refuses bf16 on a machine without a GPU otherwise
    ]
    port = str(free_port())
    if launcher == "torchrun":
        command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *args]
    else:
        command = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", port, "--module", *args[1:]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def check_run(out: Path) -> None:
    with open(out / "train_summary.json") as f:
        result = json.load(f)["result"]
    assert result["global_step"] == 6 and result["mod"]
    assert result["last_loss"] < result["first_loss"]
    with open(out / "trainer_state.json") as f:
        state = json.load(f)
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 6
    # both processes took part: each step saw 2 x 4 samples (throughput is summed over processes)
    with open(out / "checkpoint-6" / "trainer_state.json") as f:
        assert json.load(f)["train_batch_size"] == 4
    assert (out / "checkpoint-6" / "rng_state_1.pth").is_file()  # one RNG state per process
    model = mllm_mod.from_pretrained(out).eval()
    routers = mllm_mod.mod_state_dict(model)
    assert routers and any(float(v.abs().max()) > 0 for v in routers.values())  # routers trained and gathered
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"
    from PIL import Image

    image = Image.open(out.parent / "data" / "images" / "color-000000.png")
    batch = processor(images=[image], text=["USER : <image> what color is the object ? ASSISTANT :"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert batch["input_ids"].shape[1] < generated.shape[1] <= batch["input_ids"].shape[1] + 2  # may stop at </s>


def test_zero3_bf16_two_processes_trains_saves_and_reloads(rig):
    """ZeRO-3 in bf16 (ZeRO-3 asserts one dtype per flattened group: float32 routers beside bf16 weights failed)."""
    check_run(run_distributed(rig, "zero3", "torchrun", bf16=True))


@pytest.mark.slow
def test_zero2_two_processes_with_the_deepspeed_launcher(rig):
    if shutil.which(str(BIN / "deepspeed")) is None:
        pytest.fail("the deepspeed launcher is not installed next to python")
    check_run(run_distributed(rig, "zero2", "deepspeed"))

"""The streaming model with a plain `transformers.Trainer`, `evaluate_streaming`, and `mllm-mod stream`."""

from __future__ import annotations

import json

import pytest
import torch

import mllm_mod
from mllm_mod.cli import main
from mllm_mod.streaming import (
    StreamCollator,
    StreamDataset,
    SynthSpec,
    evaluate_streaming,
    load_records,
    make_synthetic_stream,
    tiny_stream_model,
)
from mllm_mod.streaming.metrics import random_timing_baseline
from mllm_mod.streaming import StreamForCausalLM
from mllm_mod.streaming.train import StreamTrainSpec, freeze_vision, train_stream, with_lora


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream_train")
    make_synthetic_stream(directory, SynthSpec(num_videos=4, duration=4.0, seed=5))
    return directory


TINY = dict(max_steps=12, batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-3, warmup_ratio=0.0, logging_steps=3)


@pytest.mark.parametrize("preset", [None, "videomod"])
def test_plain_trainer_loss_decreases(data_dir, tmp_path, preset):
    records = load_records(data_dir / "stream.json")
    model, tokenizer = tiny_stream_model(num_layers=2, frame_loss_weight=2.0)
    if preset:
        mllm_mod.retrofit(model, preset)
    dataset = StreamDataset(records, tokenizer, model.config)
    batch = StreamCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        before = float(model(**batch).loss)
    spec = StreamTrainSpec(lora_r=0, **TINY)  # full fine-tuning: the tiny runs' choice
    model, losses = train_stream(model, tokenizer, records, tmp_path, spec, progress=False)
    with torch.no_grad():
        after = float(model(**batch).loss)
    assert len(losses) == 4 and losses[-1][1] < losses[0][1]
    assert after < 0.8 * before, (before, after)


def test_the_default_recipe_is_videollm_onlines():
    """arguments_live.py / live1+.sh: LoRA r 128, alpha 256 on the decoder's linear layers and the LM head,
    the connector in full, the vision tower frozen, lr 2e-4, 2 epochs, at most 1,200 frames."""
    spec = StreamTrainSpec()
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout) == (128, 256, 0.05)
    assert (spec.learning_rate, spec.num_epochs, spec.max_frames, spec.warmup_ratio) == (2e-4, 2.0, 1200, 0.05)
    assert spec.batch_size * spec.gradient_accumulation_steps == 8


@pytest.mark.parametrize("preset", [None, "videomod"])
def test_lora_recipe_trains_what_the_reference_trains(data_dir, tmp_path, preset):
    records = load_records(data_dir / "stream.json")[:2]
    model, tokenizer = tiny_stream_model(num_layers=2)
    if preset:
        mllm_mod.retrofit(model, preset)
    freeze_vision(model)
    peft_model = with_lora(model, StreamTrainSpec(lora_r=4, lora_alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    layers = model.config.text_config.num_hidden_layers
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_a = {n for n in trainable if "lora_A" in n}
    assert len(lora_a) == layers * len(linears) + 1  # + the LM head
    assert any(".lm_head.lora_A." in n for n in lora_a)
    assert all(".language_model." in n for n in lora_a if "lm_head" not in n)
    connector = {n for n in trainable if "multi_modal_projector" in n}
    assert len(connector) == 4 and all("modules_to_save" in n for n in connector)  # 2 linears, in full
    routers = {n for n in trainable if ".router." in n}
    assert bool(routers) == (preset is not None)  # the MoD routers, new parameters, train in full
    assert trainable == lora_a | {n.replace("lora_A", "lora_B") for n in lora_a} | connector | routers
    assert not any("vision_tower" in n or "embed_tokens" in n for n in trainable)
    # training merges the adapters back: a plain model whose weights moved, its tower untouched
    model2, tokenizer = tiny_stream_model(num_layers=2)
    if preset:
        mllm_mod.retrofit(model2, preset)
    tower = {k: v.clone() for k, v in model2.model.vision_tower.state_dict().items()}
    q = model2.model.language_model.layers[0].self_attn.q_proj.weight.clone()
    spec = StreamTrainSpec(lora_r=4, lora_alpha=8, **{**TINY, "max_steps": 2})
    trained, _ = train_stream(model2, tokenizer, records, tmp_path, spec, progress=False)
    assert type(trained) is StreamForCausalLM
    assert all(torch.equal(v, trained.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert not torch.equal(trained.model.language_model.layers[0].self_attn.q_proj.weight, q)


def test_evaluate_streaming_runs_on_a_json(data_dir):
    model, tokenizer = tiny_stream_model(num_layers=2)
    result = evaluate_streaming(model, str(data_dir / "stream.json"), tokenizer, max_samples=2, progress=False)
    assert result["num_samples"] == 2 and result["num_turns"] >= 6
    assert result["lm_ppl"] > 1 and 0 <= result["lm_correctness"] <= 1 and 0 <= result["fluency"] <= 1
    baseline = random_timing_baseline(load_records(data_dir / "stream.json"), tokenizer, model.config, repeats=5)
    assert baseline["time_diff"] > 0


def test_cli_narrates_and_scores(data_dir, tmp_path, capsys):
    model, tokenizer = tiny_stream_model(num_layers=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    video = str(data_dir / "clips" / "clip-5-0.mp4")
    args = ["stream", "--model", str(tmp_path / "model"), "--video", video, "--fps", "2", "--threshold", "1.01"]
    assert (
        main(args + ["--max-new-tokens", "2", "--ask", "1.5:what color is it ?", "--json", str(tmp_path / "n.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "[   1.50s] USER: what color is it ?" in out and "[   3.50s]" in out and "8 frames at 2 fps" in out
    replies = json.loads((tmp_path / "n.json").read_text())["replies"]
    assert len(replies) == 8 + 1  # threshold > 1: a reply at every frame, and the question answered at once
    asked = [r for r in replies if r["silence_prob"] != r["silence_prob"]]  # NaN: no frame decided it
    assert [(r["time"], r["frame"]) for r in asked] == [(1.5, 3)]
    assert (
        main(
            [
                "stream",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(data_dir / "stream.json"),
                "--max-samples",
                "1",
            ]
        )
        == 0
    )
    assert "| TimeDiff (s) |" in capsys.readouterr().out
    # the same metrics through `mllm-mod eval --suite streaming`, two checkpoints side by side
    mllm_mod.retrofit(model, "videomod")
    model.save_pretrained(tmp_path / "videomod")
    tokenizer.save_pretrained(tmp_path / "videomod")
    ev = ["eval", str(tmp_path / "model"), "--suite", "streaming", "--data", str(data_dir / "stream.json"), "--limit", "1"]
    assert main([*ev, "--compare-checkpoint", str(tmp_path / "videomod"), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "results.json").read_text())["models"]
    assert list(report) == ["model", "videomod"] and all(0 <= r["fluency"] <= 1 for r in report.values())
    assert "| videomod |" in capsys.readouterr().out
    assert main(ev[:4] + ["--out", str(tmp_path / "rep2")]) == 2
    assert "needs --data" in capsys.readouterr().err
    # bad input: clear errors naming the problem
    assert main(["stream", "--model", str(tmp_path / "model"), "--video", str(tmp_path / "nope.mp4")]) == 2
    assert "nope.mp4 does not exist" in capsys.readouterr().err
    assert main(["stream", "--model", str(tmp_path / "model"), "--video", video, "--fps", "4"]) == 2
    assert "differs from the model's 2 fps" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_tiny_model_times_replies_better_than_random(tmp_path):
    """A few minutes on the CPU: the tiny videomod model learns when events happen (docs/STREAMING.md)."""
    train = load_records(make_synthetic_stream(tmp_path / "train", SynthSpec(num_videos=48, seed=1)))
    held_out = load_records(make_synthetic_stream(tmp_path / "eval", SynthSpec(num_videos=16, seed=2)))
    model, tokenizer = tiny_stream_model(hidden_size=64, frame_loss_weight=2.0)
    mllm_mod.retrofit(model, "videomod")
    spec = StreamTrainSpec(lora_r=0, max_steps=300, batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-3)
    model, _ = train_stream(model, tokenizer, train, tmp_path / "out", spec, progress=False)
    trained = evaluate_streaming(model, held_out, tokenizer, progress=False)
    random = random_timing_baseline(held_out, tokenizer, model.config)
    assert trained["time_diff"] < 0.5 * random["time_diff"], (trained, random)
    assert trained["lm_ppl"] < 2.0

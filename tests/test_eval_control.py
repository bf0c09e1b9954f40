"""The blank-image control: after a short training on the synthetic colour family, the model answers
from the picture, so the same questions over grey pictures score lower (slow: a few minutes on CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_mod.data.synth import families
from mllm_mod.eval.runner import ModelSpec, run_suite
from mllm_mod.eval.synthetic import vocabulary
from mllm_mod.tiny import tiny_model


def train_on_color(model, processor, steps: int, batch: int, seed: int = 1000) -> float:
    """A plain LM-loss loop on the answer token of the synthetic colour questions; returns the last loss."""
    family = families(30)["color"]
    processor.tokenizer.padding_side = "left"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        images, texts = [], []
        for i in range(batch):
            sample = family.make(np.random.default_rng([seed + step, i]), 30)
            content = [{"type": "image"}, {"type": "text", "text": sample.question}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            images.append(Image.fromarray(sample.media[0]))
            texts.append(f"{prompt} {sample.answer} </s>")
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -2:] = inputs["input_ids"][:, -2:]  # the answer word and </s>
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


@pytest.mark.slow
def test_blank_image_control_scores_lower_after_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    assert train_on_color(model, processor, steps=100, batch=16) < 1.0
    model.save_pretrained(tmp_path / "trained")
    processor.save_pretrained(tmp_path / "trained")
    spec = ModelSpec("trained", {"pretrained": str(tmp_path / "trained"), "dtype": "float32", "batch_size": 8})
    run_suite([spec], "synthetic", tmp_path / "report")
    (result,) = json.loads((tmp_path / "report" / "results.json").read_text())["models"]
    scores = result["scores"]
    assert scores["mllm_mod_color"] > scores["mllm_mod_color_blank"] + 0.2, scores
    assert scores["mllm_mod_color_mc"] > scores["mllm_mod_color_mc_blank"] + 0.2, scores

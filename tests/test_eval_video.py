"""Clips through the plugin: the synthetic video tasks (mp4 files) on a tiny LLaVA-OneVision with p-MoD,
generation and multiple choice checked against our own `generate` / forward calls on the same frames."""

from __future__ import annotations

import pytest
import torch

import mllm_mod
from mllm_mod.data import load_video
from mllm_mod.eval.synthetic import SYNTHETIC_VIDEO_TASKS, vocabulary, write_tasks
from mllm_mod.tiny import tiny_model

N_DOCS, FRAMES = 3, 8
STOPS = ("</s>", ".")


def video_prompt(processor, question: str) -> str:
    content = [{"type": "video"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_video_tasks_match_reference(tmp_path, monkeypatch):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from mllm_mod.eval.lmms_plugin import MoDLMM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, processor = tiny_model("llava_onevision", num_layers=4, words=vocabulary())
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    task_dir = write_tasks(tmp_path / "synthetic", n=N_DOCS, tasks=SYNTHETIC_VIDEO_TASKS)

    lm = MoDLMM(pretrained=str(tmp_path / "base"), preset="pmod", dtype="float32", batch_size=2, num_frames=FRAMES)
    tm = TaskManager("WARNING", include_path=str(task_dir), include_defaults=False)
    names = [t.name for t in SYNTHETIC_VIDEO_TASKS]
    res = evaluator.simple_evaluate(model=lm, tasks=names, task_manager=tm, log_samples=True)

    import datasets

    docs = datasets.load_from_disk(str(tmp_path / "synthetic" / "data" / "motion"))["test"]
    mllm_mod.retrofit(model, "pmod")
    processor.tokenizer.padding_side = "left"
    generations, predictions = [], []
    for doc in docs:
        frames = load_video(doc["video"], "ref", num_frames=FRAMES)
        prompt = video_prompt(processor, doc["question"])
        inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for stop in STOPS:
            text = text.split(stop)[0]
        generations.append(text.strip())
        nlls = []
        for choice in doc["choices"]:
            full = processor(text=[f"{prompt} {choice}"], videos=[frames], return_tensors="pt")
            n = len(processor.tokenizer(f"{prompt} {choice}").input_ids) - len(processor.tokenizer(prompt).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(**full).logits[0, :-1].float(), dim=-1)  # [T-1, V]
            nlls.append(float(-logp[-n:].gather(1, full["input_ids"][0, 1:][-n:, None]).sum()))
        predictions.append(min(range(len(nlls)), key=nlls.__getitem__))

    samples = {s["doc_id"]: s for s in res["samples"]["mllm_mod_motion"]}
    assert [samples[i]["filtered_resps"][0].strip() for i in range(N_DOCS)] == generations
    expected_em = sum(g == a for g, a in zip(generations, docs["answer"])) / N_DOCS
    assert res["results"]["mllm_mod_motion"]["exact_match,none"] == pytest.approx(expected_em)
    expected_acc = sum(p == label for p, label in zip(predictions, docs["label"])) / N_DOCS
    assert res["results"]["mllm_mod_motion_mc"]["acc,none"] == pytest.approx(expected_acc)
    summary = lm.meter.summary()
    assert summary["kv_bytes_per_sample"] > 0 and summary["prefill_tflops_per_sample"] > 0


def test_image_only_processor_refuses_clips(tmp_path):
    import numpy as np

    from mllm_mod.eval.lmms_plugin import MoDLMM

    model, processor = tiny_model("llava", num_layers=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = MoDLMM(pretrained=str(tmp_path), dtype="float32")
    clip = np.zeros((FRAMES, 30, 30, 3), dtype=np.uint8)
    with pytest.raises(NotImplementedError, match="takes no videos"):
        lm.generate_batch([lm.prompt("which object moved ?", [clip])], [[clip]], {"max_new_tokens": 2})

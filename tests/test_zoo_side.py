"""Side costs (issue #16): what each training-free method computes outside the decoder layers to choose its
tokens, measured per sample on the forwards it runs, checked against its formula by hand, equal for a sample
alone and in a left-padded batch, and reported apart from the decoder TFLOPs (efficiency table, eval report)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, make_inputs

import mllm_mod
from mllm_mod.eval.baselines import apply_baseline
from mllm_mod.eval.zoo import DARTSpec, DivPruneSpec, PDropSpec, VisionZipSpec, VTWSpec
from mllm_mod.tiny import tiny_model

D, Q, KV = 32, 32, 16  # tiny decoder: hidden, H * hd (4 x 8), Hkv * hd (2 x 8)
N_VISION = 25  # tiny LLaVA-1.5: 5 x 5 patches
METHODS = {
    "fastv": "fastv",
    "random": "random",
    "pdrop": PDropSpec((1, 2, 3), 0.5),
    "vtw": VTWSpec(2),
    "divprune": DivPruneSpec(0.3),
    "dart": DARTSpec(pruned_layer=2, reduction_ratio=0.5, pivot_image_token=2, pivot_text_token=2),
    "visionzip": VisionZipSpec(6, 3),
}


def row(tokens: int) -> int:
    """One ranking row: the query 2 D Q, the keys 2 T D KV, the scores 2 T Q."""
    return 2 * D * Q + 2 * tokens * D * KV + 2 * tokens * Q


def expected(method: str, n_text: int) -> int:
    t = n_text + N_VISION
    if method == "fastv":
        return row(t)
    if method == "pdrop":  # each boundary ranks over text + the tokens the previous stage kept: 25, 12, 6
        return sum(row(n_text + v) for v in (25, 12, 6))
    if method == "divprune":  # n x n distances, k = round(0.3 * 25) = 8 greedy updates
        return 2 * N_VISION**2 * D + 8 * N_VISION
    if method == "dart":  # keys, L1 norms, each pivot's similarities to the unclaimed tokens: 23, 20, 17, 14
        return 2 * t * D * KV + t * KV + 2 * (23 + 20 + 17 + 14) * D
    if method == "visionzip":  # CLS row, key metric, 17 merged tokens x 3 targets, their sum (vision width 32, hd 8)
        return 2 * 26 * 32 + 26 * 32 + 2 * 17 * 3 * 8 + 17 * 32
    return 0  # random, vtw


@pytest.mark.parametrize("method", list(METHODS))
def test_side_flops_by_hand_and_batch_equals_single(method):
    model, processor = tiny_model("llava", num_layers=4)
    apply_baseline(model, METHODS[method])
    batch = make_inputs(processor, n=2)
    report = mllm_mod.efficiency(model, batch)
    assert report.side_flops == [expected(method, t) for t in report.n_text]
    images = make_images()
    for i in range(2):
        alone = mllm_mod.efficiency(model, processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt"))
        assert alone.side_flops == [report.side_flops[i]]
    assert report.side_tflops == pytest.approx(sum(report.side_flops) / 2 / 1e12)
    assert report.side_tflops < report.mean(report.mod_tflops)  # reported apart, not folded into the decoder's


def test_side_cost_reaches_the_eval_report(tmp_path):
    from mllm_mod.eval.report import ModelResult, write_report
    from mllm_mod.eval.runner import side_cost
    from mllm_mod.eval.suites import SuiteTask

    model, processor = tiny_model("llava", num_layers=4)
    assert side_cost(model) == {"side_tflops_per_sample": 0.0}  # the stock model computes nothing aside
    apply_baseline(model, "fastv")
    batch = make_inputs(processor, n=2)
    with torch.no_grad():
        model(**batch)
        model(**batch)
    n_text = (batch["attention_mask"].sum(1) - N_VISION).tolist()
    mean = sum(expected("fastv", t) for t in n_text) / 2
    side = side_cost(model)
    assert side["side_tflops_per_sample"] == pytest.approx(mean / 1e12)
    tasks = (SuiteTask("a", "acc"),)
    efficiency = {"prefill_tflops_per_sample": 1e-6, **side}
    text = write_report([ModelResult("fastv", tasks, {"a": 0.5}, efficiency, {"preset": "fastv"})], tmp_path).read_text()
    assert "side TFLOPs/sample" in text and f"{mean / 1e12:.3g}" in text

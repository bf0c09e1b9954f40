"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dynamic resolution, M-RoPE, Qwen3-VL's DeepStack) keep the invariants
of DESIGN.md section 6 with their real classes and processors: ratio 1 == dense, cached == uncached and a
left-padded batch == each sample alone at the logit level, text + trunc(r * n_vision) tokens per MoD layer
(measured == accounted), videos, exact save/reload; ``positions="renumber"`` is refused (M-RoPE)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_routers
from logits import (
    assert_batch_equals_single,
    assert_cached_equals_uncached,
    assert_logits_close,
    assert_prompt_equals_single,
    assert_ratio_one_equals_dense,
)
from PIL import Image

import mllm_mod
from mllm_mod.efficiency import efficiency
from mllm_mod.flops import kept_tokens
from mllm_mod.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
DECODERS = {"qwen2_vl": "Qwen2VLTextModel", "qwen2_5_vl": "Qwen2_5_VLTextModel", "qwen3_vl": "Qwen3VLTextModel"}
# 4-px patches, 2 x 2 merged: (h / 8) * (w / 8) placeholders per image, so each sample has its own count
IMAGE_SIZES = [(32, 32), (32, 48), (64, 40)]
N_VISION = [16, 24, 40]
QUESTIONS = ["what color is the object ?", "how many objects are there in the picture ?", "is there a red circle ?"]
IMAGE = "<|vision_start|><image><|vision_end|>"


def qwen_inputs(processor, samples=(0, 1, 2), padding_side: str = "left") -> dict:
    """The processor's batch, one picture per prompt: ids, ``mm_token_type_ids``, patches, ``image_grid_thw``."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    processor.tokenizer.padding_side = padding_side
    texts = [f"USER : {IMAGE} {QUESTIONS[i]} ASSISTANT :" for i in samples]
    return dict(processor(images=[[pictures[i]] for i in samples], text=texts, return_tensors="pt", padding=True))


def video_inputs(processor, family: str) -> dict:
    """One 4-frame 32-px clip (2 temporal patches of 16 placeholders) and a question."""
    frames = np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    video = "<video>" if family == "qwen3_vl" else "<|vision_start|><video><|vision_end|>"  # Qwen3-VL's processor adds the markers per frame
    extra = {"video_metadata": [{"fps": 2.0, "total_num_frames": 4}]} if family == "qwen3_vl" else {}
    return dict(processor(videos=[frames], text=[f"USER : {video} what moved first ? ASSISTANT :"], return_tensors="pt", **extra))


def n_vision(model, inputs: dict) -> list[int]:
    ids = torch.tensor(mllm_mod.adapter_for(model).vision_token_ids(model.config))
    mask = inputs["attention_mask"].bool()
    return (torch.isin(inputs["input_ids"], ids) & mask).sum(1).tolist()


def pmod_model(family: str, attn: str = "sdpa", **overrides):
    model, processor = tiny_model(family, num_layers=4, attn=attn)
    mllm_mod.retrofit(model, "pmod", **overrides)  # 4 layers: layer 0 dense, 1-3 at 0.75, 0.25, 0.15
    randomize_routers(model)
    return model, processor


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_the_real_class_with_dynamic_resolution(family):
    model, processor = tiny_model(family)
    adapter = mllm_mod.adapter_for(model)
    assert type(adapter.decoder(model)).__name__ == DECODERS[family]
    assert adapter.vision_tower(model) is model.model.visual
    inputs = qwen_inputs(processor)
    assert n_vision(model, inputs) == N_VISION
    assert inputs["image_grid_thw"].tolist() == [[1, h // 4, w // 4] for h, w in IMAGE_SIZES]


@pytest.mark.parametrize(
    "family, attn", [("qwen2_vl", "eager"), ("qwen2_vl", "sdpa"), ("qwen2_5_vl", "sdpa"), ("qwen3_vl", "eager"), ("qwen3_vl", "sdpa")]
)
def test_ratio_one_equals_dense(family, attn):
    model, processor = tiny_model(family, attn=attn)
    assert_ratio_one_equals_dense(model, qwen_inputs(processor), f"ratio 1 == dense ({family}, {attn})")


@pytest.mark.parametrize("family, attn", [("qwen2_vl", "eager"), ("qwen2_vl", "sdpa"), ("qwen2_5_vl", "sdpa"), ("qwen3_vl", "sdpa")])
def test_cached_equals_uncached(family, attn):
    """The stock model keeps ``rope_deltas`` from the prefill for the decoding positions; the MoD layers'
    compact caches report the full sequence length, so those positions are the dense model's."""
    model, processor = pmod_model(family, attn)
    assert_cached_equals_uncached(model, qwen_inputs(processor), 5, f"cached == uncached (pmod, {family}, {attn})")


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(family):
    """Left padding, 16 / 24 / 40 vision tokens: the M-RoPE positions of a padded row are its own."""
    model, processor = pmod_model(family)
    batch = qwen_inputs(processor)
    singles = [qwen_inputs(processor, [i]) for i in range(3)]
    check = f"left-padded batch == alone (pmod, {family})"
    assert_batch_equals_single(model, batch, singles, 5, check)
    assert_prompt_equals_single(model, batch, singles, check)  # every real prompt position too


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_kept_tokens_and_kv_entries_follow_each_samples_vision_count(family):
    model, processor = pmod_model(family, "eager")
    inputs = qwen_inputs(processor)
    report = efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    assert report.n_vision == N_VISION
    ratios = mllm_mod.layer_ratios(model)
    assert ratios == pytest.approx([1.0, 0.75, 0.25, 0.15])
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):  # text + trunc(r * n_vision), per layer
        expected = kept_tokens(ratios, t, v)
        assert expected[1:] == [t + int(r * v) for r in ratios[1:]]
        assert [layer[b] for layer in report.kept_per_layer] == expected
        assert [layer[b] for layer in report.kv_entries_per_layer] == expected


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_video(family):
    """Video placeholders compete like image ones (Qwen3-VL: one run per temporal patch, so one group per frame)."""
    model, processor = tiny_model(family, attn="sdpa")
    inputs = video_inputs(processor, family)
    assert "pixel_values_videos" in inputs and inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert n_vision(model, inputs) == [32]
    with torch.no_grad():
        dense = model(**inputs).logits
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=1.0)
    with torch.no_grad():
        assert_logits_close(model(**inputs).logits, dense, f"ratio 1 == dense, video ({family})")
    mllm_mod.unload(model)
    mllm_mod.retrofit(model, "pmod")
    randomize_routers(model)
    report = efficiency(model, inputs)
    assert report.accounting_matches and report.n_vision == [32]
    assert [layer[0] for layer in report.kept_per_layer] == kept_tokens(mllm_mod.layer_ratios(model), report.n_text[0], 32)
    assert_cached_equals_uncached(model, inputs, 4, f"cached == uncached, video (pmod, {family})")
    # groups: one per temporal patch (Qwen2-VL: sized by video_grid_thw; Qwen3-VL: one run each)
    adapter = mllm_mod.adapter_for(model)
    groups = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"], inputs=inputs).groups
    video = inputs["input_ids"] == model.config.video_token_id
    frames = groups[video]
    assert frames.unique().numel() == 2 and torch.equal(frames[:16], frames[:1].expand(16)) and bool((frames[16:] != frames[0]).all())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_videomod_keeps_per_frame_counts_on_a_left_padded_image_and_video_batch(family):
    """Per-group top-k (`selection="group"`): ceil(r * 16) tokens of each 16-token temporal patch and of each
    image; a left-padded batch of an image prompt and a video prompt == each alone."""
    model, processor = tiny_model(family, num_layers=4)
    mllm_mod.retrofit(model, "pmod", selection="group")
    randomize_routers(model)
    clip = video_inputs(processor, family)
    picture = qwen_inputs(processor, [1])
    width = max(clip["input_ids"].shape[1], picture["input_ids"].shape[1])

    def pad(x, value):  # left padding to `width`
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    batch = {k: torch.cat([pad(picture[k], 0), pad(clip[k], 0)]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch.update({k: v for k, v in {**picture, **clip}.items() if k not in batch})
    ctx = mllm_mod.adapter_for(model).routing_context(model, batch["input_ids"], None, batch["attention_mask"], inputs=batch)
    video = batch["input_ids"] == model.config.video_token_id
    assert ctx.groups[1][video[1]].unique().numel() == 2 and ctx.groups[0][video[0]].numel() == 0
    report = efficiency(model, batch)
    assert report.accounting_matches, report.mismatches
    for layer, ratio in zip(report.kept_per_layer, mllm_mod.layer_ratios(model)):
        r = np.float32(ratio)  # ceil(r * n) in float32, as select.py
        assert layer == [report.n_text[0] + int(np.ceil(r * 24)), report.n_text[1] + 2 * int(np.ceil(r * 16))]
    assert_prompt_equals_single(model, batch, [picture, clip], f"image + video batch == alone (group, {family})")
    assert_cached_equals_uncached(model, clip, 3, f"cached == uncached, video (group, {family})")


@pytest.mark.parametrize("family", FAMILIES)
def test_renumbered_positions_are_refused_and_gmod_runs_with_original_positions(family):
    """gamma-MoD on each Qwen VL family: ARank calibration on the family (eager attention maps over M-RoPE
    prompts), then the shared router with original positions."""
    from mllm_mod.arank import arank

    model, processor = tiny_model(family, num_layers=4)
    name = "Qwen3-VL" if family == "qwen3_vl" else "Qwen2-VL / Qwen2.5-VL"
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: positions='renumber' is not supported \(M-RoPE"):
        mllm_mod.retrofit(model, "gmod")  # the gmod preset renumbers, as gamma-MoD's reference
    assert not hasattr(model, "mod_state")  # refused before anything changed
    inputs = qwen_inputs(processor)
    report = arank(model, [inputs], progress=False)
    assert report.samples == 3 and len(report.layer_arank) == 4
    longest = int(inputs["attention_mask"].sum(1).max())
    assert all(0 < a < longest for a in report.layer_arank)  # numerical ranks of the [S, S] maps, diagonal zeroed
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"  # restored after calibration
    mllm_mod.retrofit(model, "gmod", arank=report, positions="original", threshold=0.5, decode_threshold=0.5)
    assert [i for i, r in enumerate(mllm_mod.layer_ratios(model)) if r == 1.0] == report.dense_layers()
    randomize_routers(model, scale=2.0)
    assert efficiency(model, inputs).accounting_matches
    assert_cached_equals_uncached(model, inputs, 4, f"cached == uncached (gmod, original positions, {family})")


def reloaded_logits(root, family: str, kind: str) -> torch.Tensor:
    """A fresh stock tiny model with the MoD adapter (``kind="adapter"``) or the full checkpoint reloaded."""
    model, processor = tiny_model(family, num_layers=4, seed=0)
    path = f"{root}/{family}-{kind}"
    model = mllm_mod.load_mod(model, path) if kind == "adapter" else mllm_mod.from_pretrained(path)
    with torch.no_grad():
        return model(**qwen_inputs(processor)).logits


def saved(root) -> dict[str, torch.Tensor]:
    """Each family's retrofitted tiny model saved both ways under `root`; its logits per family."""
    expected = {}
    for family in FAMILIES:
        model, processor = pmod_model(family)
        with torch.no_grad():
            expected[family] = model(**qwen_inputs(processor)).logits
        mllm_mod.save_mod(model, root / f"{family}-adapter")
        model.save_pretrained(root / f"{family}-full")
    return expected


def test_save_and_reload(tmp_path):
    """save_mod -> load_mod and save_pretrained -> mllm_mod.from_pretrained reproduce the logits exactly."""
    expected = saved(tmp_path)
    for family in FAMILIES:
        for kind in ("adapter", "full"):
            assert torch.equal(reloaded_logits(tmp_path, family, kind), expected[family]), f"{family} {kind}"


RELOAD_SCRIPT = """
import sys, torch
from test_qwen_vl import FAMILIES, reloaded_logits
for family in FAMILIES:
    for kind in ("adapter", "full"):
        torch.save(reloaded_logits(sys.argv[1], family, kind), f"{sys.argv[1]}/{family}-{kind}.pt")
"""


@pytest.mark.slow
def test_save_and_reload_in_a_fresh_process(tmp_path):
    """The same in a fresh process (no state of the saving process, e.g. the model's ``rope_deltas``)."""
    expected = saved(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path)], check=True, env=env)
    for family in FAMILIES:
        for kind in ("adapter", "full"):
            assert torch.equal(torch.load(tmp_path / f"{family}-{kind}.pt"), expected[family]), f"{family} {kind}"


def test_qwen3_vl_deepstack_reaches_kept_and_skipped_vision_tokens():
    """DeepStack adds vision features after decoder layers 0 and 1 (here), between layers, on the full-length
    hidden states: after MoD layer 1 every vision token -- kept or skipped -- gets its features, text none."""
    model, processor = pmod_model("qwen3_vl")
    layers = mllm_mod.adapter_for(model).layers(model)
    assert isinstance(layers[1], mllm_mod.MoDLayer) and len(model.config.vision_config.deepstack_visual_indexes) == 2
    seen = {}
    hooks = [
        layers[1].register_forward_hook(lambda m, a, k, out: seen.__setitem__("out", out), with_kwargs=True),
        layers[2].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", a[0] if a else k["hidden_states"]), with_kwargs=True),
    ]
    inputs = qwen_inputs(processor)
    ctx = mllm_mod.adapter_for(model).routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    ctx.stats = []
    with torch.no_grad():
        model(**inputs, mod_routing=ctx)
    for h in hooks:
        h.remove()
    added = (seen["in"] - seen["out"]).abs().amax(-1)  # [B, T]
    vision = inputs["input_ids"] == model.config.image_token_id
    kept = next(s for s in ctx.stats if s.layer_idx == 1).kept
    assert bool((kept < inputs["attention_mask"].sum(1)).all())  # layer 1 skipped some vision tokens of every sample
    assert bool((added[vision] > 0).all()) and bool((added[~vision] == 0).all())


@pytest.mark.parametrize("name, layers, dense_layers", [("qwen2.5-vl-7b", 28, 7), ("qwen3-vl-8b", 36, 9)])
def test_profile_config_only_reference_shapes(name, layers, dense_layers, capsys):
    """The real 7B / 8B shapes on the meta device: PRD with pi / (L - 1) keeps the layers with R(i) > 0.85
    dense; the profile prints dense vs MoD TFLOPs and KV bytes from the same accounting."""
    from transformers import AutoModelForImageTextToText

    from mllm_mod.cli import main
    from mllm_mod.flops import DecoderShape, prefill_cost
    from mllm_mod.reference_shapes import REFERENCE_SHAPES

    ref = REFERENCE_SHAPES[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(ref.config())
    assert mllm_mod.adapter_for(model).name.startswith("Qwen")
    mllm_mod.retrofit(model, "pmod")
    ratios = mllm_mod.layer_ratios(model)
    assert len(ratios) == layers and ratios[:dense_layers] == [1.0] * dense_layers and ratios[dense_layers] < 0.85
    shape = DecoderShape.from_config(mllm_mod.adapter_for(model).text_config(model.config))
    dense = prefill_cost(shape, [1.0] * layers, ref.n_text, ref.n_vision, 2)
    mod = prefill_cost(shape, ratios, ref.n_text, ref.n_vision, 2)
    assert main(["profile", name, "--config-only"]) == 0
    out = capsys.readouterr().out
    assert f"{layers} layers, 1024 vision + 64 text tokens" in out
    assert f"| prefill TFLOPs / sample | {dense.tflops:.3f} | {mod.tflops:.3f} |" in out
    assert 0.5 < mod.kv_bytes / dense.kv_bytes < 0.6 and 0.5 < mod.tflops / dense.tflops < 0.6


@pytest.mark.slow
def test_train_cli_on_llava_json_through_the_qwen2_vl_processor(tmp_path):
    """`mllm-mod train` on the synthetic LLaVA JSON through Qwen2-VL's own processor (``mm_token_type_ids``
    and ``image_grid_thw`` collated with the ids), labels on the answer only, the vision tower frozen."""
    from transformers import AutoProcessor

    from mllm_mod.cli import main
    from mllm_mod.data import IGNORE_INDEX, ConversationDataset, DataOptions
    from mllm_mod.data.synth import generate, vocabulary

    generate(tmp_path / "synth", 8, seed=0, only=["color", "count"], progress=False)
    model, processor = tiny_model("qwen2_vl", num_layers=4, words=vocabulary())
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    processor = AutoProcessor.from_pretrained(tmp_path / "base")
    data = ConversationDataset(tmp_path / "synth" / "train.json", processor, DataOptions(image_folder=str(tmp_path / "synth")))
    item = data[0]
    ids, labels = item["input_ids"], item["labels"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    answer = len(tokens) - tokens[::-1].index("ASSISTANT") + 1  # first token after the last "ASSISTANT :"
    assert torch.equal(labels[answer:], ids[answer:]) and bool((labels[:answer] == IGNORE_INDEX).all())
    assert int((ids == model.config.image_token_id).sum()) == int(item["image_grid_thw"].prod()) // 4
    argv = ["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "synth" / "train.json"), "--image-folder",
            str(tmp_path / "synth"), "--output-dir", str(tmp_path / "out"), "--preset", "pmod", "batch_size=4", "num_workers=0",
            "max_steps=2", "gradient_checkpointing=false", "progress=false", "bf16=false", "freeze_vision_tower=true"]
    assert main(argv) == 0
    trained = mllm_mod.from_pretrained(tmp_path / "out")
    assert trained.config.model_type == "qwen2_vl" and mllm_mod.layer_ratios(trained)[1] < 1.0
    base = type(trained).from_pretrained(tmp_path / "base")
    for (name, before), after in zip(base.model.visual.state_dict().items(), trained.model.visual.state_dict().values()):
        assert torch.equal(before, after), name  # frozen

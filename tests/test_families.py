"""Beyond LLaVA: InternVL (tiles) and Idefics3 / SmolVLM (sub-images + a global view) keep the invariants of
DESIGN.md section 6 with their real classes and processors: ratio 1 == dense, cached == uncached and a
left-padded batch == each sample alone at the logit level, text + trunc(r * n_vision) tokens per MoD layer
(measured == accounted, FLOPs and KV entries), exact save/reload, p-MoD and gamma-MoD (ARank)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_routers
from logits import (
    assert_batch_equals_single,
    assert_cached_equals_uncached,
    assert_prompt_equals_single,
    assert_ratio_one_equals_dense,
)
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import mllm_mod
from mllm_mod.arank import arank
from mllm_mod.efficiency import efficiency
from mllm_mod.flops import DecoderShape, kept_tokens, prefill_cost
from mllm_mod.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["internvl", "idefics3", "smolvlm"]
DECODERS = {"internvl": "Qwen2Model", "idefics3": "LlamaModel", "smolvlm": "LlamaModel"}
# 20 px: one tile / no split; the others several tiles (InternVL: by aspect ratio, up to 6 + a thumbnail;
# Idefics3 / SmolVLM: a grid of 24-px sub-images + the global view), so every sample has its own count
IMAGE_SIZES = [(20, 20), (30, 30), (40, 70), (70, 35)]
SAMPLES = [  # (images of the sample, question): two images in the first prompt
    ((0, 2), "what color is the object ?"),
    ((1,), "how many objects are there in the picture ?"),
    ((3,), "is there a red circle ?"),
]
# placeholders per sample as the stock processors count them, 9 per tile / sub-image. InternVL: 1 tile for
# 20 px, 6 + a thumbnail for 40x70 | 1 | 2 + thumbnail. Idefics3 / SmolVLM: global only for 20 px, 2x2 + global
# for 40x70 | 2x2 + global | 2x1 + global
N_VISION = {"internvl": [72, 9, 27], "idefics3": [90, 45, 27], "smolvlm": [90, 45, 27]}


def family_inputs(processor, family: str, samples=SAMPLES, padding_side: str = "left") -> dict:
    """The processor's batch for `samples` ([B, T] ids; InternVL: [tiles, C, H, W] pixels; Idefics3 /
    SmolVLM: [B, images, C, H, W] sub-image pixels)."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    token = processor.image_token
    texts = [f"USER : {' '.join([token] * len(idx))} {q} ASSISTANT :" for idx, q in samples]
    nested = [[pictures[i] for i in idx] for idx, _ in samples]
    images = [p for row in nested for p in row] if family == "internvl" else nested  # InternVL takes a flat list
    processor.tokenizer.padding_side = padding_side
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def alone(processor, family: str) -> list[dict]:
    """Each sample of `SAMPLES` processed alone (no padding)."""
    return [family_inputs(processor, family, [s]) for s in SAMPLES]


def n_vision(model, inputs: dict) -> list[int]:
    ids = torch.tensor(mllm_mod.adapter_for(model).vision_token_ids(model.config))
    return (torch.isin(inputs["input_ids"], ids) & inputs["attention_mask"].bool()).sum(1).tolist()


def pmod_model(family: str, attn: str = "sdpa", num_layers: int = 4):
    model, processor = tiny_model(family, num_layers=num_layers, attn=attn)
    mllm_mod.retrofit(model, "pmod")  # 4 layers: layer 0 dense, 1-3 at 0.75, 0.25, 0.15
    randomize_routers(model)
    return model, processor


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_the_real_class_with_tiles(family):
    model, processor = tiny_model(family)
    assert type(mllm_mod.adapter_for(model).decoder(model)).__name__ == DECODERS[family]
    inputs = family_inputs(processor, family)
    assert n_vision(model, inputs) == N_VISION[family]
    tiles = inputs["pixel_values"].shape[0] if family == "internvl" else int(inputs["pixel_attention_mask"].any(-1).any(-1).sum())
    assert tiles == sum(N_VISION[family]) // 9  # 9 placeholders per tile / sub-image


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_equals_dense(family, attn):
    model, processor = tiny_model(family, attn=attn)
    assert_ratio_one_equals_dense(model, family_inputs(processor, family), f"ratio 1 == dense ({family}, {attn})")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_uncached(family, attn):
    model, processor = pmod_model(family, attn)
    assert_cached_equals_uncached(model, family_inputs(processor, family), 5, f"cached == uncached (pmod, {family})")


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(family):
    model, processor = pmod_model(family)
    batch, singles = family_inputs(processor, family), alone(processor, family)
    check = f"left-padded batch == alone (pmod, {family})"
    assert_batch_equals_single(model, batch, singles, 5, check)
    assert_prompt_equals_single(model, batch, singles, check)  # every real prompt position too


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_kv_entries_and_flops_match_the_accounting(family):
    model, processor = pmod_model(family, "eager")  # the FLOP counter sees eager attention's matmuls
    inputs = family_inputs(processor, family)
    report = efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    assert report.n_vision == N_VISION[family]
    ratios = mllm_mod.layer_ratios(model)
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):  # text + trunc(r * n_vision), per layer
        expected = kept_tokens(ratios, t, v)
        assert [layer[b] for layer in report.kept_per_layer] == expected
        assert [layer[b] for layer in report.kv_entries_per_layer] == expected
    # FLOPs: FlopCounterMode on the decoder of one (unpadded) sample with two images == flops.py
    one = family_inputs(processor, family, SAMPLES[:1])
    decoder = mllm_mod.adapter_for(model).decoder(model)
    name = next(n for n, m in model.named_modules() if m is decoder)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**one, use_cache=False)
    counts = counter.get_flop_counts()
    flops = {k.split(".", 1)[-1]: sum(v.values()) for k, v in counts.items()}  # keys: "<Class>.<module path>"
    measured = flops[name] - flops.get(f"{name}.rotary_emb", 0)  # RoPE's outer product is not accounted
    shape = DecoderShape.from_config(mllm_mod.adapter_for(model).text_config(model.config))
    v = N_VISION[family][0]
    assert measured == prefill_cost(shape, ratios, one["input_ids"].shape[1] - v, v).decoder_flops


RELOAD_SCRIPT = """
import sys, torch, mllm_mod
from mllm_mod.tiny import tiny_model
from test_families import FAMILIES, family_inputs
root = sys.argv[1]
for family in FAMILIES:
    for kind in ("adapter", "full"):
        model, processor = tiny_model(family, num_layers=4, seed=0)
        path = f"{root}/{family}-{kind}"
        model = mllm_mod.load_mod(model, path) if kind == "adapter" else mllm_mod.from_pretrained(path)
        with torch.no_grad():
            torch.save(model(**family_inputs(processor, family)).logits, f"{path}.pt")
"""


def test_save_and_reload_in_a_fresh_process(tmp_path):
    """save_mod -> load_mod and save_pretrained -> mllm_mod.from_pretrained, in one fresh process for all."""
    expected = {}
    for family in FAMILIES:
        model, processor = pmod_model(family)
        with torch.no_grad():
            expected[family] = model(**family_inputs(processor, family)).logits
        mllm_mod.save_mod(model, tmp_path / f"{family}-adapter")
        model.save_pretrained(tmp_path / f"{family}-full")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path)], check=True, env=env)
    for family in FAMILIES:
        for kind in ("adapter", "full"):
            assert torch.equal(torch.load(tmp_path / f"{family}-{kind}.pt"), expected[family]), f"{family} {kind}"


@pytest.mark.parametrize("family", FAMILIES)
def test_gmod_from_an_arank_calibration(family, tmp_path):
    model, processor = tiny_model(family, num_layers=6)
    inputs = family_inputs(processor, family)
    report = arank(model, [inputs], progress=False)
    assert report.samples == 3 and len(report.layer_arank) == 6
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"  # restored
    # one threshold for prefill and decoding: the reference's two (0.005 / 0.5) judge a token differently when
    # uncached recomputation re-prefills it (docs/DESIGN.md, gamma-MoD differences)
    mllm_mod.retrofit(model, "gmod", arank=report, threshold=0.5, decode_threshold=0.5)
    ratios = mllm_mod.layer_ratios(model)
    assert [i for i, r in enumerate(ratios) if r == 1.0] == report.dense_layers()  # 1 of 6 stays dense
    randomize_routers(model, scale=2.0)
    effect = efficiency(model, inputs)  # threshold routing: data-dependent counts, measured == cache
    assert effect.accounting_matches, effect.mismatches
    assert_cached_equals_uncached(model, inputs, 4, f"cached == uncached (gmod, {family})")


def test_profile_config_only_reference_shapes(capsys):
    """InternVL3-8B (28 layers) and SmolVLM (24 layers) on the meta device: PRD uses pi / (L - 1); the
    profile prints dense vs MoD TFLOPs and KV bytes from the same accounting."""
    import math

    from transformers import AutoModelForImageTextToText

    from mllm_mod.cli import main
    from mllm_mod.reference_shapes import REFERENCE_SHAPES

    for name, layers in (("internvl3-8b", 28), ("smolvlm-2b", 24)):
        ref = REFERENCE_SHAPES[name]
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(ref.config())
        mllm_mod.retrofit(model, "pmod")
        curve = [0.5 * math.cos(i * math.pi / (layers - 1)) + 0.5 for i in range(layers)]
        assert mllm_mod.layer_ratios(model) == pytest.approx([1.0 if r > 0.85 else max(r, 0.15) for r in curve])
        shape = DecoderShape.from_config(mllm_mod.adapter_for(model).text_config(model.config))
        dense = prefill_cost(shape, [1.0] * layers, ref.n_text, ref.n_vision, 2)
        mod = prefill_cost(shape, mllm_mod.layer_ratios(model), ref.n_text, ref.n_vision, 2)
        assert main(["profile", name, "--config-only"]) == 0
        out = capsys.readouterr().out
        assert f"{layers} layers, {ref.n_vision} vision + 64 text tokens" in out
        assert f"| prefill TFLOPs / sample | {dense.tflops:.3f} | {mod.tflops:.3f} |" in out
        assert 0.5 < mod.kv_bytes / dense.kv_bytes < 0.6 and 0.5 < mod.tflops / dense.tflops < 0.6


def test_unsupported_family_is_refused_listing_the_supported_ones():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = dict(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    with pytest.raises(
        ValueError,
        match=r"'paligemma' is not supported; supported families: Gemma 3 \(gemma3\), Idefics3 / SmolVLM \(idefics3/smolvlm\), "
        r"InternVL \(internvl\), LLaVA-1.5.*Qwen2-VL / Qwen2.5-VL \(qwen2_vl/qwen2_5_vl\), Qwen3-VL \(qwen3_vl\)",
    ):
        mllm_mod.retrofit(model, "pmod")
    assert not hasattr(model, "mod_state")


def test_gemma3_is_supported():
    """Gemma 3 is retrofitted (its invariants are in tests/test_gemma3.py): the real class, its decoder and tower."""
    from mllm_mod.tiny import gemma3_model

    model = gemma3_model(num_layers=2)
    adapter = mllm_mod.adapter_for(model)
    assert adapter.name == "Gemma 3" and adapter.vision_tower(model) is model.model.vision_tower
    mllm_mod.retrofit(model, "pmod", schedule="constant", ratio=0.5)
    assert all(isinstance(layer, mllm_mod.MoDLayer) for layer in adapter.layers(model))


# -- fine-tuning and evaluation through the family's own processor --------------------------------------
@pytest.fixture(scope="module")
def synth_and_bases(tmp_path_factory):
    """Synthetic LLaVA-JSON data and eval tasks, and a saved stock tiny model + processor per family."""
    from mllm_mod.data.synth import generate, vocabulary
    from mllm_mod.eval.synthetic import vocabulary as eval_vocabulary
    from mllm_mod.eval.synthetic import write_tasks

    root = tmp_path_factory.mktemp("families")
    generate(root / "synth", 8, seed=0, only=["color", "count"], progress=False)
    tasks = write_tasks(root / "tasks", n=3)
    bases = {}
    for family in FAMILIES:
        model, processor = tiny_model(family, num_layers=4, words=[*vocabulary(), *eval_vocabulary()])
        bases[family] = root / family
        model.save_pretrained(bases[family])
        processor.save_pretrained(bases[family])
    return root, tasks, bases


@pytest.mark.parametrize("family", FAMILIES)
def test_train_cli_on_llava_json_through_the_family_processor(family, synth_and_bases, tmp_path):
    from transformers import AutoProcessor

    from mllm_mod.cli import main
    from mllm_mod.data import IGNORE_INDEX, ConversationDataset, DataOptions

    root, _, bases = synth_and_bases
    processor = AutoProcessor.from_pretrained(bases[family])
    data = ConversationDataset(root / "synth" / "train.json", processor, DataOptions(image_folder=str(root / "synth")))
    for item in (data[0], data[1]):  # labels: the answer and its end of turn, after the last "ASSISTANT :"
        ids, labels = item["input_ids"], item["labels"]
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        answer = len(tokens) - tokens[::-1].index("ASSISTANT") + 1  # first token after "ASSISTANT :"
        assert torch.equal(labels[answer:], ids[answer:]) and tokens[-1] == "</s>"
        assert bool((labels[:answer] == IGNORE_INDEX).all())
        n_vision = int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
        assert n_vision > 0 and n_vision % 9 == 0  # whole tiles / sub-images
    # the vision tower is found through the adapter (Idefics3 / SmolVLM keep it under `vision_model`) and frozen
    argv = ["train", "--model", str(bases[family]), "--data", str(root / "synth" / "train.json"), "--image-folder",
            str(root / "synth"), "--output-dir", str(tmp_path / "out"), "--preset", "pmod", "batch_size=4", "num_workers=0",
            "max_steps=2", "gradient_checkpointing=false", "progress=false", "bf16=false", "freeze_vision_tower=true"]
    assert main(argv) == 0
    trained = mllm_mod.from_pretrained(tmp_path / "out")
    assert trained.config.model_type == family and mllm_mod.layer_ratios(trained)[1] < 1.0
    base = type(trained).from_pretrained(bases[family])
    tower = mllm_mod.adapter_for(trained).vision_tower
    for (name, before), after in zip(tower(base).state_dict().items(), tower(trained).state_dict().values()):
        assert torch.equal(before, after), name  # frozen


@pytest.mark.parametrize(
    "family",
    [
        "internvl",
        "idefics3",
        "smolvlm",
    ],
)
def test_lmms_eval_plugin_on_synthetic_tasks(family, synth_and_bases, monkeypatch):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from mllm_mod.eval.lmms_plugin import MoDLMM

    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)
    _, tasks, bases = synth_and_bases
    lm = MoDLMM(pretrained=str(bases[family]), preset="pmod", dtype="float32", batch_size="3", max_new_tokens=4)
    manager = TaskManager("WARNING", include_path=str(tasks), include_defaults=False)
    res = evaluator.simple_evaluate(
        model=lm, tasks=["mllm_mod_color", "mllm_mod_color_mc"], task_manager=manager, log_samples=True
    )
    assert mllm_mod.layer_ratios(lm.model)[1] < 1.0  # the plugin evaluated the retrofitted model
    assert sorted(s["doc_id"] for s in res["samples"]["mllm_mod_color"]) == [0, 1, 2]
    # batched generation through the plugin (left padding, one batch of 3) == each prompt alone
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES[1:]]
    items = [(lm.prompt(q, [p]), [p], {"max_new_tokens": 4}) for (_, q), p in zip(SAMPLES, pictures)]
    assert lm.generate_items(items) == [lm.generate_items([item])[0] for item in items]
    for s in res["samples"]["mllm_mod_color_mc"]:  # loglikelihood: (nll, is_greedy) per choice, NLLs > 0
        assert all(isinstance(r[0][0], float) and r[0][0] > 0 and isinstance(r[0][1], bool) for r in s["resps"])
    assert "acc,none" in res["results"]["mllm_mod_color_mc"]

"""The training-free methods on InternVL (tiles, Qwen2 decoder) and Qwen2.5-VL (dynamic resolution, M-RoPE)
tiny models of the real classes: each method's kept tokens and KV entries per layer (measured == accounted,
different vision counts per sample, left padding), a left-padded batch == each sample alone and cached ==
uncached generation on the logits; on Qwen2.5-VL the shortened sequence keeps its tokens' gathered M-RoPE
positions (DivPrune pinned against the stock decoder run on the shortened embeddings at the gathered 3-D
position ids); VisionZip refused with its reason (tests/test_zoo_visionzip.py).

Gemma 3 (its own processor: 16-token images with ``token_type_ids``, 12-token sliding windows): random drop and
VTW run (kept tokens == accounted, batch == alone, cached == uncached); FastV, PyramidDrop and DART are refused
(their rankings recompute Llama-style attention, and Gemma 3 normalizes queries and keys), DivPrune (its shorter
sequence's positions are renumbered, but the MoD layers measure the sliding window in original positions: past
the window that is neither the shorter sequence's forward nor the stock model's, 0.5 in the logits when it was
allowed), VisionZip too (SigLIP has no CLS token)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from logits import assert_batch_equals_single, assert_cached_equals_uncached, assert_logits_close
from test_families import SAMPLES, family_inputs
from test_qwen_vl import qwen_inputs

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.compat import output_cache
from mllm_mod.eval.baselines import apply_baseline
from mllm_mod.eval.zoo import DARTSpec, DivPruneSpec, PDropSpec, VisionZipSpec, VTWSpec
from mllm_mod.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["internvl", "qwen2_5_vl"]
DART = DARTSpec(pruned_layer=2, reduction_ratio=0.5, pivot_image_token=2, pivot_text_token=2)
METHODS = {"fastv": "fastv", "random": "random", "pdrop": PDropSpec((1, 2, 3), 0.5), "vtw": VTWSpec(2),
           "divprune": DivPruneSpec(0.3), "dart": DART}  # fmt: skip
GENERATION = [(f, m) for f in FAMILIES for m in METHODS]  # ~0.4 s each


def inputs_of(family: str, processor, samples=None) -> dict:
    if family == "internvl":
        return family_inputs(processor, family) if samples is None else family_inputs(processor, family, samples)
    return qwen_inputs(processor) if samples is None else qwen_inputs(processor, samples)


def alone_of(family: str, processor) -> list[dict]:
    if family == "internvl":
        return [family_inputs(processor, family, [s]) for s in SAMPLES]
    return [qwen_inputs(processor, (i,)) for i in range(3)]


def expected_vision(method: str, n: int) -> list[int]:
    """Vision tokens each of the 4 layers keeps for a sample of n (the rules' counts)."""
    return {
        "fastv": [n, n] + [int(n * 0.5)] * 2,
        "random": [n, n] + [int(n * 0.5)] * 2,
        "pdrop": [n] + [int(n * 0.5**s) for s in (1, 2, 3)],
        "vtw": [n, n, 0, 0],
        "divprune": [round(0.3 * n)] * 4,
        "dart": [n, n] + [min(n, 2 + 4 * int(n * 0.5 / 4))] * 2,
    }[method]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_kept_tokens_and_kv_entries_per_family(family, method):
    model, processor = tiny_model(family, num_layers=4)
    apply_baseline(model, METHODS[method])
    report = mllm_mod.efficiency(model, inputs_of(family, processor))
    assert report.accounting_matches, report.mismatches
    assert len(set(report.n_vision)) > 1
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):
        assert [k[b] for k in report.kept_per_layer] == [t + k for k in expected_vision(method, v)]


@pytest.mark.parametrize(("family", "method"), GENERATION)
def test_batch_equals_single_and_cached_equals_uncached_per_family(family, method):
    model, processor = tiny_model(family, num_layers=4)
    apply_baseline(model, METHODS[method])
    batch = inputs_of(family, processor)
    assert_batch_equals_single(model, batch, alone_of(family, processor), 3, f"left-padded batch == alone ({method}, {family})")
    assert_cached_equals_uncached(model, batch, 3, f"cached == uncached ({method}, {family})")


def rope_index(model, inputs: dict) -> torch.Tensor:
    """[3, B, T] the model's own M-RoPE position ids of the prompt (the signature changed across releases)."""
    wanted = inspect.signature(model.model.get_rope_index).parameters
    kwargs = {k: v for k, v in inputs.items() if k in wanted and k != "input_ids"}
    return model.model.get_rope_index(inputs["input_ids"], **kwargs)[0]


def test_divprune_on_qwen_is_the_shorter_sequence_at_gathered_mrope_positions():
    """DivPrune on Qwen2.5-VL: the kept set is the reference's greedy subset, and the logits equal the stock
    decoder on text + the kept tokens' embeddings at their own (t, h, w) positions, gathered from the model's
    3-D position ids of the whole prompt."""
    from mllm_mod.eval.zoo.divprune import max_min_subset

    model, processor = tiny_model("qwen2_5_vl", num_layers=4, attn="eager", seed=3)
    inputs = qwen_inputs(processor, (2,))
    vision_id = model.config.image_token_id
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0]  # [1, T, D] after the image scatter
        positions = rope_index(model, inputs)  # [3, 1, T]
    ids = inputs["input_ids"][0]
    vision = (ids == vision_id).nonzero()[:, 0]
    chosen = max_min_subset(embeds[0, vision], round(0.3 * len(vision)))
    kept = sorted(vision[chosen].tolist())
    present = torch.tensor(sorted(set(range(len(ids))) - set(vision.tolist()) | set(kept)))
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=embeds[:, present], position_ids=positions[:, :, present]).last_hidden_state
        logits_ref = model.lm_head(h[:, -1])
    apply_baseline(model, DivPruneSpec(0.3))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    for i in range(4):
        entry = cache.layers[i]
        assert isinstance(entry, MoDCacheLayer)
        assert [p for p in entry.index[0][entry.filled[0]].tolist() if p in set(vision.tolist())] == kept
    assert_logits_close(out.logits[:, -1], logits_ref, "divprune on Qwen2.5-VL == stock decoder at gathered M-RoPE positions")


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_dart_pivots_do_not_move_with_left_padding(family):
    """A left-padded forward without position_ids (a batched loglikelihood) keeps DART's key norms at each
    sample's own positions: every row's last logits equal the sample's alone."""
    from conftest import PROMPTS, make_images, make_inputs

    model, processor = tiny_model(family, num_layers=4)
    apply_baseline(model, DART)
    if family == "llava":
        batch = make_inputs(processor, n=2)
        alone = [processor(images=[make_images()[i]], text=[PROMPTS[i]], return_tensors="pt") for i in range(2)]
    else:
        batch, alone = inputs_of(family, processor), alone_of(family, processor)
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
        for i, one in enumerate(alone):
            assert_logits_close(last[i : i + 1], model(**one).logits[:, -1], f"dart forward, left padding ({family})")


def test_pdrop_on_qwen_ranks_with_the_layers_own_mrope_attention():
    """PyramidDrop's first boundary on Qwen2.5-VL: the kept set is the top int(n * lambda) image tokens by the
    head-mean attention from the last token in the stock layer b_1 itself (eager attention maps at the model's
    M-RoPE positions: nothing is pruned before b_1)."""
    model, processor = tiny_model("qwen2_5_vl", num_layers=4, attn="eager", seed=3)
    inputs = qwen_inputs(processor, (2,))
    with torch.no_grad():
        maps = model(**inputs, output_attentions=True).attentions[1][0, :, -1]  # [H, T] layer 1, last token
    ids = inputs["input_ids"][0]
    vision = (ids == model.config.image_token_id).nonzero()[:, 0]
    scores = maps.mean(0)[vision]
    kept = sorted(vision[scores.topk(int(len(vision) * 0.5)).indices].tolist())
    apply_baseline(model, PDropSpec((1, 2, 3), 0.5))
    with torch.no_grad():
        entry = output_cache(model(**inputs, use_cache=True)).layers[1]
    assert [p for p in entry.index[0][entry.filled[0]].tolist() if p in set(vision.tolist())] == kept


# -- Gemma 3 ----------------------------------------------------------------------------------------------
GEMMA3_RUNS = ["random", "vtw"]
GEMMA3_REFUSED = {  # method -> (spec, what the error names), all when applied, before the first forward
    "fastv": ("fastv", "fastv: the ranking in layer 1 recomputes the attention Llama-style (q/k projections, RoPE, no q/k norms), and Gemma3Attention normalizes its queries and keys"),
    "pdrop": (PDropSpec((1, 2, 3), 0.5), "pdrop: the ranking in boundary layer 1 recomputes the attention Llama-style"),
    "dart": (DART, "dart: the pivot ranking (key norms) in layer 1 recomputes the attention Llama-style"),
    "divprune": (DivPruneSpec(0.3), "divprune: the LLM should see the shorter sequence (positions renumbered), but layers [0, 1, 2] have a sliding window"),
    "visionzip": (VisionZipSpec(), "Gemma 3 is not supported: VisionZip needs a CLIP tower whose CLS attention"),
}
GEMMA3_QUESTIONS = [("what color is it ?", 1), ("what is the color of the object in the picture ?", 2), ("how many ?", 1)]


def gemma3_inputs(processor, samples=(0, 1, 2)) -> dict:
    """Left-padded prompts through Gemma 3's processor and chat template: 1, 2 and 1 pictures (16 tokens each,
    ``token_type_ids`` 1 on them), questions of different lengths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    texts, images = [], []
    for s in samples:
        question, n = GEMMA3_QUESTIONS[s]
        content = [*[{"type": "image"}] * n, {"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False))
        images.append(pictures[s : s + n])
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", GEMMA3_RUNS)
def test_gemma3_kept_tokens_batch_equals_single_and_cached_equals_uncached(method):
    model, processor = tiny_model("gemma3", num_layers=4)
    apply_baseline(model, METHODS[method])
    batch = gemma3_inputs(processor)
    assert "token_type_ids" in batch and min(batch["attention_mask"].sum(1).tolist()) > model.config.text_config.sliding_window
    report = mllm_mod.efficiency(model, batch)
    assert report.accounting_matches, report.mismatches
    assert report.n_vision == [16, 32, 16]
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):
        assert [k[b] for k in report.kept_per_layer] == [t + k for k in expected_vision(method, v)]
    alone = [gemma3_inputs(processor, (i,)) for i in range(3)]
    assert_batch_equals_single(model, batch, alone, 3, f"left-padded batch == alone ({method}, gemma3)")
    assert_cached_equals_uncached(model, batch, 3, f"cached == uncached ({method}, gemma3)")


@pytest.mark.parametrize("method", list(GEMMA3_REFUSED))
def test_gemma3_refusals_name_the_reason(method):
    model, processor = tiny_model("gemma3", num_layers=4)
    spec, reason = GEMMA3_REFUSED[method]
    with pytest.raises(NotImplementedError, match=re.escape(reason)):
        apply_baseline(model, spec)  # refused when applied: nothing installed, the model stays stock
    assert not isinstance(mllm_mod.adapter_for(model).layers(model)[2], mllm_mod.MoDLayer)

"""Gemma 3 (`Gemma3ForConditionalGeneration`, a tiny random model of the real class) keeps the invariants of
DESIGN.md section 6: ratio 1 == dense (eager, sdpa), cached == uncached and a left-padded batch == each sample
alone at the logit level, with prompts longer than the sliding window (12 tokens) and 16-token images that
attend bidirectionally; text + trunc(r * n_vision) tokens per MoD layer, KV entries and TFLOPs measured ==
accounted; exact save/reload; pmod and gmod (ARank) presets. A hand-built reference (the stock attention on the
kept tokens, its mask gathered from the dense model's full mask by original index) pins that kept tokens keep
both of Gemma 3's rules: an image's kept tokens see each other both ways, and the window counts original
positions, in the prefill and against the compact cache."""

from __future__ import annotations

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
from torch.utils.flop_counter import FlopCounterMode

import mllm_mod
from mllm_mod.retrofit import is_retrofitted
from mllm_mod.cache import static_mod_cache
from mllm_mod.compat import output_cache
from mllm_mod.efficiency import efficiency
from mllm_mod.flops import DecoderShape, kept_tokens, prefill_cost
from mllm_mod.retrofit import get_state
from mllm_mod.tiny import GEMMA3_TOKENS, gemma3_model

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 12
IMAGE_TOKENS = 16
# (text before, [text between images...], text after) per sample: 16, 32 and 16 image tokens; 28-45 tokens each
LAYOUTS = [(3, [None], 6), (2, [None, 2], 4), (8, [None], 3)]
N_VISION = [16, 32, 16]
SLIDING = [0, 1, 2, 3, 4]  # layer types of the 6-layer tiny model: 5 sliding, then layer 5 global


def prompt(sample: int) -> list[int]:
    """``<bos> text <start_of_image> <image>*16 <end_of_image> ... text``, Gemma 3's processor layout."""
    before, images, after = LAYOUTS[sample]
    gen = torch.Generator().manual_seed(100 + sample)
    text = lambda n: torch.randint(4, 60, (n,), generator=gen).tolist()  # ids below the specials
    ids = [GEMMA3_TOKENS["bos"], *text(before)]
    for between in images:
        ids += text(between or 0) + [GEMMA3_TOKENS["boi"], *[GEMMA3_TOKENS["image"]] * IMAGE_TOKENS, GEMMA3_TOKENS["eoi"]]
    return ids + text(after)


def gemma_inputs(samples=(0, 1, 2)) -> dict:
    """Left-padded ids, mask, ``token_type_ids`` (1 on the image placeholders, as the processor) and 32-px images."""
    rows = [prompt(i) for i in samples]
    width = max(map(len, rows))
    ids = torch.tensor([[GEMMA3_TOKENS["pad"]] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    images = []
    for i in samples:
        gen = torch.Generator().manual_seed(200 + i)
        images.append(torch.randn(len(LAYOUTS[i][1]), 3, 32, 32, generator=gen))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == GEMMA3_TOKENS["image"]).long(), pixel_values=torch.cat(images))


def pmod_model(attn: str = "sdpa", **overrides):
    """PRD on 6 layers: 0-1 dense, 2-4 (sliding) and 5 (global) MoD at 0.655, 0.345, 0.15, 0.15."""
    model = gemma3_model(attn=attn)
    mllm_mod.retrofit(model, "pmod", **overrides)
    randomize_routers(model)
    return model


def test_tiny_model_is_the_real_class_and_the_window_cuts_the_prompts():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    model = gemma3_model()
    adapter = mllm_mod.adapter_for(model)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and type(adapter.decoder(model)).__name__ == "Gemma3TextModel"
    text = model.config.text_config
    assert [i for i, t in enumerate(text.layer_types) if t == "sliding_attention"] == SLIDING and text.sliding_window == WINDOW
    inputs = gemma_inputs()
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == N_VISION
    assert min(inputs["attention_mask"].sum(1).tolist()) > 2 * WINDOW  # the window cuts every prompt
    ctx = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"], inputs=inputs)
    assert torch.equal(ctx.candidates, inputs["token_type_ids"].bool())
    assert torch.equal(ctx.blocks, get_block_sequence_ids_for_mask(inputs["token_type_ids"]))  # the stock model's blocks
    bare = adapter.routing_context(model, inputs["input_ids"], None, inputs["attention_mask"])
    assert bare.blocks is None  # without token_type_ids the stock mask is causal, and so is MoD's
    with torch.no_grad():
        logits = model(**inputs).logits  # [B, T, V]
        assert logits.shape[1] == inputs["input_ids"].shape[1]
        other = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))  # the same prompts, other pictures
        assert (model(**other).logits - logits).abs().max() > 1e-3  # the pictures reach the decoder (not a zero projector)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ratio_one_equals_dense(attn):
    """Every layer MoD at ratio 1 (the general mask by original index: blocks + window) == the stock masks."""
    assert_ratio_one_equals_dense(gemma3_model(attn=attn), gemma_inputs(), f"ratio 1 == dense (gemma3, {attn})")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_equals_uncached(attn):
    """Decoding against the compact caches (window by original index) == recomputing the whole sequence."""
    model = pmod_model(attn)
    assert_cached_equals_uncached(model, gemma_inputs(), 5, f"cached == uncached (pmod, gemma3, {attn})")


def test_batch_equals_one_by_one():
    model = pmod_model()
    batch, singles = gemma_inputs(), [gemma_inputs([i]) for i in range(3)]
    check = "left-padded batch == alone (pmod, gemma3)"
    assert_batch_equals_single(model, batch, singles, 5, check)
    assert_prompt_equals_single(model, batch, singles, check)


def test_kept_tokens_kv_entries_and_flops_match_the_accounting():
    model = pmod_model("eager")  # the FLOP counter sees eager attention's matmuls
    inputs = gemma_inputs()
    report = efficiency(model, inputs)
    assert report.accounting_matches, report.mismatches
    assert report.n_vision == N_VISION
    ratios = mllm_mod.layer_ratios(model)
    assert ratios[:2] == [1.0, 1.0] and all(r < 1.0 for r in ratios[2:])
    for b, (t, v) in enumerate(zip(report.n_text, report.n_vision)):  # text + trunc(r * n_vision), per layer
        expected = kept_tokens(ratios, t, v)
        assert expected[2:] == [t + int(r * v) for r in ratios[2:]]
        assert [layer[b] for layer in report.kept_per_layer] == expected
        kv = [layer[b] for layer in report.kv_entries_per_layer]  # the window cuts every sample (t + v > 11)
        assert kv[:2] == [WINDOW - 1] * 2  # dense sliding layers: the stock sliding cache's last window - 1 tokens
        assert kv[5] == expected[5]  # the global MoD layer: every kept token
        assert all(0 < kv[i] <= min(expected[i], WINDOW - 1) for i in (2, 3, 4))  # MoD sliding: kept ones among those
    # each MoD layer's attention runs on exactly the kept tokens: its queries [B, Tk] and the real ones per row
    seen = {}
    layers = mllm_mod.adapter_for(model).layers(model)
    hooks = [
        layers[i].base_layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(i, k["hidden_states"].shape[1]), with_kwargs=True
        )
        for i in range(2, 6)
    ]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    length = inputs["input_ids"].shape[1]
    for i in range(2, 6):  # rows keep their padding (masked): the widest row is T - n_vision + trunc(r * n_vision)
        assert seen[i] == max(length - v + int(ratios[i] * v) for v in N_VISION)
    # FLOPs: FlopCounterMode on the decoder of one unpadded sample with two images == flops.py
    one = gemma_inputs([1])
    decoder = mllm_mod.adapter_for(model).decoder(model)
    name = next(n for n, m in model.named_modules() if m is decoder)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**one, use_cache=False)
    flops = {k.split(".", 1)[-1]: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    measured = flops[name] - flops.get(f"{name}.rotary_emb", 0)  # RoPE's outer product is not accounted
    shape = DecoderShape.from_config(model.config.text_config)
    assert measured == prefill_cost(shape, ratios, one["input_ids"].shape[1] - 32, 32).decoder_flops


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A backend mask (bool: True = attend; or additive float) as booleans."""
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("layer_idx", [2, 5])  # a sliding layer (ratio 0.655) and the global one (0.15)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kept_tokens_keep_the_bidirectional_image_rule_and_the_window(layer_idx, attn):
    """The reference: the stock attention on the kept tokens, with the dense model's own mask for this layer
    gathered by original index. The MoD layer's mask equals it and its attention output matches; dropping the
    bidirectional rule or the window for the kept tokens changes that output (so this test would catch it)."""
    model = pmod_model(attn)
    layer = mllm_mod.adapter_for(model).layers(model)[layer_idx]
    inputs = gemma_inputs([1])  # two images, 45 tokens, no padding
    got = {}

    def on_layer(module, args, kwargs):
        got.update(x=args[0] if args else kwargs["hidden_states"], mask=kwargs["attention_mask"], pe=kwargs["position_embeddings"], ctx=kwargs["mod_routing"])

    def on_attention(module, args, kwargs, output):
        got.update(attn_mask=kwargs["attention_mask"], attn_out=output[0])

    hooks = [layer.register_forward_pre_hook(on_layer, with_kwargs=True),
             layer.base_layer.self_attn.register_forward_hook(on_attention, with_kwargs=True)]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    x, full, ctx = got["x"], _allowed(got["mask"]), got["ctx"]  # [1, T, D], [1, 1, T, T]
    length = x.shape[1]
    token_mask = ctx.token_mask(length, x.device)
    with torch.no_grad():
        route = layer.route(x, ctx, token_mask, 0, ctx.host_lists(token_mask, 1)[0])
    order = route.order[0]  # [Tk] original indices of the kept tokens
    assert order.numel() == length - 32 + int(layer.ratio * 32) and bool((order.diff() > 0).all())
    reference = full[:, :, order][:, :, :, order]  # [1, 1, Tk, Tk] the stock rule, by original index
    assert torch.equal(_allowed(got["attn_mask"]).expand_as(reference), reference)

    # the rules bite among the kept tokens: some kept image token sees a later one; the window hides earlier ones
    q, k = order[:, None], order[None, :]
    later = reference[0, 0] & (k > q)
    assert bool(later.any())
    causal = torch.ones(len(order), len(order), dtype=torch.bool).tril()
    if layer_idx in SLIDING:
        assert bool((causal & ~reference[0, 0] & (q - k >= WINDOW)).any())
        no_window = causal | later  # the bidirectional rule kept, the window dropped
    else:
        no_window = reference[0, 0]
    base = layer.base_layer
    cos, sin = (t[:, order] for t in got["pe"])

    def attention(allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed[None, None] if allowed.dim() == 2 else allowed
        if attn == "eager":
            mask = torch.zeros(mask.shape, dtype=x.dtype).masked_fill_(~mask, torch.finfo(x.dtype).min)
        with torch.no_grad():
            return base.self_attn(hidden_states=base.input_layernorm(x[:, order]), position_embeddings=(cos, sin), attention_mask=mask)[0]

    expected = attention(reference)
    assert_logits_close(got["attn_out"], expected, f"kept-token attention == stock rule gathered by index (gemma3, {attn})", atol=1e-5)
    assert float((attention(causal) - expected).abs().max()) > 1e-3  # the bidirectional rule dropped
    if layer_idx in SLIDING:
        assert float((attention(no_window) - expected).abs().max()) > 1e-3  # the window dropped


def test_decoding_window_counts_original_positions_in_the_compact_cache():
    """A sliding MoD layer's compact cache keeps exactly its kept entries a later query can attend (original
    index > seen - window), after the prefill and after each decoding step; a step attends all of them."""
    model = pmod_model()
    layer = mllm_mod.adapter_for(model).layers(model)[3]  # sliding, ratio 0.345
    inputs = gemma_inputs([1])
    routes = []
    route = layer.route
    layer.route = lambda *a, **k: routes.append(route(*a, **k)) or routes[-1]
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    del layer.route
    kept = routes[0].order[0]  # [Tk] original indices of the prefill's kept tokens
    length = inputs["input_ids"].shape[1]
    entries = cache.layers[3]
    assert kept.numel() == length - 32 + int(layer.ratio * 32) > WINDOW
    assert torch.equal(entries.index[0], kept[kept > length - WINDOW])  # the window has passed the others
    assert entries.kept_length() == int((kept > length - WINDOW).sum()) < WINDOW - 1
    got = {}
    hook = layer.base_layer.self_attn.register_forward_hook(lambda m, a, k, o: got.update(mask=k["attention_mask"]), with_kwargs=True)
    held = entries.index[0]
    for step in range(WINDOW + 2):  # decoding past the window: every prefill entry goes
        seen = length + step
        ids = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, seen + 1, dtype=torch.long)}
        with torch.no_grad():
            model(**ids, **mllm_mod.compat.cache_kwargs(cache, type(model)), use_cache=True)
        allowed = torch.ones(held.numel() + 1, dtype=torch.bool) if got["mask"] is None else _allowed(got["mask"]).reshape(-1)
        assert bool(allowed.all())  # every entry held before the step is within its window, and itself
        held = torch.cat([held, torch.tensor([seen])])
        held = held[held > seen + 1 - WINDOW]
        assert torch.equal(entries.index[0], held) and entries.kept_length() == held.numel() <= WINDOW - 1
    hook.remove()
    assert int(entries.index.min()) >= length  # only decoding entries are left


def test_gmod_from_an_arank_calibration_on_the_family():
    """gamma-MoD: ARank on Gemma 3 (eager), the shared router, renumbered positions (each layer type's RoPE),
    threshold routing: the accounting follows the measured counts, cached == uncached."""
    from mllm_mod.arank import arank

    model = gemma3_model(attn="eager")
    report = arank(model, [gemma_inputs()], progress=False)
    assert report.samples == 3 and len(report.layer_arank) == 6
    mllm_mod.retrofit(model, "gmod", arank=report, arank_dense=2, threshold=0.5, decode_threshold=0.5)
    assert get_state(model).config.positions == "renumber"
    assert [i for i, r in enumerate(mllm_mod.layer_ratios(model)) if r == 1.0] == report.dense_layers(2)
    randomize_routers(model, scale=2.0)
    assert efficiency(model, gemma_inputs()).accounting_matches
    assert_cached_equals_uncached(model, gemma_inputs(), 4, "cached == uncached (gmod, renumber, gemma3)")


def test_pmod_with_original_positions_runs_the_videomod_style_group_selection():
    """Per-image top-k (``selection="group"``: one group per image) keeps ceil(r * 16) of each image."""
    model = pmod_model(selection="group")
    ctx = mllm_mod.adapter_for(model).routing_context(model, gemma_inputs()["input_ids"], None, None)
    assert ctx.groups[1][ctx.candidates[1]].unique().numel() == 2
    assert_cached_equals_uncached(model, gemma_inputs(), 3, "cached == uncached (group, gemma3)")


def test_static_cache_is_refused():
    model = pmod_model()
    inputs = gemma_inputs([0])
    with pytest.raises(NotImplementedError, match="Gemma 3 with a static cache is not supported"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    for name in ("cache", "past_key_values"):  # either keyword, in either release
        cache = static_mod_cache(model, inputs["input_ids"].shape[1], 2)
        with pytest.raises(NotImplementedError, match="Gemma 3 with a static cache is not supported"), torch.no_grad():
            model(**inputs, **{name: cache}, use_cache=True)


def test_bidirectional_text_variant_is_refused():
    """`use_bidirectional_attention` makes every stock layer attend both ways; MoD layers' masks are causal
    outside an image block, so the variant is refused rather than answered wrongly."""
    model = gemma3_model()
    model.config.text_config.use_bidirectional_attention = True
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"):
        mllm_mod.retrofit(model, "pmod")
    assert not is_retrofitted(model)  # refused before anything changed
    model = pmod_model()  # a config changed after the retrofit: refused at the forward
    model.config.text_config.use_bidirectional_attention = True
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"), torch.no_grad():
        model(**gemma_inputs([0]))


def test_save_and_reload(tmp_path):
    """save_mod -> load_mod and save_pretrained -> mllm_mod.from_pretrained reproduce the logits exactly."""
    model = pmod_model()
    inputs = gemma_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    mllm_mod.save_mod(model, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "full")
    for kind in ("adapter", "full"):
        fresh = mllm_mod.load_mod(gemma3_model(), tmp_path / "adapter") if kind == "adapter" else mllm_mod.from_pretrained(tmp_path / "full")
        with torch.no_grad():
            assert torch.equal(fresh(**inputs).logits, expected), kind


def test_profile_config_only_gemma_3_4b(capsys):
    """Gemma-3-4B's shapes on the meta device: PRD over 34 layers with pi / 33; dense vs MoD from one accounting."""
    import math

    from transformers import AutoModelForImageTextToText

    from mllm_mod.cli import main
    from mllm_mod.reference_shapes import REFERENCE_SHAPES

    ref = REFERENCE_SHAPES["gemma-3-4b"]
    config = ref.config()
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.sliding_window, config.mm_tokens_per_image) == (34, 2560, 1024, 256)
    assert config.vision_config.image_size // config.vision_config.patch_size == 64  # 896 px, 64 x 64 patches pooled to 16 x 16
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert mllm_mod.adapter_for(model).name == "Gemma 3"
    mllm_mod.retrofit(model, "pmod")
    curve = [0.5 * math.cos(i * math.pi / 33) + 0.5 for i in range(34)]
    ratios = mllm_mod.layer_ratios(model)
    assert ratios == pytest.approx([1.0 if r > 0.85 else max(r, 0.15) for r in curve])
    shape = DecoderShape.from_config(text)
    dense = prefill_cost(shape, [1.0] * 34, ref.n_text, ref.n_vision, 2)
    mod = prefill_cost(shape, ratios, ref.n_text, ref.n_vision, 2)
    assert main(["profile", "gemma-3-4b", "--config-only"]) == 0
    out = capsys.readouterr().out
    assert "34 layers, 256 vision + 64 text tokens" in out
    assert f"| prefill TFLOPs / sample | {dense.tflops:.3f} | {mod.tflops:.3f} |" in out
    assert 0.55 < mod.kv_bytes / dense.kv_bytes < 0.7 and 0.55 < mod.tflops / dense.tflops < 0.7
    assert "sliding window shorter than the prompt" not in out  # 320 tokens fit the 1024-token window
    # 2048 vision tokens: the 29 sliding layers hold the last 1023 entries, the 5 global ones all 2112, dense and
    # MoD alike (bf16: 2 x 4 KV heads x 256 x 2 bytes = 4096 bytes an entry)
    assert main(["profile", "gemma-3-4b", "--config-only", "--n-vision", "2048", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "note: 29 of 34 layers have a sliding window shorter than the prompt (1024 tokens)" in out
    assert f"| KV cache MiB / sample | {(29 * 1023 + 5 * 2112) * 4096 / 2**20:.1f} |" in out


def test_a_hand_built_static_mod_cache_refuses_a_window_that_could_bite():
    """The core rule behind the refusal, on any family: a MoD layer with a sliding window shorter than a static
    MoD cache (here Mistral's, in `static_mod_cache`) raises instead of decoding without the window."""
    from conftest import make_inputs

    from mllm_mod.tiny import tiny_model

    model, processor = tiny_model("llava_next", num_layers=4, attn="sdpa", decoder="mistral", sliding_window=24)
    mllm_mod.retrofit(model, "pmod")
    inputs = dict(make_inputs(processor, 1))
    cache = static_mod_cache(model, inputs["input_ids"].shape[1], 2)
    with pytest.raises(NotImplementedError, match="24-token sliding window, shorter than the static cache"), torch.no_grad():
        model(**inputs, **mllm_mod.compat.cache_kwargs(cache, type(model)), use_cache=True)

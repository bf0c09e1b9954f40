"""The streaming video LLM: save/load, per-frame routing, cached frame-by-frame inference, the bounded
cache, the streaming data and objective. (Metrics: test_streaming_metrics.py; Trainer/CLI:
test_streaming_train.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import randomize_routers
from logits import assert_logits_close
from transformers import AutoModelForCausalLM, CLIPVisionConfig

import mllm_mod
from mllm_mod.cache import MoDCacheLayer
from mllm_mod.retrofit import mod_layer_map
from mllm_mod.streaming import (
    CacheBudget,
    StreamCollator,
    StreamDataset,
    StreamForCausalLM,
    StreamSession,
    SynthSpec,
    load_records,
    load_stream_model,
    make_synthetic_stream,
    read_frames,
    tiny_stream_model,
)
from mllm_mod.streaming import StreamConfig, StreamRecord, Turn
from mllm_mod.streaming.budget import cache_slots
from mllm_mod.streaming.data import preprocess
from mllm_mod.streaming.inference import replies_at, teacher_forced_stream
from mllm_mod.streaming.objective import IGNORE, Layout, build_sequence, clip_frames


@pytest.fixture(scope="session")
def stream_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream")
    path = make_synthetic_stream(directory, SynthSpec(num_videos=3, seed=3, question_rate=1.0))
    return load_records(path)


@pytest.fixture
def tiny():
    return tiny_stream_model(num_layers=4)


def sequences(model, tokenizer, records):
    dataset = StreamDataset(records, tokenizer, model.config)
    return [dataset.sequence(i) for i in range(len(records))]


def full_logits(model, seq) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=seq.input_ids[None], pixel_values=seq.pixel_values).logits[0]  # [T, V]


# -- data and objective ----------------------------------------------------------------------------


def test_synthetic_clips_read_back_with_their_events(stream_data):
    record = stream_data[0]
    frames, times = read_frames(record.video, 2.0)
    assert frames.shape == (16, 64, 64, 3) and np.allclose(times, np.arange(16) / 2)
    appear, vanish = record.turns[1], next(t for t in record.turns if "disappears" in t.text)
    shown = frames.reshape(16, -1).max(axis=1) > 60  # [F] a shape is on screen
    first, last = round(appear.time * 2), round(vanish.time * 2)
    assert not shown[:first].any() and shown[first:last].all() and not shown[last:].any()


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_sequence_layout_and_labels_follow_the_reference_template(tiny):
    """tokenization_live.py's template and learn ranges on a hand-made timeline (2 fps): frames separated
    by ',', runs wrapped in '[' ... ']'; a user turn after the frame at or before its time (floor), a
    frame-decided reply after the frame at or after its time (ceil), a reply at a user turn's time
    right after it."""
    model, tokenizer = tiny
    cfg = model.config
    record = StreamRecord(
        video="none.mp4",
        turns=[
            Turn("user", 0.2, "narrate the shapes ."),  # floor(0.4) = frame 0
            Turn("assistant", 0.8, "a red circle appears ."),  # ceil(1.6) = frame 2
            Turn("user", 2.0, "what color is it ?"),  # frame 4
            Turn("assistant", 2.0, "red ."),  # answers the user turn at once
        ],
    )
    seq = build_sequence(record, 6, tokenizer, cfg)
    v = ["<v>"] * 10
    want = (
        ["<s>", "[", *v, "]", "User", ":", "narrate", "the", "shapes", "."]
        + ["[", *v, ",", *v, "]", "Assistant", ":", "a", "red", "circle", "appears", ".", "</s>"]
        + ["[", *v, ",", *v, "]", "User", ":", "what", "color", "is", "it", "?", "Assistant", ":", "red", ".", "</s>"]
        + ["[", *v]
    )
    assert tokens(tokenizer, seq.input_ids) == want
    assert cfg.silence_token_id == tokenizer.convert_tokens_to_ids(",")
    learned = {i: tok for i, tok in enumerate(tokens(tokenizer, seq.labels.clamp(min=0))) if seq.labels[i] != IGNORE}
    frame_ends = [f.stop - 1 for f in seq.frames()]
    assert [learned.get(i) for i in frame_ends] == [
        None,  # frame 0: closed by a user turn (unlearned, as narration.py's first stream)
        ",",  # frame 1: silence, frame 2 follows
        "]",  # frame 2 decides: reply
        ",",
        None,  # frame 4: closed by the user's question
        ",",  # the video's last frame: silence
    ]
    reply = seq.replies()[0]  # ']' -> Assistant, Assistant -> ':', ... '.' -> </s>
    assert [learned[i] for i in range(reply.start - 1, reply.stop - 1)] == ["Assistant", ":", "a", "red", "circle", "appears", ".", "</s>"]
    answer = seq.replies()[1]  # the user's '?' predicts 'Assistant'
    assert tokens(tokenizer, seq.input_ids[answer.start - 1 : answer.start]) == ["?"]
    assert [learned[i] for i in range(answer.start - 1, answer.stop - 1)] == ["Assistant", ":", "red", ".", "</s>"]
    assert len(learned) == len(frame_ends) - 2 + 8 + 5  # nothing else learns
    n_frame_labels = 4
    with torch.no_grad():  # the loss is normalised by the number of labels (modeling_live_llama.py)
        pixels = torch.randn(6, 3, 32, 32)
        out = model(input_ids=seq.input_ids[None], pixel_values=pixels, labels=seq.labels[None])
        ce = torch.nn.functional.cross_entropy(out.logits[0], seq.labels, reduction="none")
        weights = torch.where(seq.input_ids == cfg.frame_token_id, 3.0, 1.0)
        weighted = model(input_ids=seq.input_ids[None], pixel_values=pixels, labels=seq.labels[None], label_weights=weights[None])
    n = len(learned)
    torch.testing.assert_close(out.loss, ce.sum() / n)
    frame_ce = ce[torch.tensor(frame_ends)].sum()
    assert n - n_frame_labels == 13
    torch.testing.assert_close(weighted.loss, (ce.sum() + 2 * frame_ce) / n)


def test_frames_are_clipped_as_the_reference_clips_them(tiny):
    """data/stream.py max_frames_clip: turns past the limit go, the video ends with the last turn kept."""
    model, tokenizer = tiny
    record = StreamRecord(
        video="none.mp4",
        turns=[Turn("user", 0.0, "narrate the shapes ."), Turn("assistant", 1.0, "red ."), Turn("assistant", 3.0, "blue .")],
    )
    clipped, n = clip_frames(record, 10, 2.0, max_frames=5)  # the reply after frame 6 does not fit
    assert n == 3 and [t.text for t in clipped.turns] == ["narrate the shapes .", "red ."]
    assert clip_frames(record, 10, 2.0, max_frames=None) == (record, 10)
    seq = build_sequence(clipped, n, tokenizer, model.config)
    assert seq.num_frames == 3 and len(seq.replies()) == 1


def test_layout_refuses_a_silence_token_that_is_not_the_separator(tiny):
    model, tokenizer = tiny
    model.config.silence_token_id = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="must be one and the same token"):
        Layout.of(tokenizer, model.config)


def test_frame_token_0_is_the_pooled_summary_and_frames_are_padded_to_square(tiny):
    """vision_live.py: SigLIP's pooler_output (attention-pooling head), CLIP's CLS; data/utils.py pads."""
    model, _ = tiny
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.model.frame_features(frames)  # [2, 10, D]
        out = model.model.vision_tower(pixel_values=frames)
        proj = model.model.multi_modal_projector
        torch.testing.assert_close(tokens[:, 0], proj(out.pooler_output))
        grid = out.last_hidden_state.transpose(1, 2).reshape(2, -1, 4, 4)
        first_cell = grid[:, :, :2, :2].mean(dim=(2, 3))  # 4x4 patches -> 3x3 adaptive pool: cell (0, 0)
        torch.testing.assert_close(tokens[:, 1], proj(first_cell))
        assert not torch.allclose(tokens[:, 0], proj(out.last_hidden_state.mean(dim=1)))
    clip_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    clip = StreamForCausalLM(StreamConfig(vision_config=clip_cfg, text_config=model.config.text_config)).eval()
    with torch.no_grad():
        out = clip.model.vision_tower(pixel_values=frames)
        torch.testing.assert_close(
            clip.model.frame_features(frames)[:, 0], clip.model.multi_modal_projector(out.last_hidden_state[:, 0])
        )
    headless = model.config.vision_config.to_dict() | {"vision_use_head": False}
    bare = StreamForCausalLM(StreamConfig(vision_config=headless, text_config=model.config.text_config))
    with pytest.raises(ValueError, match="vision_use_head=True"):
        bare.model.frame_features(frames)
    # a 16x32 frame (h x w) padded to 32x32 with black bands above and below, not stretched
    wide = np.full((1, 16, 32, 3), 255, dtype=np.uint8)
    pixels = preprocess(wide, 32, [0.5] * 3, [0.5] * 3)  # [1, 3, 32, 32]
    assert pixels.shape == (1, 3, 32, 32)
    assert (pixels[0, :, :8] == -1).all() and (pixels[0, :, 24:] == -1).all()  # black, normalised
    torch.testing.assert_close(pixels[0, :, 8:24], torch.ones(3, 16, 32))
    tall = np.zeros((1, 64, 16, 3), dtype=np.uint8)
    tall[..., 0] = 255
    pixels = preprocess(tall, 32, [0.5] * 3, [0.5] * 3)  # 64x16 -> 32x8, centred: 12 columns each side
    assert (pixels[0, :, :, :12] == -1).all() and (pixels[0, :, :, 20:] == -1).all()
    torch.testing.assert_close(pixels[0, 0, :, 12:20], torch.ones(32, 8))


def test_bad_videos_and_turns_raise_naming_the_file(tmp_path, stream_data, tiny):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4", 2.0)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        read_frames(corrupt, 2.0)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        read_frames(empty, 2.0)
    from mllm_mod.data.synth import write_video

    no_frames = tmp_path / "noframes.mp4"
    write_video(no_frames, [], fps=2, size=(32, 32))  # a valid container whose video track is empty
    with pytest.raises(ValueError, match=r"noframes.mp4: no frames"):
        read_frames(no_frames, 2.0)

    slow = tmp_path / "slow.mp4"
    write_video(slow, np.zeros((4, 32, 32, 3), dtype=np.uint8), fps=1)
    with pytest.raises(ValueError, match=r"slow.mp4 has 1 fps, below the requested 2 fps"):
        read_frames(slow, 2.0)
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="after the last frame"):
        build_sequence(stream_data[0], 4, tokenizer, model.config)  # turns past 1.5 s


def test_collator_batches_ragged_samples(stream_data, tiny):
    model, tokenizer = tiny
    dataset = StreamDataset(stream_data[:2], tokenizer, model.config)
    batch = StreamCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (32, 3, 32, 32)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.tolist() == [dataset[0]["input_ids"].shape[0], dataset[1]["input_ids"].shape[0]]
    with torch.no_grad():  # padding changes nothing for the real tokens
        out = model(**batch).logits
        alone = full_logits(model, dataset.sequence(1))
    torch.testing.assert_close(out[1, : lengths[1]], alone, atol=1e-5, rtol=1e-5)


# -- the model -------------------------------------------------------------------------------------


def test_save_reload_exact(tmp_path, stream_data, tiny):
    model, tokenizer = tiny
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded, tok = load_stream_model(str(tmp_path))
    assert type(auto) is StreamForCausalLM and loaded.config.tokens_per_frame == 10
    assert tok.convert_tokens_to_ids(",") == model.config.silence_token_id
    ref = full_logits(model, seq)
    assert torch.equal(full_logits(auto, seq), ref) and torch.equal(full_logits(loaded, seq), ref)


def test_retrofitted_adapter_save_reload_exact(tmp_path, stream_data, tiny):
    model, tokenizer = tiny
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    mllm_mod.retrofit(model, "videomod")
    randomize_routers(model)
    ref = full_logits(model, seq)
    mllm_mod.save_mod(model, tmp_path)
    fresh, _ = tiny_stream_model(num_layers=4)
    mllm_mod.load_mod(fresh, tmp_path)
    assert torch.equal(full_logits(fresh, seq), ref)


def test_retrofitted_full_checkpoint_reload_exact(tmp_path, stream_data, tiny):
    model, tokenizer = tiny
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    mllm_mod.retrofit(model, "videomod")
    randomize_routers(model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_stream_model(str(tmp_path))
    assert torch.equal(full_logits(loaded, seq), full_logits(model, seq))


@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_videomod_keeps_ceil_r_tokens_of_every_frame(stream_data, tiny, ratio):
    model, tokenizer = tiny
    mllm_mod.retrofit(model, "videomod", ratio=ratio)
    randomize_routers(model)
    assert sorted(mod_layer_map(model)) == [1, 3]
    dataset = StreamDataset(stream_data[:2], tokenizer, model.config)
    batch = StreamCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])  # ragged: padding too
    adapter = mllm_mod.adapter_for(model)
    ctx = adapter.routing_context(model, batch["input_ids"], None, batch["attention_mask"])
    ctx.records = []
    batch.pop("labels")
    with torch.no_grad():  # the inner model: the top-level hooks would turn records into a routing loss
        model.model(**batch, mod_routing=ctx)
    want = math.ceil(ratio * 10)
    separators = batch["input_ids"] == model.config.silence_token_id  # [B, T] the ',' between frames
    assert int(separators[0].sum()) >= 10
    assert len(ctx.records) == 2
    for record in ctx.records:
        assert not record.keep[~record.candidates].logical_not().any()  # text is never skipped
        assert not record.candidates[separators].any() and record.keep[separators].all()  # ',' is text
        for b in range(2):
            gids = ctx.groups[b][ctx.groups[b] >= 0].unique()
            kept = torch.stack([record.keep[b][ctx.groups[b] == g].sum() for g in gids])
            assert len(gids) == 16 and (kept == want).all(), kept
            # per frame as it sits in the sequence, ',' (or '[') + 10 tokens: want + 1 of 11 processed
            starts = [int((ctx.groups[b] == g).nonzero()[0, 0]) for g in gids]
            units = torch.stack([record.keep[b][i - 1 : i + 10].sum() for i in starts])
            assert (units == want + 1).all(), units


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mod", [False, True], ids=["dense", "videomod"])
def test_frame_by_frame_cached_equals_full_forward(stream_data, attn, mod):
    model, tokenizer = tiny_stream_model(num_layers=4, attn=attn)
    if mod:
        mllm_mod.retrofit(model, "videomod")
        randomize_routers(model)
    for seq in sequences(model, tokenizer, stream_data[:1]):
        full = full_logits(model, seq)[1:]  # [T - 1, V]: the session's BOS is the prompt
        session = StreamSession(model, tokenizer)
        streamed = teacher_forced_stream(session, seq)
        assert_logits_close(streamed, full, f"streaming frame-by-frame == full forward ({'videomod' if mod else 'dense'})")
        # same reply decisions at every frame, under the evaluation's and the demo's rule
        last = torch.tensor([f.stop - 2 for f in seq.frames()])
        silence = model.config.silence_token_id
        for threshold in (0.0, 0.725):
            assert torch.equal(replies_at(full[last], silence, threshold), replies_at(streamed[last], silence, threshold))
        if mod:  # MoD layers cached only the kept tokens: 2 per frame plus every text token (',' included)
            n_text = seq.input_ids.shape[0] - 10 * seq.num_frames
            assert n_text > seq.num_frames
            for idx in mod_layer_map(model):
                layer = session.cache.layers[idx]
                assert isinstance(layer, MoDCacheLayer)
                assert layer.kept_length() == n_text + 2 * seq.num_frames
                assert layer.seen == seq.input_ids.shape[0]


def silent(model, on: bool = True):
    """Make every frame predict ',' (stay silent): a large bonus on its logit (a hook on the LM head)."""
    sep = model.config.silence_token_id

    def hook(module, args, out):
        return out.index_add(-1, torch.tensor([sep]), torch.full((*out.shape[:-1], 1), 1e4))

    return model.lm_head.register_forward_hook(hook)


def test_reply_decision_rules():
    """modeling_live.py stream_evaluate (threshold 0: argmax) and demo/inference.py (P(',') < 0.725)."""
    sep = 0
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.45, 0.3, 0.25], [0.3, 0.6, 0.1], [0.8, 0.1, 0.1]]))
    assert replies_at(logits, sep, 0.0).tolist() == [False, False, True, False]  # argmax only
    assert replies_at(logits, sep, 0.725).tolist() == [True, True, True, False]  # the demo's
    assert replies_at(logits, sep, 0.5).tolist() == [False, True, True, False]  # P(',') < 0.5


def test_live_session_replies_and_continues(stream_data, tiny):
    """demo/inference.py: '[' + frame, ',' + frame, ...; a reply is ']' 'Assistant :' + greedy tokens + </s>."""
    model, tokenizer = tiny
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    session = StreamSession(model, tokenizer, threshold=1.01, max_new_tokens=3)  # always replies
    replies = [session.frame(seq.pixel_values[i]) for i in range(4)]
    assert all(r is not None and r.time == i / 2 for i, r in enumerate(replies))
    # each frame: '[' + 10 tokens, then ']' 'Assistant' ':' + at most 3 tokens + </s>
    assert 1 + 4 * (11 + 4) <= session.position <= 1 + 4 * (11 + 7) and session.cached_tokens == session.position
    handle = silent(model)
    try:
        quiet = StreamSession(model, tokenizer, threshold=0.725)
        assert all(quiet.frame(seq.pixel_values[i]) is None for i in range(4)) and quiet.position == 1 + 4 * 11
        answer = quiet.user("what color is it ?", answer=True)  # ']' 'User' ... then 'Assistant' ':' ...
        assert answer is not None and answer.frame == 3 and math.isnan(answer.silence_prob)
        assert not quiet.in_run  # the next frame opens a run with '['
        before = quiet.position
        assert quiet.frame(seq.pixel_values[4]) is None and quiet.position == before + 11 and quiet.in_run
    finally:
        handle.remove()


# -- the bounded cache -----------------------------------------------------------------------------


def check_cache(session: StreamSession, budget: int) -> None:
    slots = cache_slots(session.cache)
    assert slots <= budget
    assert slots == sum(s.slots for s in session.spans)
    for layer in session.cache.layers:
        if isinstance(layer, MoDCacheLayer):
            assert layer.seen == slots and layer.keys.shape[-2] == layer.index.shape[1]
            index = layer.index[0]
            assert bool((index[1:] > index[:-1]).all()) and int(index.max()) < slots
        else:
            assert layer.keys.shape[-2] == slots


@pytest.mark.parametrize("policy", ["drop", "pool"])
@pytest.mark.parametrize("mod", [False, True], ids=["dense", "videomod"])
def test_bounded_cache_stays_within_budget_and_streams_on(stream_data, tiny, policy, mod):
    model, tokenizer = tiny
    if mod:
        mllm_mod.retrofit(model, "videomod")
        randomize_routers(model)
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    budget = 64
    handle = silent(model)
    session = StreamSession(model, tokenizer, budget=CacheBudget(budget, policy))
    session.user("narrate the shapes .")
    for i in range(20):  # 20 frames + 3 questions: more than 3x the budget
        session.frame(seq.pixel_values[i % seq.num_frames])
        check_cache(session, budget)
        if i % 7 == 3:
            session.user("what color is it ?")
            check_cache(session, budget)
    assert session.position > 3 * budget  # positions keep counting past evictions
    assert session.spans[0].kind == "prompt" and session.spans[0].slots == 7  # BOS + instruction kept
    if policy == "pool":
        assert any(s.pooled for s in session.spans)
    logits = session.feed([model.config.frame_token_id] * 10, seq.pixel_values[:1], kind="frame")
    assert torch.isfinite(logits).all()
    handle.remove()


def test_budget_larger_than_the_stream_changes_nothing(stream_data, tiny):
    model, tokenizer = tiny
    mllm_mod.retrofit(model, "videomod")
    randomize_routers(model)
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    unbounded = teacher_forced_stream(StreamSession(model, tokenizer), seq)
    bounded = teacher_forced_stream(StreamSession(model, tokenizer, budget=CacheBudget(10_000)), seq)
    assert torch.equal(unbounded, bounded)


def test_dropping_a_span_equals_never_having_cached_it_in_the_first_layer(tiny):
    """Eviction bookkeeping is exact: after dropping a frame, the first layer (which reads only the
    embeddings) attends exactly as if the frame had never been fed, at the tokens' true positions."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    frames = torch.randn(3, 3, 32, 32)
    ids = [model.config.frame_token_id] * 10
    hidden = {}

    def grab(module, args, kwargs, out):
        hidden["h"] = out[0] if isinstance(out, tuple) else out

    handle = model.model.language_model.layers[0].register_forward_hook(grab, with_kwargs=True)
    try:
        session = StreamSession(model, tokenizer, budget=CacheBudget(21))  # BOS + 2 frames
        for i in range(3):
            session.feed(ids, frames[i : i + 1], kind="frame")
            session.frames_seen += 1
        streamed = hidden["h"][0]  # [10, D] layer-0 output of frame 2, after frame 0 was dropped
        positions = torch.tensor([[0] + list(range(11, 31))])
        with torch.no_grad():
            input_ids = torch.tensor([[tokenizer.bos_token_id] + ids * 2])
            # an explicit mask: without one, transformers reads a position jump as packed sequences
            model(
                input_ids=input_ids,
                pixel_values=frames[1:],
                position_ids=positions,
                attention_mask=torch.ones_like(input_ids),
            )
        reference = hidden["h"][0, 11:]
    finally:
        handle.remove()
    torch.testing.assert_close(streamed, reference, atol=1e-5, rtol=1e-5)

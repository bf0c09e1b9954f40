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
from transformers import AutoModelForCausalLM

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
from mllm_mod.streaming.budget import cache_slots
from mllm_mod.streaming.inference import teacher_forced_stream
from mllm_mod.streaming.objective import IGNORE, build_sequence


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


def test_sequence_layout_and_labels(stream_data, tiny):
    model, tokenizer = tiny
    cfg = model.config
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    frames = seq.frames()
    assert len(frames) == 16 and all(len(f) == cfg.tokens_per_frame for f in frames)
    assert int((seq.input_ids == cfg.frame_token_id).sum()) == 16 * 10
    reply_frames = {r.frame for r in seq.replies()}
    for f in frames:  # each frame's last token decides: silence, or the reply's first token
        decision = int(seq.labels[f.stop - 1])
        assert decision == (int(seq.input_ids[f.stop]) if f.frame in reply_frames else cfg.silence_token_id)
        assert (seq.labels[f.start : f.stop - 1] == IGNORE).all()
    for r in seq.replies():  # reply tokens learn the next token through </s>
        assert torch.equal(seq.labels[r.start : r.stop - 1], seq.input_ids[r.start + 1 : r.stop])
        assert int(seq.input_ids[r.stop - 1]) == tokenizer.eos_token_id
    for u in (s for s in seq.segments if s.kind == "user"):  # user turns precede their frame, no loss
        assert (seq.labels[u.start : u.stop] == IGNORE).all() and seq.segments[seq.segments.index(u) + 1].kind in (
            "user",
            "frame",
        )


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
    assert tok.convert_tokens_to_ids("<silence>") == model.config.silence_token_id
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
    assert len(ctx.records) == 2
    for record in ctx.records:
        assert not record.keep[~record.candidates].logical_not().any()  # text is never skipped
        for b in range(2):
            gids = ctx.groups[b][ctx.groups[b] >= 0].unique()
            kept = torch.stack([record.keep[b][ctx.groups[b] == g].sum() for g in gids])
            assert len(gids) == 16 and (kept == want).all(), kept


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
        # same silence decisions at every frame
        last = torch.tensor([f.stop - 2 for f in seq.frames()])
        silence = model.config.silence_token_id
        p_full = torch.softmax(full[last], -1)[:, silence]
        p_stream = torch.softmax(streamed[last], -1)[:, silence]
        assert torch.equal(p_full < 0.5, p_stream < 0.5)
        if mod:  # MoD layers cached only the kept tokens: 2 per frame plus every text token
            n_text = seq.input_ids.shape[0] - 10 * seq.num_frames
            for idx in mod_layer_map(model):
                layer = session.cache.layers[idx]
                assert isinstance(layer, MoDCacheLayer)
                assert layer.kept_length() == n_text + 2 * seq.num_frames
                assert layer.seen == seq.input_ids.shape[0]


def test_live_session_replies_and_continues(stream_data, tiny):
    model, tokenizer = tiny
    seq = sequences(model, tokenizer, stream_data[:1])[0]
    session = StreamSession(model, tokenizer, threshold=1.01, max_new_tokens=3)  # always replies
    replies = [session.frame(seq.pixel_values[i]) for i in range(4)]
    assert all(r is not None and r.time == i / 2 for i, r in enumerate(replies))
    # each frame: 10 tokens + a reply of at most 3 tokens + </s>
    assert 1 + 4 * 11 <= session.position <= 1 + 4 * 14 and session.cached_tokens == session.position
    quiet = StreamSession(model, tokenizer, threshold=0.0)
    assert all(quiet.frame(seq.pixel_values[i]) is None for i in range(4)) and quiet.position == 41


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
    session = StreamSession(model, tokenizer, threshold=0.0, budget=CacheBudget(budget, policy))
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

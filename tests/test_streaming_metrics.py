"""Streaming metrics on hand-made timelines, as VideoLLM-online's ``models/modeling_live.py``
(``stream_evaluate``) computes them: on time, early, late (run on from the cache), never, the last turn,
LM-PPL / LM-Correctness, and the turn-then-sample averaging. No video is decoded for the hand-made
cases: sequences are laid out for a given frame count and the decisions are given."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_routers
from logits import assert_logits_close

import mllm_mod
from mllm_mod.streaming import StreamRecord, Turn, tiny_stream_model
from transformers import DynamicCache

from mllm_mod.compat import cache_kwargs
from mllm_mod.streaming.metrics import average, cache_run_ahead, run_on, score_sequence, score_turns
from mllm_mod.streaming.objective import IGNORE, Layout, build_sequence

FPS = 2.0


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_stream_model(num_layers=1)
    return model.config, tokenizer


# frames 0..9 at 2 fps. Turn 1: frames 0..3 ('[' f0 ']' User ... '[' f1 , f2 , f3 ']' Assistant ...), the
# reply after frame 3 (1.5 s): 3 frame decisions (f1 ',', f2 ',', f3 ']'; f0, closed by the user turn,
# learns nothing) and 8 LM labels. Turn 2: frames 4..8, the reply after frame 8 (4.0 s): 5 decisions,
# 8 LM labels. Then frame 9, after the last turn.
TURNS = [
    Turn("user", 0.0, "narrate the shapes ."),
    Turn("assistant", 1.5, "a red circle appears ."),  # after frame 3
    Turn("assistant", 4.0, "the red circle disappears ."),  # after frame 8
]


def layout(setup, turns=TURNS, num_frames=10):
    config, tokenizer = setup
    return build_sequence(StreamRecord(video="none.mp4", turns=turns), num_frames, tokenizer, config)


def decision_positions(seq, config) -> list[int]:
    """Positions of the labelled frame decisions, in order."""
    mask = (seq.labels != IGNORE) & (seq.input_ids == config.frame_token_id)
    return mask.nonzero()[:, 0].tolist()


def perfect(seq, config):
    """A perfect predictor: replies exactly where a frame's label is not ',', every LM token right."""
    n = seq.input_ids.shape[0]
    reply = (seq.labels != config.silence_token_id) & (seq.labels != IGNORE)  # [T]
    return reply, torch.zeros(n), torch.ones(n, dtype=torch.bool)


def no_run_ahead(cut, first, n):
    raise AssertionError("no turn should need frames run on here")


class RunAhead:
    """A fake continuation: replies at the given offsets (0 = the first appended frame); records calls."""

    def __init__(self, at: set[int]):
        self.at, self.calls = at, []

    def __call__(self, cut: int, first: int, n: int) -> torch.Tensor:
        self.calls.append((cut, first, n))
        return torch.tensor([j in self.at for j in range(n)])


def test_layout_of_the_timeline(setup):
    config, _ = setup
    seq = layout(setup)
    assert len(decision_positions(seq, config)) == 3 + 5 + 1  # + frame 9, after the last turn
    lm = [(seq.labels != IGNORE) & (seq.input_ids != config.frame_token_id)]
    assert int(lm[0].sum()) == 8 + 8  # ']' -> Assistant, Assistant -> ':', 5 words, </s>; twice


def test_on_time(setup):
    config, _ = setup
    seq = layout(setup)
    scores = score_turns(seq, config, *perfect(seq, config), no_run_ahead)
    assert scores == [{"lm_ppl": 1.0, "lm_correctness": 1.0, "time_diff": 0.0, "fluency": 1.0}] * 2


def test_early_reply(setup):
    """Turn 2 replies at its 2nd decision (frame 5) instead of its 5th: frame_diff = 5 - 1 - 1 = 3 frames
    early (1.5 s); fluency = (idx + 1) / N = 2 / (5 + 8)."""
    config, _ = setup
    seq = layout(setup)
    reply, nll, correct = perfect(seq, config)
    reply[decision_positions(seq, config)[3 + 1]] = True
    second = score_turns(seq, config, reply, nll, correct, no_run_ahead)[1]
    assert second["time_diff"] == 1.5
    assert second["fluency"] == pytest.approx(2 / (5 + 8))


def test_late_reply_runs_on_from_the_cache(setup):
    """Turn 1 stays silent at its 3 decisions: the cache is cut after frame 3's last token and the next
    frames are run on, at most min(next turn's 5 frames, this turn's 4 frames - 1) = 3 of them, from
    frame 4; a reply at the 2nd gives frame_diff = -2 (1 s late), fluency (n_v - 1) / N = 2 / (3 + 8)."""
    config, _ = setup
    seq = layout(setup)
    reply, nll, correct = perfect(seq, config)
    frame3 = decision_positions(seq, config)[2]
    reply[frame3] = False
    ahead = RunAhead({1})
    first = score_turns(seq, config, reply, nll, correct, ahead)[0]
    assert ahead.calls == [(frame3 + 1, 4, 3)]
    assert first["time_diff"] == 1.0
    assert first["fluency"] == pytest.approx(2 / (3 + 8))
    assert first["lm_correctness"] == 1.0  # teacher forced: the text is scored as given


def test_missed_reply_counts_the_frames_looked_at(setup):
    config, _ = setup
    seq = layout(setup)
    reply, nll, correct = perfect(seq, config)
    reply[decision_positions(seq, config)[2]] = False
    first = score_turns(seq, config, reply, nll, correct, RunAhead(set()))[0]
    assert first["time_diff"] == 3 / FPS  # never: min(5, 4 - 1) = 3 frames
    assert first["fluency"] == pytest.approx(2 / (3 + 8))


def test_last_turn_late_or_missed_is_on_time(setup):
    """No frame after the last turn is looked at (modeling_live.py: the stream is assumed to end): TimeDiff
    0, and fluency is the on-time formula, with the LM prefix."""
    config, _ = setup
    seq = layout(setup)
    reply, nll, correct = perfect(seq, config)
    reply[decision_positions(seq, config)[7]] = False
    second_reply = seq.replies()[1]
    correct[second_reply.start + 2] = False  # ']'->Assistant, Assistant->':', ':'->'the' right, then wrong
    second = score_turns(seq, config, reply, nll, correct, no_run_ahead)[1]
    assert second["time_diff"] == 0.0
    assert second["lm_correctness"] == pytest.approx(3 / 8)
    assert second["fluency"] == pytest.approx((5 + 3) / (5 + 8))


def test_user_answered_turns_get_lm_metrics_only(setup):
    config, _ = setup
    turns = TURNS[:2] + [Turn("user", 2.5, "what color is it ?"), Turn("assistant", 2.5, "red .")]
    seq = layout(setup, turns, num_frames=8)
    scores = score_turns(seq, config, *perfect(seq, config), no_run_ahead)
    assert scores[1] == {"lm_ppl": 1.0, "lm_correctness": 1.0}


def test_ppl_and_correctness(setup):
    config, _ = setup
    seq = layout(setup)
    reply, nll, correct = perfect(seq, config)
    r = seq.replies()[0]  # LM labels at r.start - 1 .. r.stop - 2: 8 of them
    correct[r.start + 2] = False  # the 4th LM label is wrong
    nll[r.start - 1 : r.stop - 1] = math.log(2.0)
    first = score_turns(seq, config, reply, nll, correct, no_run_ahead)[0]
    assert first["lm_correctness"] == pytest.approx(3 / 8)
    assert first["lm_ppl"] == pytest.approx(2.0)
    assert first["fluency"] == pytest.approx((3 + 3) / (3 + 8))


def test_averaging_is_over_turns_then_samples():
    a = [{"lm_ppl": 1.0, "lm_correctness": 1.0, "time_diff": 0.0, "fluency": 1.0}] * 3
    b = [{"lm_ppl": 3.0, "lm_correctness": 0.0, "time_diff": 2.0, "fluency": 0.0}, {"lm_ppl": 3.0, "lm_correctness": 0.0}]
    out = average([a, b, []])
    assert out["lm_ppl"] == 2.0 and out["time_diff"] == 1.0 and out["lm_correctness"] == 0.5
    assert out["num_samples"] == 2 and out["num_turns"] == 5


@pytest.mark.parametrize("mod", [False, True], ids=["dense", "videomod"])
def test_run_ahead_from_the_cut_cache_equals_a_fresh_forward(mod):
    """The late-reply continuation: the full forward's cache cut after a frame, then ',' + frames, gives
    the logits of one forward over the prefix and those frames (dense and videomod)."""
    model, tokenizer = tiny_stream_model(num_layers=4)
    if mod:
        mllm_mod.retrofit(model, "videomod")
        randomize_routers(model)
    config = model.config
    seq = build_sequence(StreamRecord(video="none.mp4", turns=TURNS), 10, tokenizer, config)
    torch.manual_seed(0)
    seq.pixel_values = torch.randn(10, 3, 32, 32)
    frame3 = decision_positions(seq, config)[2]
    lay = Layout.of(tokenizer, config)
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    with torch.no_grad():
        model(input_ids=seq.input_ids[None], pixel_values=seq.pixel_values, use_cache=True, **cache_kwargs(cache))
        ahead = run_on(model, cache, seq.pixel_values, lay, frame3 + 1, 4, 3)  # [33, V]
        ids = torch.cat([seq.input_ids[: frame3 + 1], torch.tensor(([lay.separator] + lay.frame) * 3)])[None]
        fresh = model(input_ids=ids, pixel_values=seq.pixel_values[:7]).logits[0, frame3 + 1 :]
        decisions = cache_run_ahead(model, cache, seq, lay, threshold=1.01)(frame3 + 1, 4, 3)
    check = f"run-ahead from the cut cache == fresh forward ({'videomod' if mod else 'dense'})"
    assert_logits_close(ahead, fresh, check)
    assert decisions.tolist() == [True] * 3  # threshold > 1: every frame replies
    assert cache.get_seq_length() == seq.input_ids.shape[0]  # the evaluation's cache is left whole


def test_score_sequence_end_to_end():
    """The real path (forward, decisions, cache run-on) with decisions forced: every frame replies, then
    no frame does (a bonus on the ',' logit)."""
    model, tokenizer = tiny_stream_model(num_layers=2)
    seq = build_sequence(StreamRecord(video="none.mp4", turns=TURNS), 10, tokenizer, model.config)
    torch.manual_seed(0)
    seq.pixel_values = torch.randn(10, 3, 32, 32)
    lay = Layout.of(tokenizer, model.config)
    eager = score_sequence(model, seq, lay, threshold=1.01)  # P(',') < 1.01 everywhere: reply at once
    assert [t["time_diff"] for t in eager] == [2 / FPS, 4 / FPS]  # early by n_v - 1 frames
    assert [t["fluency"] for t in eager] == pytest.approx([1 / (3 + 8), 1 / (5 + 8)])
    sep = model.config.silence_token_id
    handle = model.lm_head.register_forward_hook(
        lambda m, a, out: out.index_add(-1, torch.tensor([sep]), torch.full((*out.shape[:-1], 1), 1e4))
    )
    try:
        mute = score_sequence(model, seq, lay, threshold=0.0)
    finally:
        handle.remove()
    assert [t["time_diff"] for t in mute] == [3 / FPS, 0.0]  # run on 3 frames, no reply; the last turn: 0
    assert [t["fluency"] for t in mute] == pytest.approx([2 / (3 + 8), 5 / (5 + 8)])  # late; on time, prefix 0
    assert [t["lm_correctness"] for t in mute] == [0.0, 0.0]

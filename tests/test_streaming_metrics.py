"""Streaming metrics on hand-made cases: a perfect predictor, late/early replies, wrong tokens, and the
turn-then-sample averaging. No video is decoded: sequences are laid out for a given frame count."""

from __future__ import annotations

import math

import pytest
import torch

from mllm_mod.streaming import StreamRecord, Turn, tiny_stream_model
from mllm_mod.streaming.metrics import average, score_turns
from mllm_mod.streaming.objective import build_sequence


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_stream_model(num_layers=1)
    return model.config, tokenizer


def layout(setup, turns, num_frames=8):
    config, tokenizer = setup
    return build_sequence(StreamRecord(video="none.mp4", turns=turns), num_frames, tokenizer, config)


def perfect(seq):
    """What a perfect predictor outputs: silence exactly off the reply frames, every next token right."""
    reply_frames = {r.frame for r in seq.replies()}
    silence = torch.tensor([0.0 if i in reply_frames else 1.0 for i in range(seq.num_frames)])  # [F]
    preds = torch.cat([seq.input_ids[1:], seq.input_ids[:1]])  # [T] next tokens
    return silence, preds, torch.zeros(seq.input_ids.shape[0])


TURNS = [
    Turn("user", 0.0, "narrate the shapes ."),
    Turn("assistant", 1.0, "a red circle appears ."),  # frame 2 at 2 fps
    Turn("assistant", 2.5, "the red circle disappears ."),  # frame 5
]


def test_perfect_predictor(setup):
    seq = layout(setup, TURNS)
    assert [r.frame for r in seq.replies()] == [2, 5]
    scores = score_turns(seq, *perfect(seq))
    assert scores == [{"lm_ppl": 1.0, "lm_correctness": 1.0, "time_diff": 0.0, "fluency": 1.0}] * 2


def test_late_reply_costs_time_and_fluency(setup):
    seq = layout(setup, TURNS)
    silence, preds, nll = perfect(seq)
    silence[2], silence[3] = 1.0, 0.0  # the first reply one frame late (0.5 s at 2 fps)
    first, second = score_turns(seq, silence, preds, nll)
    assert first["time_diff"] == 0.5
    # decisions of turn 1: frames 0, 1 silent (right), frame 2 silent (wrong) -> 2 right before the error,
    # out of 3 frame decisions + 6 reply tokens (": a red circle appears . </s>" is 7 tokens incl. ":")
    n_tokens = len(seq.replies()[0]) - 1
    assert n_tokens == 7
    assert first["fluency"] == pytest.approx(2 / (3 + n_tokens))
    # turn 2's window is frames 3, 4, 5: the stray reply at frame 3 is early (1 s) and breaks fluency at once
    assert second["time_diff"] == 1.0 and second["fluency"] == 0.0
    assert first["lm_correctness"] == second["lm_correctness"] == 1.0  # teacher forced: text unaffected


def test_no_reply_in_the_window_counts_the_window_end(setup):
    seq = layout(setup, TURNS)
    silence, preds, nll = perfect(seq)
    silence[5] = 1.0  # turn 2 never fires: window (2, 8) ends at frame 7 -> 1 s late
    assert score_turns(seq, silence, preds, nll)[1]["time_diff"] == 1.0


def test_correctness_and_ppl(setup):
    seq = layout(setup, TURNS)
    silence, preds, nll = perfect(seq)
    reply = seq.replies()[0]  # r_0 .. r_7; predictions of r_1 .. r_7 at reply.start .. reply.stop - 2
    preds[reply.start + 3] = -1  # the 4th reply token is wrong
    nll[reply.start : reply.stop - 1] = math.log(2.0)
    first = score_turns(seq, silence, preds, nll)[0]
    assert first["lm_correctness"] == pytest.approx(3 / 7)
    assert first["lm_ppl"] == pytest.approx(2.0)
    assert first["fluency"] == pytest.approx((3 + 3) / (3 + 7))  # 3 frame decisions + 3 tokens right


def test_averaging_is_over_turns_then_samples():
    a = [{"lm_ppl": 1.0, "lm_correctness": 1.0, "time_diff": 0.0, "fluency": 1.0}] * 3
    b = [{"lm_ppl": 3.0, "lm_correctness": 0.0, "time_diff": 2.0, "fluency": 0.0}]
    out = average([a, b, []])
    assert out["lm_ppl"] == 2.0 and out["time_diff"] == 1.0 and out["lm_correctness"] == 0.5
    assert out["num_samples"] == 2 and out["num_turns"] == 4

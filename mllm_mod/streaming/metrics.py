r"""Streaming metrics, computed per turn as VideoLLM-online's ``models/modeling_live.py``
(``LiveMixin.stream_evaluate``) computes them, averaged over a video's turns, then over videos.

A turn is the span after the previous ``</s>`` through the next one. Its labelled positions split into
the frame decisions (labels at frame tokens: ',' or ']\n', n_v of them) and the LM part (the labels
of ``]\n -> Assistant``, ``Assistant -> :``, the text and ``</s>``: n_lm of them). One teacher-forced
forward over the whole sequence gives every logit; a frame *replies* where `inference.replies_at`
says so (threshold 0: the argmax is not ',').

- LM-PPL: ``exp(mean NLL)`` of the LM part.
- LM-Correctness: the correct greedy prefix of the LM part, over n_lm.
- TimeDiff: the first replying frame decision at index idx gives ``frame_diff = n_v - idx - 1`` (early
  by that many frames; 0 on time). With none (late or never): on the video's last turn 0; otherwise
  the cache is cut after the turn's last frame and the next real frames are run on from it, each as
  ',' + its tokens, at most ``a = min(frames of the next turn, frames of this turn - 1)`` of them:
  the first replying one at j gives ``-(j + 1)``, none gives ``-a`` (``a = 0``: 0). TimeDiff is
  ``|frame_diff| / fps`` seconds.
- Fluency: on time ``(n_v + LM prefix) / (n_v + n_lm)``; early ``(idx + 1) / (n_v + n_lm)``; late
  ``(n_v - 1) / (n_v + n_lm)``.

Turns whose reply answers a user turn at once have no frame decision (their frames all learn ','):
VideoLLM-online runs this evaluation on narration only, where every reply is decided by a frame; here
such turns get the LM metrics only (running on for a reply that no frame is meant to make would count
a correct silence as late).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from ..compat import cache_kwargs
from .budget import cache_slots, drop_slots
from .data import StreamRecord, load_records, read_frames
from .inference import EVAL_THRESHOLD, replies_at
from .model import StreamConfig, StreamForCausalLM
from .objective import IGNORE, Layout, StreamDataset, StreamSequence, build_sequence

METRICS = ("lm_ppl", "lm_correctness", "time_diff", "fluency")

# (cut, first_frame, n) -> [n] bool: run n frames from `first_frame` on from the cache cut at `cut`
# (positions < cut kept); does each frame's last token reply?
RunAhead = Callable[[int, int, int], torch.Tensor]


def score_turns(
    seq: StreamSequence,
    config: StreamConfig,
    reply: torch.Tensor,
    nll: torch.Tensor,
    correct: torch.Tensor,
    run_ahead: RunAhead,
) -> list[dict[str, float]]:
    """The metrics of every turn of `seq` (see the module docstring), from the reply decision [T] bool at
    each position (read at labelled frame tokens), the NLL [T] of each position's label and whether the
    greedy token is it, correct [T] bool; `run_ahead` serves late replies. A metric a turn does not
    define is left out of its dict."""
    ids, labels = seq.input_ids, seq.labels
    n_tok = config.tokens_per_frame
    stops = [r.stop for r in seq.replies()]
    starts = [0] + stops[:-1]
    frames_in = [int((ids[a:b] == config.frame_token_id).sum()) // n_tok for a, b in zip(starts, stops)]
    past_frames = 0
    scores = []
    for r, (a, b) in enumerate(zip(starts, stops)):
        learn = labels[a:b] != IGNORE  # [L]
        stream = learn & (ids[a:b] == config.frame_token_id)  # [L] frame decisions
        lm = learn & ~stream  # [L]
        turn: dict[str, float] = {}
        if lm.any():
            turn["lm_ppl"] = float(nll[a:b][lm].double().mean().exp())  # inf past float range
            prefix = _leading(correct[a:b][lm])
            turn["lm_correctness"] = prefix / int(lm.sum())
        n_v = int(stream.sum())
        decided = n_v > 0 and int(labels[a:b][stream][-1]) != config.silence_token_id
        if decided:
            frame_diff = _frame_diff(reply[a:b][stream], r == len(stops) - 1, frames_in, r, a, stream, past_frames, run_ahead)
            turn["time_diff"] = abs(frame_diff) / config.fps
            if lm.any():
                n = n_v + int(lm.sum())
                if frame_diff == 0:
                    turn["fluency"] = (n_v + prefix) / n
                elif frame_diff > 0:
                    turn["fluency"] = (n_v - frame_diff) / n
                else:
                    turn["fluency"] = (n_v - 1) / n
        scores.append(turn)
        past_frames += frames_in[r]
    return scores


def _frame_diff(
    decisions: torch.Tensor,
    last_turn: bool,
    frames_in: list[int],
    r: int,
    start: int,
    stream: torch.Tensor,
    past_frames: int,
    run_ahead: RunAhead,
) -> int:
    """Frames early (> 0) or late (< 0) of turn r, from its frame decisions [n_v] (``stream_evaluate``)."""
    n_v = decisions.shape[0]
    if decisions.any():
        return n_v - int(decisions.nonzero()[0, 0]) - 1
    if last_turn:  # no frame after the last turn: the stream is assumed to end here
        return 0
    ahead = min(frames_in[r + 1], frames_in[r] - 1)
    if ahead == 0:
        return 0
    cut = start + int(stream.nonzero()[-1, 0]) + 1  # through the turn's last frame
    later = run_ahead(cut, past_frames + frames_in[r], ahead)  # [ahead] bool
    return -(int(later.nonzero()[0, 0]) + 1) if later.any() else -ahead


def _leading(flags: torch.Tensor) -> int:
    """How many leading entries of [n] bool are True."""
    wrong = (~flags).nonzero()
    return int(wrong[0, 0]) if wrong.numel() else int(flags.shape[0])


def average(per_sample: list[list[dict[str, float]]]) -> dict[str, float]:
    """Each metric averaged over the turns of a video that define it, then over the videos that have one."""
    out: dict[str, float] = {}
    for m in METRICS:
        means = [float(np.mean([t[m] for t in turns if m in t])) for turns in per_sample if any(m in t for t in turns)]
        out[m] = float(np.mean(means)) if means else float("nan")
    return {**out, "num_samples": sum(1 for t in per_sample if t), "num_turns": sum(len(t) for t in per_sample)}


def run_on(
    model: StreamForCausalLM, cache: DynamicCache, pixel_values: torch.Tensor, layout: Layout, cut: int, first_frame: int, n: int
) -> torch.Tensor:
    """Logits [n * (1 + N), V] of n frames from `first_frame` of `pixel_values` [F, 3, S, S], each as ',' +
    its tokens, run on from a copy of `cache` cut to its first `cut` positions (`cache` is left as it is)."""
    device = next(model.parameters()).device
    trimmed = copy.deepcopy(cache)
    drop_slots(trimmed, cut, cache_slots(trimmed))
    input_ids = torch.tensor([([layout.separator] + layout.frame) * n], device=device)  # [1, n * (1 + N)]
    pixels = pixel_values[first_frame : first_frame + n].to(device)  # [n, 3, S, S]
    return model(input_ids=input_ids, pixel_values=pixels, use_cache=True, **cache_kwargs(trimmed)).logits[0]


def cache_run_ahead(
    model: StreamForCausalLM, cache: DynamicCache, seq: StreamSequence, layout: Layout, threshold: float
) -> RunAhead:
    """`RunAhead` from the KV cache of the teacher-forced forward over `seq` (``stream_evaluate``)."""
    unit = 1 + len(layout.frame)

    def run(cut: int, first_frame: int, n: int) -> torch.Tensor:
        logits = run_on(model, cache, seq.pixel_values, layout, cut, first_frame, n)  # [n * unit, V]
        return replies_at(logits[unit - 1 :: unit], model.config.silence_token_id, threshold).cpu()  # [n]

    return run


@torch.no_grad()
def score_sequence(model: StreamForCausalLM, seq: StreamSequence, layout: Layout, threshold: float) -> list[dict[str, float]]:
    """One teacher-forced forward over `seq` with a cache, then `score_turns`."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    out = model(
        input_ids=seq.input_ids[None].to(device),
        pixel_values=seq.pixel_values.to(device),
        use_cache=True,
        **cache_kwargs(cache),
    )
    logits = out.logits[0].float().cpu()  # [T, V]
    labels = seq.labels
    nll = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")  # [T]
    correct = logits.argmax(dim=-1) == labels  # [T]
    reply = replies_at(logits, model.config.silence_token_id, threshold)  # [T]
    return score_turns(seq, model.config, reply, nll, correct, cache_run_ahead(model, cache, seq, layout, threshold))


@torch.no_grad()
def evaluate_streaming(
    model: StreamForCausalLM,
    records: list[StreamRecord] | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    threshold: float = EVAL_THRESHOLD,
    video_folder: str | os.PathLike | None = None,
    max_samples: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """LM-PPL, LM-Correctness, TimeDiff (s) and Fluency of `model` on streaming `records` (a list or a
    JSON path). `threshold`: see `inference.replies_at` (0, the default: VideoLLM-online's evaluation).
    The tokenizer defaults to the one saved beside the model (``model.name_or_path``)."""
    if tokenizer is None:
        if not model.name_or_path:
            raise ValueError("evaluate_streaming needs a tokenizer for a model not loaded from a directory")
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if not isinstance(records, list):
        records = load_records(records, video_folder)
    records = records[:max_samples] if max_samples is not None else records
    dataset = StreamDataset(records, tokenizer, model.config, cache=False)
    layout = Layout.of(tokenizer, model.config)
    was_training = model.training
    model.eval()
    try:
        per_sample = [
            score_sequence(model, dataset.sequence(idx), layout, threshold)
            for idx in tqdm(range(len(dataset)), desc="streaming eval", unit="video", disable=not progress)
        ]
    finally:
        model.train(was_training)
    return average(per_sample)


def random_timing_baseline(
    records: list[StreamRecord],
    tokenizer: PreTrainedTokenizerBase,
    config: StreamConfig,
    seed: int = 0,
    repeats: int = 20,
) -> dict[str, float]:
    """TimeDiff of a responder that replies at random frames, as often as the data does (each frame with
    probability = the fraction of frame decisions that reply); the other metrics are not defined (NaN)."""
    rng = np.random.default_rng(seed)
    per_sample = []
    for record in records:
        frames, _ = read_frames(record.video, config.fps)
        seq = build_sequence(record, frames.shape[0], tokenizer, config)
        stream = (seq.labels != IGNORE) & (seq.input_ids == config.frame_token_id)
        rate = float((seq.labels[stream] != config.silence_token_id).float().mean()) if stream.any() else 0.0
        n = seq.input_ids.shape[0]
        for _ in range(repeats):
            draw = lambda k: torch.from_numpy(rng.random(k) < rate)  # noqa: E731  [k] bool
            turns = score_turns(seq, config, draw(n), torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool),
                                lambda cut, first, k: draw(k))
            per_sample.append([{"time_diff": t["time_diff"]} if "time_diff" in t else {} for t in turns])
    return average(per_sample)

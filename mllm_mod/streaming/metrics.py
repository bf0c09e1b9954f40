"""Streaming metrics (VideoLLM-online), teacher forced, per assistant turn, averaged over turns then samples.

For assistant turn k, said after frame f_k (reply tokens ``r_0 .. r_{m-1}``, ``r_0`` = ``ASSISTANT``
is the frame's decision, ``r_{m-1}`` = ``</s>``), with the previous and next replies at frames
f_{k-1} and f_{k+1} (-1 and F at the ends):

- LM-PPL: ``exp(mean NLL)`` of ``r_1 .. r_{m-1}``, each given the true prefix.
- LM-Correctness: length of the correct greedy prefix of ``r_1 .. r_{m-1}``, over ``m - 1``.
- TimeDiff: ``|t(pred) - t(f_k)|`` in seconds, pred = the first frame in ``(f_{k-1}, f_{k+1})`` whose
  silence probability is below the threshold, or the window's last frame if there is none.
- Fluency: the decisions of the turn in order: silence on every frame in ``(f_{k-1}, f_k)``, a reply
  at f_k, then the greedy reply tokens ``r_1 .. r_{m-1}``; the number correct before the first error,
  over their count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .data import StreamRecord, load_records, read_frames
from .model import StreamConfig, StreamForCausalLM
from .objective import StreamDataset, StreamSequence, build_sequence

METRICS = ("lm_ppl", "lm_correctness", "time_diff", "fluency")


def token_stats(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy predictions [T] and the NLL [T] of the next true token at each position (0 at the end)."""
    logits = logits.float()  # [T, V]
    nll = F.cross_entropy(logits[:-1], input_ids[1:], reduction="none")  # [T - 1]
    return logits.argmax(dim=-1), F.pad(nll, (0, 1))


def silence_probs(logits: torch.Tensor, seq: StreamSequence, silence_token_id: int) -> torch.Tensor:
    """[F] silence probability at each frame's last token."""
    last = torch.tensor([s.stop - 1 for s in seq.frames()], dtype=torch.long)  # [F]
    return torch.softmax(logits[last].float(), dim=-1)[:, silence_token_id]


def score_turns(
    seq: StreamSequence,
    silence: torch.Tensor,
    preds: torch.Tensor,
    nll: torch.Tensor,
    threshold: float = 0.5,
) -> list[dict[str, float]]:
    """The four metrics of every assistant turn of `seq`, from per-frame silence probabilities [F],
    greedy predictions [T] and next-token NLLs [T] (see the module docstring)."""
    reply_at = (silence < threshold).tolist()  # [F] the model would reply after frame i
    replies = seq.replies()
    frames = [r.frame for r in replies]
    scores = []
    for k, reply in enumerate(replies):
        fk = reply.frame
        prev = frames[k - 1] if k > 0 else -1
        nxt = frames[k + 1] if k + 1 < len(frames) else seq.num_frames
        targets = seq.input_ids[reply.start + 1 : reply.stop]  # [m - 1] r_1 .. r_{m-1}
        predicted = preds[reply.start : reply.stop - 1]  # [m - 1]
        correct_tokens = (predicted == targets).tolist()
        window = list(range(prev + 1, nxt))
        pred_frame = next((i for i in window if reply_at[i]), window[-1])
        decisions = [reply_at[i] == (i == fk) for i in range(prev + 1, fk + 1)] + correct_tokens
        scores.append(
            {
                "lm_ppl": math.exp(float(nll[reply.start : reply.stop - 1].mean())),
                "lm_correctness": _leading(correct_tokens) / len(correct_tokens),
                "time_diff": abs(float(seq.times[pred_frame] - seq.times[fk])),
                "fluency": _leading(decisions) / len(decisions),
            }
        )
    return scores


def _leading(flags: Sequence[bool]) -> int:
    """How many leading entries are True."""
    return next((i for i, ok in enumerate(flags) if not ok), len(flags))


def average(per_sample: list[list[dict[str, float]]]) -> dict[str, float]:
    """Average over each sample's turns, then over samples (samples without turns are left out)."""
    means = [{m: float(np.mean([t[m] for t in turns])) for m in METRICS} for turns in per_sample if turns]
    out = {m: float(np.mean([s[m] for s in means])) if means else float("nan") for m in METRICS}
    return {**out, "num_samples": len(means), "num_turns": sum(len(t) for t in per_sample)}


@torch.no_grad()
def evaluate_streaming(
    model: StreamForCausalLM,
    records: list[StreamRecord] | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    threshold: float = 0.5,
    video_folder: str | os.PathLike | None = None,
    max_samples: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """LM-PPL, LM-Correctness, TimeDiff (s) and Fluency of `model` on streaming `records` (a list or a
    JSON path), teacher forced: one forward per video over its whole interleaved sequence. The
    tokenizer defaults to the one saved beside the model (``model.name_or_path``)."""
    if tokenizer is None:
        if not model.name_or_path:
            raise ValueError("evaluate_streaming needs a tokenizer for a model not loaded from a directory")
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if not isinstance(records, list):
        records = load_records(records, video_folder)
    records = records[:max_samples] if max_samples is not None else records
    dataset = StreamDataset(records, tokenizer, model.config, cache=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_sample = []
    try:
        for idx in tqdm(range(len(dataset)), desc="streaming eval", unit="video", disable=not progress):
            seq = dataset.sequence(idx)
            out = model(input_ids=seq.input_ids[None].to(device), pixel_values=seq.pixel_values.to(device))
            logits = out.logits[0].cpu()  # [T, V]
            preds, nll = token_stats(logits, seq.input_ids)
            silence = silence_probs(logits, seq, model.config.silence_token_id)
            per_sample.append(score_turns(seq, silence, preds, nll, threshold))
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
    """TimeDiff of a responder that replies at random frames, as often as the data does (each frame
    with probability = the fraction of reply frames); the other metrics are not defined for it (NaN)."""
    rng = np.random.default_rng(seed)
    per_sample = []
    for record in records:
        frames, _ = read_frames(record.video, config.fps)
        seq = build_sequence(record, frames.shape[0], tokenizer, config)
        rate = len(seq.replies()) / seq.num_frames
        nan = torch.full((seq.input_ids.shape[0],), float("nan"))
        for _ in range(repeats):
            silence = torch.from_numpy((rng.random(seq.num_frames) >= rate).astype(np.float32))  # 0 = reply
            turns = score_turns(seq, silence, torch.full_like(seq.input_ids, -1), nan)
            per_sample.append([{**{m: float("nan") for m in METRICS}, "time_diff": t["time_diff"]} for t in turns])
    return average(per_sample)

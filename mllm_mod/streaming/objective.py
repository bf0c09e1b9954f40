"""The streaming objective: one interleaved causal sequence per video, its labels, a dataset and a collator.

Layout (frames at the model's fps, ``N = 1 + grid**2`` placeholders each)::

    <s> USER : narrate ... [frame 0] [frame 1] ... USER : q [frame i] ASSISTANT : reply </s> [frame i+1] ...

A user turn is read just before the frame it belongs to; an assistant turn follows the frame that
decides it. Labels (aligned with the inputs: the label at t is the token after t):

- the last token of every frame: the silence token where no reply follows, else the reply's first
  token (``ASSISTANT``): the frame's decision;
- reply tokens: the next reply token, through ``</s>``: the ordinary LM loss;
- everything else (prompt, user turns, the other frame tokens): ignored (-100).

Frame labels weigh ``config.frame_loss_weight`` in the loss (text 1), see `model.StreamForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .data import StreamRecord, frame_index, preprocess, read_frames
from .model import StreamConfig

USER_PREFIX = "USER :"
REPLY_PREFIX = "ASSISTANT :"
IGNORE = -100


@dataclass
class Segment:
    """A span ``[start, stop)`` of the sequence: "prompt" (BOS), "user", "frame" or "reply".
    `frame` is the frame index of a frame, or the frame a user/reply turn belongs to."""

    kind: str
    start: int
    stop: int
    frame: int = -1
    turn: int = -1  # index of the turn in the record (user / reply segments)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class StreamSequence:
    """A record laid out as one sequence: ids and labels [T], its segments, and the frame times."""

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long
    segments: list[Segment]
    times: np.ndarray  # [F] seconds of each frame
    record_id: str = ""
    pixel_values: torch.Tensor | None = field(default=None, repr=False)  # [F, 3, S, S]

    @property
    def num_frames(self) -> int:
        return len(self.times)

    def frames(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "frame"]

    def replies(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "reply"]


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def reply_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of an assistant turn as it appears in the sequence: ``ASSISTANT : text </s>``."""
    return text_ids(tokenizer, f"{REPLY_PREFIX} {text}") + [tokenizer.eos_token_id]


def build_sequence(
    record: StreamRecord, num_frames: int, tokenizer: PreTrainedTokenizerBase, config: StreamConfig
) -> StreamSequence:
    """Lay out `record` over `num_frames` frames at ``config.fps``; raises on turns past the video's end."""
    fps, n_tok = config.fps, config.tokens_per_frame
    user: dict[int, list[tuple[int, str]]] = {}
    reply: dict[int, tuple[int, str]] = {}
    for k, turn in enumerate(record.turns):
        i = frame_index(turn.time, fps)
        if i >= num_frames:
            raise ValueError(
                f"{record.id or record.video}: {turn.role} turn at {turn.time:g} s is after the last frame "
                f"({(num_frames - 1) / fps:g} s at {fps:g} fps)"
            )
        if turn.role == "user":
            user.setdefault(i, []).append((k, turn.text))
        elif i in reply:
            raise ValueError(
                f"{record.id or record.video}: two assistant turns fall on frame {i} ({i / fps:g} s); merge them"
            )
        else:
            reply[i] = (k, turn.text)

    ids: list[int] = []
    labels: list[int] = []
    segments: list[Segment] = []

    def add(kind: str, tokens: list[int], token_labels: list[int], frame: int = -1, turn: int = -1) -> None:
        segments.append(Segment(kind, len(ids), len(ids) + len(tokens), frame, turn))
        ids.extend(tokens)
        labels.extend(token_labels)

    if tokenizer.bos_token_id is not None:
        add("prompt", [tokenizer.bos_token_id], [IGNORE])
    for i in range(num_frames):
        for k, text in user.get(i, []):
            tokens = text_ids(tokenizer, f"{USER_PREFIX} {text}")
            add("user", tokens, [IGNORE] * len(tokens), i, k)
        tokens = reply_ids(tokenizer, reply[i][1]) if i in reply else None
        decision = tokens[0] if tokens else config.silence_token_id
        add("frame", [config.frame_token_id] * n_tok, [IGNORE] * (n_tok - 1) + [decision], i)
        if tokens:
            add("reply", tokens, tokens[1:] + [IGNORE], i, reply[i][0])
    return StreamSequence(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        segments=segments,
        times=np.arange(num_frames) / fps,
        record_id=record.id,
    )


class StreamDataset(Dataset):
    """Streaming records -> ``{"input_ids", "labels", "pixel_values"}`` samples (frames read with decord).

    `cache`: keep decoded, preprocessed frames in memory (small synthetic sets, repeated epochs).
    """

    def __init__(
        self,
        records: list[StreamRecord],
        tokenizer: PreTrainedTokenizerBase,
        config: StreamConfig,
        cache: bool = True,
    ):
        self.records, self.tokenizer, self.config, self.cache = records, tokenizer, config, cache
        self._frames: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def pixel_values(self, idx: int) -> torch.Tensor:
        """[F, 3, S, S] preprocessed frames of record `idx`."""
        if idx in self._frames:
            return self._frames[idx]
        vision = self.config.vision_config
        frames, _ = read_frames(self.records[idx].video, self.config.fps)
        pixels = preprocess(frames, vision.image_size, self.config.image_mean, self.config.image_std)
        if self.cache:
            self._frames[idx] = pixels
        return pixels

    def sequence(self, idx: int) -> StreamSequence:
        pixels = self.pixel_values(idx)
        seq = build_sequence(self.records[idx], pixels.shape[0], self.tokenizer, self.config)
        seq.pixel_values = pixels
        return seq

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        seq = self.sequence(idx)
        return {"input_ids": seq.input_ids, "labels": seq.labels, "pixel_values": seq.pixel_values}


@dataclass
class StreamCollator:
    """Right-pads ids (pad id) and labels (-100), builds the attention mask, and concatenates every
    sample's frames in batch order (the order in which the model fills the frame placeholders)."""

    pad_token_id: int

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(s["input_ids"].shape[0] for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros(batch, length, dtype=torch.long)  # [B, T]
        for b, s in enumerate(samples):
            n = s["input_ids"].shape[0]
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            out["pixel_values"] = torch.cat(pixels, dim=0)  # [sum F, 3, S, S]
        return out

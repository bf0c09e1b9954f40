r"""The streaming objective: one interleaved causal sequence per video, its labels, a dataset and a collator.

The layout is VideoLLM-online's chat template (``models/tokenization_live.py``), frames at the model's
fps, ``N = 1 + grid**2`` placeholders ``<v>`` each, consecutive frames separated by ',' and every run of
frames wrapped in '[' ... ']'::

    <s> \n[ <v>*N ]\n User: narrate ... \n[ <v>*N , <v>*N , <v>*N ]\n Assistant: a reply </s> \n[ <v>*N , ...

Turns are placed as `data.py` says (a user turn after the frame at or before its time; an assistant
turn after the frame at or after its time, or right after the user turn it answers). Labels (aligned
with the inputs: the label at t is the token after t), as ``tokenization_live.get_learn_ranges`` and
``data/data_collator.py`` set them:

- the last token of every frame: ',' (stay silent) where the next frame follows in the same run;
  the run's closing ']\n' where a reply follows the frame (the frame decides to speak); none where the
  run is closed by a user turn (VideoLLM-online leaves the frame before a user turn unlearned in its
  narration data and first livechat stream); ',' on the video's last frame when nothing follows;
- the reply: its first token ('Assistant') from the token before it (the ']\n', or the end of the
  user turn it answers), then ':', the text and ``</s>``: the ordinary LM loss;
- everything else (BOS, brackets, separators, user turns, the other frame tokens): ignored (-100).

Frame labels weigh ``config.frame_loss_weight`` in the loss (text 1), see `model.StreamForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .data import StreamRecord, frame_index, preprocess, read_frames, user_frame_index
from .model import StreamConfig

USER_PREFIX = "User:"
REPLY_PREFIX = "Assistant:"
STREAM_OPEN = "\n["
STREAM_CLOSE = "]\n"
SEPARATOR = ","
NEWLINE = "\n"
IGNORE = -100


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclass(frozen=True)
class Layout:
    """The token ids of the template's pieces for one tokenizer and model (each piece is tokenized on
    its own, so a word-level tokenizer and a BPE one agree on where every piece starts)."""

    frame: list[int]  # [N] placeholders of one frame
    separator: int  # ',' (= config.silence_token_id)
    open: list[int]  # '\n['
    close: list[int]  # ']\n': its first token is what a frame predicts to reply
    newline: list[int]  # '\n' before a turn that does not follow a run of frames (may be empty)
    bos: list[int]
    eos: int
    tokenizer: PreTrainedTokenizerBase = field(repr=False, compare=False)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, config: StreamConfig) -> Layout:
        """Raises if the tokenizer does not give ',' as the config's single silence token, or no brackets."""
        sep = text_ids(tokenizer, SEPARATOR)
        if sep != [config.silence_token_id]:
            raise ValueError(
                f"the frame separator {SEPARATOR!r} tokenizes to {sep}, but config.silence_token_id is "
                f"{config.silence_token_id}: they must be one and the same token"
            )
        layout = cls(
            frame=[config.frame_token_id] * config.tokens_per_frame,
            separator=config.silence_token_id,
            open=text_ids(tokenizer, STREAM_OPEN),
            close=text_ids(tokenizer, STREAM_CLOSE),
            newline=text_ids(tokenizer, NEWLINE),
            bos=[] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id],
            eos=tokenizer.eos_token_id,
            tokenizer=tokenizer,
        )
        if not layout.open or not layout.close:
            raise ValueError(f"the tokenizer gives no token for {STREAM_OPEN!r} or {STREAM_CLOSE!r}")
        return layout

    def user(self, text: str) -> list[int]:
        """``User: text``."""
        return text_ids(self.tokenizer, f"{USER_PREFIX} {text}")

    def reply(self, text: str) -> list[int]:
        """``Assistant: text </s>``."""
        return self.reply_prompt() + text_ids(self.tokenizer, f" {text}") + [self.eos]

    def reply_prompt(self) -> list[int]:
        """``Assistant:``: what inference feeds before generating a reply (as ``demo/inference.py``)."""
        return text_ids(self.tokenizer, REPLY_PREFIX)


@dataclass
class Segment:
    r"""A span ``[start, stop)`` of the sequence: "prompt" (BOS), "open" ('\n['), "frame", "sep" (','),
    "close" (']\n'), "newline", "user" or "reply". `frame` is the frame index of a frame, or the frame
    after which a turn comes; `turn` the turn's index in the record (user / reply segments)."""

    kind: str
    start: int
    stop: int
    frame: int = -1
    turn: int = -1

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


def place_turns(record: StreamRecord, num_frames: int, fps: float) -> dict[int, list[tuple[int, bool]]]:
    """Frame index -> the turns said after that frame, in order, as ``(turn index, decided)`` where
    `decided` marks an assistant turn the frame itself decides (not one answering a user turn at once).
    Raises on turns past the last frame and on two decided replies after one frame."""
    after: dict[int, list[tuple[int, bool]]] = {}
    decided_at: set[int] = set()
    name = record.id or record.video
    for k, turn in enumerate(record.turns):
        prev = record.turns[k - 1] if k > 0 else None
        answers_user = turn.role == "assistant" and prev is not None and prev.role == "user" and prev.time == turn.time
        if turn.role == "user":
            i = user_frame_index(turn.time, fps)
        elif answers_user:
            i = user_frame_index(prev.time, fps)
        else:
            i = frame_index(turn.time, fps)
        if i >= num_frames:
            raise ValueError(
                f"{name}: {turn.role} turn at {turn.time:g} s is after the last frame "
                f"({(num_frames - 1) / fps:g} s at {fps:g} fps)"
            )
        decided = turn.role == "assistant" and not answers_user
        if decided and (i in decided_at or any(r for _, r in after.get(i, []))):
            raise ValueError(f"{name}: two assistant turns fall on frame {i} ({i / fps:g} s); merge them")
        if decided:
            decided_at.add(i)
        after.setdefault(i, []).append((k, decided))
    for turns in after.values():  # a decided reply is said right after its frame, before the turns that follow it
        turns.sort(key=lambda kd: not kd[1])
    return after


def build_sequence(
    record: StreamRecord, num_frames: int, tokenizer: PreTrainedTokenizerBase, config: StreamConfig
) -> StreamSequence:
    """Lay out `record` over `num_frames` frames at ``config.fps`` (see the module docstring)."""
    layout = Layout.of(tokenizer, config)
    after = place_turns(record, num_frames, config.fps)
    ids: list[int] = []
    labels: list[int] = []
    segments: list[Segment] = []

    def add(kind: str, tokens: list[int], frame: int = -1, turn: int = -1) -> None:
        if tokens:
            segments.append(Segment(kind, len(ids), len(ids) + len(tokens), frame, turn))
            ids.extend(tokens)
            labels.extend([IGNORE] * len(tokens))

    def learn(tokens: list[int]) -> None:
        """Label the last |tokens| positions' predecessors with `tokens` (the label at t is the token after t)."""
        labels[len(ids) - len(tokens) - 1 : len(ids) - 1] = tokens

    add("prompt", layout.bos)
    in_run = False
    for i in range(num_frames):
        add("sep" if in_run else "open", [layout.separator] if in_run else layout.open, i)
        add("frame", layout.frame, i)
        in_run = True
        turns = after.get(i, [])
        if not turns:
            labels[-1] = layout.separator  # silence: the next frame follows (or the video ends)
            continue
        for j, (k, decided) in enumerate(turns):
            turn = record.turns[k]
            if in_run:
                add("close", layout.close, i)
                if decided:
                    learn(layout.close)  # the frame's last token predicts ']\n': reply now
                in_run = False
            else:
                add("newline", layout.newline, i)
            if turn.role == "user":
                add("user", layout.user(turn.text), i, k)
            else:
                add("reply", layout.reply(turn.text), i, k)
                learn(layout.reply(turn.text))
    return StreamSequence(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        segments=segments,
        times=np.arange(num_frames) / config.fps,
        record_id=record.id,
    )


def clip_frames(record: StreamRecord, num_frames: int, fps: float, max_frames: int | None) -> tuple[StreamRecord, int]:
    """At most `max_frames` frames, as ``data/stream.py`` (``max_frames_clip``) clips: the turns said after
    a frame past the limit are dropped and the video ends with the last turn kept."""
    if max_frames is None or num_frames <= max_frames:
        return record, num_frames
    after = place_turns(record, num_frames, fps)
    kept = sorted(k for i, turns in after.items() if i < max_frames for k, _ in turns)
    last = max((i for i in after if i < max_frames), default=max_frames - 1)
    turns = [record.turns[k] for k in kept]
    return StreamRecord(video=record.video, turns=turns, id=record.id, extra=record.extra), last + 1


class StreamDataset(Dataset):
    """Streaming records -> ``{"input_ids", "labels", "pixel_values"}`` samples (frames read with decord).

    `cache`: keep decoded, preprocessed frames in memory (small synthetic sets, repeated epochs).
    `max_frames`: clip longer videos (`clip_frames`; VideoLLM-online trains on at most 1,200 frames).
    """

    def __init__(
        self,
        records: list[StreamRecord],
        tokenizer: PreTrainedTokenizerBase,
        config: StreamConfig,
        cache: bool = True,
        max_frames: int | None = None,
    ):
        self.records, self.tokenizer, self.config, self.cache = records, tokenizer, config, cache
        self.max_frames = max_frames
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
        record, n = clip_frames(self.records[idx], pixels.shape[0], self.config.fps, self.max_frames)
        seq = build_sequence(record, n, self.tokenizer, self.config)
        seq.pixel_values = pixels[:n]
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

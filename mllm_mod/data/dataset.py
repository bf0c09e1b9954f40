"""LLaVA-format instruction data as a torch `Dataset`, and the collator that pads it for training.

A record is ``{"id", "image": path | [paths] (or "video": path | [paths]), "conversations": [{"from":
"human"|"gpt", "value": "..."}]}``. Structure and file existence are checked for every record when
the dataset is built; pictures and clips are decoded when a sample is read (or every sample is
decoded and encoded once up front with ``verify_media=True``). A bad sample raises `DataError` naming
its id and file; with ``skip_bad_samples=True`` it is left out instead, logged, and recorded in
``dataset.skipped`` (see `summary`). A sample found bad while training (read time) is replaced by the
next good one; in DataLoader worker processes such skips are logged by the worker but cannot reach the
main process's count, which `summary` says (use ``verify_media`` for exact counts up front).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .conversation import COUNT_KEYS, IGNORE_INDEX, TEXT_KEYS, count_placeholders, encode, to_messages, truncate
from .media import DataError, as_list, load_image, load_video, resolve

logger = logging.getLogger(__name__)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records from a JSON list or a JSONL file."""
    path = str(path)
    with open(path) as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")  # noqa: TRY004 (bad data)
    return records


@dataclass
class DataOptions:
    """How samples are read.

    max_length: tokens per sample after vision-token expansion (truncation never splits an image).
    num_frames / fps: uniform frame sampling of videos (`media.frame_indices`); video_backend: decord or pyav.
    skip_bad_samples: leave bad samples out (counted in `summary`) instead of raising `DataError`.
    verify_media: decode and encode every sample once when the dataset is built.
    progress: a progress bar over the samples while checking them.
    """

    image_folder: str | None = None
    video_folder: str | None = None
    max_length: int = 2048
    num_frames: int = 8
    fps: float | None = None
    video_backend: str = "decord"
    skip_bad_samples: bool = False
    verify_media: bool = False
    progress: bool = False


@dataclass
class Skipped:
    sample_id: str
    file: str | None
    reason: str


@dataclass
class SkipReport:
    source: str
    total: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        if any(s.sample_id == err.sample_id for s in self.skipped):
            return  # a read-time failure seen again in a later epoch
        logger.warning("skipping %s", err)
        self.skipped.append(Skipped(err.sample_id, err.file, err.reason))

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.total} samples, none skipped"
        reasons = Counter(s.reason.split(" (")[0] for s in self.skipped)
        listed = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        return f"{self.source}: {self.total} samples, {len(self.skipped)} skipped ({listed})"


class ConversationDataset(Dataset):
    """Tokenized LLaVA conversations for one processor; items are dicts of tensors (see `encode`)."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]] | str | os.PathLike,
        processor: Any,
        options: DataOptions | None = None,
        source: str | None = None,
    ):
        if isinstance(records, (str, os.PathLike)):
            source = source or str(records)
            records = load_records(records)
        self.processor = processor
        self.options = options or DataOptions()
        self.report = SkipReport(source or "<records>", total=len(records))
        self.records: list[dict[str, Any]] = []
        verb = "verifying samples" if self.options.verify_media else "checking samples"
        for index, record in enumerate(tqdm(records, desc=verb, unit="sample", disable=not self.options.progress)):
            try:
                checked = self.check(record, index)
                if self.options.verify_media:
                    self.encode(checked)
            except DataError as err:
                self.fail(err)
                continue
            self.records.append(checked)
        if not self.records:
            raise ValueError(f"{self.report.source}: no usable samples ({self.report.summary()})")

    @property
    def skipped(self) -> list[Skipped]:
        return self.report.skipped

    def summary(self) -> str:
        note = ""
        if self.options.skip_bad_samples and not self.options.verify_media:
            note = " (read-time skips in DataLoader workers are logged by the workers, not counted here)"
        return self.report.summary() + note

    def fail(self, err: DataError) -> None:
        if not self.options.skip_bad_samples:
            raise err
        self.report.add(err)

    def __len__(self) -> int:
        return len(self.records)

    # -- checks that need no decoding ----------------------------------------------------------
    def check(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        """The record with resolved media paths and placeholders, or `DataError`."""
        sample_id = str(record.get("id", f"#{index}"))
        source = self.report.source
        conversations = record.get("conversations")
        if not conversations or not isinstance(conversations, list):
            raise DataError(sample_id, source, "empty conversation (no 'conversations' turns)")
        try:
            messages = to_messages(conversations)
        except ValueError as err:
            raise DataError(sample_id, source, str(err)) from err
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise DataError(sample_id, source, "empty conversation (no assistant answer to learn)")
        if not any(m["role"] == "user" and m["content"] for m in messages):
            raise DataError(sample_id, source, "empty conversation (no user turn)")
        media = {
            "image": [resolve(p, self.options.image_folder) for p in as_list(record.get("image"))],
            "video": [resolve(p, self.options.video_folder) for p in as_list(record.get("video"))],
        }
        for kind, paths in media.items():
            n_placeholders = count_placeholders(conversations, kind)
            if any(m["role"] == "assistant" and any(p["type"] == kind for p in m["content"]) for m in messages):
                raise DataError(sample_id, source, f"a <{kind}> placeholder in an assistant turn")
            if n_placeholders > len(paths):
                raise DataError(
                    sample_id, paths[0] if paths else source,
                    f"more <{kind}> placeholders ({n_placeholders}) than {kind}s ({len(paths)})",
                )
            if 0 < n_placeholders < len(paths):
                raise DataError(
                    sample_id, paths[0], f"fewer <{kind}> placeholders ({n_placeholders}) than {kind}s ({len(paths)})"
                )
            if n_placeholders == 0 and paths:  # LLaVA convention: the pictures come before the first question
                first = next(m for m in messages if m["role"] == "user")
                first["content"][:0] = [{"type": kind} for _ in paths]
            for path in paths:
                if not os.path.isfile(path):
                    raise DataError(sample_id, path, f"{kind} file not found")
        return {"id": sample_id, "messages": messages, **media}

    # -- reading -------------------------------------------------------------------------------
    def encode(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        opts = self.options
        images = [load_image(p, record["id"]) for p in record["image"]]
        videos = [load_video(p, record["id"], opts.num_frames, opts.fps, opts.video_backend) for p in record["video"]]
        try:
            encoded = truncate(encode(self.processor, record["messages"], images, videos), opts.max_length)
        except ValueError as err:
            raise DataError(record["id"], self.report.source, str(err)) from err
        if not bool((encoded.tensors["labels"] != IGNORE_INDEX).any()):
            raise DataError(
                record["id"], self.report.source, f"no answer tokens left after truncation to {opts.max_length} tokens"
            )
        return encoded.tensors

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self.records) <= index < len(self.records):  # ends `for item in dataset` (and list(dataset))
            raise IndexError(f"sample index {index} out of range for {len(self.records)} samples")
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return self.encode(record)
            except DataError as err:
                self.fail(err)  # raises unless skipping; a skipped sample is replaced by the next one
        raise ValueError(f"{self.report.source}: every sample failed to load ({self.report.summary()})")


def pad_stack(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    """Concatenate along dim 0, padding every other dim at the end to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(F.pad(t, pad, value=value) if any(pad) else t)
    return torch.cat(padded)


@dataclass
class Collator:
    """Right-pads token tensors to the longest sample ([B, T]: ids with the pad id, labels with
    `IGNORE_INDEX`, the attention mask and per-token types such as Gemma 3's ``token_type_ids`` with 0);
    concatenates vision tensors over the batch's images/videos, zero-padding their inner dims (LLaVA-NeXT
    patch counts differ per image)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(s["input_ids"].shape[0] for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        pads = {key: 0 for key in TEXT_KEYS if any(key in s for s in samples)}
        pads.update(input_ids=self.pad_token_id, labels=IGNORE_INDEX)
        for key, value in pads.items():
            if not all(key in s for s in samples):
                raise ValueError(f"{key!r} in some samples of a batch only")
            batch[key] = torch.stack([F.pad(s[key], (0, length - s[key].shape[0]), value=value) for s in samples])
        for key in COUNT_KEYS:
            if any(key in s for s in samples):
                batch[key] = torch.cat([s.get(key, torch.zeros(1, dtype=torch.long)) for s in samples])  # [B]
        keys = {k for s in samples for k in s} - set(batch)
        for key in sorted(keys):
            rows = [s[key] for s in samples if key in s and s[key].shape[0] > 0]
            if rows:
                batch[key] = pad_stack(rows, 0)
        return batch

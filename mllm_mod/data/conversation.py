"""LLaVA conversation records -> chat messages -> token ids, labels and vision inputs for one sample.

The prompt is the model's own chat template rendered by its processor, so training sees exactly what
inference sees. Labels come from character spans: assistant turn k is the text between the template
rendered up to turn k with the generation prompt and the template rendered through turn k (so the
end-of-turn tokens are learned too). The text is tokenized once without expanding placeholders (with
offsets, to find the label tokens) and once by the processor (which expands every ``<image>`` into the
model's image-token count); the two are aligned token by token, every non-vision token must agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")")
# processor outputs with one row per image / per video, and per-sample image counts
IMAGE_KEYS = ("pixel_values", "image_sizes")
VIDEO_KEYS = ("pixel_values_videos", "video_sizes")
COUNT_KEYS = {"batch_num_images": "image"}
TEXT_KEYS = ("input_ids", "attention_mask")


def to_messages(conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LLaVA turns (``from``/``value``) as chat messages whose content lists image/video/text parts."""
    messages = []
    for turn in conversations:
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r} (expected one of {sorted(ROLES)})")
        value = turn.get("value", turn.get("content", ""))
        if not isinstance(value, str):
            raise ValueError(f"turn value must be a string, got {type(value).__name__}")  # noqa: TRY004 (bad data)
        parts = []
        for piece in _SPLIT.split(value):
            kind = next((k for k, p in PLACEHOLDERS.items() if piece == p), None)
            if kind is not None:
                parts.append({"type": kind})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": parts})
    return messages


def count_placeholders(conversations: list[dict[str, Any]], kind: str) -> int:
    return sum(str(turn.get("value", "")).count(PLACEHOLDERS[kind]) for turn in conversations)


def assistant_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of every assistant turn."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{type(processor).__name__} has no chat template; set processor.chat_template")
    full = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        through = processor.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(prompt)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix (turn "
                f"{k}); cannot locate the assistant tokens for the labels"
            )
        spans.append((len(prompt), len(through)))
    return full, spans


@dataclass
class Encoded:
    """One sample ready for the collator. Vision blocks are runs of vision tokens: (start, end, kind, n)."""

    tensors: dict[str, torch.Tensor]
    blocks: list[tuple[int, int, str, int]]


def encode(
    processor: Any,
    messages: list[dict[str, Any]],
    images: list[Any],
    videos: list[Any],
) -> Encoded:
    """input_ids [T], attention_mask [T], labels [T] and the processor's vision tensors for one sample."""
    text, spans = assistant_spans(processor, messages)
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    out = processor(**kwargs)
    expanded = out["input_ids"][0].tolist()
    plain = tokenizer(text, return_offsets_mapping=True)
    vision_ids = {kind: tokenizer.convert_tokens_to_ids(p) for kind, p in PLACEHOLDERS.items()}
    kind_of = {i: kind for kind, i in vision_ids.items() if i is not None and i != tokenizer.unk_token_id}
    in_span = [any(s < end and e > start for start, end in spans) for s, e in plain["offset_mapping"]]

    labels: list[int] = []
    blocks: list[tuple[int, int, str, int]] = []
    i = j = 0
    ids = plain["input_ids"]
    while j < len(ids):
        token = ids[j]
        if token in kind_of:
            n = 0
            while j < len(ids) and ids[j] == token:
                j, n = j + 1, n + 1
            start = i
            while i < len(expanded) and expanded[i] == token:
                i += 1
            if i == start:
                raise ValueError(f"the processor did not expand the {kind_of[token]} placeholder at token {start}")
            blocks.append((start, i, kind_of[token], n))
            labels.extend([IGNORE_INDEX] * (i - start))
            continue
        if i >= len(expanded) or expanded[i] != token:
            raise ValueError(
                f"processor output and tokenized template text differ at token {i}; "
                "the processor must only expand vision placeholders"
            )
        labels.append(token if in_span[j] else IGNORE_INDEX)
        i, j = i + 1, j + 1
    if i != len(expanded):
        raise ValueError(f"processor output has {len(expanded) - i} more tokens than the template text")

    tensors = {k: v[0] if k in TEXT_KEYS else v for k, v in out.items()}
    tensors["labels"] = torch.tensor(labels, dtype=torch.long)  # [T]
    return Encoded(tensors, blocks)


def truncate(encoded: Encoded, max_length: int) -> Encoded:
    """Cut to `max_length` tokens, never inside a run of vision tokens: a run the cut would split is
    dropped whole, with its images/videos (their rows are removed from the vision tensors)."""
    tensors, blocks = encoded.tensors, encoded.blocks
    length = tensors["input_ids"].shape[0]
    if length <= max_length:
        return encoded
    cut = max_length
    for start, end, _, _ in blocks:
        if start < cut < end:
            cut = start
    kept_blocks = [b for b in blocks if b[1] <= cut]
    keep = {kind: sum(n for _, _, k, n in kept_blocks if k == kind) for kind in PLACEHOLDERS}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in (*TEXT_KEYS, "labels"):
            out[key] = value[:cut]
        elif key in IMAGE_KEYS:
            out[key] = value[: keep["image"]]
        elif key in VIDEO_KEYS:
            out[key] = value[: keep["video"]]
        elif key in COUNT_KEYS:
            out[key] = torch.full_like(value, keep[COUNT_KEYS[key]])
        else:
            raise ValueError(f"cannot truncate processor output {key!r}: unknown whether it is per image or per video")
    return Encoded(out, kept_blocks)

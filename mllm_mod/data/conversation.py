"""LLaVA conversation records -> chat messages -> token ids, labels and vision inputs for one sample.

The prompt is the model's own chat template rendered by its processor, so training sees exactly what
inference sees. Labels come from character spans: assistant turn k is the text between the template
rendered up to turn k with the generation prompt and the template rendered through turn k (so the
end-of-turn tokens are learned too). The processor expands each image / video placeholder into the model's
own layout (a run of placeholders for LLaVA; ``<img>`` + tiles + ``</img>`` for InternVL; tagged sub-images
and a global view for Idefics3 / SmolVLM) and reports where each expansion landed in the text
(``text_replacement_offsets``); with the tokenizer's character offsets, that places every label and every
vision block exactly, whatever tokens the expansion holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .media import video_processor_kwargs

IGNORE_INDEX = -100
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")")
# processor outputs with one row per image / per video, and per-sample image counts
IMAGE_KEYS = ("pixel_values", "image_sizes", "pixel_attention_mask")
VIDEO_KEYS = ("pixel_values_videos", "video_sizes")
COUNT_KEYS = {"batch_num_images": "image"}
# per-token processor outputs ([T] per sample; padded and truncated with the ids): Gemma 3's
# ``token_type_ids`` (1 on image tokens: the stock mask's bidirectional blocks), ``mm_token_type_ids``
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


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


def template_text_kwargs(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Processor kwargs for texts a chat template rendered: no second BOS where the template wrote one (Gemma 3's
    writes ``<bos>`` and its tokenizer adds one too), transformers' own rule in ``apply_chat_template(tokenize=True)``."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and texts and all(t.startswith(bos) for t in texts):
        return {"add_special_tokens": False}
    return {}


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
    """One sample ready for the collator. Vision blocks are the token ranges of each image / video's
    expansion: (start, end, kind, 1), in order."""

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
    kwargs: dict[str, Any] = {
        "text": [text],
        "return_tensors": "pt",
        "return_offsets_mapping": True,  # character range of each token in the expanded text
        "return_text_replacement_offsets": True,  # where each placeholder's expansion landed
    }
    if images:
        kwargs["images"] = images  # one sample: every processor takes its pictures as a flat list
    kwargs.update(video_processor_kwargs([videos]))  # the frames as read: their timing, no second sampling
    kwargs.update(template_text_kwargs(processor.tokenizer, [text]))
    out = processor(**kwargs)
    offsets = [tuple(o) for o in out.pop("offset_mapping")[0].tolist()]  # [T] (start, end) in the expanded text
    replacements = (out.pop("text_replacement_offsets", None) or [[]])[0]
    if len(replacements) != len(images) + len(videos):
        raise ValueError(
            f"the processor expanded {len(replacements)} placeholder(s) for {len(images)} image(s) and "
            f"{len(videos)} video(s); the chat template must render one placeholder per image / video"
        )
    # an assistant span's characters move right by what every expansion before it added
    grown = [(r["span"][1], (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])) for r in replacements]
    shifted = [tuple(c + sum(g for end, g in grown if end <= c) for c in span) for span in spans]

    blocks: list[tuple[int, int, str, int]] = []
    for r in replacements:
        start, end = r["new_span"]
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and start <= s and e <= end]
        if not inside:
            raise ValueError(f"the processor expanded the {r['type']} placeholder at character {start} into no token")
        blocks.append((inside[0], inside[-1] + 1, r["type"], 1))
    ids = out["input_ids"][0]
    learned = torch.tensor([any(s < end and e > start for start, end in shifted) for s, e in offsets], dtype=torch.bool)
    tensors = {k: v[0] if k in TEXT_KEYS else v for k, v in out.items()}
    tensors["labels"] = torch.where(learned, ids, IGNORE_INDEX)  # [T]
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
    total = {kind: sum(n for _, _, k, n in blocks if k == kind) for kind in PLACEHOLDERS}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        kind = "image" if key in IMAGE_KEYS else "video" if key in VIDEO_KEYS else None
        if kind is not None and keep[kind] < total[kind] and value.shape[0] != total[kind]:
            raise ValueError(  # InternVL's rows are tiles, Idefics3's one row holds every sub-image
                f"truncation to {max_length} tokens would drop a {kind}, and processor output {key!r} does not hold "
                f"one row per {kind} ({value.shape[0]} rows for {total[kind]}); raise max_length"
            )
        if key in (*TEXT_KEYS, "labels"):
            out[key] = value[:cut]
        elif kind is not None:
            out[key] = value[: keep[kind]]
        elif key in COUNT_KEYS:
            out[key] = torch.full_like(value, keep[COUNT_KEYS[key]])
        else:
            raise ValueError(f"cannot truncate processor output {key!r}: unknown whether it is per image or per video")
    return Encoded(out, kept_blocks)

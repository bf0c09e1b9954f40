"""lmms-eval hooks of the synthetic `mllm_mod_*` tasks (referenced by `!function utils.*` in the YAMLs)."""

from __future__ import annotations

from typing import Any

from PIL import Image

BLANK = (128, 128, 128)


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def doc_to_video(doc: dict[str, Any]) -> list[str]:
    """The clip as its mp4 path (the model samples the frames)."""
    return [doc["video"]]


def doc_to_blank_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The blank-image control: a grey picture of the same size, so only the text can be used."""
    return [Image.new("RGB", doc["image"].size, BLANK)]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the (stop-string cut, stripped, lower-cased) generation with the answer."""
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}

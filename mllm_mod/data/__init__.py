"""Instruction data: LLaVA conversation JSON/JSONL, media reading, collation, and synthetic data."""

from .conversation import IGNORE_INDEX, encode, to_messages, truncate
from .dataset import Collator, ConversationDataset, DataOptions, SkipReport, load_records
from .media import DataError, frame_indices, load_image, load_video

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "ConversationDataset",
    "DataError",
    "DataOptions",
    "SkipReport",
    "encode",
    "frame_indices",
    "load_image",
    "load_records",
    "load_video",
    "to_messages",
    "truncate",
]

"""Model families, one file each, registered by `config.model_type`."""

from . import (  # noqa: F401  (registration)
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    qwen2_vl,
    qwen3_vl,
    streaming,
)
from .base import Adapter, adapter_for, frame_groups, register, supported_model_types

__all__ = ["Adapter", "adapter_for", "frame_groups", "register", "supported_model_types"]

"""A streaming video LLM built from stock transformers parts that follows VideoLLM-online's released code
(layout, reply decision, metrics, training recipe; docs/STREAMING.md lists where and why it does not):
its data format, synthetic data, streaming objective, frame-by-frame inference with a bounded (MoD) KV
cache, and the streaming metrics. Importing it registers model_type ``mllm_mod_stream`` with the Auto classes."""

from .budget import CacheBudget
from .data import StreamRecord, Turn, load_records, read_frames, save_records
from .inference import Reply, StreamSession, narrate, replies_at
from .metrics import evaluate_streaming
from .model import StreamConfig, StreamForCausalLM, StreamModel, load_stream_model
from .objective import StreamCollator, StreamDataset, build_sequence
from .synthetic import SynthSpec, make_synthetic_stream
from .tiny import tiny_stream_model

__all__ = [
    "CacheBudget",
    "Reply",
    "StreamCollator",
    "StreamConfig",
    "StreamDataset",
    "StreamForCausalLM",
    "StreamModel",
    "StreamRecord",
    "StreamSession",
    "SynthSpec",
    "Turn",
    "build_sequence",
    "evaluate_streaming",
    "load_records",
    "load_stream_model",
    "make_synthetic_stream",
    "narrate",
    "read_frames",
    "replies_at",
    "save_records",
    "tiny_stream_model",
]

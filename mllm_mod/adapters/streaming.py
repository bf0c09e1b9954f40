"""The streaming video LLM (`mllm_mod.streaming`, model_type ``mllm_mod_stream``): every frame placeholder
is a candidate, and each frame (``1 + grid**2`` consecutive placeholders) is its own routing group. In
VideoLLM-online's layout consecutive frames are separated by ',' (and runs wrapped in '[' ... ']'):
those are text tokens, never candidates, so a MoD layer always processes them."""

from .base import Adapter, register

STREAMING = register(
    Adapter(
        name="Streaming video LLM",
        model_types=("mllm_mod_stream",),
        vision_token_attrs=("frame_token_id",),
        video_token_attr="frame_token_id",
        frame_tokens=lambda config: config.tokens_per_frame,
    )
)

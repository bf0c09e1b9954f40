"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, Qwen2 decoder): image and video placeholders."""

from .base import Adapter, register

LLAVA_ONEVISION = register(
    Adapter(
        name="LLaVA-OneVision",
        model_types=("llava_onevision",),
        vision_token_attrs=("image_token_id", "video_token_id"),
    )
)

"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, Qwen2 decoder): image and video placeholders.

A video is ``frames * ceil(side / 2) ** 2`` placeholders (each frame's patch grid bilinearly pooled by
2) followed by one image-newline placeholder, which belongs to no frame.
"""

import math

from transformers import PretrainedConfig

from .base import Adapter, register


def frame_tokens(config: PretrainedConfig) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return math.ceil(side / 2) ** 2


LLAVA_ONEVISION = register(
    Adapter(
        name="LLaVA-OneVision",
        model_types=("llava_onevision",),
        vision_token_attrs=("image_token_id", "video_token_id"),
        video_token_attr="video_token_id",
        frame_tokens=frame_tokens,
        video_trailing=1,
    )
)

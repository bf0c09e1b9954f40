"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): images as in LLaVA-NeXT (anyres), videos
as ``frames * (side // spatial_pool_stride) ** 2`` placeholders (each frame's patch grid pooled)."""

from transformers import PretrainedConfig

from .base import Adapter, register


def frame_tokens(config: PretrainedConfig) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return (side // config.spatial_pool_stride) ** 2


LLAVA_NEXT_VIDEO = register(
    Adapter(
        name="LLaVA-NeXT-Video",
        model_types=("llava_next_video",),
        vision_token_attrs=("image_token_id", "video_token_id"),
        video_token_attr="video_token_id",
        frame_tokens=frame_tokens,
    )
)

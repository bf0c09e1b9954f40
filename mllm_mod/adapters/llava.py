"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one `<image>` placeholder per vision token (576 at 336 px)."""

from .base import Adapter, register

LLAVA = register(Adapter(name="LLaVA-1.5", model_types=("llava",), vision_token_attrs=("image_token_id",)))

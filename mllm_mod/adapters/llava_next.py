"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles, so the number of image placeholders
varies per sample (base + high-resolution tiles + image-newline tokens, all with the image token id);
all of them are routable."""

from .base import Adapter, register

LLAVA_NEXT = register(Adapter(name="LLaVA-NeXT", model_types=("llava_next",), vision_token_attrs=("image_token_id",)))

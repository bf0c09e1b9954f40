"""Configs with the dimensions of published checkpoints, for `--config-only` accounting (no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


VICUNA_7B: dict[str, Any] = dict(  # the LLM of LLaVA-1.5-7B and LLaVA-NeXT-7B (vicuna)
    vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
TINYLLAMA_1B: dict[str, Any] = dict(  # TinyLlama-1.1B, the LLM of TinyLLaVA-style 1B models (GQA 32/4)
    vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
)


@dataclass(frozen=True)
class ReferenceShape:
    name: str
    description: str
    n_vision: int  # vision tokens of a typical sample
    n_text: int  # text tokens of a typical prompt
    tokens_per_frame: int | None = None  # video models: pooled tokens per frame
    text: dict[str, Any] = field(default_factory=lambda: VICUNA_7B)  # LlamaConfig keyword arguments

    def config(self) -> Any:
        import transformers as tf

        text = tf.LlamaConfig(**self.text)
        vision = tf.CLIPVisionConfig(  # CLIP ViT-L/14-336
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768,
        )
        if self.tokens_per_frame is not None:  # LLaVA-NeXT-Video: 24x24 patches pooled by 2 -> 144 per frame
            return tf.LlavaNextVideoConfig(
                vision_config=vision, text_config=text, image_token_index=32001, video_token_index=32000,
                spatial_pool_stride=2,
            )
        cls = tf.LlavaNextConfig if "next" in self.name else tf.LlavaConfig
        return cls(vision_config=vision, text_config=text, image_token_index=32000)


REFERENCE_SHAPES = {
    s.name: s
    for s in (
        ReferenceShape("llava-1.5-7b", "LLaVA-1.5-7B: Vicuna-7B + CLIP-L/336, 576 image tokens", 576, 64),
        ReferenceShape("llava-next-7b", "LLaVA-NeXT-7B (Vicuna): anyres 2x2 + base, ~2880 image tokens", 2880, 64),
        ReferenceShape(  # small enough (4.4 GB in fp32) to benchmark on a CPU
            "tinyllava-1b", "TinyLlama-1.1B + CLIP-L/336 (TinyLLaVA-style): 576 image tokens", 576, 64,
            text=TINYLLAMA_1B,
        ),
        ReferenceShape(
            "llava-next-video-7b", "LLaVA-NeXT-Video-7B: 32 frames x 144 pooled tokens", 32 * 144, 64, tokens_per_frame=144
        ),
    )
}

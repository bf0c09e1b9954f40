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

QWEN25_7B: dict[str, Any] = dict(  # Qwen2.5-7B, the LLM of InternVL3-8B (GQA 28/4, 28 layers)
    vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)
SMOLLM2_1B7: dict[str, Any] = dict(  # SmolLM2-1.7B, the LLM of SmolVLM-Instruct (2.2B)
    vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384, rms_norm_eps=1e-5,
    rope_theta=273768.0,
)

QWEN25_VL_7B_TEXT: dict[str, Any] = dict(  # the LLM of Qwen2.5-VL-7B (Qwen2.5-7B; M-RoPE sections 16/24/24)
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN3_VL_8B_TEXT: dict[str, Any] = dict(  # the LLM of Qwen3-VL-8B (Qwen3-8B; interleaved M-RoPE 24/20/20)
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
)
GEMMA3_4B_TEXT: dict[str, Any] = dict(  # the LLM of Gemma-3-4B (GQA 8/4, head_dim 256; 5 sliding : 1 global)
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072,
    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
)


def _llava_config(shape: ReferenceShape) -> Any:
    import transformers as tf

    text = tf.LlamaConfig(**shape.text)
    vision = tf.CLIPVisionConfig(  # CLIP ViT-L/14-336
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    if shape.tokens_per_frame is not None:  # LLaVA-NeXT-Video: 24x24 patches pooled by 2 -> 144 per frame
        return tf.LlavaNextVideoConfig(
            vision_config=vision, text_config=text, image_token_index=32001, video_token_index=32000,
            spatial_pool_stride=2,
        )
    cls = tf.LlavaNextConfig if "next" in shape.name else tf.LlavaConfig
    return cls(vision_config=vision, text_config=text, image_token_index=32000)


def _internvl_config(shape: ReferenceShape) -> Any:
    import transformers as tf

    vision = tf.InternVLVisionConfig(  # InternViT-300M-448px: 32x32 patches, pixel-shuffled to 256 per tile
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=448, patch_size=14,
    )
    return tf.InternVLConfig(
        vision_config=vision, text_config=tf.Qwen2Config(**shape.text), image_token_id=151667, image_seq_length=256,
        downsample_ratio=0.5, tie_word_embeddings=False,
    )


def _smolvlm_config(shape: ReferenceShape) -> Any:
    import transformers as tf

    vision = tf.SmolVLMVisionConfig(  # SigLIP so400m at 384 px: 27x27 patches, pixel-shuffled by 3 -> 81
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14,
    )
    return tf.SmolVLMConfig(
        vision_config=vision, text_config=tf.LlamaConfig(**shape.text), image_token_id=49190, scale_factor=3,
    )


def _qwen_vl_config(shape: ReferenceShape) -> Any:
    import transformers as tf

    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    if shape.family == "qwen2_5_vl":  # 675M ViT, 14-px patches, 2x2 merged (one token per 28 x 28 px)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        return tf.Qwen2_5_VLConfig(text_config=shape.text, vision_config=vision, **ids)
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,  # 16-px patches
                  patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
    return tf.Qwen3VLConfig(text_config=shape.text, vision_config=vision, **ids)


def _gemma3_config(shape: ReferenceShape) -> Any:
    import transformers as tf

    vision = dict(  # SigLIP-so400m at 896 px: 64 x 64 patches, average-pooled to 16 x 16 = 256 per image
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=896,
        patch_size=14, vision_use_head=False,
    )
    return tf.Gemma3Config(text_config=shape.text, vision_config=vision, mm_tokens_per_image=256)


@dataclass(frozen=True)
class ReferenceShape:
    name: str
    description: str
    n_vision: int  # vision tokens of a typical sample
    n_text: int  # text tokens of a typical prompt
    tokens_per_frame: int | None = None  # video models: pooled tokens per frame
    text: dict[str, Any] = field(default_factory=lambda: VICUNA_7B)  # the text config's keyword arguments
    family: str = "llava"  # which CONFIGS entry builds the model config

    def config(self) -> Any:
        return CONFIGS[self.family](self)


CONFIGS = {
    "llava": _llava_config, "internvl": _internvl_config, "smolvlm": _smolvlm_config,
    "qwen2_5_vl": _qwen_vl_config, "qwen3_vl": _qwen_vl_config, "gemma3": _gemma3_config,
}


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
        ReferenceShape(  # a 4:3 picture: 2x3 tiles of 448 px (closest grid within 12) + the thumbnail
            "internvl3-8b", "InternVL3-8B: Qwen2.5-7B + InternViT-300M, 2x3 tiles + thumbnail x 256 = 1792 image tokens",
            7 * 256, 64, text=QWEN25_7B, family="internvl",
        ),
        ReferenceShape(  # a square picture resized to 1536 px: 4x4 sub-images of 384 px + the global view
            "smolvlm-2b", "SmolVLM-Instruct (2.2B): SmolLM2-1.7B + SigLIP-so400m, 4x4 sub-images + global x 81 = 1377",
            17 * 81, 64, text=SMOLLM2_1B7, family="smolvlm",
        ),
        ReferenceShape(  # e.g. a 896 x 896 picture: (896 / 28) ** 2 tokens
            "qwen2.5-vl-7b", "Qwen2.5-VL-7B: Qwen2.5-7B + 675M ViT, dynamic resolution, 1024 image tokens (896 x 896 px)",
            1024, 64, text=QWEN25_VL_7B_TEXT, family="qwen2_5_vl",
        ),
        ReferenceShape(  # 32 x 32 px per token: 1024 px square
            "qwen3-vl-8b", "Qwen3-VL-8B: Qwen3-8B + SigLIP2-so400m, dynamic resolution, 1024 image tokens (1024 x 1024 px)",
            1024, 64, text=QWEN3_VL_8B_TEXT, family="qwen3_vl",
        ),
        ReferenceShape(  # one image: 896 x 896 px, pooled to 256 soft tokens
            "gemma-3-4b", "Gemma-3-4B: Gemma 3 4B + SigLIP-so400m/896, 256 image tokens per image",
            256, 64, text=GEMMA3_4B_TEXT, family="gemma3",
        ),
    )
}

"""Tiny random-weight models of the real transformers classes, with real processors.

No weights can be downloaded here, so tests, the demo and `--config-only` profiling build models from
configs (as transformers' own model testers do) and a word-level tokenizer made on the spot. The
processors are the stock ones, so placeholder expansion (576-style image tokens, LLaVA-NeXT anyres
counts) is exactly what the real checkpoints get.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>")
BASE_WORDS = (
    "USER : ASSISTANT SYSTEM what is the a an of in on at to and or yes no color shape how many left right "
    "above below red green blue yellow purple orange black white circle square triangle star object objects "
    "there picture image video word text chart bar value answer question which option A B C D moved first "
    "? . , ! ' \" - _ ( ) [ ] = + / * # @"
).split() + [str(i) for i in range(101)]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'video' %}<video> "
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} </s>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `BASE_WORDS` + `words`, with LLaVA's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *BASE_WORDS, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_config(family: str, vocab_size: int, num_layers: int, attn: str, decoder: str | None = None, **overrides):
    """Llama for LLaVA / LLaVA-NeXT, Qwen2 for OneVision; `decoder="mistral"` for LLaVA-NeXT-Mistral."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        attn_implementation=attn,
    )
    common.update(overrides)
    decoder = decoder or ("qwen2" if family == "llava_onevision" else "llama")
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if decoder not in classes:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {sorted(classes)}")
    return classes[decoder](**common)


def check_attention(model: torch.nn.Module, attn: str) -> None:
    """Refuse a model whose decoder quietly fell back to another attention backend than `attn`."""
    actual = model.config.get_text_config(decoder=True)._attn_implementation
    if actual != attn:
        raise RuntimeError(f"asked for {attn!r} attention, the decoder runs {actual!r}")


def tiny_model(
    family: str = "llava",
    num_layers: int = 4,
    attn: str = "sdpa",
    words: Iterable[str] = (),
    seed: int = 0,
    image_size: int | None = None,
    patch_size: int = 6,
    device: str | torch.device = "cpu",
    decoder: str | None = None,
    **text_overrides,
):
    """(model, processor) for a tiny random model of `family` (one of `FAMILIES`).

    `decoder` picks the text model ("llama", "mistral", "qwen2"); `text_overrides` go to its config.
    `image_size` defaults to 30 (a 5x5 patch grid), 24 for LLaVA-NeXT-Video, whose processor counts
    ``grid // 4`` tokens per frame and so needs an even grid.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    image_size = image_size or (24 if family == "llava_next_video" else 30)
    tokenizer = build_tokenizer(words)
    vocab_size = len(tokenizer)
    text = tiny_text_config(family, vocab_size, num_layers, attn, decoder, **text_overrides)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        attn_implementation=attn,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    crop = {"height": image_size, "width": image_size}
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    clip_processor = dict(  # what the processors of the CLIP-tower families share (CLS token dropped)
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    if family == "llava":
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**vision),
            text_config=text,
            image_token_index=image_token_id,
            image_seq_length=(image_size // patch_size) ** 2,
            vision_feature_layer=-1,
        )
        model_cls = tf.LlavaForConditionalGeneration
        image_processor = tf.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop, **norm)
        processor = tf.LlavaProcessor(image_processor=image_processor, **clip_processor)
    elif family in ("llava_next", "llava_next_video"):
        common = dict(
            vision_config=tf.CLIPVisionConfig(**vision),
            text_config=text,
            image_token_index=image_token_id,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
        )
        image_processor = tf.LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size=crop, image_grid_pinpoints=pinpoints, **norm
        )
        parts = dict(image_processor=image_processor, **clip_processor)
        if family == "llava_next":
            config = tf.LlavaNextConfig(**common)
            model_cls = tf.LlavaNextForConditionalGeneration
            processor = tf.LlavaNextProcessor(**parts)
        else:
            config = tf.LlavaNextVideoConfig(**common, video_token_index=video_token_id, spatial_pool_stride=2)
            model_cls = tf.LlavaNextVideoForConditionalGeneration
            video_processor = tf.LlavaNextVideoVideoProcessor(size={"shortest_edge": image_size}, crop_size=crop, **norm)
            processor = tf.LlavaNextVideoProcessor(video_processor=video_processor, **parts)
    else:
        vision.pop("attn_implementation")
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**vision, attn_implementation=attn),
            text_config=text,
            image_token_index=image_token_id,
            video_token_index=video_token_id,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
        )
        model_cls = tf.LlavaOnevisionForConditionalGeneration
        image_processor = tf.LlavaOnevisionImageProcessor(
            size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints, **norm
        )
        video_processor = tf.LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size}, **norm)
        processor = tf.LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            chat_template=CHAT_TEMPLATE,
        )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn).to(device).eval()
    check_attention(model, attn)
    return model, processor

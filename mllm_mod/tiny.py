"""Tiny random-weight models of the real transformers classes, with real processors.

No weights can be downloaded here, so tests, the demo and `--config-only` profiling build models from
configs (as transformers' own model testers do) and a word-level tokenizer made on the spot. The
processors are the stock ones, so placeholder expansion (576-style image tokens, LLaVA-NeXT anyres
counts, InternVL tiles, Idefics3 / SmolVLM sub-images) is exactly what the real checkpoints get.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from transformers import PreTrainedTokenizerFast

QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # dynamic-resolution families with M-RoPE
FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "internvl", "idefics3", "smolvlm", *QWEN_VL, "gemma3")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>")
BASE_WORDS = (
    "USER : ASSISTANT SYSTEM what is the a an of in on at to and or yes no color shape how many left right "
    "above below red green blue yellow purple orange black white circle square triangle star object objects "
    "there picture image video word text chart bar value answer question which option A B C D moved first "
    "? . , ! ' \" - _ ( ) [ ] = + / * # @"
).split() + [str(i) for i in range(101)]

def chat_template(image: str = "<image>", video: str = "<video>") -> str:
    """The tiny models' chat template (USER / ASSISTANT turns), rendering image and video parts as the
    family's placeholder strings (the processor's ``image_token`` / ``video_token``)."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image} {{% elif part['type'] == 'video' %}}{video} "
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if message['role'] == 'assistant' %} </s>{% endif %} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
    )


CHAT_TEMPLATE = chat_template()
# the placeholder and tag tokens of the InternVL and Idefics3 / SmolVLM tokenizers (named as their processors
# read them from the tokenizer), and the 6 x 6 sub-image tags Idefics3's processor looks up
INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
IDEFICS3_SPECIALS = {
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
QWEN_VL_SPECIALS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
IDEFICS3_TAGS = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))


def build_tokenizer(
    words: Iterable[str] = (), specials: Mapping[str, str] | None = None, tags: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `BASE_WORDS` + `words`, with LLaVA's specials.

    `specials`: more named special tokens (attribute name -> token, e.g. InternVL's ``context_image_token``);
    `tags`: more unnamed special tokens (Idefics3's sub-image tags). Both get ids right after LLaVA's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = dict(specials or {})
    tags = tuple(tags)
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *specials.values(), *tags, *BASE_WORDS, *words):
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
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>", **specials},
    )
    if tags:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tags)})  # already in the vocabulary
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_config(family: str, vocab_size: int, num_layers: int, attn: str, decoder: str | None = None, **overrides):
    """Llama for LLaVA / LLaVA-NeXT / Idefics3 / SmolVLM, Qwen2 for OneVision and InternVL (InternVL3's
    decoder); `decoder="mistral"` for LLaVA-NeXT-Mistral."""
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
    decoder = decoder or ("qwen2" if family in ("llava_onevision", "internvl") else "llama")
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
    patch_size: int | None = None,
    device: str | torch.device = "cpu",
    decoder: str | None = None,
    **text_overrides,
):
    """(model, processor) for a tiny random model of `family` (one of `FAMILIES`).

    `decoder` picks the text model ("llama", "mistral", "qwen2"); `text_overrides` go to its config.
    `image_size` defaults to 30 (a 5x5 patch grid), 24 for LLaVA-NeXT-Video, whose processor counts
    ``grid // 4`` tokens per frame and so needs an even grid. InternVL, Idefics3 and SmolVLM use 24-px
    tiles / sub-images of 4-px patches (a 6x6 grid, pixel-shuffled by 2: 9 placeholders each); the others
    6-px patches. Gemma 3 (`gemma3_processor_model`): its stock processor and the released chat template,
    32-px images in 4-px patches pooled to 16 placeholders.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if family == "gemma3":
        return gemma3_processor_model(num_layers, attn, words, seed, image_size or 32, patch_size or 4, device, **text_overrides)
    if family in QWEN_VL:
        return qwen_vl_model(family, num_layers, attn, words, seed, patch_size or 4, device, **text_overrides)
    if family in TILED:
        return tiled_model(family, num_layers, attn, words, seed, image_size or 24, patch_size or 4, device, decoder, **text_overrides)
    image_size = image_size or (24 if family == "llava_next_video" else 30)
    patch_size = patch_size or 6
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
    return instantiate(model_cls, config, processor, attn, seed, device)


def instantiate(model_cls: type, config, processor, attn: str, seed: int, device: str | torch.device):
    """(model, processor): `model_cls` built from `config` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn).to(device).eval()
    check_attention(model, attn)
    return model, processor


TILED = ("internvl", "idefics3", "smolvlm")  # families whose images become several tiles / sub-images


def tiled_model(
    family: str,
    num_layers: int,
    attn: str,
    words: Iterable[str],
    seed: int,
    tile: int,
    patch_size: int,
    device: str | torch.device,
    decoder: str | None,
    **text_overrides,
):
    """InternVL (tiles by aspect ratio, up to 6 + a thumbnail) and Idefics3 / SmolVLM (images resized to a
    longest edge of 2 tiles, split into ``tile``-px sub-images + a global view): ``tile``-px vision inputs of
    ``patch_size`` patches, pixel-shuffled by 2, so ``(tile // patch_size // 2) ** 2`` placeholders each."""
    import transformers as tf

    internvl = family == "internvl"
    tokenizer = build_tokenizer(words, INTERNVL_SPECIALS) if internvl else build_tokenizer(words, IDEFICS3_SPECIALS, IDEFICS3_TAGS)
    text = tiny_text_config(family, len(tokenizer), num_layers, attn, decoder, **text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=tile, patch_size=patch_size)
    tokens = (tile // patch_size // 2) ** 2  # placeholders per tile / sub-image
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if internvl:
        template = chat_template(image=INTERNVL_SPECIALS["context_image_token"])
        config = tf.InternVLConfig(
            vision_config=tf.InternVLVisionConfig(**vision),
            text_config=text,
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=tokens,
            downsample_ratio=0.5,
        )
        square = {"height": tile, "width": tile}
        processor = tf.InternVLProcessor(
            image_processor=tf.GotOcr2ImageProcessor(size=square, crop_to_patches=True, min_patches=1, max_patches=6, **norm),
            tokenizer=tokenizer,
            video_processor=tf.InternVLVideoProcessor(size=square, **norm),
            image_seq_length=tokens,
            chat_template=template,
        )
        return instantiate(tf.InternVLForConditionalGeneration, config, processor, attn, seed, device)
    smolvlm = family == "smolvlm"
    config_cls, vision_cls = (tf.SmolVLMConfig, tf.SmolVLMVisionConfig) if smolvlm else (tf.Idefics3Config, tf.Idefics3VisionConfig)
    config = config_cls(
        vision_config=vision_cls(**vision),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    sizes = dict(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, **norm)
    parts = dict(tokenizer=tokenizer, image_seq_len=tokens, chat_template=CHAT_TEMPLATE)
    if smolvlm:
        processor = tf.SmolVLMProcessor(  # needs the num2words package (its video prompts spell durations)
            image_processor=tf.SmolVLMImageProcessor(do_image_splitting=True, **sizes),
            video_processor=tf.SmolVLMVideoProcessor(**sizes),
            **parts,
        )
        return instantiate(tf.SmolVLMForConditionalGeneration, config, processor, attn, seed, device)
    processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(do_image_splitting=True, **sizes), **parts)
    return instantiate(tf.Idefics3ForConditionalGeneration, config, processor, attn, seed, device)


def qwen_vl_model(
    family: str, num_layers: int, attn: str, words: Iterable[str], seed: int, patch_size: int, device: str | torch.device, **text_overrides
):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, so an image of h x w px (resized to multiples of
    ``2 * patch_size``) becomes ``(h / patch_size) * (w / patch_size) / 4`` ``<image>`` placeholders (2 x 2
    patches merged), between ``<|vision_start|>`` and ``<|vision_end|>``; a video of f frames ``f / 2``
    temporal patches of as many. M-RoPE sections sum to head_dim / 2 (head_dim 8: [2, 1, 1]); the prompts'
    vision markers are written by the caller (the tiny chat template wraps them around the placeholder)."""
    import transformers as tf

    tokenizer = build_tokenizer(words, QWEN_VL_SPECIALS)
    tokenizer.chat_template = chat_template(
        image="<|vision_start|><image><|vision_end|>", video="<|vision_start|><video><|vision_end|>"
    )
    head_dim = 8
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    vision = dict(depth=2, num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=32)
        config_cls, model_cls, processor_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    elif family == "qwen2_5_vl":  # window attention over 2 x 2 merged units, the second block full attention
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=4 * patch_size, fullatt_block_indexes=[1])
        config_cls, model_cls, processor_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
    else:  # Qwen3-VL: interleaved M-RoPE, DeepStack features from both vision blocks into decoder layers 0 and 1
        text.update(head_dim=head_dim)
        rope = {**rope, "mrope_interleaved": True}
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        config_cls, model_cls, processor_cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
    text.update(rope_parameters=rope, **text_overrides)
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    config.pad_token_id = tokenizer.pad_token_id
    sizes = dict(
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": (32 * patch_size) ** 2},
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    if family == "qwen3_vl":
        video_processor = tf.Qwen3VLVideoProcessor(**sizes)
    else:  # every frame at its own size, as the processor has done so far (and without its warning)
        video_processor = tf.Qwen2VLVideoProcessor(cap_pixels_per_frame=False, **sizes)
    processor = processor_cls(
        image_processor=tf.Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer, video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return instantiate(model_cls, config, processor, attn, seed, device)


GEMMA3_TOKENS = dict(pad=0, bos=2, eos=1, boi=61, eoi=62, image=63)  # ids of the tiny Gemma 3 vocabulary (64)


def gemma3_model(
    num_layers: int = 6,
    attn: str = "sdpa",
    seed: int = 0,
    sliding_window: int = 12,
    mm_tokens_per_image: int = 16,
    device: str | torch.device = "cpu",
    **text_overrides,
):
    """A tiny random `Gemma3ForConditionalGeneration` (no processor: the tests write the prompts by hand, as
    Gemma 3's processor lays them out: ``<start_of_image>`` + `mm_tokens_per_image` image placeholders +
    ``<end_of_image>``, with ``token_type_ids`` 1 on the placeholders). Layers alternate sliding-window and
    global attention as Gemma 3's pattern (every 6th global; with 6 layers: 0-4 sliding, 5 global, unless
    `layer_types` is overridden); the sliding window (12) is shorter than the prompts, so it cuts them. The
    SigLIP tower sees 32-px images in 4-px patches (8 x 8), average-pooled to ``mm_tokens_per_image``
    (4 x 4 = 16) placeholders."""
    import transformers as tf

    text = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=2048,
        sliding_window=sliding_window, pad_token_id=GEMMA3_TOKENS["pad"], bos_token_id=GEMMA3_TOKENS["bos"],
        eos_token_id=GEMMA3_TOKENS["eos"],
    )
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4)
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=GEMMA3_TOKENS["boi"], eoi_token_index=GEMMA3_TOKENS["eoi"], image_token_index=GEMMA3_TOKENS["image"],
    )
    config.pad_token_id = GEMMA3_TOKENS["pad"]
    model, _ = instantiate(tf.Gemma3ForConditionalGeneration, config, None, attn, seed, device)
    # generated text never contains image markers: an uncached recompute would count one more placeholder
    model.generation_config.suppress_tokens = [GEMMA3_TOKENS[k] for k in ("boi", "eoi", "image")]
    return see_images(model, seed)  # not the stock init's zero projector: the pictures reach the decoder


def see_images(model, seed: int):
    """Gemma 3's stock init zeroes the projector (``mm_input_projection_weight``), so a random model's image
    tokens would all embed to 0 and the pictures would not matter: give it seeded random weights instead."""
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * weight.shape[0] ** -0.5)
    return model


# Gemma 3's tokenizer names its image tokens as the processor reads them; its turns are special tokens
GEMMA3_SPECIALS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
GEMMA3_TURNS = ("<start_of_turn>", "<end_of_turn>")
GEMMA3_CHAT_TEMPLATE = (  # the released gemma-3 template (an optional system turn folded into the first user turn)
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def gemma3_processor_model(
    num_layers: int, attn: str, words: Iterable[str], seed: int, image_size: int, patch_size: int,
    device: str | torch.device, mm_tokens_per_image: int = 16, sliding_window: int = 12, **text_overrides,
):
    """Gemma 3 with its stock processor (`Gemma3Processor`, `Gemma3ImageProcessor` at `image_size` px): the
    chat template (the released one) writes ``<start_of_image>`` per picture, which the processor expands to
    ``\\n\\n<start_of_image> <image_soft_token> * mm_tokens_per_image <end_of_image>\\n\\n`` and marks with
    ``token_type_ids`` 1 (the bidirectional blocks of the stock mask). Layers alternate sliding (window 12)
    and global attention; with fewer than 6 layers the last one is global, so both kinds are present."""
    import transformers as tf

    from tokenizers import processors

    tokenizer = build_tokenizer([*words, "user", "model"], GEMMA3_SPECIALS, GEMMA3_TURNS)
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)  # Gemma's tokenizer adds BOS, and its template writes one
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos])
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    layer_types = ["full_attention" if (i + 1) % 6 == 0 or (num_layers < 6 and i == num_layers - 1) else "sliding_attention"
                   for i in range(num_layers)]  # fmt: skip
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=2048,
        sliding_window=sliding_window, layer_types=layer_types, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id,
    )
    config.pad_token_id = tokenizer.pad_token_id
    size = {"height": image_size, "width": image_size}
    image_processor = tf.Gemma3ImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = tf.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens_per_image
    )
    model, processor = instantiate(tf.Gemma3ForConditionalGeneration, config, processor, attn, seed, device)
    return see_images(model, seed), processor

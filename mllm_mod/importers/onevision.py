"""LLaVA-OneVision in the LLaVA-NeXT code base's layout (`LlavaQwenForCausalLM`, ``model_type: llava_qwen``).

A Qwen2 decoder (its ``lm_head`` may be tied: cloned from ``embed_tokens`` when absent) and a SigLIP tower
from which the original code removes the last layer and the head (26 of so400m's 27 layers), read at its
last kept layer with every patch token (``vision_feature_layer -1``, ``"full"``); anyres_max_9 tiling
with the image-newline token kept. Key map: `llava.py`'s, the SigLIP head unused.
"""

from __future__ import annotations

import re
from typing import Any

import transformers as tf

from .layout import Layout, Options, Target, register, require, text_config
from .llava import check_projector, grid_pinpoints, language_rules
from .loader import CheckpointError, Source
from .processor import chat_template, load_tokenizer
from .vision import checkpoint_tower_layers, checkpoint_tower_rules, resolve_tower


def prepare(src: str, raw: dict[str, Any], source: Source, options: Options) -> Target:
    check_projector(raw, src)
    require(raw, src, "mm_patch_merge_type", ("spatial_unpad",), "flat")
    aspect = raw.get("image_aspect_ratio")
    if not isinstance(aspect, str) or not re.fullmatch(r"anyres_max_\d+", aspect):
        raise CheckpointError(f"{src}/config.json: image_aspect_ratio = {aspect!r} is not supported (anyres_max_<n>)")
    in_checkpoint = checkpoint_tower_layers(source)
    tower = resolve_tower(raw, src, in_checkpoint > 0, options.vision_tower)
    if tower.kind != "siglip":
        raise CheckpointError(f"{src}: OneVision's tower is SigLIP; got a {tower.kind} tower")
    vision = tower.config
    # the original tower drops its last layer: the checkpoint holds the kept ones, a full tower one more
    vision.num_hidden_layers = in_checkpoint or vision.num_hidden_layers - 1
    vision.vision_use_head = False
    tokenizer, ids = load_tokenizer(src, ("<image>", "<video>"))
    vocab = max(int(raw["vocab_size"]), len(tokenizer))
    text = text_config(raw, "qwen2", vocab, tokenizer.pad_token_id)
    pinpoints = grid_pinpoints(raw, src, vision.image_size)
    config = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    config.pad_token_id = tokenizer.pad_token_id
    size = {"height": vision.image_size, "width": vision.image_size}
    norm = dict(image_mean=tower.image_mean, image_std=tower.image_std)
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints, **norm),
        video_processor=tf.LlavaOnevisionVideoProcessor(size=size, **norm),
        tokenizer=tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        chat_template=chat_template("qwen2"),
    )
    rules = checkpoint_tower_rules(drop_head=True) + language_rules(newline=True)
    extra = [tower.source(drop_last_layer=True)] if in_checkpoint == 0 else []  # else: the dir gave the config only
    notes = [f"SigLIP tower: {vision.num_hidden_layers} layers (the original removes the last), no head"]
    return Target(
        config, tf.LlavaOnevisionForConditionalGeneration, processor, rules, extra_sources=extra,
        derivable={"lm_head.weight": "model.language_model.embed_tokens.weight"}, notes=notes,
    )  # fmt: skip


ONEVISION = register(
    Layout("LLaVA-OneVision (LLaVA-NeXT code base)", ("LlavaQwenForCausalLM",), ("llava_qwen",), prepare)
)

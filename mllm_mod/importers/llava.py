"""The original LLaVA code base's layout (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`): LLaVA-1.5
(``image_aspect_ratio`` "pad" or "square") and LLaVA-NeXT (``anyres`` with ``spatial_unpad`` merging),
and every checkpoint fine-tuned with that code base.

Key map (transformers' conversion script, written to the current transformers names):
    model.vision_tower.vision_tower.vision_model.*  -> model.vision_tower.*
    model.mm_projector.0.* / .2.*                   -> model.multi_modal_projector.linear_1.* / linear_2.*
    model.image_newline                             -> model.image_newline (LLaVA-NeXT; unused when flat)
    model.{embed_tokens,layers,norm}.*              -> model.language_model.*
    lm_head.*                                       -> lm_head.*
    *.rotary_emb.inv_freq                           -> unused (recomputed)
"""

from __future__ import annotations

import re
from typing import Any

import transformers as tf

from .layout import Layout, Options, Target, register, require, select_strategy, text_config
from .loader import CheckpointError, Rule, Source
from .processor import chat_template, load_tokenizer
from .vision import checkpoint_tower_layers, checkpoint_tower_rules, resolve_tower

DECODERS = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral", "PmodLlavaLlamaForCausalLM": "llama"}
DECODER_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "pmod_llava_llama": "llama"}


def decoder_of(raw: dict[str, Any]) -> str:
    """The text decoder of an original config.json: from its architecture, else its model_type."""
    for name in raw.get("architectures") or []:
        if name in DECODERS:
            return DECODERS[name]
    return DECODER_TYPES[raw["model_type"]]


INV_FREQ = Rule(r".*\.rotary_emb\.inv_freq", None, "a buffer transformers recomputes")


def language_rules(newline: bool) -> list[Rule]:
    """The projector, image-newline and text-model part of the key map (shared with OneVision and p-MoD)."""
    return [
        Rule(r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
        Rule(r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
        Rule(r"model\.image_newline", "model.image_newline")
        if newline
        else Rule(r"model\.image_newline", None, "flat patch merging has no image-newline token"),
        INV_FREQ,
        Rule(r"model\.(embed_tokens|layers|norm)\.(.*)", r"model.language_model.\1.\2"),
        Rule(r"lm_head\.weight", "lm_head.weight"),
    ]


def check_projector(raw: dict[str, Any], path: str) -> None:
    require(raw, path, "mm_projector_type", ("mlp2x_gelu",), "linear")
    require(raw, path, "mm_use_im_start_end", (False, None))
    require(raw, path, "mm_use_im_patch_token", (False, None))


def prepare(src: str, raw: dict[str, Any], source: Source, options: Options) -> Target:
    decoder = decoder_of(raw)
    model_type = raw.get("model_type")
    check_projector(raw, src)
    strategy = select_strategy(raw, src)
    aspect = require(raw, src, "image_aspect_ratio", ("pad", "square", "anyres", None), "square")
    anyres = aspect == "anyres"
    if anyres:
        require(raw, src, "mm_patch_merge_type", ("spatial_unpad",), "flat")
        require(raw, src, "max_num_patches", (None,))  # bilinear down-sampling of the tiles: not in transformers
    in_checkpoint = checkpoint_tower_layers(source) > 0
    tower = resolve_tower(raw, src, in_checkpoint, options.vision_tower)
    if tower.kind != "clip":
        raise CheckpointError(f"{src}: a {tower.kind} vision tower in a {model_type} checkpoint is not supported (CLIP only)")
    tokenizer, ids = load_tokenizer(src, ("<image>",))
    vocab = max(int(raw["vocab_size"]), len(tokenizer))
    text = text_config(raw, decoder, vocab, tokenizer.pad_token_id)
    vision = tower.config
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    size, crop = {"shortest_edge": vision.image_size}, {"height": vision.image_size, "width": vision.image_size}
    norm = dict(image_mean=tower.image_mean, image_std=tower.image_std)
    parts = dict(
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat_template(decoder),
    )
    notes: list[str] = []
    if anyres:
        pinpoints = grid_pinpoints(raw, src, vision.image_size)
        config = tf.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model_class = tf.LlavaNextForConditionalGeneration
        image_processor = tf.LlavaNextImageProcessor(
            size=size, crop_size=crop, image_grid_pinpoints=pinpoints, do_pad=True, **norm
        )
        processor = tf.LlavaNextProcessor(image_processor=image_processor, **parts)
        notes.append(
            "LLaVA-NeXT preprocessing is transformers' anyres (resize to the best grid, pad, tile + a resized base "
            "image); it follows the original process_anyres_image but interpolation may differ in the last digits"
        )
    else:
        config = tf.LlavaConfig(**common, image_seq_length=(vision.image_size // vision.patch_size) ** 2)
        model_class = tf.LlavaForConditionalGeneration
        image_processor = tf.LlavaImageProcessor(
            size=size, crop_size=crop, do_pad=aspect == "pad", resample=3, **norm  # 3 = bicubic, as CLIP's
        )
        processor = tf.LlavaProcessor(image_processor=image_processor, **parts)
        if aspect == "pad":
            notes.append("image_aspect_ratio 'pad': images are padded to a square with the image mean, then resized")
    config.pad_token_id = tokenizer.pad_token_id
    rules = checkpoint_tower_rules(drop_head=False) + language_rules(newline=anyres)
    extra = [] if in_checkpoint else [tower.source()]  # with the tower in the checkpoint the dir gives its config only
    return Target(config, model_class, processor, rules, extra_sources=extra, notes=notes)


def grid_pinpoints(raw: dict[str, Any], path: str, image_size: int) -> list[list[int]]:
    """``image_grid_pinpoints`` as transformers reads them: [height, width] each, in the source's order.

    The original code bases read each pair as (width, height) (``for width, height in
    possible_resolutions`` in `select_best_resolution`, against PIL's (width, height) image size), so
    every pair is swapped. A list, or the LLaVA-NeXT code base's range string ``"(1x1),...,(6x6)"``
    (every (i, j) between the two corners, in units of the tower's image size). Released configs list
    a set closed under the swap, where it changes nothing; a fine-tune's asymmetric list needs it."""
    value = raw.get("image_grid_pinpoints")
    pairs = None
    if isinstance(value, list) and value and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [(int(w), int(h)) for w, h in value]
    elif isinstance(value, str):
        corners = re.findall(r"\((\d+)x(\d+)\)", value)
        if len(corners) >= 2:
            (i0, j0), (i1, j1) = [(int(a), int(b)) for a, b in (corners[0], corners[-1])]
            pairs = [(i * image_size, j * image_size) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
    if not pairs or any(w <= 0 or h <= 0 for w, h in pairs):
        raise CheckpointError(f"{path}/config.json: image_grid_pinpoints = {value!r} is not a list of [width, height]")
    return [[h, w] for w, h in pairs]


LLAVA = register(
    Layout(
        "LLaVA (original code base)",
        architectures=("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"),
        model_types=("llava_llama", "llava_mistral"),
        prepare=prepare,
    )
)

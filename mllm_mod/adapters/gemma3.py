"""Gemma 3 (`Gemma3ForConditionalGeneration`, Gemma 3 decoder under ``model.language_model``, SigLIP under
``model.vision_tower``): each image is one run ``<start_of_image> <image_soft_token> * mm_tokens_per_image
<end_of_image>`` (256 placeholders per 896-px image: 64 x 64 patches average-pooled to 16 x 16). Only the
placeholders (``image_token_id``) are routable; the start/end markers are text.

What the family adds, and where it is handled (no routing math here):
- bidirectional attention inside an image: the stock model ORs a blockwise mask (one block per run of
  ``token_type_ids == 1``) with causality, and only when the call passes ``token_type_ids`` (generate does in
  the prefill, not in decoding steps). This adapter gives the same blocks to the MoD layers
  (`RoutingContext.blocks`), whose masks apply them by original index, so a kept image token sees the
  other kept tokens of its image, later ones included;
- sliding-window and global layers alternate (5 : 1), each with its own RoPE base: the stock decoder hands
  each layer its mask and (cos, sin) by layer type; the MoD layer reads its window from its attention
  module and measures it in original positions, in prefill and against its compact cache;
- sandwich norms (a norm after the attention and around the MLP): the MoD layer's block detects them from
  the layer's modules.

Groups (``selection="group"``): one per image (a run of placeholders).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import compat
from ..layer import RoutingContext
from .base import Adapter, frame_groups, register

STATIC_REFUSED = (
    "Gemma 3 with a static cache is not supported by MoD layers: its sliding-window layers would need a static "
    "compact cache that keeps a window (not implemented), and generate passes per-layer-type masks; use the "
    "default dynamic cache"
)


BIDIRECTIONAL_REFUSED = (
    "Gemma 3 with use_bidirectional_attention (every token attends both ways, the embedding variant) is not "
    "supported by MoD layers: their masks are causal outside an image's block"
)


@dataclass(frozen=True)
class Gemma3Adapter(Adapter):
    """The stock adapter plus the bidirectional image blocks of the stock model's mask."""

    def refuse(self, model: nn.Module) -> None:
        if getattr(self.text_config(model.config), "use_bidirectional_attention", False):
            raise NotImplementedError(BIDIRECTIONAL_REFUSED)

    def routing_context(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs: Mapping[str, Any] | None = None,
    ) -> RoutingContext:
        if inputs is not None and _is_static(compat.call_cache(inputs)):
            raise NotImplementedError(STATIC_REFUSED)
        ctx = super().routing_context(model, input_ids, inputs_embeds, attention_mask, inputs)
        ctx.blocks = image_blocks(inputs, input_ids if input_ids is not None else inputs_embeds)
        return ctx


def image_blocks(inputs: Mapping[str, Any] | None, chunk: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] block id of each token of the chunk (one per run of ``token_type_ids == 1``, as transformers'
    ``get_block_sequence_ids_for_mask``), -1 elsewhere; None without ``token_type_ids`` or image tokens (the
    stock mask is then causal). ``token_type_ids`` may span the whole sequence (a chunk after a cache): the
    chunk is its last T columns."""
    token_types = inputs.get("token_type_ids") if inputs is not None else None
    if token_types is None or chunk is None:
        return None
    image = token_types == 1  # [B, S]
    if not bool(image.any()):
        return None
    return frame_groups(image, tokens_per_frame=None)[:, -chunk.shape[1] :].to(chunk.device)  # [B, T]


def _is_static(cache: Any) -> bool:
    return any(isinstance(layer, compat.StaticLayer) for layer in getattr(cache, "layers", ()))


GEMMA3 = register(Gemma3Adapter(name="Gemma 3", model_types=("gemma3",), vision_token_attrs=("image_token_id",)))

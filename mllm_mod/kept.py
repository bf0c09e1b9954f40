"""What MoD routers keep, measured against the picture.

For each MoD layer, one eval forward records the layer's own decision (which tokens went through it).
Against pictures whose objects are drawn in known colours on a known background
(`mllm_mod.data.localized`), three numbers per layer say whether the router learned where the answer
lives:

- ``kept``: the share of vision tokens kept (the layer's ratio, up to rounding);
- ``object_recall``: the share of patches that hold any object (a pixel off the background) that are kept;
- ``named_recall``: the share of patches holding the colour the question names that are kept.

A router that picks at random has both recalls near ``kept``; one that learned the task keeps the named
colour's patches above it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def kept_vision(model: nn.Module, batch: dict[str, torch.Tensor], image_token_id: int) -> dict[int, torch.Tensor]:
    """Per MoD layer, which vision tokens of each sample it keeps: {layer: [B, N_vision] bool}, tokens in
    picture order. The decision is the layer's own (its `RouterRecord` of one eval forward), so it follows
    whatever rule the layer applies: top-k or threshold, the candidates, a router shared by layers. Every
    sample of `batch` must have the same number of vision tokens."""
    from .retrofit import is_retrofitted, mod_layer_map

    if not (is_retrofitted(model) and mod_layer_map(model)):
        return {}
    vision = (batch["input_ids"] == image_token_id) & batch["attention_mask"].bool()  # [B, T]
    counts = vision.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"kept_vision: samples with different numbers of vision tokens {counts.tolist()}")
    contexts = []

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ctx = kwargs.get("mod_routing")  # the RoutingContext the retrofit's own pre-hook (registered first) made
        if ctx is None:
            raise RuntimeError("kept_vision: the forward has no routing context (is the model retrofitted?)")
        ctx.records = []  # every MoD layer appends its decision
        contexts.append(ctx)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.eval()
        model(**batch, logits_to_keep=1)
    finally:
        handle.remove()
    out: dict[int, torch.Tensor] = {}
    for rec in contexts[-1].records:
        out[rec.layer_idx] = rec.keep[vision].view(vision.shape[0], int(counts[0])).cpu()  # [B, N_vision]
    return dict(sorted(out.items()))


def patch_masks(
    picture: np.ndarray, n_patches: int, background: Sequence[int], named: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(object [N] bool, named [N] bool) for a square `picture` [H, W, 3] cut into `n_patches` square
    patches in raster order: a patch holds an object when a pixel differs from `background`, and the named
    colour when a pixel equals `named` exactly (all False without one)."""
    side = int(round(n_patches**0.5))
    if side * side != n_patches or picture.shape[0] != picture.shape[1] or picture.shape[0] % side:
        raise ValueError(f"patch_masks: a {picture.shape[:2]} picture does not cut into {n_patches} square patches")
    size = picture.shape[0] // side
    cells = picture.reshape(side, size, side, size, 3).transpose(0, 2, 1, 3, 4).reshape(n_patches, size * size, 3)
    objects = (cells != np.asarray(background)).any(-1).any(-1)  # [N]
    if named is None:
        return objects, np.zeros(n_patches, dtype=bool)
    return objects, (cells == np.asarray(named)).all(-1).any(-1)


def named_color(question: str, colors: dict[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The RGB of the one colour word of `colors` that `question` names, or None (no colour or several)."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    found = [rgb for name, rgb in colors.items() if name in words]
    return found[0] if len(found) == 1 else None


def routing_recall(
    model: nn.Module,
    batches: Sequence[tuple[Sequence[dict[str, Any]], dict[str, torch.Tensor]]],
    image_folder: str,
    image_token_id: int,
    max_images: int,
) -> dict[str, dict[str, float]]:
    """Per MoD layer {"kept", "object_recall", "named_recall", "images"} over the first `max_images`
    pictures of `batches` ((records, prompt batch) pairs of LLaVA-style records, one picture each), pooled
    over patches; {} for a model without MoD layers. `named_recall` is None where no question names a
    colour, `object_recall` where no picture has an object."""
    from PIL import Image

    from .data.synth import BACKGROUND, COLORS

    totals: dict[int, np.ndarray] = {}  # layer -> [kept, vision, kept objects, objects, kept named, named]
    seen = 0
    for records, batch in batches:
        if seen >= max_images:
            break
        kept = kept_vision(model, batch, image_token_id)
        if not kept:
            return {}
        for b, record in enumerate(records[: max_images - seen]):
            with Image.open(os.path.join(image_folder, record["image"])) as image:
                picture = np.asarray(image.convert("RGB"))
            rgb = named_color(record["conversations"][0]["value"], COLORS)
            objects, named = patch_masks(picture, next(iter(kept.values())).shape[1], BACKGROUND, rgb)  # once per picture
            for idx, mask in kept.items():
                keep = mask[b].numpy()  # [N]
                counts = [keep.sum(), keep.size, (keep & objects).sum(), objects.sum(), (keep & named).sum(), named.sum()]
                totals[idx] = totals.get(idx, np.zeros(6)) + np.asarray(counts, dtype=np.float64)
        seen += min(len(records), max_images - seen)
    return {
        str(idx): {
            "kept": t[0] / t[1],
            "object_recall": t[2] / t[3] if t[3] else None,
            "named_recall": t[4] / t[5] if t[5] else None,
            "images": seen,
        }
        for idx, t in sorted(totals.items())
    }

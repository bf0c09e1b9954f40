"""VisionZip (arXiv 2412.04467): dominant and contextual tokens chosen in the vision encoder, so the LLM
receives fewer vision tokens from its first layer on.

The rule, as the paper and its reference code (dvlab-research/VisionZip, ``CLIPVisionTower_VisionZip.forward``
with ``CLIP_EncoderLayer_forward`` / ``CLIPAttention_forward``; ``visionzip(model, dominant, contextual)``)
apply it to each image of LLaVA-1.5, in the vision layer whose output LLaVA feeds its projector (the
reference hard-codes LLaVA's ``-2``: ``attentions[-2]``, ``hidden_states[-2]`` and that layer's keys; here
the layer of the model's ``vision_feature_layer``), over its ``N`` tokens (CLS + patches):

- dominant: the CLS token and the ``dominant - 1`` patches receiving the most attention from CLS in that
  layer (post-softmax probabilities, summed over heads), taken in their position order (CLS first), as
  that layer's output hidden states; ``dominant`` counts the CLS token (the reference passes
  ``dominant_num = dominant - 1`` to its top-k), so ``dominant=54, contextual=10`` is 64 tokens;
- contextual: of the ``N - dominant`` remaining tokens (in position order), ``contextual`` targets are the
  evenly spaced ``0, step, 2 step, ..`` (``step = max(1, (N - dominant) // contextual)``, the first
  ``contextual`` of them); every other remaining token goes to the target of highest cosine similarity of the
  layer's keys averaged over heads (the reference's ``metric``, normalised); each contextual token is the
  target's hidden state *plus the mean* of the hidden states assigned to it (the reference's
  ``target_hidden + aggregated_hidden``, a count clamped at 1: a target nobody joined stays itself);
- the ``dominant + contextual`` tokens, dominant then contextual, go through the projector, and the LLM's
  sequence is text + those tokens at positions ``0 ..`` (the reference rebuilds ``position_ids`` as
  ``arange`` of the shorter sequence).

How it reaches the core: the processor still writes ``P`` placeholders per image (576 for LLaVA-1.5), and
the stock model checks their count. A forward pre-hook on the projector puts the image's VisionZip tokens in
its first ``dominant + contextual`` rows (the rest keep the stock features, and are dropped); every decoder
layer is a MoD layer keeping those first rows of each image with renumbered positions (the staged decision,
as DivPrune's), which is the shorter sequence's forward (pinned by the test against the stock decoder run on
the shortened embeddings), and `mllm_mod.efficiency` counts text + ``dominant + contextual`` tokens and KV
entries per image in every layer.

Side cost (outside the decoder, `side_flops`): what this implementation computes besides the stock vision
tower: the CLS attention row of the selected layer (``2 N H hd``, the layer's own q/k captured by hooks --
the reference instead runs the whole tower eagerly with ``output_attentions`` to get every map), the key
metric averaged over heads (``N H hd``), the similarities of the merged tokens to the targets
(``2 M C hd``, M = merged tokens) and their sum (``M Dv``). The projector still runs on the ``P`` rows
(the stock model's count check), as in the stock model.

LLaVA-NeXT (anyres), as the reference's ``prepare_inputs_labels_for_multimodal_visionzip`` with
``restore_image_features_sorted`` does for LLaVA's ``mm_patch_merge_type="spatial_unpad"`` (the one transformers
implements): each crop of an image -- the base (resized) image and every crop of its anyres grid -- is zipped
on its own by the rule above (the reference runs the tower on the crops as one batch, one selection per row),
and the image's tokens are laid out as the reference packs them (`anyres_layout`):

1. the base crop's ``dominant + contextual`` tokens as they are (CLS, dominant patches, contextual);
2. the grid crops' dominant patches (CLS excluded) put back on the whole ``(rows * side, cols * side)`` patch
   grid and read in raster order (the reference's ``view(height, width, 24, 24)`` / ``permute`` / mask select;
   its hard-coded 24 = 336 / 14 is ``image_size // patch_size`` here);
3. the grid crops' CLS tokens, crop by crop; 4. their contextual tokens, crop after crop.

That is ``crops * (dominant + contextual)`` tokens per image and, as in the reference, no ``image_newline``
token (it builds ``image_newline_expanded`` and never uses it) and no unpadding of the grid (this path never
calls ``unpad_image``). Where transformers' stock `LlavaNextForConditionalGeneration` differs from the original
LLaVA code, and what is done:

- its `get_image_features` drops CLS before the projector (``vision_feature_select_strategy="default"``), so
  a crop has ``N - 1`` projector rows; the projector pre-hook writes each crop's zipped tokens (CLS included)
  in its first rows, as for LLaVA-1.5 (``dominant + contextual <= N - 1``);
- its `pack_image_features` unpads the grid and appends an ``image_newline`` to each row, and the processor
  writes that many placeholders per image (``P``, which the model checks): the stock packing still runs (for
  that count), wrapped by `VisionZipRule.pack` (an instance attribute over ``LlavaNextModel
  .pack_image_features``, removed by ``mllm_mod.unload``), which replaces each image's first
  ``crops * (dominant + contextual)`` packed rows by the reference's layout; the staged rule keeps those
  first rows of each image, so the LLM's sequence is text + the reference's layout at positions ``0 ..``
  (pinned per grid shape, 1 x 2, 2 x 2 and 2 x 1, against the stock decoder on that sequence);
- the grid: transformers' ``get_anyres_image_grid_shape(image_sizes[i])`` ((H, W) in, (rows, cols) out) and
  the original's ((W, H) in, (cols, rows) out) give the same grid, its crops row-major in both processors;
- a one-crop image (the reference: the crop's tokens + a newline) never occurs in stock LLaVA-NeXT (a base
  image and >= 1 grid crop) and is refused; with ``contextual=0`` no contextual token is appended (the
  reference's ``image_feature[:, -0:]`` would append every token a second time).

`generate` encodes the images once (``mm_encoder_outputs``) and passes the features to every forward, so the
rule keeps the images of the projector's last run (uncached steps included). The side cost is per crop.

Families: LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`),
with a CLIP tower and one ``int`` feature layer. Refused: towers without a CLS token (SigLIP: LLaVA-OneVision,
Qwen2-VL / Qwen2.5-VL's own ViT, Idefics3 / SmolVLM) -- the rule is CLS attention, and the authors' released
code defines no other; InternVL (its ViT has a CLS, but each tile's patches are pixel-shuffled 2 x 2 before
the projector, which a merge of arbitrary tokens cannot feed); LLaVA-NeXT-Video (its video frames are pooled
before the projector; not covered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ... import compat
from .staged import Stage, StageInput, install

PAPER_SETTINGS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # tokens kept -> (dominant, contextual)
PAPER_DOMINANT, PAPER_CONTEXTUAL = PAPER_SETTINGS[64]  # the reference's README example (10% of 576)
PAPER_TOKENS = 576  # LLaVA-1.5's tokens per image (the nominal keep ratio reported for the layers)
SUPPORTED_TOWERS = ("clip_vision_model",)
SUPPORTED_FAMILIES = ("LLaVA-1.5", "LLaVA-NeXT")  # adapter names (LLaVA-NeXT: each anyres crop, `anyres_layout`)


@dataclass(frozen=True)
class VisionZipSpec:
    """VisionZip: `dominant` tokens (the CLS token included, as the reference counts them) and `contextual`
    merged tokens per image (the paper's settings: 54 + 10, 108 + 20, 162 + 30)."""

    dominant: int = PAPER_DOMINANT
    contextual: int = PAPER_CONTEXTUAL
    method: str = "visionzip"

    def __post_init__(self) -> None:
        if int(self.dominant) < 1:
            raise ValueError(f"visionzip: dominant (CLS included) must be >= 1, got {self.dominant!r}")
        if int(self.contextual) < 0:
            raise ValueError(f"visionzip: contextual must be >= 0, got {self.contextual!r}")
        object.__setattr__(self, "dominant", int(self.dominant))
        object.__setattr__(self, "contextual", int(self.contextual))

    @property
    def retained(self) -> int:
        """Tokens per image the LLM receives."""
        return self.dominant + self.contextual

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(0, min(1.0, self.retained / PAPER_TOKENS))]

    def kept_vision(self, num_layers: int, n_vision: int) -> list[int]:
        """Vision tokens each layer processes for a sample of one image of `n_vision` placeholders."""
        return [min(n_vision, self.retained)] * num_layers

    def label(self) -> str:
        """The budget as the paper names it, for reports."""
        return f"dominant={self.dominant}, contextual={self.contextual}"

    def budget(self) -> dict[str, object]:
        return {"dominant": self.dominant, "contextual": self.contextual}


def cls_attention(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """[n, N-1] attention each patch receives from CLS (token 0), post-softmax, summed over heads; q, k
    [n, N, H*hd] the layer's projections (before scaling)."""
    n, length, _ = k.shape
    qh = q[:, 0].float().view(n, heads, -1) * scale  # [n, H, hd]
    kh = k.float().view(n, length, heads, -1)  # [n, N, H, hd]
    probs = torch.softmax(torch.einsum("nhd,nthd->nht", qh, kh), dim=-1)  # [n, H, N]
    return probs[:, :, 1:].sum(dim=1)


def zip_image(hidden: torch.Tensor, metric: torch.Tensor, scores: torch.Tensor, spec: VisionZipSpec):
    """(tokens [dominant + contextual', Dv], dominant indices [dominant] of the N tokens, side FLOPs) of one
    image; hidden [N, Dv] the layer's output, metric [N, hd] its keys averaged over heads, scores [N-1] the
    CLS attention of the patches."""
    length, width = hidden.shape
    top = scores.topk(spec.dominant - 1).indices + 1  # patches by CLS attention
    dominant = torch.zeros(length, dtype=torch.bool, device=hidden.device)
    dominant[0] = True
    dominant[top] = True
    rest = (~dominant).nonzero()[:, 0]  # [N - dominant] in position order
    tokens = [hidden[dominant]]  # CLS first, then the dominant patches in position order
    side = 0
    if spec.contextual > 0 and len(rest) > 0:
        m = metric[rest].float()
        m = m / m.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // spec.contextual)
        targets = torch.arange(0, len(rest), step, device=hidden.device)[: spec.contextual]  # [C]
        merged = torch.ones(len(rest), dtype=torch.bool, device=hidden.device)
        merged[targets] = False
        similarity = m[merged] @ m[targets].T  # [M, C]
        assign = similarity.argmax(dim=1)  # [M]
        h = hidden[rest].float()
        sums = torch.zeros(len(targets), width, device=hidden.device).index_add_(0, assign, h[merged])  # [C, Dv]
        counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1)[:, None]
        tokens.append((h[targets] + sums / counts).to(hidden.dtype))
        side = 2 * int(merged.sum()) * len(targets) * m.shape[-1] + int(merged.sum()) * width
    return torch.cat(tokens), dominant.nonzero()[:, 0], side


def anyres_layout(
    tokens: torch.Tensor, dominant: list[torch.Tensor], grid: tuple[int, int], side: int, spec: VisionZipSpec
) -> torch.Tensor:
    """[crops * retained, D] one anyres image's tokens in the reference's order (``restore_image_features_sorted``
    with ``spatial_unpad``): the base crop's tokens as they are (CLS, dominant patches, contextual), then the
    grid crops' dominant patches in raster order of the whole ``(rows * side, cols * side)`` patch grid, then
    the grid crops' CLS tokens, then their contextual tokens, crop after crop; no newline, nothing unpadded.
    tokens [crops, retained, D] each crop's VisionZip tokens, dominant[c] the crop's sorted dominant indices
    (0 = CLS), grid (rows, cols) of the grid crops, side the patches per crop side."""
    rows, cols = grid
    crops = tokens[1:]  # [rows * cols, retained, D], row-major over the grid (the processor's crop order)
    if len(crops) != rows * cols:
        raise RuntimeError(f"visionzip: {len(crops)} grid crops for a {rows} x {cols} anyres grid")
    keys = []
    for c, indices in enumerate(dominant[1:]):
        patch = indices[1:] - 1  # the crop's dominant patches, position order
        keys.append(((c // cols) * side + patch // side) * (cols * side) + (c % cols) * side + patch % side)
    order = torch.cat(keys).argsort()  # raster order of the whole grid
    patches = crops[:, 1 : spec.dominant].reshape(-1, crops.shape[-1])[order]
    return torch.cat([tokens[0], patches, crops[:, 0], crops[:, spec.dominant :].reshape(-1, crops.shape[-1])])


@dataclass
class VisionZipRule:
    """The tower side (hooks on the selected vision layer and the projector; on LLaVA-NeXT the packing of
    each image's crops) and the LLM side (the staged rule keeping each image's first tokens)."""

    spec: VisionZipSpec
    attn: nn.Module  # the selected vision layer's attention (q_proj, k_proj, num_heads, scale)
    anyres: Any = None  # LLaVA-NeXT: the model whose `pack_image_features` is wrapped (config: grid pinpoints)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (placeholders, kept, side FLOPs) per image
    dominant_indices: list[torch.Tensor] = field(default_factory=list)  # per crop (LLaVA-1.5: image), last run
    image_side: list[int] = field(default_factory=list)  # side FLOPs per crop (LLaVA-1.5: image), last run

    def keep(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def project(self, projector: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook on the projector: the first rows of each crop become its VisionZip tokens."""
        selected = args[0]  # [n, P, Dv]
        if any(k not in self.captured for k in ("q", "k", "hidden")):
            raise RuntimeError("visionzip: the selected vision layer did not run before the projector")
        q, k, hidden = (self.captured.pop(name) for name in ("q", "k", "hidden"))  # [n, N, *]
        n, rows, _ = selected.shape
        if self.spec.retained > rows or self.spec.dominant > hidden.shape[1]:
            raise ValueError(f"visionzip: {self.spec.label()} keeps more than the {rows} tokens of an image")
        heads = self.attn.num_heads
        scores = cls_attention(q, k, heads, self.attn.scale)  # [n, N-1]
        metric = k.float().view(n, k.shape[1], heads, -1).mean(dim=2)  # [n, N, hd]
        out = selected.clone()
        self.dominant_indices, self.image_side = [], []
        length = hidden.shape[1]
        for i in range(n):
            tokens, dominant, side = zip_image(hidden[i], metric[i], scores[i], self.spec)
            out[i, : len(tokens)] = tokens.to(out.dtype)
            self.dominant_indices.append(dominant)
            self.image_side.append(2 * length * k.shape[-1] + length * k.shape[-1] + side)
        self.images = [(rows, self.spec.retained, s) for s in self.image_side]  # LLaVA-1.5; anyres: `pack`
        return (out, *args[1:])

    def pack(self, stock: Any):
        """The wrapper of LLaVA-NeXT's `pack_image_features`: the stock packing (its placeholder count, which the
        model checks), then each image's first ``crops * retained`` rows replaced by `anyres_layout`."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        def pack_image_features(image_features, image_sizes, *args, **kwargs):
            packed, lengths = stock(image_features, image_sizes, *args, **kwargs)
            config = self.anyres.config
            side = config.vision_config.image_size // config.vision_config.patch_size
            out, images, first = [], [], 0
            for i, (features, stock_image) in enumerate(zip(image_features, packed)):
                crops = features.shape[0]
                if crops < 2:  # stock LLaVA-NeXT always has a base image and >= 1 grid crop
                    raise NotImplementedError("visionzip: an anyres image of one crop (the reference adds a newline)")
                size = config.vision_config.image_size
                grid = get_anyres_image_grid_shape(image_sizes[i], config.image_grid_pinpoints, size)  # (rows, cols)
                tokens = features[:, : self.spec.retained]  # [crops, retained, D] (`project` wrote them)
                layout = anyres_layout(tokens, self.dominant_indices[first : first + crops], grid, side, self.spec)
                if len(layout) > len(stock_image):
                    raise ValueError(f"visionzip: {self.spec.label()} keeps {len(layout)} of {len(stock_image)} tokens")
                out.append(torch.cat([layout.to(stock_image.dtype), stock_image[len(layout) :]]))
                images.append((len(stock_image), len(layout), sum(self.image_side[first : first + crops])))
                first += crops
            self.images = images
            return out, lengths

        return pack_image_features

    def __call__(self, spec: VisionZipSpec, seen: StageInput) -> torch.Tensor:
        """Each image's first `kept` of its `placeholders` (images in row order, as the model scattered them);
        adds each sample's tower-side FLOPs. The images are those of the projector's last run: `generate`
        encodes them once and passes the features to every forward (uncached steps included)."""
        images = self.images
        if not images:
            raise RuntimeError("visionzip: no image has gone through the projector")
        counts = seen.vision.sum(dim=1).tolist()
        if sum(p for p, _, _ in images) != sum(counts):
            raise RuntimeError("visionzip: this forward's vision tokens are not the images the projector saw")
        kept = torch.cat([torch.arange(p, device=seen.vision.device) < k for p, k, _ in images])
        keep = torch.zeros_like(seen.vision)
        keep[seen.vision] = kept
        image = 0
        for b, count in enumerate(counts):
            while count > 0:
                count -= images[image][0]
                seen.side[b] += float(images[image][2])
                image += 1
            if count != 0:
                raise RuntimeError(f"visionzip: row {b}'s vision tokens do not end with an image")
        return keep


class Unwrap:
    """The handle of an instance-level wrapper: `remove` restores the class's method (``mllm_mod.unload``)."""

    def __init__(self, owner: nn.Module, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def apply_visionzip(model: nn.Module, spec: VisionZipSpec | None = None, **fields) -> nn.Module:
    """Turn a stock LLaVA-1.5 or LLaVA-NeXT model into VisionZip in place (``mllm_mod.unload`` undoes it); other
    families are refused with the reason."""
    from ...adapters import adapter_for

    spec = spec or VisionZipSpec(**fields)
    adapter = adapter_for(model)
    tower = adapter.vision_tower(model)
    tower_type = getattr(getattr(tower, "config", None), "model_type", None)
    if adapter.name not in SUPPORTED_FAMILIES:
        raise NotImplementedError(f"visionzip: {adapter.name} is not supported: {REFUSED.get(adapter.name, REFUSED['other'])}")
    if tower_type not in SUPPORTED_TOWERS:
        raise NotImplementedError(f"visionzip: the {tower_type} tower has no CLS token: {REFUSED['no_cls']}")
    feature_layer = model.config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise NotImplementedError(f"visionzip: one vision feature layer is needed, the model concatenates {feature_layer}")
    encoder_layers = compat.vision_encoder_layers(tower)
    index = feature_layer - 1 if feature_layer > 0 else len(encoder_layers) + feature_layer  # hidden_states[l] = layer l-1's output
    if not 0 <= index < len(encoder_layers):
        raise ValueError(f"visionzip: vision_feature_layer {feature_layer} is not the output of a vision layer")
    layer = encoder_layers[index]
    anyres = model.model if adapter.name == "LLaVA-NeXT" else None
    rule = VisionZipRule(spec, layer.self_attn, anyres)
    install(model, spec, spec.stages(0), rule, positions="renumber")
    if anyres is not None:  # an instance attribute over the class's method, removed by unload
        anyres.pack_image_features = rule.pack(anyres.pack_image_features)
        model.mod_state.hooks.append(Unwrap(anyres, "pack_image_features"))
    model.mod_state.hooks.extend(
        [
            layer.self_attn.q_proj.register_forward_hook(rule.keep("q")),
            layer.self_attn.k_proj.register_forward_hook(rule.keep("k")),
            layer.register_forward_hook(rule.keep("hidden")),
            model.model.multi_modal_projector.register_forward_pre_hook(rule.project),
        ]
    )
    return model


REFUSED = {
    "no_cls": "VisionZip's dominant tokens are those CLS attends to most, and the authors' released code defines no rule "
    "for towers without CLS",
    "InternVL": "each tile's patches are pixel-shuffled 2 x 2 before the projector, which merged tokens cannot feed",
    "LLaVA-NeXT-Video": "its video frames are average-pooled before the projector, which VisionZip's per-crop "
    "token layout does not cover (not implemented; its images would need the LLaVA-NeXT path tested there)",
    "other": "VisionZip needs a CLIP tower whose CLS attention picks the dominant tokens (LLaVA-1.5, LLaVA-NeXT); "
    "this family's tower has no CLS token or packs its features differently",
}

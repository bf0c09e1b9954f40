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

Families: LLaVA-1.5 (`LlavaForConditionalGeneration` with a CLIP tower, one ``int`` feature layer). Refused:
towers without a CLS token (SigLIP: LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL's own ViT, Idefics3 / SmolVLM) --
the rule is CLS attention, and the authors' released code defines no other; InternVL (its ViT has a CLS, but
each tile's patches are pixel-shuffled 2 x 2 before the projector, which a merge of arbitrary tokens cannot
feed); LLaVA-NeXT (the reference re-inserts the dominant tokens into the anyres grid with newline tokens:
not implemented here).
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


@dataclass
class VisionZipRule:
    """The tower side (hooks on the selected vision layer and the projector) and the LLM side (the staged
    rule keeping each image's first `retained` placeholders)."""

    spec: VisionZipSpec
    attn: nn.Module  # the selected vision layer's attention (q_proj, k_proj, num_heads, scale)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    per_image: int | None = None  # placeholders per image (the projector's input rows)
    dominant_indices: list[torch.Tensor] = field(default_factory=list)  # per image of the last forward
    image_side: list[int] = field(default_factory=list)  # side FLOPs per image of the last forward

    def keep(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def project(self, projector: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook on the projector: the first rows of each image become its VisionZip tokens."""
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
        self.per_image = rows
        return (out, *args[1:])

    def __call__(self, spec: VisionZipSpec, seen: StageInput) -> torch.Tensor:
        """Each image's first `retained` placeholders (images of `per_image` placeholders, in row order);
        adds each sample's tower-side FLOPs."""
        if self.per_image is None:
            raise RuntimeError("visionzip: no image went through the projector in this forward")
        order = seen.vision.long().cumsum(dim=1) - 1  # [B, T] index among the row's vision tokens
        keep = seen.vision & (order % self.per_image < spec.retained)
        images = (seen.vision.sum(dim=1) // self.per_image).tolist()
        first = 0
        for b, count in enumerate(images):
            seen.side[b] += float(sum(self.image_side[first : first + count]))
            first += count
        return keep


def apply_visionzip(model: nn.Module, spec: VisionZipSpec | None = None, **fields) -> nn.Module:
    """Turn a stock LLaVA-1.5 model into VisionZip in place (``mllm_mod.unload`` undoes it); other families
    are refused with the reason."""
    from ...adapters import adapter_for

    spec = spec or VisionZipSpec(**fields)
    adapter = adapter_for(model)
    tower = adapter.vision_tower(model)
    tower_type = getattr(getattr(tower, "config", None), "model_type", None)
    if adapter.name != "LLaVA-1.5":
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
    rule = VisionZipRule(spec, layer.self_attn)
    install(model, spec, spec.stages(0), rule, positions="renumber")
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
    "LLaVA-NeXT": "the reference re-inserts the dominant tokens into the anyres grid with its newline tokens and appends "
    "CLS and the contextual tokens after it; that packing is not implemented here",
    "InternVL": "each tile's patches are pixel-shuffled 2 x 2 before the projector, which merged tokens cannot feed",
    "other": "VisionZip needs a CLIP tower whose CLS attention picks the dominant tokens (LLaVA-1.5); this family's "
    "tower has no CLS token or packs its features differently",
}

"""PyramidDrop (PDrop, arXiv 2410.17247): the decoder in stages, fewer image tokens in each.

The rule, as the paper and its reference code (Cooperx521/PyramidDrop, ``pdrop_rank_drop``) apply it at
inference: with boundaries ``layer_list = [b_1, b_2, ...]`` (LLaVA-1.5-7B: ``[8, 16, 24]``) and ratio
``lambda`` (0.5), stage s (layers ``b_s .. b_{s+1} - 1``) keeps ``int(n * lambda^s)`` of a sample's ``n``
image tokens (the reference's ``image_token_ratio_list = [lambda, lambda^2, ...]``, each taken of the original
count). At boundary ``b_s``, before layer ``b_s`` runs, the image tokens stage s - 1 kept are ranked by the
attention they receive from the last instruction token (the prompt's last token) in layer ``b_s`` itself:
that layer's input norm and q/k projections on its input, RoPE at the positions of the pruned sequence
(the reference rebuilds ``position_ids`` as ``0 ..`` after each drop), causal softmax over the tokens still
present, averaged over heads; the top ``int(n * lambda^s)`` stay, in their order, and layer ``b_s`` and the
rest of the stage run on them. Positions are renumbered (the pruned sequence's), as in the reference;
generated tokens follow each layer's shorter cache (the reference shifts ``position_ids`` by the dropped
count).

M-RoPE families (Qwen2-VL / Qwen2.5-VL / Qwen3-VL): the pruned sequence keeps its tokens' own gathered
(t, h, w) positions instead of 0.. (`staged.sequence_positions`: renumbering would erase the image grid), and
the ranking uses the layer's own position embeddings.

Side cost (outside the decoder, measured per sample): at each boundary the ranking token's query, the keys
of the tokens still present and their score row (`mllm_mod.eval.baselines.ranking_row_flops`).

Depth: the paper's boundaries are for 32 layers; for a decoder of ``L`` layers the default boundaries are
the same fractions, ``b_i = floor(i * L / 4 + 1/2)`` for i = 1, 2, 3 (32 -> 8, 16, 24; 40 -> 10, 20, 30;
28 -> 7, 14, 21; 4 -> 1, 2, 3). Give ``layer_list`` to choose others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..baselines import ranking_row_flops, require_llama_attention, token_attention
from .staged import Stage, StageInput, install, sequence_positions, top_count

PAPER_LAYERS = 32
PAPER_LAYER_LIST = (8, 16, 24)
PAPER_LAMBDA = 0.5


def scaled_layer_list(num_layers: int) -> tuple[int, ...]:
    """The paper's boundaries (8, 16, 24 of 32) at the same fractions of `num_layers`, rounded half up."""
    out = tuple(math.floor(b * num_layers / PAPER_LAYERS + 0.5) for b in PAPER_LAYER_LIST)
    if len(set(out)) != len(out) or out[0] < 1:
        raise ValueError(f"pdrop: a {num_layers}-layer decoder is too shallow for three stages; give layer_list")
    return out


@dataclass(frozen=True)
class PDropSpec:
    """PyramidDrop: `layer_list` the stage boundaries (None: the paper's 8, 16, 24 scaled to the depth),
    `lam` the paper's lambda, the fraction of the image tokens each boundary keeps."""

    layer_list: tuple[int, ...] | None = None
    lam: float = PAPER_LAMBDA
    method: str = "pdrop"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.lam) < 1.0:
            raise ValueError(f"pdrop: lam (lambda, the fraction kept at each boundary) must be in (0, 1), got {self.lam!r}")
        if self.layer_list is not None:
            layers = tuple(int(b) for b in self.layer_list)
            if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1:
                raise ValueError(f"pdrop: layer_list must be increasing layer indices >= 1, got {self.layer_list!r}")
            object.__setattr__(self, "layer_list", layers)

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        layers = self.layer_list if self.layer_list is not None else scaled_layer_list(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(f"pdrop: boundary {layers[-1]} does not exist in a decoder of {num_layers} layers")
        return layers

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(b, float(self.lam) ** (s + 1)) for s, b in enumerate(self.boundaries(num_layers))]

    def kept_vision(self, num_layers: int, n_vision: int) -> list[int]:
        """Vision tokens each layer processes for a sample of `n_vision` (the rule's counts)."""
        stages = self.stages(num_layers)
        return [next((int(n_vision * st.ratio) for st in reversed(stages) if st.start <= i), n_vision) for i in range(num_layers)]

    def label(self) -> str:
        """The budget as the paper names it, for reports."""
        boundaries = ",".join(map(str, self.layer_list)) if self.layer_list else "8,16,24 of 32, scaled"
        return f"layer_list={boundaries}, lambda={self.lam:g}"

    def budget(self) -> dict[str, object]:
        """The model args that name this budget (the reference's names)."""
        out: dict[str, object] = {"lam": self.lam}
        if self.layer_list is not None:
            out["layer_list"] = ",".join(str(b) for b in self.layer_list)
        return out


def keep_counts(n_vision: torch.Tensor, lam: float, stage: int) -> list[int]:
    """``int(n * lambda^(s + 1))`` per sample for stage index `stage` (0 = after the first boundary)."""
    ratio = float(lam) ** (stage + 1)
    return [int(int(n) * ratio) for n in n_vision.tolist()]


def rule(spec: PDropSpec, seen: StageInput) -> torch.Tensor:
    """Stage `seen.stage`'s kept image tokens: the top ``int(n * lambda^s)`` of those still present, by the
    head-averaged attention from the ranking token in the stage's first layer (pruned-sequence positions)."""
    base = seen.layer.base_layer
    scores = token_attention(
        base.self_attn, base.input_layernorm(seen.hidden), seen.positions(), seen.visible(), seen.ranking
    )  # [B, T]
    for b, flops in enumerate(ranking_row_flops(base.self_attn, seen.visible(), seen.ranking)):
        seen.side[b] += flops  # the ranking row of this boundary, over the tokens still present
    return top_count(scores, seen.before, keep_counts(seen.vision.sum(dim=1), spec.lam, seen.stage))


def apply_pdrop(model: nn.Module, spec: PDropSpec | None = None, **fields) -> nn.Module:
    """Turn a stock model into PyramidDrop in place (``mllm_mod.unload`` undoes it)."""
    from ...adapters import adapter_for

    spec = spec or PDropSpec(**fields)
    layers = adapter_for(model).layers(model)
    num_layers = len(layers)
    for stage in spec.stages(num_layers):  # refused before anything is installed, not in the first forward
        require_llama_attention(layers[stage.start].self_attn, "pdrop", f"the ranking in boundary layer {stage.start}")
    return install(model, spec, spec.stages(num_layers), rule, positions=sequence_positions(model))

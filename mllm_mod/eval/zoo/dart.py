"""DART (arXiv 2502.11494, "duplication matters more"): pivots at an early layer, the image tokens most
duplicated with them removed.

The rule, as its reference code applies it (ZichenWen1/DART, ``get_retained_image_token``; LLaVA-1.5 scripts:
``--pruned_layer 2 --reduction_ratio 0.778 --pivot_image_token 4 --pivot_text_token 4``): before layer K runs,

- keys: layer K-1's keys after RoPE, all heads concatenated; pivots are the ``pivot_image_token`` image tokens
  and the ``pivot_text_token`` text tokens after the image with the largest L1 key norm (the K-norm);
- each pivot, taken in the order the reference iterates its Python ``set`` of pivot indices (CPython's order
  of those ints; indices counted from the sample's first real token, which is the reference's absolute index
  for its unpadded batch of one), takes the ``int(n * (1 - reduction_ratio) / (pivot_image_token +
  pivot_text_token))`` image tokens still unclaimed that are least similar to it (lowest cosine similarity of
  the hidden states after layer K-1, passed through the decoder's final norm, as the reference does); an image
  token is claimed once;
- the image pivots and every claimed token are kept; from layer K on the layers run on text + kept tokens at
  their original positions (the reference indexes ``position_ids`` with the kept indices).

"Text after the image" is read here as the text tokens after the sample's last vision token up to the
ranking token (the prompt's last token; in loglikelihood the last context token), so a scored continuation
is never a pivot. (An older LLaVA variant of the reference sizes each pivot's share as ``128 // 8 = 16``
from ``max_num_trunction``; this follows the ``reduction_ratio`` form of its Qwen2-VL code: 15 for 576
tokens at 0.778, 4 + 8 * 15 = 124 kept.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..baselines import require_llama_attention, rotate_half
from .staged import Stage, StageInput, install

PAPER_K, PAPER_REDUCTION, PAPER_PIVOT_IMAGE, PAPER_PIVOT_TEXT = 2, 0.778, 4, 4


@dataclass(frozen=True)
class DARTSpec:
    """DART: `pruned_layer` K, `reduction_ratio` the fraction of image tokens pruned (nominal: the pivots come
    on top), `pivot_image_token` and `pivot_text_token` the numbers of pivots (the reference's names)."""

    pruned_layer: int = PAPER_K
    reduction_ratio: float = PAPER_REDUCTION
    pivot_image_token: int = PAPER_PIVOT_IMAGE
    pivot_text_token: int = PAPER_PIVOT_TEXT
    method: str = "dart"

    def __post_init__(self) -> None:
        if int(self.pruned_layer) < 1:
            raise ValueError(f"dart: pruned_layer K must be >= 1 (layer K-1 gives the keys), got {self.pruned_layer!r}")
        if not 0.0 <= float(self.reduction_ratio) < 1.0:
            raise ValueError(f"dart: reduction_ratio must be in [0, 1), got {self.reduction_ratio!r}")
        if int(self.pivot_image_token) < 0 or int(self.pivot_text_token) < 0 or self.pivots < 1:
            raise ValueError("dart: pivot_image_token and pivot_text_token must be >= 0, one of them > 0")

    @property
    def pivots(self) -> int:
        return int(self.pivot_image_token) + int(self.pivot_text_token)

    def share(self, n_vision: int) -> int:
        """Image tokens each pivot claims: ``int(n * (1 - reduction_ratio) / pivots)``."""
        return int(n_vision * (1 - float(self.reduction_ratio)) / self.pivots)

    def stages(self, num_layers: int) -> list[Stage]:
        if int(self.pruned_layer) >= num_layers:
            raise ValueError(f"dart: pruned_layer K={self.pruned_layer} does not exist in a decoder of {num_layers} layers")
        return [Stage(int(self.pruned_layer), 1.0 - float(self.reduction_ratio))]

    def kept_vision(self, num_layers: int, n_vision: int) -> list[int]:
        """Vision tokens each layer processes when the sample has enough text after its image for every text
        pivot: all before K, the image pivots + every pivot's share from K on."""
        k = int(self.pruned_layer)
        image_pivots = min(int(self.pivot_image_token), n_vision)
        kept = min(n_vision, image_pivots + self.pivots * self.share(n_vision))
        return [n_vision] * k + [kept] * (num_layers - k)

    def label(self) -> str:
        """The budget as the paper names it, for reports."""
        return f"K={self.pruned_layer}, reduction_ratio={self.reduction_ratio:g}, pivots={self.pivot_image_token}+{self.pivot_text_token}"

    def budget(self) -> dict[str, object]:
        return {"pruned_layer": self.pruned_layer, "reduction_ratio": self.reduction_ratio,
                "pivot_image_token": self.pivot_image_token, "pivot_text_token": self.pivot_text_token}  # fmt: skip


def set_order(values: list[int]) -> list[int]:
    """The order CPython iterates ``set(values)`` (the reference loops over its pivot set)."""
    return list(set(values))


def select(spec: DARTSpec, keys: torch.Tensor, states: torch.Tensor, image: list[int], text: list[int]) -> tuple[list[int], int]:
    """(kept image indices, similarities computed) of one sample. keys [T, H*hd] (layer K-1, after RoPE),
    states [T, D] (after the final norm); image / text: candidate indices (image tokens; text tokens after the
    image)."""
    norms = keys.float().abs().sum(dim=-1)  # [T] L1 norm
    n_img, n_txt = min(int(spec.pivot_image_token), len(image)), min(int(spec.pivot_text_token), len(text))
    img = torch.tensor(image, dtype=torch.long)
    txt = torch.tensor(text, dtype=torch.long)
    image_pivots = img[norms[img].topk(n_img).indices].tolist() if n_img else []
    text_pivots = txt[norms[txt].topk(n_txt).indices].tolist() if n_txt else []
    share = spec.share(len(image))
    kept = set(image_pivots)
    free = [i for i in image if i not in kept]  # in position order
    compared = 0
    for pivot in set_order(image_pivots + text_pivots):
        take = min(share, len(free))
        if take == 0:
            break
        compared += len(free)
        similarity = torch.nn.functional.cosine_similarity(states[pivot].float()[None], states[free].float(), dim=-1)
        chosen = {free[i] for i in (-similarity).topk(take).indices.tolist()}
        kept |= chosen
        free = [i for i in free if i not in chosen]
    return sorted(kept), compared


def side_flops(tokens: int, kv_dim: int, width: int, compared: int) -> int:
    """FLOPs of the selection outside the decoder for one sample of `tokens` real tokens: layer K-1's keys
    recomputed ``2 T D kv_dim`` (D = width), their L1 norms ``T kv_dim`` and the `compared` pivot-token cosine
    similarities ``2 D`` each (the states' norms not counted, as in `flops.py`)."""
    return 2 * tokens * width * kv_dim + tokens * kv_dim + 2 * compared * width


class DARTRule:
    """The rule with what it needs from outside the stage: layer K-1's normed input (captured by a pre-hook on
    its attention), its keys after RoPE and the decoder's final norm.

    The keys are rotated at each sample's own positions, counted from its first real token (the reference's
    unpadded batch of one), whatever ``position_ids`` the caller passed: the L1 norm of a rotated key depends
    on its absolute position, and a left-padded forward without ``position_ids`` (a batched loglikelihood)
    would shift them. `rotary`: the decoder's 1-D rotary embedding; None for M-RoPE families, whose positions
    the model computes from the grids and the attention mask (already padding-free): their layer's own."""

    def __init__(self, norm: nn.Module, rotary: nn.Module | None) -> None:
        self.norm = norm
        self.rotary = rotary
        self.attn: nn.Module | None = None
        self.inputs: torch.Tensor | None = None  # [B, T, D] layer K-1's normed input
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keys: torch.Tensor | None = None  # [B, T, Hkv*hd]

    def capture(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on layer K-1's attention: its normed input and position embeddings."""
        self.attn = attn
        self.inputs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, D], normed
        self.rope = kwargs.get("position_embeddings")  # [B or 1, T, hd] each

    def rotated_keys(self, real: torch.Tensor) -> torch.Tensor:
        """[B, T, Hkv*hd] layer K-1's keys after RoPE at each sample's own positions; real [B, T]."""
        hidden, attn = self.inputs, self.attn
        batch, length, _ = hidden.shape
        if self.rotary is not None:
            cos, sin = self.rotary(hidden, (real.long().cumsum(dim=1) - 1).clamp(min=0))  # [B, T, hd]
        else:
            cos, sin = self.rope
        k = attn.k_proj(hidden).view(batch, length, -1, attn.head_dim)  # [B, T, Hkv, hd]
        k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
        return k.reshape(batch, length, -1)

    def __call__(self, spec: DARTSpec, seen: StageInput) -> torch.Tensor:
        if self.inputs is None or self.inputs.shape[:2] != seen.vision.shape:
            raise RuntimeError("dart: layer K-1's input was not captured in this forward")
        self.keys = self.rotated_keys(seen.real)
        states = self.norm(seen.hidden)  # [B, T, D]
        keep = torch.zeros_like(seen.vision)
        for b in range(seen.vision.shape[0]):
            first = int(seen.real[b].long().argmax())  # left padding: indices from the first real token
            vision = seen.vision[b].nonzero()[:, 0]
            after = torch.arange(int(vision[-1]) + 1, int(seen.ranking[b]) + 1, device=vision.device)
            text = after[seen.real[b, after] & ~seen.vision[b, after]]
            kept, compared = select(
                spec,
                self.keys[b, first:],
                states[b, first:],
                (vision - first).tolist(),
                (text - first).tolist(),
            )
            seen.side[b] += side_flops(int(seen.real[b].sum()), self.keys.shape[-1], states.shape[-1], compared)
            keep[b, torch.tensor(kept, dtype=torch.long, device=keep.device) + first] = True
        return keep


def apply_dart(model: nn.Module, spec: DARTSpec | None = None, **fields) -> nn.Module:
    """Turn a stock model into DART in place (``mllm_mod.unload`` undoes it)."""
    from ...adapters import adapter_for

    spec = spec or DARTSpec(**fields)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    attn = layers[int(spec.pruned_layer) - 1].self_attn  # a stock layer: K - 1 < K stays dense
    require_llama_attention(attn, "dart", f"the pivot ranking (key norms) in layer {int(spec.pruned_layer) - 1}")
    decoder = adapter.decoder(model)
    rule = DARTRule(decoder.norm, None if adapter.renumber_refused else decoder.rotary_emb)
    install(model, spec, spec.stages(len(layers)), rule, positions="original")
    model.mod_state.hooks.append(attn.register_forward_pre_hook(rule.capture, with_kwargs=True))
    return model

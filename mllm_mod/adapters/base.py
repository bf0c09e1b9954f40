"""What an adapter knows about a model family: where the decoder layers are and which tokens are routable.

No routing math lives here. An adapter is registered for one or more `config.model_type` values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ..layer import RoutingContext


@dataclass(frozen=True)
class Adapter:
    """A model family.

    name: shown in errors and reports.
    model_types: the `config.model_type` values it serves.
    vision_token_attrs: config attributes holding the ids of vision placeholder tokens (the processor
        expands each image/video into that many placeholder ids; the model scatters features into them).
    video_token_attr: the config attribute of the video placeholder id, for families with video input.
    frame_tokens: config -> placeholder tokens per video frame (the model's pooled frame size).
    video_trailing: placeholders after the last frame of each video (OneVision appends one newline token).
    video_frame_sizes: (config, model inputs) -> placeholders per frame of each video of the batch ([videos],
        in prompt order), for families whose frame size varies per video (Qwen2-VL's ``video_grid_thw``);
        None (or returning None) where the inputs do not tell it.
    vision_tower_attr: the vision encoder's attribute on the inner model (``vision_model`` for Idefics3).
    decoder_attr: the text decoder's attribute on the inner model (``text_model`` for Idefics3).
    renumber_refused: why ``positions="renumber"`` cannot be done faithfully on this family (retrofit
        refuses it with this reason), or None where it can.

    Groups for per-group selection: each video frame is a group, and so is each image (a run of image
    placeholders), so ``selection="group"`` keeps ``ceil(r * n)`` tokens of every frame and every image.
    """

    name: str
    model_types: tuple[str, ...]
    vision_token_attrs: tuple[str, ...]
    video_token_attr: str | None = None
    frame_tokens: Callable[[PretrainedConfig], int] | None = None
    video_trailing: int = 0
    video_frame_sizes: Callable[[PretrainedConfig, Mapping[str, Any]], torch.Tensor | None] | None = None
    vision_tower_attr: str = "vision_tower"
    decoder_attr: str = "language_model"
    renumber_refused: str | None = None

    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return config.get_text_config(decoder=True)

    def refuse(self, model: nn.Module) -> None:
        """Raise where MoD layers cannot run this model as its stock layers do; checked by `retrofit` (before
        anything changes) and again at every routed forward (a config changed after the retrofit). The
        stock adapter refuses nothing."""

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder (an HF `*Model` with `.layers`): ``model.model.<decoder_attr>``."""
        inner = getattr(model, "model", model)
        decoder = getattr(inner, self.decoder_attr, None)
        if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise TypeError(f"{type(model).__name__}: could not find the text decoder's layers ({self.name} adapter)")
        return decoder

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision encoder (``model.model.<vision_tower_attr>``), e.g. to freeze it for training."""
        inner = getattr(model, "model", model)
        tower = getattr(inner, self.vision_tower_attr, None)
        if not isinstance(tower, nn.Module):
            raise TypeError(f"{type(model).__name__}: no {self.vision_tower_attr} submodule ({self.name} adapter)")
        return tower

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def vision_token_ids(self, config: PretrainedConfig) -> list[int]:
        ids = [getattr(config, attr, None) for attr in self.vision_token_attrs]
        return [int(i) for i in ids if i is not None]

    def routing_context(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs: Mapping[str, Any] | None = None,
    ) -> RoutingContext:
        """Candidates [B, T] = the vision placeholder positions of this chunk. `inputs`: the model call's other
        arguments (e.g. grids that size video frames), where the caller has them."""
        self.refuse(model)
        ids = self.vision_token_ids(model.config)
        if input_ids is not None:
            candidates = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))  # [B, T]
        elif inputs_embeds is not None:
            # as transformers' get_placeholder_mask does: compare with the placeholder embeddings
            table = model.get_input_embeddings()
            placeholders = table(torch.tensor(ids, device=inputs_embeds.device)).to(inputs_embeds.dtype)  # [V, D]
            candidates = (inputs_embeds[:, :, None, :] == placeholders[None, None]).all(-1).any(-1)  # [B, T]
        else:
            candidates = None
        return RoutingContext(
            candidates=candidates, groups=self.groups(model.config, input_ids, candidates, inputs), attention_mask=attention_mask
        )

    def groups(
        self,
        config: PretrainedConfig,
        input_ids: torch.Tensor | None,
        candidates: torch.Tensor | None,
        inputs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | None:
        """[B, T] group ids: one per image run, one per video frame; -1 elsewhere (see `frame_groups`)."""
        if candidates is None:
            return None
        video_id = getattr(config, self.video_token_attr, None) if self.video_token_attr else None
        sizes = self.video_frame_sizes(config, inputs) if self.video_frame_sizes is not None and inputs is not None else None
        per_frame = sizes if sizes is not None else self.frame_tokens(config) if self.frame_tokens is not None else None
        if video_id is None or input_ids is None or per_frame is None:
            return frame_groups(candidates, tokens_per_frame=None)  # every run of placeholders is one group
        video = input_ids == video_id  # [B, T]
        image_groups = frame_groups(candidates & ~video, tokens_per_frame=None)
        video_groups = frame_groups(video, per_frame, self.video_trailing)
        offset = input_ids.shape[1]  # keeps image and frame ids apart (a sample has < T runs)
        return torch.where(video, torch.where(video_groups >= 0, video_groups + offset, -1), image_groups)


def frame_groups(mask: torch.Tensor, tokens_per_frame: int | torch.Tensor | None, trailing: int = 0) -> torch.Tensor:
    """Group ids [B, T] for the runs of True in `mask` [B, T].

    Each maximal run of consecutive placeholders is one image or one video. With `tokens_per_frame`,
    a run is cut into frames of that many tokens (its last `trailing` tokens belong to no frame): one
    count for every run, or a tensor [R] of one count per run (the batch's runs in order, sample by
    sample; a chunk without any run needs none); without it, the whole run is one group. Ids are unique
    within a sample; -1 marks tokens in no group. A run whose frame tokens do not divide into whole frames
    is refused (the layout is not what we think).
    """
    batch, length = mask.shape
    pos = torch.arange(length, device=mask.device).expand(batch, length)  # [B, T]
    prev = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)  # [B, T] mask shifted right
    nxt = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)  # [B, T] mask shifted left
    start = mask & ~prev
    run = start.long().cumsum(dim=1) - 1  # [B, T] run number within the sample
    run_start = torch.where(start, pos, 0).cummax(dim=1).values  # [B, T] first position of the run
    if tokens_per_frame is None:
        return torch.where(mask, run, -1)
    size = f"{tokens_per_frame}-token" if isinstance(tokens_per_frame, int) else "its video's"
    if isinstance(tokens_per_frame, torch.Tensor):  # one count per run of the batch
        runs = int(start.sum())
        if runs and runs != tokens_per_frame.numel():
            raise ValueError(f"{runs} video placeholder runs in the batch but frame sizes for {tokens_per_frame.numel()} videos")
        batch_run = (start.flatten().long().cumsum(0) - 1).clamp(min=0).view(batch, length)  # [B, T] run index in the batch
        tokens_per_frame = tokens_per_frame.to(mask.device)[batch_run] if runs else 1  # [B, T] frame size of the token's run
    end = torch.where(mask & ~nxt, pos, length).flip(1).cummin(dim=1).values.flip(1)  # [B, T] last position
    run_frames = end - run_start + 1 - trailing  # [B, T] frame tokens of the token's run
    if bool((mask & ((run_frames < 0) | (run_frames % tokens_per_frame != 0))).any()):
        raise ValueError(
            f"a video placeholder run is not a whole number of {size} frames"
            f"{f' plus {trailing} trailing token(s)' if trailing else ''}; the processor and the model disagree"
        )
    offset = pos - run_start  # [B, T] index within the run
    frame = run * length + offset // tokens_per_frame  # unique per (run, frame)
    return torch.where(mask & (offset < run_frames), frame, -1)


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} already has an adapter ({_REGISTRY[model_type].name})")
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model_or_config: nn.Module | PretrainedConfig) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        families = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in dict.fromkeys(_REGISTRY.values()))
        raise ValueError(f"model_type {model_type!r} is not supported; supported families: {families}")
    return _REGISTRY[model_type]



"""What an adapter knows about a model family: where the decoder layers are and which tokens are routable.

No routing math lives here. An adapter is registered for one or more `config.model_type` values.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    name: str
    model_types: tuple[str, ...]
    vision_token_attrs: tuple[str, ...]

    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return config.get_text_config(decoder=True)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder (an HF `*Model` with `.layers`)."""
        inner = getattr(model, "model", model)
        decoder = getattr(inner, "language_model", None)
        if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise TypeError(f"{type(model).__name__}: could not find the text decoder's layers ({self.name} adapter)")
        return decoder

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
    ) -> RoutingContext:
        """Candidates [B, T] = the vision placeholder positions of this chunk."""
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
        return RoutingContext(candidates=candidates, attention_mask=attention_mask)


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



"""A KV cache layer for MoD layers: it stores only the entries the layer kept.

HF's `Cache` holds one layer object per decoder layer. A MoD layer swaps its own slot for a
`MoDCacheLayer` (on first use, while empty), which stores the kept keys/values plus, per entry, the
token's original sequence index and whether it is a real token. `get_seq_length()` stays the length
of the *full* sequence, so generation positions and the masks HF builds for dense layers are those
of the full sequence, while the MoD layer attends only its own shorter cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class MoDCacheLayer(DynamicLayer):
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.index: torch.Tensor | None = None  # [B, S] original sequence index of each entry
        self.filled: torch.Tensor | None = None  # [B, S] a kept token of its sample (not a filler slot)
        self.valid: torch.Tensor | None = None  # [B, S] attendable: filled and not padding
        self.seen = 0  # tokens of the full sequence this layer has been shown (kept or not)

    def get_seq_length(self) -> int:
        return self.seen

    def kept_length(self) -> int:
        """Entries stored (the K/V tensors' sequence length)."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def record(self, index: torch.Tensor, filled: torch.Tensor, valid: torch.Tensor, num_tokens: int) -> None:
        """Book-keeping for the entries the last `update` appended ([B, Tk] each)."""
        cat = lambda old, new: new if old is None else torch.cat([old, new], dim=1)  # noqa: E731
        self.index, self.filled, self.valid = cat(self.index, index), cat(self.filled, filled), cat(self.valid, valid)
        self.seen += num_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.index is not None:
            beam_idx = beam_idx.to(self.index.device)
            self.index, self.filled, self.valid = (t.index_select(0, beam_idx) for t in (self.index, self.filled, self.valid))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("cropping a MoD layer's compact cache is not supported")

    def reset(self) -> None:
        super().reset()
        self.index = self.filled = self.valid = None
        self.seen = 0


def mod_cache_layer(cache: Cache, layer_idx: int) -> MoDCacheLayer:
    """The `MoDCacheLayer` in slot `layer_idx` of `cache`, installing it if the slot is empty."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"MoD layers need a transformers `Cache` with per-layer objects, got {type(cache).__name__}")
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, MoDCacheLayer):
        return layer
    if not isinstance(layer, DynamicLayer):
        raise TypeError(
            f"MoD layer {layer_idx} needs a dynamic cache layer, got {type(layer).__name__}; "
            "use the default DynamicCache (static caches have a fixed length per layer)"
        )
    if layer.get_seq_length() != 0:
        raise ValueError(
            f"cache slot {layer_idx} already holds {layer.get_seq_length()} dense entries; a MoD layer "
            "must start from an empty cache"
        )
    layers[layer_idx] = MoDCacheLayer()
    return layers[layer_idx]


def kv_entries(cache: Cache) -> list[torch.Tensor]:
    """K/V entries each layer holds for each sample (filler slots excluded): a list of [B] tensors."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, MoDCacheLayer):
            out.append(layer.filled.sum(dim=1).cpu())
        else:
            keys = layer.keys
            out.append(torch.full((keys.shape[0],), keys.shape[-2], dtype=torch.long))
    return out


def kv_bytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of every layer (what is allocated, fillers included)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total

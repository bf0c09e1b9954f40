"""A KV cache layer for MoD layers: it stores only the entries the layer kept.

HF's `Cache` holds one layer object per decoder layer. A MoD layer swaps its own slot for a
`MoDCacheLayer` (on first use, while empty), which stores the kept keys/values plus, per entry, the
token's original sequence index and whether it is a real token. `get_seq_length()` stays the length
of the *full* sequence, so generation positions and the masks HF builds for dense layers are those
of the full sequence, while the MoD layer attends only its own shorter cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .compat import DynamicLayer


class MoDCacheLayer(DynamicLayer):
    """Per entry: `index` [B, S] (the token's original sequence index), `filled` [B, S] (a kept token of
    its sample, not a filler slot) and `valid` [B, S] (attendable: filled and not padding).

    The bookkeeping is kept in the form a step needs, so that a decoding step costs what a dense layer's
    does: entries recorded without an index are the chunk's tokens in order, held as a run (start, length)
    until someone reads `index`; entries recorded without `filled` / `valid` are all True, held as nothing
    until read; and `key_valid()` is None while every entry is attendable (the mask is then left out).
    Reading `index`, `filled` or `valid` materialises the [B, S] tensor; assigning one replaces it.
    """

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0  # tokens of the full sequence this layer has been shown (kept or not)
        self._entries = 0  # entries recorded (the K/V length once the attention has appended them)
        self._batch, self._device = 0, None
        self._index: torch.Tensor | None = None  # [B, S_i]: index of the first S_i entries ...
        self._run_start, self._run = 0, 0  # ... then `_run` entries with indices _run_start, _run_start + 1, ...
        self._filled: torch.Tensor | None = None  # [B, S_f]: the first S_f entries; every later one is True
        self._valid: torch.Tensor | None = None  # [B, S_v]: likewise

    def get_seq_length(self) -> int:
        return self.seen

    def kept_length(self) -> int:
        """Entries stored (the K/V tensors' sequence length)."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def record(
        self,
        num_tokens: int,
        kept: int,
        batch: int,
        device: torch.device,
        index: torch.Tensor | None = None,
        filled: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Book-keeping for the `kept` entries this chunk of `num_tokens` tokens adds ([B, Tk] each):
        `index` None: the chunk's tokens in order (kept == num_tokens); `filled` / `valid` None: all True."""
        self._batch, self._device = batch, device
        if index is None:
            if self._run and self._run_start + self._run != self.seen:
                self._materialise_index()
            if not self._run:
                self._run_start = self.seen
            self._run += kept
        else:
            self._index = _cat(self.index, index)
        if filled is not None:
            self._filled = _cat(self._full(self._filled), filled)
        if valid is not None:
            self._valid = _cat(self._full(self._valid), valid)
        self._entries += kept
        self.seen += num_tokens

    def key_valid(self) -> torch.Tensor | None:
        """[B, S] attendable entries, or None while every entry is (no mask needed)."""
        return None if self._valid is None else self.valid

    @property
    def index(self) -> torch.Tensor | None:
        self._materialise_index()
        return self._index

    @index.setter
    def index(self, value: torch.Tensor) -> None:
        self._index, self._run, self._entries = value, 0, value.shape[1]

    @property
    def filled(self) -> torch.Tensor | None:
        self._filled = self._full(self._filled)
        return self._filled

    @filled.setter
    def filled(self, value: torch.Tensor) -> None:
        self._filled = value

    @property
    def valid(self) -> torch.Tensor | None:
        self._valid = self._full(self._valid)
        return self._valid

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._valid = value

    def _materialise_index(self) -> None:
        if self._run:
            run = torch.arange(self._run_start, self._run_start + self._run, device=self._device)  # [n]
            self._index = _cat(self._index, run.expand(self._batch, -1))
            self._run = 0

    def _full(self, prefix: torch.Tensor | None) -> torch.Tensor | None:
        """`prefix` [B, S_p] extended with True to every recorded entry (None when nothing is recorded)."""
        missing = self._entries - (0 if prefix is None else prefix.shape[1])
        if missing == 0:
            return prefix
        return _cat(prefix, torch.ones(self._batch, missing, dtype=torch.bool, device=self._device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._entries:
            beam_idx = beam_idx.to(self._device)
            self.index = self.index.index_select(0, beam_idx)
            for name in ("_filled", "_valid"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).index_select(0, beam_idx))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("cropping a MoD layer's compact cache is not supported")

    def reset(self) -> None:
        super().reset()
        self._index = self._filled = self._valid = None
        self._run = self._entries = self.seen = 0


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


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

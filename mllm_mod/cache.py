"""A KV cache layer for MoD layers: it stores only the entries the layer kept.

HF's `Cache` holds one layer object per decoder layer. A MoD layer swaps its own slot for a
`MoDCacheLayer` (on first use, while empty), which stores the kept keys/values plus, per entry, the
token's original sequence index and whether it is a real token. `get_seq_length()` stays the length
of the *full* sequence, so generation positions and the masks HF builds for dense layers are those
of the full sequence, while the MoD layer attends only its own shorter cache.

A static cache (``generate(..., cache_implementation="static")``, transformers' `StaticCache`, or
`static_mod_cache`) gets a `StaticMoDCacheLayer` in each MoD slot instead: the compact cache with a
capacity fixed at the prefill (the prompt's kept entries + the decoding budget), so that every decoding
step has the same shapes (torch.compile without recompiles, CUDA graphs).

A MoD layer whose attention has a sliding window (Gemma 3's local layers, Mistral, Qwen2 with
``use_sliding_window``) gives its window to its `MoDCacheLayer`, which then drops, after each chunk, the
entries no later query can attend: original index ``<= seen - window`` (transformers'
`DynamicSlidingWindowLayer` keeps the last ``window - 1`` tokens, indices ``seen - window + 1 .. seen - 1``:
the same rule). So a MoD sliding layer never holds more slots than the stock sliding layer would.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from transformers.cache_utils import Cache

from .compat import DynamicLayer, StaticLayer


class MoDCacheLayer(DynamicLayer):
    """Per entry: `index` [B, S] (the token's original sequence index), `filled` [B, S] (a kept token of
    its sample, not a filler slot) and `valid` [B, S] (attendable: filled and not padding).

    The bookkeeping is kept in the form a step needs, so that a decoding step costs what a dense layer's
    does: entries recorded without an index are the chunk's tokens in order, held as a run (start, length)
    until someone reads `index`; entries recorded without `filled` / `valid` are all True, held as nothing
    until read; and `key_valid()` is None while every entry is attendable (the mask is then left out).
    Reading `index`, `filled` or `valid` materialises the [B, S] tensor; assigning one replaces it.

    `window` (the layer's sliding window, None: global attention): after each chunk the slots that no row
    needs any more are dropped (`slide`). The slots are common to the batch ([B, H, S, hd]), so:
    - after a chunk of several tokens (the prefill) with ``seen >= window``, the cache is compacted (one host
      sync): each row keeps exactly its valid entries of index ``> seen - window``, right-aligned in slot
      order; rows that keep fewer get invalid slots in front (``filled`` and ``valid`` False); padding and
      filler slots go. S is the largest row's count, never more than ``window - 1`` (a row's entries have
      distinct indices in ``seen - window + 1 .. seen - 1``);
    - after a one-token chunk (decoding) the oldest slots go by a host-side rule, with no sync: each slot's
      expiry (the largest index any row holds there, non-decreasing over slots) is kept on the host, and the
      leading slots whose expiry is ``<= seen - window`` are sliced off, as the stock layer slices its
      oldest token. In a batch whose rows kept different tokens a slot may then still hold, in some row, an
      entry the window has passed: it stays until its slot goes, and the MoD layer's mask (by original
      index, with the window) hides it, as before.
    Valid entries dropped are counted per row (`dropped`), so renumbered positions (gamma-MoD) still count them.
    """

    is_croppable = False

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window  # the layer's sliding window; None: every entry is kept
        self._expiry: list[int] | None = []  # per slot (window only): the largest index a row holds there; None: unknown
        self._dropped: torch.Tensor | None = None  # [B] valid entries the window dropped (on the device) ...
        self._dropped_all = 0  # ... plus this many in every row
        self.seen = 0  # tokens of the full sequence this layer has been shown (kept or not)
        self._entries = 0  # entries recorded (the K/V length once the attention has appended them)
        self._batch, self._device = 0, None
        self._index: torch.Tensor | None = None  # [B, S_i]: index of the first S_i entries ...
        self._run_start, self._run = 0, 0  # ... then `_run` entries with indices _run_start, _run_start + 1, ...
        self._filled: torch.Tensor | None = None  # [B, S_f]: the first S_f entries; every later one is True
        self._valid: torch.Tensor | None = None  # [B, S_v]: likewise

    def get_seq_length(self) -> int:
        return self.seen

    @property
    def empty(self) -> bool:
        """Whether no entry is recorded: the layer kept no token of any sample so far (`index`, `filled` and
        `valid` are None then)."""
        return self._entries == 0

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
        if self.window is not None and self._expiry is not None:
            if num_tokens == 1 and kept == 1:  # a decoding step: its slot holds index `seen` in every row
                self._expiry.append(self.seen)
            elif kept:  # a chunk's entries: their indices are on the device; the next slide compacts
                self._expiry = None
        self._entries += kept
        self.seen += num_tokens
        if self.window is not None and kept == 0:  # nothing to store (the attention will not call `update`)
            self.slide()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the chunk's K/V ([B, H, Tk, hd]) and return every entry (the chunk's attention needs them all);
        with a window, then drop what no later query can attend."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.window is not None:
            self.slide()
        return keys, values

    def slide(self) -> None:
        """Drop the slots no later query can attend (index ``<= seen - window`` in every row); see the class doc."""
        threshold = self.seen - self.window
        if threshold < 0 or self._entries == 0 or self.kept_length() != self._entries:
            return  # nothing can be dead yet, or the chunk's K/V are not stored yet (`update` slides then)
        if self._expiry is None:
            self._compact(threshold)
            return
        drop = bisect.bisect_right(self._expiry, threshold)
        if drop:
            self._drop_front(drop)

    def dropped(self) -> torch.Tensor | int:
        """Valid entries the window dropped, per row ([B] on the device, or an int for every row)."""
        return self._dropped_all if self._dropped is None else self._dropped + self._dropped_all

    def _drop_front(self, n: int) -> None:
        """Slice off the first `n` slots (K/V and bookkeeping)."""
        self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
        valid_prefix = 0 if self._valid is None else min(n, self._valid.shape[1])
        if valid_prefix:
            counted = self._valid[:, :valid_prefix].sum(dim=1)  # [B]
            self._dropped = counted if self._dropped is None else self._dropped + counted
        self._dropped_all += n - valid_prefix
        indexed = 0 if self._index is None else self._index.shape[1]
        if n >= indexed:
            self._index = None
            self._run_start, self._run = self._run_start + n - indexed, self._run - (n - indexed)
        else:
            self._index = self._index[:, n:]
        self._filled = None if self._filled is None or n >= self._filled.shape[1] else self._filled[:, n:]
        self._valid = None if self._valid is None or n >= self._valid.shape[1] else self._valid[:, n:]
        self._entries -= n
        self._expiry = self._expiry[n:]

    def _compact(self, threshold: int) -> None:
        """Keep, per row, exactly the valid entries of index > threshold, right-aligned (one host sync)."""
        index, valid = self.index, self.valid  # [B, S]
        live = valid & (index > threshold)  # [B, S]
        code = torch.where(live, index, torch.where(valid, -1, -2)).cpu()  # [B, S]: index, -1 passed, -2 not valid
        live_host = code >= 0
        width = int(live_host.sum(dim=1).max())
        slots = code.shape[1]
        order = torch.sort(live_host.to(torch.int8), dim=1, stable=True).indices[:, slots - width :]  # [B, W]: dead first
        passed = (code == -1).sum(dim=1)  # [B] valid entries that go
        kept_live = live_host.gather(1, order)  # [B, W]
        slot_index = torch.where(kept_live, code.gather(1, order), -1)  # [B, W]
        if bool((order == torch.arange(slots - width, slots)).all()):  # a common prefix goes: slice
            self.keys, self.values = self.keys[:, :, slots - width :], self.values[:, :, slots - width :]
            new_index, new_live = index[:, slots - width :], live[:, slots - width :]
        else:
            at = order.to(self.keys.device)  # [B, W]
            k, v = self.keys, self.values  # [B, H, S, hd]
            self.keys = k.gather(2, at[:, None, :, None].expand(k.shape[0], k.shape[1], width, k.shape[3]))
            self.values = v.gather(2, at[:, None, :, None].expand(v.shape[0], v.shape[1], width, v.shape[3]))
            new_index, new_live = index.gather(1, at), live.gather(1, at)
        self.index = new_index  # the entry count becomes W
        self._filled = self._valid = None if bool(kept_live.all()) else new_live
        if bool(passed.any()):
            passed = passed.to(new_index.device)
            self._dropped = passed if self._dropped is None else self._dropped + passed
        self._expiry = slot_index.amax(dim=0).cummax(dim=0).values.tolist() if width else []

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
        if self.window is not None:
            self._expiry = None  # rewritten entries (streaming eviction): the next slide reads them again

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
            for name in ("_filled", "_valid", "_dropped"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).index_select(0, beam_idx))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("cropping a MoD layer's compact cache is not supported")

    def reset(self) -> None:
        super().reset()
        self._index = self._filled = self._valid = self._dropped = None
        self._run = self._entries = self.seen = self._dropped_all = 0
        self._expiry = []


class StaticMoDCacheLayer(MoDCacheLayer):
    """A MoD layer's compact cache with a fixed capacity, so that decoding runs with fixed shapes.

    Sized once, at the prefill (one chunk: the prompt): capacity ``C = Tk + budget``, where Tk is the
    prefill's kept length (the longest row after routing) and the budget is `max_new_tokens`, or, when
    that is None, what the full-sequence static length leaves after the prompt (``max_cache_len - T``:
    the dense layers' `StaticLayer` size that generate picks from the prompt and ``max_new_tokens``).
    K/V are [B, H, C, hd], allocated once and written in place; `valid` [B, C] is the attendable mask, its
    unfilled tail False, so a decoding step attends all C slots with the tail masked. A step writes slot
    `cursor` (a 0-dim tensor on the device): its validity, then its K/V (`update`), then moves the cursor;
    nothing on the host changes, so a compiled step never sees a new constant.

    Decoding slots hold one token each in order, so their `index` (T + j) and `filled` (written or not)
    follow from the cursor and are made only when read; `index` / `filled` / `valid` are read-only here
    (rewriting entries, as `streaming.budget` evicts them, needs the dynamic cache). Not supported: a chunk
    of more than one token after the prefill (chunked prefill, speculative decoding), and decoding steps
    that skip the layer (``decode_skip``).
    """

    is_compileable = True

    def __init__(self, max_cache_len: int, max_new_tokens: int | None = None) -> None:
        self.allocated = False  # set before the base initialiser assigns `seen`
        self._host_seen = 0
        super().__init__()
        self.max_cache_len = max_cache_len  # the full sequence's static length (what HF sizes its masks by)
        self.max_new_tokens = max_new_tokens
        self.capacity = 0  # C, set at the prefill
        self._prompt, self._prompt_kept = 0, 0  # T and Tk of the prefill
        self.cursor = torch.zeros((), dtype=torch.long)  # entries written (a device tensor once allocated)
        self._valid_buf: torch.Tensor | None = None  # [B, C] attendable
        self._prompt_index: torch.Tensor | None = None  # [B, Tk] original index of the prefill's entries
        self._prompt_filled: torch.Tensor | None = None  # [B, Tk]

    @property
    def seen(self) -> int:  # type: ignore[override]
        """Tokens of the full sequence shown so far (a host read of the cursor once decoding started)."""
        if not self.allocated:
            return self._host_seen
        return self._prompt + int(self.cursor) - self._prompt_kept

    @seen.setter
    def seen(self, value: int) -> None:
        if self.allocated:
            raise AttributeError("a static MoD cache layer's length follows its cursor")
        self._host_seen = value

    def get_seq_length(self) -> torch.Tensor | int:
        """The full sequence's length: a tensor once allocated (as transformers' `StaticLayer`), no host sync."""
        return self.cursor + (self._prompt - self._prompt_kept) if self.allocated else 0

    def get_mask_sizes(self, query_length: int, *args: object, **kwargs: object) -> tuple[int, int]:
        """What HF's mask builders size the dense layers' masks by when this is the reference layer."""
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def kept_length(self) -> int:
        return int(self.cursor) if self.allocated else 0

    def record(self, num_tokens: int, kept: int, batch: int, device: torch.device, **entries: torch.Tensor | None) -> None:
        """The prefill (`entries`: `MoDCacheLayer.record`'s index / filled / valid): the dynamic bookkeeping,
        then the fixed-size buffers. A decoding step (one token, kept; ``valid`` [B, 1], or None: a real
        token): its validity written at the cursor."""
        if self.allocated:
            valid = entries.pop("valid", None)
            if num_tokens != 1 or kept != 1 or any(v is not None for v in entries.values()):
                raise NotImplementedError(
                    "a static MoD cache takes one prefill chunk, then one kept token per step; use the default "
                    "dynamic cache for chunked prefill or decoding steps that skip MoD layers"
                )
            slot = self.cursor.view(1)
            if valid is None:
                self._valid_buf.index_fill_(1, slot, True)
            else:
                self._valid_buf.index_copy_(1, slot, valid)
            return
        if self._host_seen:
            raise NotImplementedError("a static MoD cache takes the prompt as one prefill chunk")
        super().record(num_tokens, kept, batch, device, **entries)
        budget = self.max_new_tokens if self.max_new_tokens is not None else self.max_cache_len - num_tokens
        if budget < 0:
            raise ValueError(f"a {num_tokens}-token prompt does not fit a static cache of {self.max_cache_len} tokens")
        self.capacity, self._prompt, self._prompt_kept = kept + budget, num_tokens, kept
        valid_buf = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)  # [B, C]
        valid_buf[:, :kept] = MoDCacheLayer.valid.fget(self)
        self._prompt_index = MoDCacheLayer.index.fget(self)  # [B, Tk]
        self._prompt_filled = MoDCacheLayer.filled.fget(self)  # [B, Tk]
        self._valid_buf = valid_buf
        self.cursor = torch.tensor(kept, dtype=torch.long, device=device)
        _mark_static(self._valid_buf, self.cursor)
        self.allocated = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill ([B, H, Tk, hd]): allocate [B, H, C, hd], store, and return the chunk itself (its
        attention is over its own kept tokens). A step: write slot `cursor`, return all C slots."""
        if not self.allocated:
            raise RuntimeError("record() must book the entries before the attention stores them")
        if self.keys is None or self.keys.shape[-2] != self.capacity:  # not yet stored (or lazily made empty)
            batch, heads, kept, _ = key_states.shape
            if kept != self._prompt_kept:
                raise RuntimeError(f"the prefill stores {kept} entries, its bookkeeping booked {self._prompt_kept}")
            self.device = key_states.device
            self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
            self.values = value_states.new_zeros(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
            self.keys[:, :, :kept] = key_states
            self.values[:, :, :kept] = value_states
            self.is_initialized = True
            _mark_static(self.keys, self.values)
            return key_states, value_states
        slot = self.cursor.view(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.cursor.add_(1)
        return self.keys, self.values

    def key_valid(self) -> torch.Tensor | None:
        return self._valid_buf if self.allocated else super().key_valid()

    @property
    def index(self) -> torch.Tensor | None:  # type: ignore[override]
        if not self.allocated:
            return MoDCacheLayer.index.fget(self)
        decode = torch.arange(self._prompt, self._prompt + self.capacity - self._prompt_kept, device=self.cursor.device)
        return torch.cat([self._prompt_index, decode.expand(self._batch, -1)], dim=1)  # [B, C]

    @property
    def filled(self) -> torch.Tensor | None:  # type: ignore[override]
        if not self.allocated:
            return MoDCacheLayer.filled.fget(self)
        written = torch.arange(self._prompt_kept, self.capacity, device=self.cursor.device) < self.cursor  # [C - Tk]
        return torch.cat([self._prompt_filled, written.expand(self._batch, -1)], dim=1)  # [B, C]

    @property
    def valid(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._valid_buf if self.allocated else MoDCacheLayer.valid.fget(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.allocated:
            return
        beam_idx = beam_idx.to(self.cursor.device)
        for buf in (self.keys, self.values, self._valid_buf):  # in place: the addresses stay static
            if buf is not None:
                buf.copy_(buf.index_select(0, beam_idx))
        self._prompt_index = self._prompt_index.index_select(0, beam_idx)
        self._prompt_filled = self._prompt_filled.index_select(0, beam_idx)

    def reset(self) -> None:
        """Back to empty and unallocated: the next prompt sizes the buffers again."""
        self.allocated = False
        self.keys = self.values = self._valid_buf = self._prompt_index = self._prompt_filled = None
        self.is_initialized = False
        self.capacity = self._prompt = self._prompt_kept = 0
        self.cursor = torch.zeros((), dtype=torch.long)
        super().reset()


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell dynamo these buffers keep their address (mutated in place), as transformers' `StaticLayer` does,
    so CUDA graphs can be replayed over them; not while tracing."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


def static_mod_cache(model: torch.nn.Module, prompt_length: int, max_new_tokens: int) -> Cache:
    """A transformers `StaticCache` for `model` with a `StaticMoDCacheLayer` in every MoD layer's slot, for
    a prompt of `prompt_length` tokens (padding included) and up to `max_new_tokens` generated ones.

    Pass it to ``generate`` as the cache (``cache=`` / ``past_key_values=``), one cache per generate call.
    ``generate(..., cache_implementation="static")`` builds the same thing by itself (MoD layers convert
    their slots of the `StaticCache` it makes); this function is for driving decoding by hand."""
    from transformers import StaticCache

    from .retrofit import mod_layer_map

    max_cache_len = prompt_length + max_new_tokens
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)
    for idx in mod_layer_map(model):
        cache.layers[idx] = StaticMoDCacheLayer(max_cache_len, max_new_tokens)
    return cache


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


def mod_cache_layer(cache: Cache, layer_idx: int, window: int | None = None) -> MoDCacheLayer:
    """The `MoDCacheLayer` in slot `layer_idx` of `cache`, installing it if the slot is empty; `window`: the
    layer's sliding window (its dynamic compact cache then drops what the window has passed)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"MoD layers need a transformers `Cache` with per-layer objects, got {type(cache).__name__}")
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, MoDCacheLayer):
        return layer
    if isinstance(layer, StaticLayer):  # a static cache: the compact cache with a capacity fixed at the prefill
        if layer.is_initialized and layer.get_seq_length() != 0:
            raise ValueError(f"static cache slot {layer_idx} already holds dense entries; a MoD layer must start from an empty cache")
        if getattr(layer, "is_sliding", False) or (window is not None and layer.max_cache_len > window):
            raise NotImplementedError(  # before anything is installed in the caller's cache
                f"MoD layer {layer_idx}: a static sliding-window cache layer is not supported; use the dynamic cache"
            )
        layers[layer_idx] = StaticMoDCacheLayer(layer.max_cache_len)
        return layers[layer_idx]
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
    layers[layer_idx] = MoDCacheLayer(window)
    return layers[layer_idx]


def kv_entries(cache: Cache, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """K/V entries each layer holds for each sample: a list of [B] tensors (CPU).

    A MoD layer: its filled entries (kept tokens, padding included; filler slots and the invalid slots of a
    windowed layer's compaction excluded). A dense layer: the tokens it holds (a sliding-window layer the
    last ``window - 1``; a static layer its entries, not its allocated length). `attention_mask` [B, S] (the
    2-D padding mask of the sequence the cache holds): count real tokens only. Padding is taken as held by
    every layer (MoD layers keep their padding, a dense layer every token), except where a sliding window
    dropped it: a windowed MoD layer counts its valid entries, a stock sliding layer the real tokens among
    the last ones it holds."""
    padding = None if attention_mask is None else (attention_mask.shape[1] - attention_mask.long().sum(dim=1)).cpu()  # [B]
    out = []
    for layer in cache.layers:
        if isinstance(layer, MoDCacheLayer):
            if layer.empty:  # the layer kept no token of any sample (a threshold rule can), padding neither
                out.append(torch.zeros(layer._batch if attention_mask is None else attention_mask.shape[0], dtype=torch.long))
            elif padding is not None and layer.window is not None:
                out.append(layer.valid.sum(dim=1).cpu())  # valid: filled and not padding
            else:
                out.append(layer.filled.sum(dim=1).cpu() - (0 if padding is None else padding))
            continue
        held = _dense_held(layer)
        if padding is not None and getattr(layer, "is_sliding", False):  # the held tokens are the sequence's last
            out.append(attention_mask[:, attention_mask.shape[1] - held :].long().sum(dim=1).cpu())
        else:
            out.append(torch.full((layer.keys.shape[0],), held, dtype=torch.long) - (0 if padding is None else padding))
    return out


def _dense_held(layer: Any) -> int:
    """Tokens a stock cache layer holds: a dynamic sliding layer's K/V length (the last ``window - 1``), a
    static sliding one's min(seen, window) (it keeps ``window``), otherwise its sequence length."""
    seen = int(layer.get_seq_length())
    if not getattr(layer, "is_sliding", False):
        return seen
    if isinstance(layer, StaticLayer):
        return min(seen, layer.max_cache_len)
    return layer.keys.shape[-2]


def kv_bytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of every layer (what is allocated, fillers included)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total

"""Efficiency measured on the batches an evaluation actually runs: prefill latency, decode throughput,
KV-cache bytes of the prompt, and prefill FLOPs per sample from the core's accounting applied to the
tokens each layer processed in that very forward.

The timed forwards collect nothing: the tokens each layer processed are read afterwards from the KV cache
the forward filled (a MoD layer's compact cache holds exactly its kept prompt tokens; a dense layer
processed every real one), so dense and MoD variants pay the same overheads (no per-layer statistics
and their host synchronisations inside the timed region).

No lmms-eval import: the plugin fills a `Meter`, the report reads its `summary()`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LogitsProcessor


@dataclass
class Meter:
    """Sums over the evaluated batches; `summary()` turns them into per-sample / per-second figures."""

    prefill_batches: int = 0
    prefill_samples: int = 0
    prefill_seconds: float = 0.0  # wall time from the call to the first next-token logits
    decode_seconds: float = 0.0  # wall time of the remaining generation steps
    decode_tokens: int = 0  # tokens generated after the first one (the first comes from the prefill)
    generated_tokens: int = 0
    kv_samples: int = 0
    kv_bytes: int = 0  # K/V bytes the prompt occupies in the cache (padding excluded), summed over samples
    flops_samples: int = 0
    prefill_flops: float = 0.0  # summed over samples

    def add_prefill(self, batch: int, seconds: float) -> None:
        self.prefill_batches += 1
        self.prefill_samples += batch
        self.prefill_seconds += seconds

    def add_decode(self, seconds: float, generated_per_sample: Sequence[int]) -> None:
        self.decode_seconds += seconds
        self.generated_tokens += sum(generated_per_sample)
        self.decode_tokens += sum(max(n - 1, 0) for n in generated_per_sample)

    def add_kv(self, bytes_per_sample: Sequence[int]) -> None:
        self.kv_samples += len(bytes_per_sample)
        self.kv_bytes += sum(bytes_per_sample)

    def add_flops(self, flops_per_sample: Sequence[float]) -> None:
        self.flops_samples += len(flops_per_sample)
        self.prefill_flops += float(sum(flops_per_sample))

    def merge(self, other: Meter) -> Meter:
        """Sum of two meters (e.g. the ranks of a multi-process run)."""
        return Meter(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def summary(self) -> dict[str, float | None]:
        """Per-sample means and throughput; None where nothing was measured."""
        div = lambda a, b: a / b if b else None
        tflops = div(self.prefill_flops, self.flops_samples)
        return {
            "prefill_tflops_per_sample": tflops / 1e12 if tflops is not None else None,
            "kv_bytes_per_sample": div(self.kv_bytes, self.kv_samples),
            "prefill_latency_s_per_batch": div(self.prefill_seconds, self.prefill_batches),
            "prefill_latency_s_per_sample": div(self.prefill_seconds, self.prefill_samples),
            "decode_tokens_per_s": div(self.decode_tokens, self.decode_seconds),
            "generated_tokens": self.generated_tokens,
            "samples": self.prefill_samples,
        }

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstStepTimer(LogitsProcessor):
    """A no-op logits processor that notes when generation reaches its first next-token logits, i.e. the
    end of the prefill (vision encoder + decoder over the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter()
        return scores


def windowed(cache) -> bool:
    """Whether a layer of `cache` drops entries a sliding window has passed (a windowed MoD layer or a stock
    sliding layer): then only a prefill's cache tells what the prompt processed and holds."""
    from ..cache import MoDCacheLayer

    return any(
        (layer.window is not None) if isinstance(layer, MoDCacheLayer) else getattr(layer, "is_sliding", False)
        for layer in cache.layers
    )


def prompt_tokens_per_layer(cache, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder layer, the prompt tokens of each sample it processed ([B] on the CPU), read from the
    `cache` its prefill filled. attention_mask [B, T]: the prompt's padding mask. A dense layer processed
    every real prompt token; a MoD layer (`MoDCacheLayer`) only its kept entries, recognised by their
    original index < T (entries of later decoding steps are not the prompt's), plus, in a sliding-window
    layer, the entries the window dropped: a `windowed` cache must be the prefill's alone (no decoding
    step, so every dropped entry was the prompt's)."""
    from ..cache import MoDCacheLayer

    prompt_len = attention_mask.shape[1]
    real = attention_mask.bool().sum(dim=1).cpu()  # [B]
    out = []
    for layer in cache.layers:
        if isinstance(layer, MoDCacheLayer) and layer.empty:  # kept nothing (a threshold rule can)
            out.append(torch.zeros_like(real))
        elif isinstance(layer, MoDCacheLayer):
            held = (layer.valid & (layer.index < prompt_len)).sum(dim=1).cpu()  # [B]
            dropped = layer.dropped() if layer.window is not None else 0
            out.append(held + (dropped.cpu() if isinstance(dropped, torch.Tensor) else dropped))
        else:
            out.append(real)
    return out


def prompt_kv_bytes(cache, entries_per_layer: Sequence[torch.Tensor]) -> list[int]:
    """K/V bytes the prompt of each sample holds in `cache`, padding excluded: each layer's entries
    (`prompt_tokens_per_layer`, or `cache.kv_entries` where a window dropped some) times the bytes of one
    entry's K and V."""
    total = torch.zeros_like(entries_per_layer[0])  # [B]
    for layer, entries in zip(cache.layers, entries_per_layer):
        keys = layer.keys  # [B, Hkv, S, hd]; None in a layer that kept no token (then `entries` are 0)
        if keys is not None:
            total += entries * (2 * keys.shape[1] * keys.shape[-1] * keys.element_size())  # K and V of one token
    return [int(x) for x in total]


def prefill_flops(
    model: nn.Module, inputs: dict[str, torch.Tensor], tokens_per_layer: Sequence[torch.Tensor]
) -> list[float]:
    """Decoder prefill FLOPs of each sample of a batch from the core's accounting (`mllm_mod.flops`): the
    sample's real text and vision token counts, and per layer the tokens measured in that forward
    (`prompt_tokens_per_layer`)."""
    from ..adapters import adapter_for
    from ..flops import DecoderShape, prefill_cost
    from ..layer import MoDLayer

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    if len(tokens_per_layer) != len(layers):
        raise ValueError(f"token counts of {len(tokens_per_layer)} layers for a decoder of {len(layers)}")
    shape = DecoderShape.from_config(adapter.text_config(model.config))
    ids = inputs["input_ids"]  # [B, T]
    real = inputs["attention_mask"].bool()  # [B, T]
    vision_ids = torch.tensor(adapter.vision_token_ids(model.config), device=ids.device)
    n_vision = (torch.isin(ids, vision_ids) & real).sum(dim=1).tolist()  # [B]
    n_tokens = real.sum(dim=1).tolist()  # [B]
    per_layer = [t.tolist() for t in tokens_per_layer]  # [L][B]
    ratios = [layer.ratio if isinstance(layer, MoDLayer) else 1.0 for layer in layers]
    routed = [isinstance(layer, MoDLayer) and any(n > 0 for n in n_vision) for layer in layers]
    state = getattr(model, "mod_state", None)
    width = 2 if state is not None and state.config.router == "shared" else 1  # gamma-MoD's 2-way router
    out = []
    for b, (total, vision) in enumerate(zip(n_tokens, n_vision)):
        tokens = [layer[b] for layer in per_layer]
        cost = prefill_cost(
            shape, ratios, total - vision, vision, mod_layers=routed, tokens_per_layer=tokens, router_outputs=width
        )
        out.append(float(cost.decoder_flops))
    return out

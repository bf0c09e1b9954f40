"""Efficiency measured on the batches an evaluation actually runs: prefill latency, decode throughput,
KV-cache bytes of the prompt, and prefill FLOPs per sample from the core's accounting applied to the
tokens each layer processed in that very forward.

No lmms-eval import: the plugin fills a `Meter`, the report reads its `summary()`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


def prompt_kv_bytes(cache, attention_mask: torch.Tensor) -> list[int]:
    """K/V bytes the prompt of each sample holds in `cache` after generation, padding excluded.

    attention_mask [B, T]: the prompt's padding mask. Dense layers hold every real prompt token; a MoD
    layer (`MoDCacheLayer`) holds only its kept entries, recognised by their original index < T.
    """
    from ..cache import MoDCacheLayer

    prompt_len = attention_mask.shape[1]
    real = attention_mask.bool().sum(dim=1).cpu()  # [B]
    total = torch.zeros_like(real)
    for layer in cache.layers:
        keys = layer.keys  # [B, Hkv, S, hd]
        per_entry = 2 * keys.shape[1] * keys.shape[-1] * keys.element_size()  # K and V of one token
        if isinstance(layer, MoDCacheLayer):
            entries = (layer.valid & (layer.index < prompt_len)).sum(dim=1).cpu()  # [B]
        else:
            entries = real
        total += entries * per_entry
    return [int(x) for x in total]


@contextlib.contextmanager
def record_prefill(model: nn.Module) -> Iterator[list]:
    """Collect the `LayerStats` of the next forward of `model` (the prefill of a `generate` call, or a
    scoring forward): tokens each MoD layer actually processed, per sample. Empty for a model without
    MoD layers (every layer processes every token)."""
    from ..retrofit import is_retrofitted

    stats: list = []
    if not is_retrofitted(model):
        yield stats
        return
    armed = [True]

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ctx = kwargs.get("mod_routing")  # set by the core's routing pre-hook, which runs first
        if armed[0] and ctx is not None:
            ctx.stats, armed[0] = stats, False

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield stats
    finally:
        handle.remove()


def prefill_flops(model: nn.Module, inputs: dict[str, torch.Tensor], stats: Sequence = ()) -> list[float]:
    """Decoder prefill FLOPs of each sample of a batch from the core's accounting (`mllm_mod.flops`): the
    sample's real text and vision token counts, and per layer the tokens measured in that forward
    (`stats` from `record_prefill`; layers without stats processed every real token)."""
    from ..adapters import adapter_for
    from ..flops import DecoderShape, prefill_cost
    from ..layer import MoDLayer

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    shape = DecoderShape.from_config(adapter.text_config(model.config))
    ids = inputs["input_ids"]  # [B, T]
    real = inputs["attention_mask"].bool()  # [B, T]
    vision_ids = torch.tensor(adapter.vision_token_ids(model.config), device=ids.device)
    n_vision = (torch.isin(ids, vision_ids) & real).sum(dim=1).tolist()  # [B]
    n_tokens = real.sum(dim=1).tolist()  # [B]
    kept = {s.layer_idx: s.kept.tolist() for s in stats}  # layer -> [B]
    ratios = [layer.ratio if isinstance(layer, MoDLayer) else 1.0 for layer in layers]
    routed = [isinstance(layer, MoDLayer) and any(n > 0 for n in n_vision) for layer in layers]
    state = getattr(model, "mod_state", None)
    width = 2 if state is not None and state.config.router == "shared" else 1  # gamma-MoD's 2-way router
    out = []
    for b, (total, vision) in enumerate(zip(n_tokens, n_vision)):
        tokens = [kept[i][b] if i in kept else total for i in range(len(layers))]
        cost = prefill_cost(shape, ratios, total - vision, vision, mod_layers=routed, tokens_per_layer=tokens, router_outputs=width)
        out.append(float(cost.decoder_flops))
    return out

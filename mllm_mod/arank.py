"""ARank (gamma-MoD): which decoder layers are redundant, measured on the user's own samples.

For each layer and head, the post-softmax attention map over the whole prompt [S, S], with its
diagonal zeroed, cast to float32: its numerical rank (SVD, default tolerance
``sigma_max * S * eps_float32``). A layer's score is the mean over heads, then over samples. A
low-rank layer attends in a redundant way; gamma-MoD keeps the highest-scoring layers dense and
converts the rest.

Ranks are computed inside a forward hook on each attention module as its map is produced, and the map
is dropped right after: at no time are two layers' maps held. The model runs eager attention for the
calibration (the only backend that materialises the maps) and gets its own backend back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .layer import MoDLayer

REPORT_NAME = "arank.json"
PLOT_NAME = "arank.png"


def attention_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Numerical rank of each head's map with its diagonal zeroed: [H, S, S] -> [H] (float32 SVD)."""
    m = maps.detach().to(torch.float32).clone()  # [H, S, S]
    m.diagonal(dim1=-2, dim2=-1).zero_()
    return torch.linalg.matrix_rank(m)  # default tolerance: sigma_max * max(S, S) * eps


@dataclass
class ARankReport:
    """Mean ARank per layer (over heads, then samples), with the per-head mean and spread."""

    model: str
    samples: int
    layer_arank: list[float]
    head_mean: list[list[float]]
    head_std: list[list[float]]

    @property
    def num_layers(self) -> int:
        return len(self.layer_arank)

    def dense_layers(self, keep_dense: int | None = None, threshold: float | None = None) -> list[int]:
        """Layers to keep dense: the `keep_dense` highest-ARank layers (default: 4 of 32, scaled to the
        depth, at least 1), or every layer whose ARank is at least `threshold`."""
        if threshold is not None:
            return [i for i, a in enumerate(self.layer_arank) if a >= threshold]
        n = keep_dense if keep_dense is not None else max(1, round(4 * self.num_layers / 32))
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"keep_dense must be in [0, {self.num_layers}], got {n}")
        ranked = sorted(range(self.num_layers), key=lambda i: (-self.layer_arank[i], i))
        return sorted(ranked[:n])

    def mod_layers(self, keep_dense: int | None = None, threshold: float | None = None) -> list[int]:
        dense = set(self.dense_layers(keep_dense, threshold))
        return [i for i in range(self.num_layers) if i not in dense]

    def schedule(self, keep_dense: int | None = None, threshold: float | None = None) -> dict[str, Any]:
        """`MoDConfig` overrides that make exactly this report's `mod_layers` route (constant ratio)."""
        return {"schedule": "constant", "layers": self.mod_layers(keep_dense, threshold), "skip_layers": None}

    def save(self, directory: str | os.PathLike, plot: bool = True) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, REPORT_NAME)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
        if plot:
            self.plot(os.path.join(directory, PLOT_NAME))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ARankReport:
        path = os.path.join(path, REPORT_NAME) if os.path.isdir(path) else path
        with open(path) as f:
            data = json.load(f)
        missing = {"model", "samples", "layer_arank", "head_mean", "head_std"} - set(data)
        if missing:
            raise ValueError(f"{path!s} is not an ARank report (missing {sorted(missing)})")
        return cls(**data)

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dense = set(self.dense_layers())
        fig, ax = plt.subplots(figsize=(max(6, self.num_layers * 0.3), 3.5))
        colors = ["tab:orange" if i in dense else "tab:blue" for i in range(self.num_layers)]
        spread = [sum(s) / len(s) for s in self.head_std]
        ax.bar(range(self.num_layers), self.layer_arank, color=colors, yerr=spread, capsize=2)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean ARank (heads, samples)")
        ax.set_title(f"ARank of {self.model or 'model'} over {self.samples} samples (orange: kept dense)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the text decoder with eager attention inside the block, then restore its backend."""
    config = adapter_for(model).text_config(model.config)
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def arank(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    max_samples: int | None = None,
    progress: bool = True,
) -> ARankReport:
    """ARank of every decoder layer of `model`, streamed over `batches` (dicts of model inputs with an
    ``attention_mask``; padding is cropped away per sample before the rank is taken)."""
    from tqdm.auto import tqdm

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    attn_modules = [(layer.base_layer if isinstance(layer, MoDLayer) else layer).self_attn for layer in layers]
    sums: list[torch.Tensor | None] = [None] * len(layers)  # [H] per layer
    squares: list[torch.Tensor | None] = [None] * len(layers)
    current: dict[str, torch.Tensor] = {}

    def on_attention(idx: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            weights = output[1]  # [B, H, S, S] post-softmax
            if weights is None:
                raise RuntimeError("attention weights were not produced; ARank needs eager attention")
            mask = current["mask"]  # [B, S]
            for b in range(weights.shape[0]):
                real = mask[b].nonzero().squeeze(1)  # [S_b]
                ranks = attention_ranks(weights[b][:, real][:, :, real]).double()  # [H]
                sums[idx] = ranks if sums[idx] is None else sums[idx] + ranks
                squares[idx] = ranks**2 if squares[idx] is None else squares[idx] + ranks**2

        return hook

    handles = [m.register_forward_hook(on_attention(i)) for i, m in enumerate(attn_modules)]
    seen = 0
    bar = tqdm(total=max_samples, desc="ARank calibration", unit="sample", disable=not progress)
    try:
        with eager_attention(model), torch.no_grad():
            for batch in batches:
                if max_samples is not None and seen >= max_samples:
                    break
                if max_samples is not None and seen + batch["input_ids"].shape[0] > max_samples:
                    batch = {k: v[: max_samples - seen] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}
                mask = batch.get("attention_mask")
                current["mask"] = mask if mask is not None else torch.ones_like(batch["input_ids"])
                model(**batch, use_cache=False)
                seen += batch["input_ids"].shape[0]
                bar.update(batch["input_ids"].shape[0])
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("ARank calibration got no samples")
    head_mean = [(s / seen).tolist() for s in sums]
    head_std = [(q / seen - (s / seen) ** 2).clamp(min=0).sqrt().tolist() for s, q in zip(sums, squares)]
    return ARankReport(
        model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        samples=seen,
        layer_arank=[sum(h) / len(h) for h in head_mean],
        head_mean=head_mean,
        head_std=head_std,
    )


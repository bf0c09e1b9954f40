"""`torch.compile` for a (MoD) model's decoder layers: the stock layer compiled, the routing eager.

What dominates a decoder's time is the stock layer's attention and MLP; the routing step around it
(router, top-k over a data-dependent number of candidates, gather, scatter, the compact cache) has
sizes that change with every batch and stays eager. So `compile_layers` compiles each stock layer
(the `base_layer` inside a `MoDLayer`, a dense layer as it is) with dynamic shapes: every layer of
the model runs the same compiled code whatever number of tokens it keeps, and a dense model compiled
the same way is the fair baseline (`mllm-mod bench --compile` does exactly that).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import adapter_for
from .layer import MoDLayer


def compile_layers(model: nn.Module, dynamic: bool = True, **options: Any) -> nn.Module:
    """Compile every stock decoder layer of `model` in place (``nn.Module.compile``); returns `model`.

    `options` go to `torch.compile` (``mode="max-autotune"``, ``backend=...``). Works before or after
    `retrofit`: layers wrapped later keep their compiled stock layer as `base_layer`, and `unload`
    gives the compiled layers back.
    """
    for layer in adapter_for(model).layers(model):
        stock = layer.base_layer if isinstance(layer, MoDLayer) else layer
        stock.compile(dynamic=dynamic, **options)
    return model

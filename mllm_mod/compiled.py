"""`torch.compile` for a (MoD) model's decoder layers: the stock compute compiled, the routing eager.

What dominates a decoder's time is the stock layer's attention and MLP; the routing step around it
(router, top-k over a data-dependent number of candidates, gather, scatter, the compact cache
bookkeeping) has sizes that change with every batch and stays eager. `compile_layers` compiles, with
dynamic shapes, the stock compute of every layer: a dense layer's forward as it is, and in a
`MoDLayer` its `block` (norm, attention, norm, MLP of the wrapped layer on the kept tokens). One
compiled code then serves every layer whatever number of tokens it keeps. The wrapped stock layers
are compiled too, so that the dense twin (`mllm_mod.efficiency.dense`, `unload`) is compiled the same
way: `mllm-mod bench --compile` compares like with like.

Dynamo specialises a layer's code on its `layer_idx` (the cache is indexed by it), so each layer gets
its own compiled graph (identical graphs reuse inductor's compiled kernels). Past
``torch._dynamo.config.recompile_limit`` graphs of one function (8 by default) dynamo silently runs
the rest eager, so `compile_layers` raises that limit to cover every layer (a process-wide torch
setting; it only ever goes up).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .layer import MoDLayer

VARIANTS_PER_LAYER = 4


def compile_layers(model: nn.Module, dynamic: bool = True, **options: Any) -> nn.Module:
    """Compile the stock compute of every decoder layer of `model` in place; returns `model`.

    Call it after `retrofit` (a layer wrapped later runs its block eager). `options` go to
    `torch.compile` (``mode="max-autotune"``, ``backend=...``).
    """
    import torch._dynamo.config as dynamo_config

    layers = adapter_for(model).layers(model)
    # per layer: prefill without a mask, with a padding mask, decoding (one token), a skipped chunk
    needed = VARIANTS_PER_LAYER * len(layers)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 2 * needed)
    for layer in layers:
        stock = layer.base_layer if isinstance(layer, MoDLayer) else layer
        stock.compile(dynamic=dynamic, **options)
        if isinstance(layer, MoDLayer):  # the MoD layer calls the stock parts through `block`
            layer.block = torch.compile(layer.block, dynamic=dynamic, **options)
    return model

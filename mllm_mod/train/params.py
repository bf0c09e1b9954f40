"""Which parameters train, and with which learning rate.

Found structurally: routers are the `Router` modules MoD added; the vision tower is the model's
``vision_tower`` submodule. Everything else (projector, LLM, embeddings, LM head) is "the LLM side".
"""

from __future__ import annotations

import logging

from torch import nn

from ..router import Router

logger = logging.getLogger(__name__)


def router_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of every router parameter, shared router included."""
    ids = {id(p) for module in model.modules() if isinstance(module, Router) for p in module.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def vision_tower(model: nn.Module) -> nn.Module:
    """The model's vision encoder, found through its family's adapter."""
    from ..adapters import adapter_for

    return adapter_for(model).vision_tower(model)


def set_trainable(model: nn.Module, freeze_vision_tower: bool = True, routers_only: bool = False) -> dict[str, int]:
    """Set ``requires_grad`` per the recipe; returns parameter counts ``{"trainable", "frozen", "routers"}``.

    routers_only: only router parameters train (the model must be retrofitted).
    freeze_vision_tower: the vision tower is frozen, everything else trains (p-MoD's default).
    """
    routers = router_parameter_names(model)
    if routers_only and not routers:
        raise ValueError("routers_only: the model has no MoD routers (retrofit it first)")
    tower = {id(p) for p in vision_tower(model).parameters()} if freeze_vision_tower else set()
    for name, param in model.named_parameters():
        if routers_only:
            param.requires_grad_(name in routers)
        else:
            param.requires_grad_(id(param) not in tower)
    counts = {"trainable": 0, "frozen": 0, "routers": 0}
    for name, param in model.named_parameters():
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
        counts["routers"] += param.numel() if name in routers else 0
    logger.info("trainable parameters: %s", counts)
    return counts


def param_groups(
    model: nn.Module, decay_names: set[str] | list[str], weight_decay: float, lr: float, router_lr: float | None
) -> list[dict]:
    """Optimizer groups: LLM-side weights with and without decay at `lr`, routers (no decay) at `router_lr`."""
    routers = router_parameter_names(model)
    decay = set(decay_names)
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr": lr},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": lr},
        "routers": {"params": [], "weight_decay": 0.0, "lr": lr if router_lr is None else router_lr},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "routers" if name in routers else "decay" if name in decay else "no_decay"
        groups[key]["params"].append(param)
    return [group for group in groups.values() if group["params"]]

"""Inject MoD layers into a stock model, take them out again, save and reload what MoD adds.

In the manner of peft: validate everything before mutating; each wrapped layer keeps the stock one as
``base_layer``; an adapter save holds only MoD parameters plus a JSON config; reloading is strict.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapters import Adapter, adapter_for
from .arank import ARankReport
from .config import MoDConfig, as_config
from .layer import MoDLayer
from .losses import routing_loss
from .masks import SUPPORTED
from .router import Router, build_router
from .schedule import mod_layers

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "mod_adapter.safetensors"
CONFIG_KEY = "mod_config"  # the key under which a full checkpoint's config.json records the MoD config
SHARED_ROUTER = "mod_shared_router"  # attribute of the decoder holding gamma-MoD's shared router
LOSS_KEY, AGREEMENT_KEY = "mod_routing_loss", "mod_router_agreement"  # added to the model outputs
FINGERPRINT_KEYS = (
    "model_type",
    "architecture",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass
class MoDState:
    """What `retrofit` attached to a model (as ``model.mod_state``)."""

    config: MoDConfig
    adapter: Adapter
    hooks: list[RemovableHandle]


def get_state(model: nn.Module) -> MoDState:
    state = getattr(model, "mod_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no MoD layers; call mllm_mod.retrofit(model, ...) first")
    return state


def is_retrofitted(model: nn.Module) -> bool:
    return getattr(model, "mod_state", None) is not None


def base_fingerprint(model: nn.Module, adapter: Adapter | None = None) -> dict[str, Any]:
    """Shape facts of the base model a MoD adapter belongs to (compared on load), plus its name."""
    adapter = adapter or adapter_for(model)
    text = adapter.text_config(model.config)
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "num_hidden_layers": len(adapter.layers(model)),
        "hidden_size": text.hidden_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": text.vocab_size,
        "weights_digest": weights_digest(model),
    }


def weights_digest(model: nn.Module) -> str | None:
    """A short digest of the base model's weights: SHA-256 of the first 16 rows of the input embedding in
    float32. Tells apart same-shape models with different weights (another checkpoint of the family); None
    where the weights are not materialised here (meta device, ZeRO-3 partitions)."""
    import hashlib

    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta" or weight.numel() == 0:
        return None
    rows = weight.detach()[:16].to("cpu", torch.float32).contiguous()  # [16, D]
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def check_base(expected: dict[str, Any], model: nn.Module) -> None:
    """Raise if `model` is not the base model `expected` describes, naming every key that differs."""
    actual = base_fingerprint(model)
    diffs = {k: (expected.get(k), actual.get(k)) for k in FINGERPRINT_KEYS if k in expected and expected[k] != actual[k]}
    if diffs:
        lines = ", ".join(f"{k}: saved {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"this MoD adapter was saved from a different base model ({lines})")
    name = expected.get("name_or_path")
    digest, actual_digest = expected.get("weights_digest"), actual["weights_digest"]
    if digest and actual_digest and digest != actual_digest:
        logger.warning(
            "MoD adapter saved from a base with other weights (embedding digest %s, this model %s; saved from %s, "
            "loading onto %s): the shapes match, but routers trained on another checkpoint route differently "
            "unless this is a fine-tuned copy of that base",
            digest, actual_digest, name or "?", actual["name_or_path"] or "?",
        )
    elif name and actual["name_or_path"] and name != actual["name_or_path"]:
        logger.warning("MoD adapter saved from %s, loading onto %s (shapes and weights digest match)", name, actual["name_or_path"])


def retrofit(
    model: nn.Module,
    config: MoDConfig | str | dict[str, Any] = "pmod",
    arank: ARankReport | str | os.PathLike | None = None,
    arank_dense: int | None = None,
    arank_threshold: float | None = None,
    **overrides: Any,
) -> nn.Module:
    """Replace the decoder layers the schedule names with `MoDLayer`s, in place; returns `model`.

    `config` is a `MoDConfig`, a preset name (``"pmod"``, ``"gmod"``, ``"videomod"``) or a dict;
    `overrides` change single fields (``retrofit(model, "pmod", prd_min_ratio=0.2)``). `arank` (a
    report or its path) picks the MoD layers: its `arank_dense` highest-ARank layers (default 4 of 32,
    scaled to the depth), or those with ARank >= `arank_threshold`, stay dense; the rest route.
    """
    if is_retrofitted(model):
        raise ValueError("model is already retrofitted; call mllm_mod.unload(model) first")
    adapter = adapter_for(model)
    adapter.refuse(model)
    layers = adapter.layers(model)
    if arank is not None:
        report = arank if isinstance(arank, ARankReport) else ARankReport.load(arank)
        if report.num_layers != len(layers):
            raise ValueError(f"the ARank report covers {report.num_layers} layers, the model has {len(layers)}")
        overrides = {**report.schedule(arank_dense, arank_threshold), **overrides}
    elif arank_dense is not None or arank_threshold is not None:
        raise ValueError("arank_dense / arank_threshold need an ARank report (arank=...)")
    config = as_config(config, **overrides)
    if config.positions == "renumber" and adapter.renumber_refused:
        raise ValueError(
            f"{adapter.name}: positions='renumber' is not supported ({adapter.renumber_refused}); "
            "pass positions='original' (kept tokens keep their own positions)"
        )
    text = adapter.text_config(model.config)
    chosen = mod_layers(config, len(layers))
    implementation = text._attn_implementation
    if implementation not in SUPPORTED:
        raise ValueError(f"attention implementation {implementation!r} is not supported; use one of {SUPPORTED}")
    config = config.replace(base_model=base_fingerprint(model, adapter), versions=library_versions())

    decoder = adapter.decoder(model)
    shared = None
    if config.router == "shared":
        shared = build_router(config, text.hidden_size, device=next(decoder.parameters()).device)
        decoder.add_module(SHARED_ROUTER, shared.train(decoder.training))
    rotary = getattr(decoder, "rotary_emb", None)
    if any(getattr(layers[idx], "_compiled_call_impl", None) is not None for idx in chosen):
        logger.warning(
            "retrofit: these decoder layers were compiled; a MoD layer runs its stock parts through its own "
            "`block`, which runs eager. Call mllm_mod.compiled.compile_layers(model) after retrofit."
        )
    for idx, ratio in chosen.items():
        mod = MoDLayer(layers[idx], idx, ratio, config, text.hidden_size, shared_router=shared, rotary=rotary)
        layers[idx] = mod.train(layers[idx].training)  # new modules start in train mode; follow the model
    hooks = [
        model.register_forward_pre_hook(_routing_hook(adapter, model), with_kwargs=True),
        model.register_forward_hook(_loss_hook(config), with_kwargs=True),
    ]
    model.mod_state = MoDState(config=config, adapter=adapter, hooks=hooks)
    setattr(model.config, CONFIG_KEY, config.to_dict())  # save_pretrained writes it into config.json
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the original layer objects back and remove everything `retrofit` added; returns `model`."""
    state = get_state(model)
    layers = state.adapter.layers(model)
    for idx, layer in enumerate(layers):
        if isinstance(layer, MoDLayer):
            layers[idx] = layer.base_layer
    decoder = state.adapter.decoder(model)
    if hasattr(decoder, SHARED_ROUTER):
        delattr(decoder, SHARED_ROUTER)
    for hook in state.hooks:
        hook.remove()
    del model.mod_state
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


def mod_layer_map(model: nn.Module) -> dict[int, MoDLayer]:
    return {i: layer for i, layer in enumerate(get_state(model).adapter.layers(model)) if isinstance(layer, MoDLayer)}


def layer_ratios(model: nn.Module) -> list[float]:
    """Keep ratio of every decoder layer, 1.0 for dense layers."""
    layers = get_state(model).adapter.layers(model)
    return [layer.ratio if isinstance(layer, MoDLayer) else 1.0 for layer in layers]


def mod_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters MoD adds: ``layers.{i}.router.*`` per layer, or ``shared_router.*``."""
    state = get_state(model)
    if state.config.router == "shared":
        shared: Router = getattr(state.adapter.decoder(model), SHARED_ROUTER)
        return {f"shared_router.{name}": p.detach() for name, p in shared.named_parameters()}
    return {
        f"layers.{i}.router.{name}": param.detach()
        for i, layer in mod_layer_map(model).items()
        for name, param in layer.router.named_parameters()
    }


def save_mod(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``mod_config.json`` and ``mod_adapter.safetensors`` (router weights only)."""
    state = get_state(model)
    os.makedirs(directory, exist_ok=True)
    state.config.replace(versions=library_versions()).save(directory)
    tensors = {k: v.contiguous().cpu() for k, v in mod_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def load_mod(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Retrofit `model` (a freshly loaded base model) with the adapter in `directory`, exactly."""
    config = MoDConfig.load(directory)
    check_base(config.base_model, model)
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {directory!s}")
    retrofit(model, config)
    try:
        load_mod_state_dict(model, load_file(path))
    except Exception:
        unload(model)
        raise
    return model


def load_mod_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy router weights into the MoD layers; missing, unexpected or mis-shaped keys raise."""
    own = mod_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise KeyError(f"MoD weights do not match the model's MoD layers: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, param in own.items():
            if tensors[key].shape != param.shape:
                raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} vs model {tuple(param.shape)}")
            param.copy_(tensors[key])


def from_pretrained(directory: str | os.PathLike, **hf_kwargs: Any) -> nn.Module:
    """Load a full checkpoint written by ``model.save_pretrained`` from a retrofitted model.

    The stock weights are loaded by transformers (so `torch_dtype`, `device_map` etc. work as usual),
    with the ``base_layer`` prefix mapped back to the stock layout; the model is then retrofitted with
    the config recorded in ``config.json`` and the router weights are loaded strictly.
    """
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    if CONFIG_KEY not in raw:
        raise ValueError(
            f"{directory!s}/config.json has no {CONFIG_KEY!r}: not a full MoD checkpoint "
            "(for an adapter directory use mllm_mod.load_mod(base_model, dir))"
        )
    cls = model_class(directory)
    key_mapping = {r"\.base_layer\.": "."}
    # the router keys are reported as unexpected (we load them below); with the loader's logger raised,
    # transformers also checks its tensor-parallel plan and warns about it: quiet both during the load
    logs = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        model = cls.from_pretrained(directory, key_mapping=key_mapping, **hf_kwargs)
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    config = MoDConfig.from_dict(getattr(model.config, CONFIG_KEY))
    delattr(model.config, CONFIG_KEY)
    retrofit(model, config)
    load_mod_state_dict(model, _router_tensors(directory))
    return model


def model_class(directory: str | os.PathLike, default: type | None = None) -> type:
    """The model class a checkpoint's `config.json` names: a transformers class, or one registered with an
    Auto class (mllm-mod's own streaming model, whose registration is imported on demand); `default`
    (e.g. an Auto class) where it names none that is known, else an error."""
    with open(os.path.join(directory, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    name = architectures[0] if architectures else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None and name:
        from . import streaming  # noqa: F401  (registers model_type "mllm_mod_stream" with the Auto classes)

        config = transformers.AutoConfig.from_pretrained(directory)
        autos = (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM, transformers.AutoModel)
        found = [auto._model_mapping[type(config)] for auto in autos if type(config) in auto._model_mapping]
        cls = next((c for c in found if c.__name__ == name), None)
    if cls is None and default is None:
        raise ValueError(f"{directory!s}/config.json names no known architecture ({architectures})")
    return cls or default


def _router_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``layers.{i}.router.*`` tensors from the safetensors file(s) of a full checkpoint."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        for key, tensor in load_file(os.path.join(directory, name)).items():
            if f"{SHARED_ROUTER}." in key:
                out["shared_router." + key.split(f"{SHARED_ROUTER}.", 1)[1]] = tensor
            elif ".router." in key:
                out[key[key.index("layers.") :]] = tensor
    return out


def library_versions() -> dict[str, str]:
    from . import __version__

    return {"mllm_mod": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _routing_hook(adapter: Adapter, model: nn.Module):
    """A forward pre-hook on the top-level model: builds the `RoutingContext` and passes it down as the
    ``mod_routing`` keyword, which transformers forwards to every decoder layer."""
    signature = inspect.signature(model.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if kwargs.get("mod_routing") is not None:
            return None
        bound = signature.bind_partial(*args, **kwargs).arguments
        ctx = adapter.routing_context(
            module, bound.get("input_ids"), bound.get("inputs_embeds"), bound.get("attention_mask"), inputs=bound
        )
        if module.training and module.mod_state.config.routing_loss_weight > 0:
            ctx.records = []
        if ctx.candidates is not None and ctx.candidates.shape[1] > 1 and not bool(ctx.candidates.any()):
            logger.debug("no vision tokens in this batch: MoD layers run dense")
        return args, {**kwargs, "mod_routing": ctx}

    return hook


def _loss_hook(config: MoDConfig):
    """A forward hook on the top-level model: in training, puts the routing loss and the router's
    agreement with top-k into the outputs (``outputs["mod_routing_loss"]``). The trainer adds it to
    the LM loss explicitly; nothing is added behind its back."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        ctx = kwargs.get("mod_routing")
        if ctx is None or not ctx.records or config.routing_loss_weight <= 0 or not hasattr(output, "keys"):
            return None
        loss, agreement = routing_loss(ctx.records, config)
        output[LOSS_KEY] = loss
        output[AGREEMENT_KEY] = agreement
        return output

    return hook

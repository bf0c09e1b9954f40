"""Bring existing checkpoints in: original LLaVA-family layouts and p-MoD releases -> a stock
transformers directory (plus, for MoD sources, the MoD config and routers beside the weights).

One file per source layout (a key map plus a config map), over one shared loader (`loader.py`:
shards, strict accounting of every tensor, atomic write):
    llava.py      LlavaLlamaForCausalLM / LlavaMistralForCausalLM (LLaVA-1.5, LLaVA-NeXT)
    onevision.py  LlavaQwenForCausalLM (LLaVA-OneVision)
    pmod.py       PmodLlavaLlamaForCausalLM (p-MoD releases)
gamma-MoD's releases are refused with the reason (`layout.REFUSED`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import llava, onevision, pmod  # noqa: F401  (each registers its layout)
from .layout import Options, detect
from .loader import MOD_PREFIX, CheckpointError, Source, atomic_directory, fill, plan

REPORT_NAME = "import_report.json"
ROUTER_FILE = "mod-routers.safetensors"
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ImportReport:
    """What an import did; written to ``import_report.json`` in the output directory."""

    source: str
    layout: str
    out: str
    dtype: str
    mapped: int
    unused: dict[str, str] = field(default_factory=dict)  # source tensor -> why it is not used
    derived: dict[str, str] = field(default_factory=dict)  # target -> target it was copied from
    extended_rows: dict[str, int] = field(default_factory=dict)  # target -> source rows (new tokens after them)
    zero_filled: dict[str, str] = field(default_factory=dict)
    mod_layers: list[int] | None = None
    notes: list[str] = field(default_factory=list)


def import_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    allow_unused: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Turn the checkpoint directory `src` into a stock transformers directory `out`.

    `vision_tower`: a local CLIP/SigLIP directory for checkpoints that do not hold their tower.
    `dtype`: of the written weights ("auto": the checkpoint's own). `allow_unused`: report tensors no
    rule knows as unused instead of refusing. Nothing is written to `out` unless the import succeeds.
    A p-MoD source gives a directory that `mllm_mod.from_pretrained(out)` loads as the MoD model (and
    transformers alone as the dense one, ignoring the routers).
    """
    from ..retrofit import CONFIG_KEY, load_mod_state_dict, retrofit, unload

    src = os.fspath(src)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    raw = read_config(src)
    layout = detect(raw, src)
    source = Source.open(src, rules=[])
    target = layout.prepare(src, raw, source, Options(vision_tower=os.fspath(vision_tower) if vision_tower else None))
    source.rules = target.rules
    torch_dtype = _dtype(dtype, source, raw)

    with torch.device("meta"):
        model = target.model_class._from_config(target.config, dtype=torch_dtype)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    the_plan = plan(
        [source, *target.extra_sources],
        shapes,
        extendable=("model.language_model.embed_tokens.weight", "lm_head.weight"),
        derivable=target.derivable,
        zero_if_absent=target.zero_if_absent,
        allow_unknown=allow_unused,
    )
    model.to_empty(device="cpu")
    bar = _progress(progress, layout.name)
    routers = fill(model, the_plan, bar)
    mod_dict = None
    if target.mod_config is not None:
        for key in the_plan.zero_filled:
            if key.startswith(MOD_PREFIX):
                routers[key[len(MOD_PREFIX) :]] = torch.zeros(1)
        retrofit(model, target.mod_config)  # validates the config on this model
        try:
            load_mod_state_dict(model, routers)  # strict: every MoD layer gets its router, nothing else
            mod_dict = model.mod_state.config.to_dict()
        finally:
            unload(model)

    report = ImportReport(
        source=os.path.abspath(src),
        layout=layout.name,
        out=os.path.abspath(os.fspath(out)),
        dtype=str(torch_dtype).removeprefix("torch."),
        mapped=len(the_plan.assign),
        unused=the_plan.unused,
        derived=the_plan.derived,
        extended_rows=the_plan.extend_rows,
        zero_filled=the_plan.zero_filled,
        mod_layers=target.mod_layers,
        notes=target.notes,
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if mod_dict is not None:
            setattr(model.config, CONFIG_KEY, mod_dict)
        model.save_pretrained(tmp)
        target.processor.save_pretrained(tmp)
        if mod_dict is not None:
            _add_routers(tmp, routers, _router_prefix(model))
        with open(os.path.join(tmp, REPORT_NAME), "w") as f:
            json.dump(asdict(report), f, indent=2)
            f.write("\n")
    return report


def read_config(src: str) -> dict[str, Any]:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{src}: no config.json (not a checkpoint directory)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _dtype(name: str, source: Source, raw: dict[str, Any]) -> torch.dtype:
    """The asked dtype; "auto": the checkpoint's floating dtype (its config's torch_dtype for .bin)."""
    if name != "auto":
        return getattr(torch, name)
    seen = Counter(info.dtype for info in source.tensors.values() if info.dtype is not None and info.dtype.is_floating_point)
    if seen:
        return seen.most_common(1)[0][0]
    declared = raw.get("torch_dtype") or raw.get("dtype")
    return getattr(torch, declared) if declared in DTYPES[1:] else torch.float32


def _router_prefix(model: torch.nn.Module) -> str:
    """Where the decoder's layers sit in the state dict (``model.language_model.``)."""
    from ..adapters import adapter_for

    decoder = adapter_for(model).decoder(model)
    return next(name for name, module in model.named_modules() if module is decoder) + "."


def _add_routers(directory: str, routers: dict[str, torch.Tensor], prefix: str) -> None:
    """Put the routers beside the stock weights: one more file in the weights index (made sharded if
    transformers wrote a single file), under the keys a MoD model has (``...layers.{i}.router.proj.*``),
    which transformers alone ignores and `mllm_mod.from_pretrained` loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:
        single = os.path.join(directory, "model.safetensors")
        renamed = "model-00001-of-00001.safetensors"
        os.rename(single, os.path.join(directory, renamed))
        with safe_open(os.path.join(directory, renamed), framework="pt") as f:  # the header only
            index = {"metadata": {}, "weight_map": {key: renamed for key in f.keys()}}  # noqa: SIM118 (a safe_open handle)
    tensors = {prefix + key: tensor.float().contiguous() for key, tensor in routers.items()}
    save_file(tensors, os.path.join(directory, ROUTER_FILE), metadata={"format": "pt"})
    index["weight_map"].update({key: ROUTER_FILE for key in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def _progress(enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda shards: tqdm(shards, desc=f"importing {name}", unit="shard")


__all__ = ["DTYPES", "CheckpointError", "ImportReport", "import_checkpoint"]

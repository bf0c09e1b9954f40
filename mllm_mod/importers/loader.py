"""The one loader every importer shares: shards, a key map, strict accounting, an atomic write.

A checkpoint is data, never code: `.safetensors` files are read tensor by tensor, `.bin` files only
through ``torch.load(..., weights_only=True)``. Before a tensor is read, every source key is mapped
(or declared unused, with a reason) and every target parameter is known to be filled, so a bad
checkpoint fails in seconds and names the file, key or field at fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFE_SINGLE, BIN_SINGLE = "model.safetensors", "pytorch_model.bin"
MOD_PREFIX = "mod:"  # a target key in this namespace is a MoD tensor (router), not a model parameter
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported as it is (the message names the file, key or field)."""


@dataclass(frozen=True)
class Rule:
    """One line of a key map: a source key that fully matches `pattern` becomes `target` (a `re.sub`
    template; ``mod:`` targets are MoD tensors), or, with ``target=None``, is unused for `reason`."""

    pattern: str
    target: str | None
    reason: str = ""


@dataclass
class TensorInfo:
    file: str  # path of the shard holding it
    shape: tuple[int, ...] | None  # from the safetensors header; None for .bin shards (known after loading)
    dtype: torch.dtype | None


@dataclass
class Source:
    """The tensors of one checkpoint directory (or of a vision-tower directory), by key."""

    directory: str
    tensors: dict[str, TensorInfo]
    rules: list[Rule]
    label: str = "checkpoint"  # how errors name this source ("checkpoint", "vision tower")

    @classmethod
    def open(cls, directory: str | os.PathLike, rules: list[Rule], label: str = "checkpoint") -> Source:
        directory = os.fspath(directory)
        return cls(directory, scan(directory), rules, label)

    def shards(self) -> list[str]:
        return sorted({info.file for info in self.tensors.values()})


@dataclass
class Plan:
    """Where every source tensor goes. `assign`: target key -> (source, source key); `unused`:
    source key -> reason; `extend_rows`: target keys whose first dimension may be longer than the
    source's (vocabulary rows added for new tokens, filled with the mean of the source rows);
    `derive`: target key -> (target key it is copied from, why) when the source has no tensor for it."""

    assign: dict[str, tuple[Source, str]] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    extend_rows: dict[str, int] = field(default_factory=dict)  # target key -> rows present in the source
    derived: dict[str, str] = field(default_factory=dict)
    zero_filled: dict[str, str] = field(default_factory=dict)  # target key -> why (absent in the source, zero by meaning)


# -- reading --------------------------------------------------------------------------------------------
def scan(directory: str) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from its index (sharded) or its single weights file.

    Safetensors headers are read and checked against the file size (a truncated file is named here,
    before anything is loaded); `.bin` shards are listed from their index (shapes come at load time).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            return _scan_index(directory, index)
    single = os.path.join(directory, SAFE_SINGLE)
    if os.path.isfile(single):
        return {k: v for k, v in _safetensors_header(single).items()}
    single = os.path.join(directory, BIN_SINGLE)
    if os.path.isfile(single):
        return {k: TensorInfo(single, tuple(t.shape), t.dtype) for k, t in _load_bin(single).items()}
    loose = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if len(loose) == 1:
        return _safetensors_header(os.path.join(directory, loose[0]))
    raise FileNotFoundError(
        f"{directory}: no weights found (looked for {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE}, {BIN_SINGLE})"
    )


def _scan_index(directory: str, index: str) -> dict[str, TensorInfo]:
    try:
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{index}: not a weights index ({err.__class__.__name__}: {err})") from err
    files = sorted(set(weight_map.values()))
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(f"{index} names shard(s) that are not in {directory}: {missing}")
    out: dict[str, TensorInfo] = {}
    for name in files:
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            header = _safetensors_header(path)
            listed = {k for k, v in weight_map.items() if v == name}
            absent = sorted(listed - set(header))
            if absent:
                raise CheckpointError(f"{path}: the index lists tensors this shard does not hold: {absent[:5]}")
            out.update({k: header[k] for k in listed})
        else:
            out.update({k: TensorInfo(path, None, None) for k, v in weight_map.items() if v == name})
    return out


def _safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Tensor names, shapes and dtypes of a safetensors file; a truncated or corrupt file is refused."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from err
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + length + end})")
    out = {}
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {info['dtype']}, which an importer cannot load")
        out[key] = TensorInfo(path, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
    return out


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a pickle with code in it, a truncated zip, ...: all refused the same way
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({err.__class__.__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
    return state


def read_shard(path: str, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors `keys` of one shard, one at a time (safetensors) or from one mmap'ed load (.bin)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    yield key, f.get_tensor(key)
        except Exception as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{path}: could not be read ({err.__class__.__name__}: {err})") from err
        return
    state = _load_bin(path)
    absent = sorted(set(keys) - set(state))
    if absent:
        raise CheckpointError(f"{path}: the index lists tensors this shard does not hold: {absent[:5]}")
    for key in keys:
        yield key, state[key]


# -- planning ------------------------------------------------------------------------------------------
def map_key(rules: list[Rule], key: str) -> Rule | None:
    return next((rule for rule in rules if re.fullmatch(rule.pattern, key)), None)


def plan(
    sources: list[Source],
    targets: dict[str, tuple[int, ...]],
    extendable: tuple[str, ...] = (),
    derivable: dict[str, str] | None = None,
    zero_if_absent: dict[str, str] | None = None,
    allow_unknown: bool = False,
) -> Plan:
    """Map every tensor of `sources` onto `targets` (key -> shape), strictly.

    A source key no rule knows is an error (unless `allow_unknown`: then it is reported unused); a
    target filled twice, a shape that differs, or a target nothing fills is an error. Sources are
    taken in order: a target the first source fills is not taken from a later one (the checkpoint's
    own vision tower wins over ``--vision-tower``'s), and the later tensor is reported unused.
    `extendable` targets may have more rows than the source (new vocabulary); `derivable` maps a
    target to another target it is copied from when no source fills it (an untied ``lm_head``);
    `zero_if_absent` targets are zero-filled when absent (a bias the source model was built without).
    """
    out = Plan()
    unknown: list[str] = []
    for rank, source in enumerate(sources):
        taken_here: set[str] = set()
        for key, info in sorted(source.tensors.items()):
            rule = map_key(source.rules, key)
            name = key if rank == 0 else f"{source.label}:{key}"
            if rule is not None and rule.target is None:
                out.unused[name] = rule.reason
                continue
            target = re.sub(rf"^{rule.pattern}$", rule.target, key) if rule is not None else None
            if target is None or not (target.startswith(MOD_PREFIX) or target in targets):
                why = "no rule knows it" if target is None else f"maps to {target}, which the target model does not have"
                if allow_unknown:
                    out.unused[name] = f"{why} (allowed: --allow-unused)"
                else:
                    unknown.append(f"{name} ({why})")
                continue
            if target in taken_here:
                raise CheckpointError(f"{source.directory}: two tensors map to {target} (the second is {key})")
            if target in out.assign:
                out.unused[name] = f"{target} is taken from the {out.assign[target][0].label}"
                continue
            taken_here.add(target)
            if not target.startswith(MOD_PREFIX):
                _check_shape(info, key, target, targets[target], target in extendable, out)
            out.assign[target] = (source, key)
    if unknown:
        raise CheckpointError(
            f"{sources[0].directory}: {len(unknown)} tensor(s) the importer cannot place (pass allow_unused / "
            f"--allow-unused to import without them): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    for target, origin in (derivable or {}).items():
        if target not in out.assign and origin in out.assign:
            out.derived[target] = origin
    for target, why in (zero_if_absent or {}).items():
        if target not in out.assign:
            out.zero_filled[target] = why
    filled = set(out.assign) | set(out.derived) | set(out.zero_filled)
    missing = sorted(set(targets) - filled)
    if missing:
        raise CheckpointError(
            f"{sources[0].directory}: {len(missing)} parameter(s) of the target model have no tensor in the "
            f"checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    return out


def _check_shape(info: TensorInfo, key: str, target: str, want: tuple[int, ...], extendable: bool, out: Plan) -> None:
    if info.shape is None:  # a .bin shard: checked when loaded
        return
    have = info.shape
    if have == want:
        return
    if extendable and len(have) == len(want) and have[1:] == want[1:] and have[0] <= want[0]:
        out.extend_rows[target] = have[0]
        return
    raise CheckpointError(f"{info.file}: tensor {key} has shape {list(have)}, the target {target} needs {list(want)}")


# -- loading -------------------------------------------------------------------------------------------
def fill(
    model: nn.Module,
    the_plan: Plan,
    progress: Callable[[list[str]], Iterator[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Copy every planned tensor into `model` (cast to each parameter's dtype), shard by shard; returns
    the ``mod:`` tensors (routers), which are not model parameters. Peak memory is the model plus one
    tensor (safetensors) or one mmap'ed shard (.bin)."""
    params = model.state_dict(keep_vars=True)
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for target, (source, key) in the_plan.assign.items():
        by_shard.setdefault(source.tensors[key].file, []).append((key, target))
    shards = sorted(by_shard)
    extra: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for shard in progress(shards) if progress else shards:
            wanted = dict(by_shard[shard])
            for key, tensor in read_shard(shard, list(wanted)):
                target = wanted[key]
                if target.startswith(MOD_PREFIX):
                    extra[target[len(MOD_PREFIX) :]] = tensor.detach().clone()
                    continue
                param = params[target]
                rows = the_plan.extend_rows.get(target)
                want = tuple(param.shape) if rows is None else (rows, *param.shape[1:])
                if tuple(tensor.shape) != want:  # .bin tensors are first seen here
                    if rows is None and tensor.dim() == param.dim() and tensor.shape[1:] == param.shape[1:] and tensor.shape[0] < param.shape[0]:
                        rows = tensor.shape[0]  # fewer vocabulary rows than the target: extended below
                        the_plan.extend_rows[target] = rows
                    else:
                        raise CheckpointError(f"{shard}: tensor {key} has shape {list(tensor.shape)}, the target {target} needs {list(param.shape)}")
                param.data[: tensor.shape[0]].copy_(tensor)
        for target, rows in the_plan.extend_rows.items():  # new tokens: the mean row, deterministic
            param = params[target]
            param.data[rows:] = param.data[:rows].float().mean(dim=0, keepdim=True).to(param.dtype)
        for target, origin in the_plan.derived.items():
            params[target].data.copy_(params[origin].data)
        for target in the_plan.zero_filled:
            if not target.startswith(MOD_PREFIX):  # MoD tensors: made by the caller, which knows their shapes
                params[target].data.zero_()
    return extra


# -- writing -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """A temporary directory beside `out`, renamed to `out` only when the block succeeds; on any error
    it is removed, so `out` is never half-written. An existing non-empty `out` is refused unless
    `overwrite` (then it is replaced only after the new one is complete)."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.importing-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

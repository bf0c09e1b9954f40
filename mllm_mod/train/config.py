"""`TrainConfig`: one fine-tuning run, read from YAML and typed ``key=value`` overrides.

Defaults are p-MoD's fine-tuning recipe (LLaVA-1.5 stage 2): the LLM, the projector and the routers
train, the vision tower is frozen, lr 2e-5 with cosine decay and 3% warmup, one epoch, bf16 where the
hardware has it, gradient checkpointing on.

Keys of the YAML file and of overrides are the fields below; ``mod.<field>`` sets a `MoDConfig` field
of the retrofit (with ``preset``), ``hf.<field>`` any other `transformers.TrainingArguments` field.
Values are parsed as YAML scalars and checked against the field's type (``lr=1e-4``,
``router_lr=none``, ``deepspeed=zero3``, ``mod.ratio=0.3``, ``hf.dataloader_pin_memory=false``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.dataset import DataOptions

REQUIRED = ("model", "data", "output_dir")


@dataclass
class TrainConfig(DataOptions):
    """A fine-tuning run: the data options of `DataOptions` (image and video folders, max_length,
    frame sampling, bad-sample handling) and the fields below.

    model: a stock transformers model directory, a full MoD checkpoint (``save_pretrained`` of a
        retrofitted model, e.g. ``mllm-mod retrofit --full`` or an earlier run's output), or a MoD adapter
        directory (``mllm-mod retrofit --out``, `mllm_mod.save_mod`): its recorded base model is loaded and
        the adapter put on it.
    adapter: a MoD adapter directory to load onto `model` (a stock model): for an adapter whose recorded
        base path is not valid here.
    preset: retrofit a stock model with this preset (``mod`` overrides its fields) before training;
        None trains the model as it is (MoD if the checkpoint is MoD, dense otherwise).
    freeze_vision_tower / routers_only: what trains (p-MoD: everything but the vision tower;
        ``routers_only``: the routers alone).
    router_lr: learning rate of the routers (None: ``lr``).
    deepspeed: ``zero2``, ``zero3`` (the shipped configs) or a path to a DeepSpeed JSON config.
    resume: ``last`` (the newest checkpoint in ``output_dir``) or a checkpoint directory.
    progress: progress bars (on the main process only).
    """

    model: str = ""
    data: str = ""
    output_dir: str = ""
    adapter: str | None = None
    preset: str | None = None
    mod: dict[str, Any] = field(default_factory=dict)
    freeze_vision_tower: bool = True
    routers_only: bool = False
    lr: float = 2e-5
    router_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    bf16: bool | None = None
    gradient_checkpointing: bool = True
    deepspeed: str | None = None
    save_steps: int = 500
    save_total_limit: int | None = 1
    logging_steps: int = 1
    resume: str | None = None
    seed: int = 42
    num_workers: int = 4
    attn_implementation: str | None = None
    progress: bool = True
    hf: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        missing = [name for name in REQUIRED if not getattr(self, name)]
        if missing:
            raise ValueError(f"missing required training settings: {', '.join(missing)}")
        if self.adapter is not None and self.preset is not None:
            raise ValueError(f"adapter={self.adapter} already holds a MoD config; drop preset={self.preset!r}")
        if self.mod and self.preset is None:
            raise ValueError(f"mod.* overrides {sorted(self.mod)} need a preset to retrofit with")
        for name in ("lr", "batch_size", "grad_accum", "num_frames", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.router_lr is not None and self.router_lr < 0:
            raise ValueError(f"router_lr must be >= 0, got {self.router_lr}")

    def data_options(self, main_process: bool = True) -> DataOptions:
        """The dataset's options: this run's data fields, progress bars on the main process only."""
        options = DataOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataOptions)})
        options.progress = self.progress and main_process
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """`value` (a YAML-parsed value, or a string from the command line) checked against `annotation`."""
    if isinstance(value, str) and annotation is not str:
        value = yaml.safe_load(value) if value.strip() else None
        if isinstance(value, str) and value.lower() == "none":
            value = None
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{name} cannot be none (expected {_type_name(annotation)})")
    for option in options:
        base = typing.get_origin(option) or option
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _is_float(value):  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base in (dict, list) and isinstance(value, base):
            return value
        if option is Any:
            return value
    raise ValueError(f"{name}: expected {_type_name(annotation)}, got {value!r}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def apply_settings(config: TrainConfig, settings: dict[str, Any], source: str) -> TrainConfig:
    """`config` with `settings` (flat ``key``, ``mod.key`` / ``hf.key``, or nested ``mod:``/``hf:`` dicts)."""
    types_ = field_types(TrainConfig)
    changes: dict[str, Any] = {}
    mod, hf = dict(config.mod), dict(config.hf)
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if dot and head in ("mod", "hf"):
            (mod if head == "mod" else hf)[rest] = _typed_nested(head, rest, value)
        elif key in ("mod", "hf"):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be a mapping, got {value!r}")
            for k, v in value.items():
                (mod if key == "mod" else hf)[k] = _typed_nested(key, k, v)
        elif key in types_:
            changes[key] = coerce(value, types_[key], f"{source}: {key}")
        else:
            known = ", ".join(sorted(types_))
            raise ValueError(f"{source}: unknown training setting {key!r} (known: {known}; mod.* and hf.* pass through)")
    return dataclasses.replace(config, **changes, mod=mod, hf=hf)


def _typed_nested(group: str, key: str, value: Any) -> Any:
    """A ``mod.*`` value typed by `MoDConfig`'s field, an ``hf.*`` value by `TrainingArguments`'."""
    if group == "mod":
        from ..config import MoDConfig

        hints = field_types(MoDConfig)
    else:
        from transformers import TrainingArguments

        hints = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
        hints = {k: _resolve_hint(v) for k, v in hints.items()}
    if key not in hints:
        raise ValueError(f"unknown {group}.{key} (not a field of {'MoDConfig' if group == 'mod' else 'TrainingArguments'})")
    if isinstance(value, str) and hints[key] is not str:
        value = yaml.safe_load(value)
    return coerce(value, hints[key], f"{group}.{key}") if hints[key] is not Any else value


def _resolve_hint(hint: Any) -> Any:
    if isinstance(hint, str):  # TrainingArguments annotations may be strings; accept any YAML value
        return Any
    return hint


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_") if "." not in key else key.strip()] = value
    return out


SHIPPED = Path(__file__).parent / "configs"


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML file, or the name of a shipped recipe (``pmod_llava15_7b``, ``pmod_llava_next_7b``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise FileNotFoundError(f"training config {str(name_or_path)!r} is neither a file nor a shipped recipe ({names})")


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] = (),
    **settings: Any,
) -> TrainConfig:
    """Defaults, then the YAML file at `path` (or a shipped recipe's name), then `settings` (typed values), then `overrides`
    (``key=value`` strings or a dict); validated."""
    config = TrainConfig()
    if path is not None:
        path = config_path(path)
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a YAML mapping, got {type(data).__name__}")
        config = apply_settings(config, data, str(path))
    config = apply_settings(config, settings, "arguments")
    pairs = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    config = apply_settings(config, pairs, "overrides")
    config.validate()
    return config

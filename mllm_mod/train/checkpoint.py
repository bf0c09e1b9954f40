"""Loading a model directory for training: a full MoD checkpoint through `mllm_mod.from_pretrained`,
a stock one through transformers; and restoring a Trainer checkpoint's weights strictly.

Why the strict restore: transformers writes LLaVA-family weights under their legacy key names
(``language_model.model.layers...``) and, on resume, the stock Trainer reloads them with a non-strict
``load_state_dict`` of the current names (``model.language_model.layers...``), which matches nothing
and silently keeps the fresh weights. `from_pretrained` maps the names; we copy with ``strict=True``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..config import CONFIG_NAME, MoDConfig
from ..retrofit import CONFIG_KEY, from_pretrained, load_mod


def is_mod_checkpoint(path: str) -> bool:
    """Whether `path` (a directory or a hub id) holds a full MoD checkpoint."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), CONFIG_KEY, None) is not None


def is_adapter_dir(path: str) -> bool:
    """A MoD adapter directory (``mod_config.json`` + router weights, no model of its own)."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and not os.path.isfile(os.path.join(path, "config.json"))


def resolve_model(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model, adapter directory or None) for ``--model`` [``--adapter``]: an adapter directory given
    as the model names its base through the ``base_model.name_or_path`` it recorded when it was saved."""
    if adapter is not None:
        if not is_adapter_dir(adapter):
            raise ValueError(f"--adapter {adapter}: not a MoD adapter directory (no {CONFIG_NAME}, or it holds a whole model)")
        if is_adapter_dir(model):
            raise ValueError(f"--model {model} is an adapter directory too; --model takes the base model")
        return model, adapter
    if not is_adapter_dir(model):
        return model, None
    base = MoDConfig.load(model).base_model.get("name_or_path") or ""
    if not base or not (os.path.isdir(base) or not os.path.isabs(base) and base.count("/") == 1):
        raise ValueError(
            f"{model} is a MoD adapter directory whose recorded base model {base!r} is not available here; "
            f"pass the base model and the adapter: --model BASE_DIR --adapter {model}"
        )
    return base, model


def load_pretrained(path: str, adapter: str | None = None, **hf_kwargs: Any) -> nn.Module:
    """A full MoD checkpoint, or a stock model (with the MoD adapter in `adapter` loaded onto it)."""
    from transformers import AutoModelForImageTextToText

    if is_mod_checkpoint(path):
        if adapter is not None:
            raise ValueError(f"{path} is already a MoD checkpoint; it takes no adapter ({adapter})")
        return from_pretrained(path, **hf_kwargs)
    model = AutoModelForImageTextToText.from_pretrained(path, **hf_kwargs)
    return load_mod(model, adapter) if adapter is not None else model


def restore_weights(model: nn.Module, checkpoint: str) -> None:
    """Copy the weights of a Trainer checkpoint directory into `model`; any key mismatch raises."""
    saved = load_pretrained(checkpoint)
    model.load_state_dict(saved.state_dict(), strict=True)

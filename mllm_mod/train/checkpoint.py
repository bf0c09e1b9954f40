"""Loading a model directory for training: a full MoD checkpoint through `mllm_mod.from_pretrained`,
a stock one through transformers; and restoring a Trainer checkpoint's weights strictly.

Why the strict restore: transformers writes LLaVA-family weights under their legacy key names
(``language_model.model.layers...``) and, on resume, the stock Trainer reloads them with a non-strict
``load_state_dict`` of the current names (``model.language_model.layers...``), which matches nothing
and silently keeps the fresh weights. `from_pretrained` maps the names; we copy with ``strict=True``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..retrofit import CONFIG_KEY, from_pretrained


def is_mod_checkpoint(path: str) -> bool:
    """Whether `path` (a directory or a hub id) holds a full MoD checkpoint."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), CONFIG_KEY, None) is not None


def load_pretrained(path: str, **hf_kwargs: Any) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    if is_mod_checkpoint(path):
        return from_pretrained(path, **hf_kwargs)
    return AutoModelForImageTextToText.from_pretrained(path, **hf_kwargs)


def restore_weights(model: nn.Module, checkpoint: str) -> None:
    """Copy the weights of a Trainer checkpoint directory into `model`; any key mismatch raises."""
    saved = load_pretrained(checkpoint)
    model.load_state_dict(saved.state_dict(), strict=True)

"""One fine-tuning run from a `TrainConfig`: arguments, model, data, `MoDTrainer`, final save.

The same function runs on one process and under ``deepspeed`` / ``torchrun`` / ``accelerate launch``
(the launchers set the distributed environment; `TrainingArguments` picks it up). `TrainingArguments`
is built before the model is loaded so that ZeRO-3 partitions the weights as they load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compat import checkpointing_arguments
from ..retrofit import is_retrofitted, retrofit
from ..router import store_routers_as
from .checkpoint import is_mod_checkpoint, load_pretrained, resolve_model
from .config import TrainConfig
from .params import set_trainable
from .trainer import MoDTrainer

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEEPSPEED_CONFIGS = {"zero2": CONFIG_DIR / "zero2.json", "zero3": CONFIG_DIR / "zero3.json"}
SUMMARY_NAME = "train_summary.json"


def deepspeed_config(name_or_path: str) -> str:
    """Path of a shipped DeepSpeed config (``zero2``, ``zero3``) or of a user's JSON file."""
    if name_or_path in DEEPSPEED_CONFIGS:
        return str(DEEPSPEED_CONFIGS[name_or_path])
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(
            f"DeepSpeed config {name_or_path!r} is neither a shipped one ({', '.join(DEEPSPEED_CONFIGS)}) nor a file"
        )
    return name_or_path


def use_bf16(config: TrainConfig) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(config: TrainConfig):
    from transformers import TrainingArguments

    args: dict[str, Any] = {
        "output_dir": config.output_dir,
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "lr_scheduler_type": config.lr_scheduler,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "max_grad_norm": config.max_grad_norm,
        "bf16": use_bf16(config),
        # use_reentrant=False works with a frozen vision tower and embeddings
        **checkpointing_arguments(config.gradient_checkpointing, {"use_reentrant": False}),
        "deepspeed": deepspeed_config(config.deepspeed) if config.deepspeed else None,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "logging_steps": config.logging_steps,
        "seed": config.seed,
        "dataloader_num_workers": config.num_workers,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "remove_unused_columns": False,  # the collator's keys are the model's vision inputs
        "report_to": "none",
        "disable_tqdm": not config.progress,
    }
    if config.deepspeed and _launched() and not torch.cuda.is_available():
        args["accelerator_config"] = {"use_configured_state": True, **args.get("accelerator_config", {})}
        _start_cpu_deepspeed()
    args.update(config.hf)
    return TrainingArguments(**args)


def _launched() -> bool:
    """Started by a distributed launcher (torchrun, deepspeed, accelerate launch set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1


def _start_cpu_deepspeed() -> None:
    """accelerate starts DeepSpeed's process group only when there is a GPU-like device; on a CPU-only
    machine (DeepSpeed's CPU accelerator, as in CI) start it here with gloo, in the state accelerate
    and `TrainingArguments` then use (``accelerator_config.use_configured_state``)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by accelerate while it builds the state
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def load_model(config: TrainConfig, bf16: bool) -> nn.Module:
    """The model to train: a full MoD checkpoint as it is, a stock one with a MoD adapter, or a stock one
    (retrofitted with `preset`)."""
    # DeepSpeed casts to bf16 itself; weights loaded in bf16 save host memory on 8 processes
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if (bf16 and config.deepspeed) else torch.float32}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    base, adapter = resolve_model(config.model, config.adapter)
    if is_mod_checkpoint(base) and config.preset is not None:
        raise ValueError(f"{base} is already a MoD checkpoint; drop preset={config.preset!r} to fine-tune it as it is")
    if adapter is not None and config.preset is not None:
        raise ValueError(f"{adapter} is a MoD adapter (it holds its MoD config); drop preset={config.preset!r}")
    model = load_pretrained(base, adapter, **kwargs)
    if config.preset is not None:
        retrofit(model, config.preset, **config.mod)
    if bf16 and config.deepspeed and is_retrofitted(model):
        store_routers_as(model, torch.bfloat16)  # DeepSpeed's ZeRO buffers take one dtype; routing stays float32
    return model


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    first_loss: float | None
    last_loss: float | None
    train_loss: float
    data_summary: str
    skipped: int
    trainable: dict[str, int]
    mod: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if resume is None:
        return None
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(f"resume=last: no checkpoint-* directory in {output_dir}")
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume: no checkpoint directory {resume}")
    return resume


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune per `config`; the final model (reloadable by `mllm_mod.from_pretrained` when it is
    MoD) and its processor go to ``config.output_dir``, with ``train_summary.json``."""
    from transformers import AutoProcessor

    from ..data import Collator, ConversationDataset

    config.validate()
    resume = resolve_resume(config.resume, config.output_dir)
    args = training_arguments(config)  # before the model: ZeRO-3 partitions weights as they load
    processor = AutoProcessor.from_pretrained(resolve_model(config.model, config.adapter)[0])
    model = load_model(config, args.bf16)
    trainable = set_trainable(model, config.freeze_vision_tower, config.routers_only)
    options = config.data_options(main_process=args.process_index == 0)
    dataset = ConversationDataset(config.data, processor, options)
    trainer = MoDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        router_lr=config.router_lr,
    )
    output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(
        output_dir=config.output_dir,
        global_step=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        train_loss=float(output.training_loss),
        data_summary=dataset.summary(),
        skipped=len(dataset.skipped),
        trainable=trainable,
        mod=is_retrofitted(model),
    )
    if trainer.is_world_process_zero():
        with open(os.path.join(config.output_dir, SUMMARY_NAME), "w") as f:
            json.dump({"config": config.to_dict(), "result": result.to_dict()}, f, indent=2)
        print(f"data: {result.data_summary}")
        print(f"trained {result.global_step} steps, loss {result.first_loss} -> {result.last_loss}; saved to {config.output_dir}")
    return result

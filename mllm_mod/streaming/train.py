"""Training the streaming model with a plain `transformers.Trainer`.

The model computes the streaming loss from ``labels`` (see `model.StreamForCausalLM`), `StreamDataset`
yields one interleaved sequence per video and `StreamCollator` pads and batches them, so nothing
streaming-specific is needed in the Trainer. (The generic recipe, `mllm_mod/train/`, adds MoD-aware
parameter selection, DeepSpeed and checkpoints on top of the same pieces.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from .data import StreamRecord
from .model import StreamForCausalLM
from .objective import StreamCollator, StreamDataset


@dataclass
class StreamTrainSpec:
    """The few knobs of a short streaming run."""

    max_steps: int = 300
    batch_size: int = 4
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    logging_steps: int = 10
    seed: int = 0


class LossLog(TrainerCallback):
    """Keeps the training losses the Trainer logs (``.losses``: (step, loss) pairs)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


def train_stream(
    model: StreamForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    records: list[StreamRecord],
    output_dir: str | os.PathLike,
    spec: StreamTrainSpec | None = None,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Fine-tune `model` in place on streaming `records`; returns the logged (step, loss) pairs."""
    spec = spec or StreamTrainSpec()
    args = TrainingArguments(
        output_dir=os.fspath(output_dir),
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        max_steps=spec.max_steps,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=spec.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        seed=spec.seed,
    )
    log = LossLog()
    trainer = Trainer(
        model=model.train(),
        args=args,
        train_dataset=StreamDataset(records, tokenizer, model.config),
        data_collator=StreamCollator(tokenizer.pad_token_id),
        callbacks=[log],
    )
    trainer.train()
    model.eval()
    return log.losses

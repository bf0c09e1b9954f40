"""Training the streaming model with a plain `transformers.Trainer`, on VideoLLM-online's recipe.

The model computes the streaming loss from ``labels`` (see `model.StreamForCausalLM`), `StreamDataset`
yields one interleaved sequence per video and `StreamCollator` pads and batches them, so nothing
streaming-specific is needed in the Trainer. The defaults of `StreamTrainSpec` are VideoLLM-online's
(``models/arguments_live.py``, ``models/modeling_live.py`` ``build_live``, ``scripts/ego4d/live1+.sh``):
LoRA r 128 / alpha 256 / dropout 0.05 on every linear layer of the decoder and on the LM head (peft),
the connector trained in full, the vision tower frozen (it runs without autograd, as on pre-extracted
features), lr 2e-4 cosine with 5% warmup, 2 epochs, batch 1 x 8 accumulation, at most 1,200 frames a
video. VideoLLM-MoD's savings (-42% time, -30% memory) are measured against this baseline. MoD
routers, new parameters, are trained in full. ``lora_r=0`` fine-tunes the whole decoder instead (the
tiny CPU runs of docs/STREAMING.md). (The generic recipe, `mllm_mod/train/`, adds MoD-aware parameter
selection, DeepSpeed and checkpoints on top of the same pieces.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from ..layer import MoDLayer
from .data import StreamRecord
from .model import StreamForCausalLM
from .objective import StreamCollator, StreamDataset

# the decoder's linear layers and the LM head (arguments_live.py's lora_modules, restricted to the
# language model: our vision tower is inside the model, VideoLLM-online's is not)
LORA_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head"
CONNECTOR = "multi_modal_projector"


@dataclass
class StreamTrainSpec:
    """The knobs of a streaming run; the defaults are VideoLLM-online's recipe (module docstring)."""

    num_epochs: float = 2.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps instead
    batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_r: int = 128  # 0: full fine-tuning of decoder, connector and LM head (vision tower frozen)
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    max_frames: int | None = 1200
    logging_steps: int = 10
    seed: int = 0


def freeze_vision(model: StreamForCausalLM) -> None:
    model.model.vision_tower.requires_grad_(False)


def with_lora(model: StreamForCausalLM, spec: StreamTrainSpec) -> nn.Module:
    """`model` wrapped by peft: LoRA on `LORA_TARGETS`, the connector fully trained (``modules_to_save``),
    MoD routers trainable, everything else frozen. `merge_lora` gives back a plain model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=[CONNECTOR],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for module in model.modules():
        if isinstance(module, MoDLayer) and getattr(module, "router", None) is not None:
            module.router.requires_grad_(True)
    return peft_model


def merge_lora(peft_model: nn.Module) -> StreamForCausalLM:
    """The plain model back from `with_lora`'s wrapper: each LoRA layer merged into its base layer, the
    trained connector copy in place of the original. (peft's own ``merge_and_unload`` takes any module
    with a ``base_layer`` attribute for one of its layers, a `MoDLayer` included, and fails on it.)"""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            parent, _, attr = name.rpartition(".")
            if isinstance(module, LoraLayer):
                module.merge()
                plain = module.get_base_layer()
            else:
                plain = module.modules_to_save[module.active_adapter]
            setattr(model.get_submodule(parent) if parent else model, attr, plain)
    return model


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
) -> tuple[StreamForCausalLM, list[tuple[int, float]]]:
    """Fine-tune `model` on streaming `records`; returns the trained model (LoRA merged into its weights:
    a plain `StreamForCausalLM`, saved and loaded as any) and the logged (step, loss) pairs."""
    spec = spec or StreamTrainSpec()
    freeze_vision(model)
    trained = with_lora(model, spec) if spec.lora_r > 0 else model
    args = TrainingArguments(
        output_dir=os.fspath(output_dir),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        num_train_epochs=spec.num_epochs,
        max_steps=spec.max_steps,
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1): a ratio of the total steps
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
        model=trained.train(),
        args=args,
        train_dataset=StreamDataset(records, tokenizer, model.config, max_frames=spec.max_frames),
        data_collator=StreamCollator(tokenizer.pad_token_id),
        callbacks=[log],
    )
    trainer.train()
    if trained is not model:
        model = merge_lora(trained)
    return model.eval(), log.losses

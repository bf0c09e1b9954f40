"""`MoDTrainer`: the HF `Trainer` plus four things MoD training needs, each in one place.

- `auxiliary_losses`: the one hook where the MoD core's auxiliary losses (the routing loss the model
  puts in its outputs under ``mod_routing_loss`` in training) join the LM loss. Nothing is added by
  hidden state; a model without routing losses trains on the LM loss alone.
- `create_optimizer`: parameter groups with a separate router learning rate (`params.param_groups`).
- `_load_from_checkpoint`: resume restores the weights strictly (the stock method loads LLaVA
  checkpoints non-strictly under the wrong key names, i.e. not at all).
- `log`: the auxiliary losses (averaged over the logging window and the processes), the router's
  agreement with top-k, and per-window throughput (samples/s, tokens/s) join HF's loss/lr/grad-norm
  log, which is also appended to ``output_dir/train_log.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..retrofit import AGREEMENT_KEY, LOSS_KEY
from .checkpoint import restore_weights
from .params import param_groups

AUX_LOSSES = {LOSS_KEY: "routing_loss"}  # model output key -> log name
LOG_NAME = "train_log.jsonl"


class MoDTrainer(Trainer):
    def __init__(self, *args: Any, router_lr: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.router_lr = router_lr
        self._window: dict[str, float | torch.Tensor] = {}
        self._window_start = time.perf_counter()

    # -- loss -------------------------------------------------------------------------------------
    def auxiliary_losses(self, outputs: Any) -> dict[str, torch.Tensor]:
        """Auxiliary losses in the model outputs, by log name (already weighted by the MoD config)."""
        if not hasattr(outputs, "keys"):
            return {}
        return {name: outputs[key] for key, name in AUX_LOSSES.items() if key in outputs}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if model.training:
            self._count("samples", inputs["input_ids"].shape[0])
            self._count("tokens", inputs["attention_mask"].sum())
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = self.auxiliary_losses(outputs) if model.training else {}
        if aux:
            # the LM loss may already be normalised over the accumulated batch (HF's num_items_in_batch);
            # auxiliary losses are per-micro-batch means, so they get the same 1 / accumulation steps
            scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            steps = self.current_gradient_accumulation_steps if scaled_for_ga else 1
            for name, value in aux.items():
                loss = loss + value / steps
                self._count(name, value.detach())
            self._count("aux_batches", 1.0)
            if AGREEMENT_KEY in outputs:
                self._count("router_agreement", outputs[AGREEMENT_KEY])
        return (loss, outputs) if return_outputs else loss

    # -- resume ------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Weights of a checkpoint on resume, loaded strictly (see `checkpoint.restore_weights`);
        DeepSpeed runs resume from DeepSpeed's own checkpoint and never get here."""
        restore_weights(self.model if model is None else model, resume_from_checkpoint)

    # -- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = self.get_decay_parameter_names(opt_model)
            groups = param_groups(opt_model, decay, self.args.weight_decay, self.args.learning_rate, self.router_lr)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- logging ----------------------------------------------------------------------------------
    def _count(self, key: str, value: float | torch.Tensor) -> None:
        """Accumulate over the logging window; tensors stay on their device (no sync per step)."""
        self._window[key] = self._window.get(key, 0.0) + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log step: every process gets here together
            logs.update(self._window_logs())
        super().log(logs, start_time)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, LOG_NAME), "a") as f:
                f.write(json.dumps({**logs, "step": self.state.global_step}) + "\n")

    def _window_logs(self) -> dict[str, float]:
        """Averages and rates since the last log, reduced over processes."""
        names = ["samples", "tokens", "aux_batches", "router_agreement", *AUX_LOSSES.values()]
        values = torch.tensor([float(self._window.get(k, 0.0)) for k in names], dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        totals = dict(zip(names, values.tolist()))
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        self._window, self._window_start = {}, time.perf_counter()
        out = {
            "samples_per_second": round(totals["samples"] / elapsed, 3),
            "tokens_per_second": round(totals["tokens"] / elapsed, 1),
        }
        if totals["aux_batches"]:
            for name in (*AUX_LOSSES.values(), "router_agreement"):
                out[name] = round(totals[name] / totals["aux_batches"], 6)
        return out

"""`mllm-mod train`: fine-tune a (MoD) model on LLaVA-format instruction data (see `mllm_mod.train.cli`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..train.cli import add_arguments, run_from_args

    p = subparsers.add_parser(
        "train",
        help="fine-tune on LLaVA conversation data (one process, or under deepspeed/torchrun/accelerate launch)",
        description="Fine-tune on LLaVA conversation JSON/JSONL. Trailing KEY=VALUE pairs override any TrainConfig "
        "field (mod.* MoDConfig fields, hf.* TrainingArguments fields). Multi-GPU: "
        "`deepspeed --num_gpus 8 --module mllm_mod.train ...` takes the same arguments.",
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)

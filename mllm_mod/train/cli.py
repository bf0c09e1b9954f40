"""The training command line, shared by ``mllm-mod train`` and ``python -m mllm_mod.train`` (so also by
``deepspeed --module mllm_mod.train``, ``torchrun -m mllm_mod.train`` and ``accelerate launch -m mllm_mod.train``).

Flags set the common `TrainConfig` fields; ``--config train.yaml`` gives a file; trailing
``key=value`` pairs override anything (typed by the config's fields). Precedence: defaults < YAML <
flags < key=value.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import TrainConfig, load_config

# flag -> TrainConfig field, for the settings people set on the command line
FLAGS: dict[str, tuple[str, type, str]] = {
    "--model": ("model", str, "a stock model directory, a full MoD checkpoint or a MoD adapter directory"),
    "--adapter": ("adapter", str, "a MoD adapter directory (mllm-mod retrofit --out) to load onto --model"),
    "--data": ("data", str, "LLaVA conversation JSON / JSONL file"),
    "--image-folder": ("image_folder", str, "root of the samples' relative image paths"),
    "--video-folder": ("video_folder", str, "root of the samples' relative video paths"),
    "--output-dir": ("output_dir", str, "checkpoints and the final model go here"),
    "--preset": ("preset", str, "retrofit a stock model with this MoD preset first (pmod, gmod, videomod)"),
    "--deepspeed": ("deepspeed", str, "zero2, zero3, or a DeepSpeed JSON config path"),
    "--resume": ("resume", str, "'last' (newest checkpoint in --output-dir) or a checkpoint directory"),
    "--num-frames": ("num_frames", int, "frames sampled uniformly per video"),
    "--fps": ("fps", float, "sample videos at this rate (then at most --num-frames frames)"),
    "--max-length": ("max_length", int, "max tokens per sample after image-token expansion"),
    "--lr": ("lr", float, "learning rate (p-MoD: 2e-5)"),
    "--router-lr": ("router_lr", float, "learning rate of the routers (default: --lr)"),
    "--batch-size": ("batch_size", int, "per-device batch size"),
    "--max-steps": ("max_steps", int, "stop after this many optimizer steps"),
}
SWITCHES: dict[str, tuple[str, str]] = {
    "--skip-bad-samples": ("skip_bad_samples", "skip unreadable samples (counted in the final summary) instead of failing"),
    "--verify-media": ("verify_media", "decode and encode every sample once before training"),
    "--routers-only": ("routers_only", "train only the routers"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML training config (keys: the TrainConfig fields)")
    for flag, (dest, kind, text) in FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    for flag, (dest, text) in SWITCHES.items():
        parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=text)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any TrainConfig field (mod.*, hf.* too)")
    # set by the `deepspeed` launcher; the distributed environment variables carry the same information
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {dest: getattr(args, dest) for dest, *_ in (*FLAGS.values(), *SWITCHES.values())}
    settings = {dest: value for dest, value in given.items() if value is not None}  # None: flag not given
    return load_config(args.config, args.overrides, **settings)


def run_from_args(args: argparse.Namespace) -> int:
    from .recipe import train

    train(config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mllm_mod.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


__all__ = ["TrainConfig", "add_arguments", "build_parser", "config_from_args", "main", "run_from_args"]

if __name__ == "__main__":
    sys.exit(main())

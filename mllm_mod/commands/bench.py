"""`mllm-mod bench`: dense vs MoD vs the ideal on 7B-shaped random-weight decoders (see `mllm_mod.bench`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from datetime import datetime, timezone

import torch

from ..reference_shapes import REFERENCE_SHAPES


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="speed benchmark: dense vs MoD vs the ideal (prefill, training, decoding, KV)")
    p.add_argument("--shapes", default="llava-1.5-7b,llava-next-7b", help=f"comma-separated, from {['tiny', *REFERENCE_SHAPES]}")
    p.add_argument("--preset", default="pmod")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--n-text", type=int, default=64)
    p.add_argument("--prefill-batches", type=_ints, default=(1, 8, 16))
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--decode-batches", type=_ints, default=(1, 16))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sections", default="correctness,prefill,train,decode,kv")
    p.add_argument("--compile", action="store_true", help="torch.compile the stock decoder layers of dense and MoD alike")
    p.add_argument(
        "--ops", action="store_true",
        help="op counts (kernel launches) of prefill and one decode step, dense vs MoD, per MoD layer; on a GPU "
        "the prefill and decode times too (replaces --sections)",
    )
    p.add_argument("--layers", type=int, default=8, help="decoder depth of the 'tiny' shape")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override MoDConfig fields of the preset")
    p.add_argument("--out", help="directory for results.json, benchmarks.md and benchmarks.png")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import BenchOptions, markdown, plot, run_benchmark
    from .core import parse_overrides

    sections = tuple(args.sections.split(","))
    if args.ops:
        sections = ("ops", "prefill", "decode") if args.device.startswith("cuda") else ("ops",)
    results = []
    for shape in args.shapes.split(","):
        options = BenchOptions(
            shape=shape, preset=args.preset, device=args.device, dtype=args.dtype, n_text=args.n_text,
            prefill_batches=args.prefill_batches, train_batch=args.train_batch, decode_batches=args.decode_batches,
            new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats, sections=sections,
            compile=args.compile, num_layers=args.layers, overrides=parse_overrides(args.set),
        )
        results.append(run_benchmark(options))
        print(markdown(results[-1]) + "\n")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        command = "mllm-mod " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("mllm-mod") else shlex.join(sys.argv)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n\n".join(markdown(r) for r in results)
        with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
            f.write(f"Command: `{command}` ({stamp}, torch {torch.__version__})\n\n{body}\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
        if any(r.prefill for r in results):
            plot([r for r in results if r.prefill], os.path.join(args.out, "benchmarks.png"))
        print(f"wrote {args.out}/benchmarks.md, results.json, benchmarks.png")
    return 0

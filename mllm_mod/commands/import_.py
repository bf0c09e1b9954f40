"""`mllm-mod import SRC --out DIR`: an original LLaVA-family or p-MoD checkpoint -> a stock transformers
directory (see `mllm_mod.importers`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..importers import DTYPES

    p = subparsers.add_parser(
        "import",
        help="convert an original LLaVA / LLaVA-NeXT / OneVision / p-MoD checkpoint to a transformers directory",
        description="Detects the layout from SRC/config.json, maps every tensor strictly (unknown tensors and "
        "unfilled parameters are errors) and writes DIR atomically: weights, processor, and for p-MoD the MoD "
        "config and routers (load it with mllm_mod.from_pretrained).",
    )
    p.add_argument("src", help="the checkpoint directory (config.json, tokenizer, .safetensors or .bin shards)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--vision-tower", help="a local CLIP/SigLIP directory, for checkpoints that do not hold their tower")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of the written weights (auto: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the import has succeeded")
    p.add_argument("--allow-unused", action="store_true", help="report tensors no rule knows as unused instead of failing")
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from ..importers import REPORT_NAME, import_checkpoint

    report = import_checkpoint(
        args.src, args.out, vision_tower=args.vision_tower, dtype=args.dtype, overwrite=args.overwrite,
        allow_unused=args.allow_unused,
    )  # fmt: skip
    print(f"imported {report.layout}: {report.mapped} tensors -> {report.out} ({report.dtype})")
    for key, why in sorted(report.unused.items()):
        print(f"  unused {key}: {why}")
    for key, rows in report.extended_rows.items():
        print(f"  {key}: {rows} rows from the checkpoint, new token rows = their mean")
    for key, origin in report.derived.items():
        print(f"  {key}: copied from {origin}")
    if report.mod_layers:
        print(f"  MoD layers {report.mod_layers}: load with mllm_mod.from_pretrained({report.out!r})")
    for note in report.notes:
        print(f"  note: {note}")
    print(f"  (all of it in {report.out}/{REPORT_NAME})")
    return 0

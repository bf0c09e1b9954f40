"""`mllm-mod eval CKPT --suite synthetic|synthetic_video|pmod14|gmod9|video --out DIR`: one lmms-eval run per model
variant (the checkpoint, and what `--compare` asks for), one report (results.json, report.md, report.png)."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import PRESETS
from ..eval.baselines import BASELINES
from ..eval.suites import SUITES
from ..eval.synthetic import SYNTHETIC_SUITES

SUITE_CHOICES = (*SYNTHETIC_SUITES, *SUITES)
COMPARE_CHOICES = ("dense", *BASELINES)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on a benchmark suite through lmms-eval")
    p.add_argument("checkpoint", help="a full MoD checkpoint or a base model directory")
    p.add_argument("--suite", choices=SUITE_CHOICES, required=True)
    p.add_argument("--out", required=True, help="directory for results.json, report.md, report.png")
    p.add_argument("--mod", help="a MoD adapter directory to load onto a base checkpoint")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS) + list(BASELINES),
        help="retrofit a base checkpoint on the fly: a MoD preset (initial routers) or a training-free baseline",
    )
    p.add_argument(
        "--compare", choices=COMPARE_CHOICES, action="append", default=[],
        help="also evaluate the same weights dense, or with a baseline at the same --prune-layer/--keep-ratio (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--prune-layer", type=int, default=2, help="baselines: layers from K on see the kept vision tokens only"
    )
    p.add_argument("--keep-ratio", type=float, default=0.5, help="baselines: fraction R of the vision tokens kept")
    p.add_argument("--limit", type=float, help="samples per task (a fraction if < 1), for smoke runs")
    p.add_argument("--data-root", help="directory of datasets.save_to_disk mirrors, one per task")
    p.add_argument("--skip-missing", action="store_true", help="run the tasks whose data is available")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from each clip of a video task")
    p.set_defaults(func=run_eval)


def specs_from_args(args: argparse.Namespace) -> list:
    """The model variants to evaluate, each a name and the plugin's model args."""
    from ..eval.runner import ModelSpec

    common = {
        "pretrained": args.checkpoint,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
    }
    for key in ("max_new_tokens", "num_frames"):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)
    budget = {"prune_layer": args.prune_layer, "keep_ratio": args.keep_ratio}
    main = {**common, "mod": args.mod, "preset": args.preset, **(budget if args.preset in BASELINES else {})}
    name = "mod" if args.mod else (args.preset or os.path.basename(os.path.normpath(args.checkpoint)))
    specs = [ModelSpec(name, main)]
    for other in dict.fromkeys(args.compare):
        if other == "dense":
            specs.append(ModelSpec("dense", {**common, "dense": True}))
        elif other != args.preset:
            specs.append(ModelSpec(other, {**common, "preset": other, **budget}))
    return specs


def run_eval(args: argparse.Namespace) -> int:
    from ..eval.runner import SuiteUnavailable, run_suite

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        report = run_suite(specs_from_args(args), args.suite, args.out, limit, args.data_root, args.skip_missing)
    except SuiteUnavailable as err:
        print(str(err), file=sys.stderr)
        return 2
    if report is None:  # a non-main process of a multi-process run
        return 0
    print(report.read_text())
    print(f"wrote {args.out}/results.json, report.md, report.png")
    return 0

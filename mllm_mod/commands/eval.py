"""`mllm-mod eval CKPT --suite synthetic|synthetic_video|pmod14|gmod9|video --out DIR`: one lmms-eval run per model
variant (the checkpoint, and what `--compare` asks for), one report (results.json, report.md, report.png)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import PRESETS
from ..eval.baselines import BASELINES
from ..eval.suites import SUITES
from ..eval.synthetic import SYNTHETIC_SUITES
from ..eval.zoo import FIELDS, ZOO

STREAMING = "streaming"  # VideoLLM-online's metrics on a streaming JSON (not an lmms-eval suite)
SUITE_CHOICES = (*SYNTHETIC_SUITES, *SUITES, STREAMING)
COMPARE_CHOICES = ("dense", *sorted(PRESETS), *BASELINES, *ZOO)


class Renamed(argparse.Action):
    """Refuses the old ``--keep-ratio`` (the fraction kept) and says what to write instead."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(
            f"{option_string} is no longer accepted (it meant the fraction of vision tokens kept): use --prune-ratio R, "
            f"FastV's fraction pruned ({option_string} {values:g} is --prune-ratio {1 - values:g})"
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on a benchmark suite through lmms-eval")
    p.add_argument("checkpoint", help="a full MoD checkpoint or a base model directory")
    p.add_argument("--suite", choices=SUITE_CHOICES, required=True)
    p.add_argument("--out", required=True, help="directory for results.json, report.md, report.png")
    p.add_argument("--mod", help="a MoD adapter directory to load onto a base checkpoint")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS) + list(BASELINES) + list(ZOO),
        help="retrofit a base checkpoint on the fly: a MoD preset (initial routers) or a training-free method",
    )
    p.add_argument(
        "--compare", choices=COMPARE_CHOICES, action="append", default=[],
        help="also evaluate the same weights dense, retrofitted with a MoD preset, or with a baseline at the same "
        "--prune-layer/--prune-ratio (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--compare-checkpoint", action="append", default=[], metavar="DIR",
        help="also evaluate another checkpoint (e.g. a gmod and a pmod fine-tune side by side; repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--prune-layer", type=int, default=2, help="baselines (FastV's K): layers from K on see the kept vision tokens"
    )
    p.add_argument(
        "--prune-ratio", type=float, default=0.5, help="baselines (FastV's R): fraction of the vision tokens pruned"
    )
    p.add_argument("--keep-ratio", type=float, action=Renamed, help=argparse.SUPPRESS)
    p.add_argument(
        "--layer-list", help="pdrop: stage boundaries, e.g. 8,16,24 (default: 8, 16, 24 of 32 layers, scaled to the depth)"
    )
    p.add_argument("--lam", type=float, help="pdrop: lambda, the fraction of image tokens each boundary keeps (default 0.5)")
    p.add_argument(
        "--withdraw-layer", type=int, help="vtw: K, the first layer without vision tokens (default: 15 of 32, scaled)"
    )
    p.add_argument("--subset-ratio", type=float, help="divprune: fraction of the vision tokens retained (default 0.098)")
    p.add_argument(
        "--reduction-ratio", type=float, help="dart: fraction of the image tokens pruned (default 0.778; K=2, 4+4 pivots)"
    )
    p.add_argument(
        "--dominant", type=int, help="visionzip: dominant tokens per image, CLS included (default 54; paper: 54, 108, 162)"
    )
    p.add_argument("--contextual", type=int, help="visionzip: contextual (merged) tokens per image (default 10; paper: 10, 20, 30)")
    p.add_argument("--limit", type=float, help="samples per task (a fraction if < 1), for smoke runs")
    p.add_argument("--data-root", help="directory of datasets.save_to_disk mirrors, one per task")
    p.add_argument("--skip-missing", action="store_true", help="run the tasks whose data is available")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from each clip of a video task")
    p.add_argument("--data", help=f"--suite {STREAMING}: a streaming JSON (videos with timed turns)")
    p.add_argument("--video-folder", help=f"--suite {STREAMING}: folder of the JSON's relative video paths")
    p.add_argument(
        "--threshold", type=float, default=None,
        help=f"--suite {STREAMING}: reply where the argmax is not ',' or P(',') < this (default 0: VideoLLM-online's evaluation)",
    )
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
    budgets = {method: {"prune_layer": args.prune_layer, "prune_ratio": args.prune_ratio} for method in BASELINES}
    for method, names in FIELDS.items():  # a zoo method's budget: only what was given (None: the paper's)
        budgets[method] = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    main = {**common, "mod": args.mod, "preset": args.preset, **budgets.get(args.preset, {})}
    name = "mod" if args.mod else (args.preset or os.path.basename(os.path.normpath(args.checkpoint)))
    specs = [ModelSpec(name, main)]
    for other in dict.fromkeys(args.compare):
        if other == "dense":
            specs.append(ModelSpec("dense", {**common, "dense": True}))
        elif other != args.preset:
            specs.append(ModelSpec(other, {**common, "preset": other, **budgets.get(other, {})}))
    for path in args.compare_checkpoint:
        specs.append(ModelSpec(os.path.basename(os.path.normpath(path)), {**common, "pretrained": path}))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two model variants share a name in {names}; rename a checkpoint directory")
    return specs


def run_streaming(args: argparse.Namespace) -> int:
    """LM-PPL, LM-Correctness, TimeDiff and Fluency of each streaming checkpoint, one table."""
    from ..streaming import evaluate_streaming, load_records, load_stream_model
    from ..streaming.inference import EVAL_THRESHOLD

    if not args.data:
        raise ValueError(f"--suite {STREAMING} needs --data (a streaming JSON)")
    records = load_records(args.data, args.video_folder)[: int(args.limit) if args.limit else None]
    results = {}
    for path in [args.checkpoint, *args.compare_checkpoint]:
        model, tokenizer = load_stream_model(path)
        threshold = EVAL_THRESHOLD if args.threshold is None else args.threshold
        results[os.path.basename(os.path.normpath(path))] = evaluate_streaming(model, records, tokenizer, threshold)
    keys = ("lm_ppl", "lm_correctness", "time_diff", "fluency")
    lines = ["| model | LM-PPL | LM-Correctness | TimeDiff (s) | Fluency | turns |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {r['num_turns']} |" for name, r in results.items()]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"suite": STREAMING, "data": args.data, "models": results}, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/results.json, report.md")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..eval.runner import SuiteUnavailable, run_suite

    if args.suite == STREAMING:
        return run_streaming(args)

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

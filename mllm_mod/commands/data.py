"""`mllm-mod data synth`: write the synthetic visual-instruction data set (LLaVA JSON + images/videos)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="instruction data tools")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = sub.add_parser("synth", help="write the synthetic visual-instruction data (deterministic by seed)")
    s.add_argument("--out", required=True, help="output directory (train.json, test.json, meta.json, images/, videos/)")
    s.add_argument("--n", type=int, default=2000, help="number of samples (families round-robin)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=30, help="picture side in pixels (even)")
    s.add_argument("--test-fraction", type=float, default=0.1, help="held-out share (every k-th sample)")
    s.add_argument("--video", action="store_true", help="add the video family (mp4 clips, read back with decord)")
    s.add_argument("--families", help="comma-separated subset of families")
    s.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from ..data.synth import generate

    only = args.families.split(",") if args.families else None
    meta = generate(args.out, args.n, seed=args.seed, size=args.size, test_fraction=args.test_fraction, video=args.video, only=only)
    print(f"wrote {meta['counts']['train']} train + {meta['counts']['test']} test samples to {args.out}")
    for name, info in meta["families"].items():
        print(f"  {name:10s} chance {info['chance']:.3f}{'  (video)' if info['video'] else ''}")
    return 0

"""`mllm-mod retrofit`, `profile` and `demo`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="tiny end-to-end demo, no downloads")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    raise NotImplementedError

"""The `mllm-mod` command. Each subcommand lives in its own module with a `register(subparsers)`
function; this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules that provide subcommands, each with `register(subparsers) -> None`
COMMAND_MODULES = (
    "mllm_mod.commands.core",
    "mllm_mod.commands.arank",
    "mllm_mod.commands.bench",
    "mllm_mod.commands.data",
    "mllm_mod.commands.train",
    "mllm_mod.commands.eval",
    "mllm_mod.commands.stream",
    "mllm_mod.commands.study",
    "mllm_mod.commands.import_",
)


# optional dependencies and the extra that installs them
OPTIONAL_EXTRAS = ((("lmms_eval", "lmms-eval"), "eval"), (("deepspeed",), "train"), (("decord", "'av'"), "video"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm-mod", description="Mixture-of-Depths for multimodal LLMs")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:  # an optional dependency (also importlib.metadata.PackageNotFoundError)
        extra = next((e for names, e in OPTIONAL_EXTRAS if any(n in str(err) for n in names)), None)
        if extra is None or args.verbose >= 2:
            raise
        print(f"mllm-mod {args.command}: error: {err}; install it with: pip install 'mllm-mod[{extra}]'", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
        if args.verbose >= 2:
            raise
        print(f"mllm-mod {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

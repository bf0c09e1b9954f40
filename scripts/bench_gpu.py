#!/usr/bin/env python3
"""The GPU benchmark of docs/BENCHMARKS.md in one run: `python scripts/bench_gpu.py [--out docs/bench]`.

Same as `mllm-mod bench` with the defaults of the issue: LLaVA-1.5-7B and LLaVA-NeXT-7B shapes, bf16,
sdpa, prefill at batch 1/8/16, a training step at batch 8 (with and without checkpointing), decoding
64 tokens at batch 1/16, KV bytes, and the bf16 correctness checks.
"""

import sys

from mllm_mod.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""Subcommands of the `mllm-mod` CLI (thin programs over the library)."""

#!/usr/bin/env bash
# The same entry point under torchrun (single node, NPROC processes) or accelerate launch:
#   scripts/train_torchrun.sh --model M --data D --image-folder I --output-dir O --deepspeed zero2 [key=value ...]
#   accelerate launch --num_processes 8 -m mllm_mod.train --model M ... --deepspeed zero3
set -euo pipefail
torchrun --nproc_per_node "${NPROC:-8}" -m mllm_mod.train "$@"

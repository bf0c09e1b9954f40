#!/usr/bin/env bash
# p-MoD fine-tuning recipe for LLaVA-NeXT-7B (Vicuna) on one node with 8 GPUs (documented, not run in CI).
#
# p-MoD follows the LLaVA-NeXT stage-2 recipe (the 779k LLaVA-NeXT data, 1 epoch, global batch 128,
# lr 2e-5, cosine, warmup 3%, max length 4096: anyres gives up to ~2,880 vision tokens per picture,
# bf16, gradient checkpointing, ZeRO-3) with PRD, TanhNorm and STRing. Difference to note: LLaVA-NeXT
# also tunes the vision tower (at lr 2e-6); this launcher keeps it frozen (freeze_vision_tower=false
# on the command line trains it at the LLM's learning rate; a separate vision lr is not offered).
#
#   MODEL=... DATA=.../llava_next_779k.json IMAGES=... OUT=ckpt/pmod-llava-next-7b scripts/pmod_llava_next_7b.sh [key=value ...]
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-v1.6-vicuna-7b-hf}
DATA=${DATA:?set DATA to the LLaVA-NeXT instruction data JSON}
IMAGES=${IMAGES:?set IMAGES to the image root of that data}
OUT=${OUT:-ckpt/pmod-llava-next-7b}
GPUS=${GPUS:-8}

deepspeed --num_gpus "$GPUS" --module mllm_mod.train \
    --config pmod_llava_next_7b \
    --model "$MODEL" --data "$DATA" --image-folder "$IMAGES" --output-dir "$OUT" \
    --deepspeed zero3 "$@"

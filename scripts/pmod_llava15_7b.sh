#!/usr/bin/env bash
# p-MoD fine-tuning recipe for LLaVA-1.5-7B on one node with 8 GPUs (documented, not run in CI).
#
# p-MoD: the LLaVA-1.5 stage-2 recipe (llava_v1_5_mix665k, 1 epoch, global batch 128 = 16 x 8 GPUs,
# lr 2e-5, cosine, warmup 3%, no weight decay, max length 2048, bf16, gradient checkpointing, ZeRO-3)
# with the PRD schedule, TanhNorm routers and STRing; the LLM, projector and routers train, the vision
# tower is frozen. p-MoD starts from the stage-1 model (Vicuna-7B + pretrained projector); point MODEL
# at its transformers-format directory, or at llava-hf/llava-1.5-7b-hf to re-tune a finished LLaVA.
#
#   MODEL=... DATA=.../llava_v1_5_mix665k.json IMAGES=.../data OUT=ckpt/pmod-llava15-7b scripts/pmod_llava15_7b.sh [key=value ...]
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
DATA=${DATA:?set DATA to llava_v1_5_mix665k.json}
IMAGES=${IMAGES:?set IMAGES to the folder holding coco/ gqa/ ocr_vqa/ textvqa/ vg/}
OUT=${OUT:-ckpt/pmod-llava15-7b}
GPUS=${GPUS:-8}

deepspeed --num_gpus "$GPUS" --module mllm_mod.train \
    --config pmod_llava15_7b \
    --model "$MODEL" --data "$DATA" --image-folder "$IMAGES" --output-dir "$OUT" \
    --deepspeed zero3 "$@"

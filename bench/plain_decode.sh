#!/usr/bin/env bash
# Plain-path decode speed (what model.generate(past_key_values=cache) runs), eviction only, batch 1:
# ATSKV (default: scored and evicted every 16 steps), ATSKV scored every step (evict_every=1) and the full cache.
#   bash bench/plain_decode.sh [MODEL] [OUT_DIR] [CONTEXT] [extra run_experiment options, e.g. --use_fp16]
# CPU (the issue's 2K case):  bash bench/plain_decode.sh smollm2-135m outputs/plain_cpu 2048
# H200 (the 8K case):         bash bench/plain_decode.sh $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf out 8192 --use_fp16
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2-135m}; out=${2:-outputs/plain_decode}; ctx=${3:-2048}; shift $(( $# < 3 ? $# : 3 ))
python run_experiment.py --benchmark speed --speed_parts plain --model_name "$model" --output_dir "$out" \
    --methods 'full,atskv,atskv[evict_every=1]' --budgets 0.1 --context_sizes "$ctx" --batch_sizes 1 \
    --decode_steps 64 "$@"

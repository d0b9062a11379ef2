#!/usr/bin/env bash
# Plain-path decode speed (what model.generate(past_key_values=cache) runs), eviction only, batch 1:
# ATSKV (default: scored and evicted every 16 steps), ATSKV scored every step (evict_every=1) and the full cache.
#   bash bench/plain_decode.sh [MODEL] [OUT_DIR] [CONTEXT] [extra run_experiment options, e.g. --use_fp16]
# CPU (the issue's 2K case):  bash bench/plain_decode.sh smollm2-135m outputs/plain_cpu 2048
# H200 (the 8K case):         bash bench/plain_decode.sh $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf out 8192 --use_fp16
# ROUNDS=n runs the methods n times, each round a process of its own into OUT_DIR/r<i> (one process's timings
# drift: the full cache's own step spread 22-35 ms between processes on one H100), then prints each round's ratio
# to the full cache and their median (bench/plain_ratio.py). METHODS and STEPS (timed steps, default 64) override.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2-135m}; out=${2:-outputs/plain_decode}; ctx=${3:-2048}; shift $(( $# < 3 ? $# : 3 ))
rounds=${ROUNDS:-1}
for i in $(seq 1 "$rounds"); do
  dir=$([ "$rounds" = 1 ] && echo "$out" || echo "$out/r$i")
  python run_experiment.py --benchmark speed --speed_parts plain --model_name "$model" --output_dir "$dir" \
      --methods "${METHODS:-full,atskv,atskv[evict_every=1]}" --budgets 0.1 --context_sizes "$ctx" \
      --batch_sizes 1 --decode_steps "${STEPS:-64}" "$@"
done
[ "$rounds" = 1 ] || python bench/plain_ratio.py "$out"/r*

#!/usr/bin/env bash
# Issue 25 item 4: the needle table of every baseline under both decoding policies (decode='grow', the papers':
# compress the prompt, keep every generated token; decode='hold': the budget holds while decoding), at 2K, 4K and
# 8K, 20 samples, seed 42, fp32. Usage: bash bench/needle_policies.sh MODEL OUT [extra run_experiment options,
# e.g. --ray --gpus_per_cell 0.125]. Resumes from OUT/results.jsonl.
set -uo pipefail
M=$1; OUT_DIR=$2; shift 2
methods='full,sliding_window,h2o'
for m in snapkv pyramidkv dynamic_kv rocket_kv knorm; do methods="$methods,$m,$m[decode=\"hold\"]"; done
python run_experiment.py --model_name "$M" --output_dir "$OUT_DIR" --methods "$methods" --tasks needle \
    --context_sizes 2048,4096,8192 --budgets 0.5,0.25,0.1 --num_samples 20 --seed 42 "$@"

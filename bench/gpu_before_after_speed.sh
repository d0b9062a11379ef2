#!/usr/bin/env bash
# Issue 23 item 6 on the GPU: the README's first speed command (bf16, --compile, 8192 x 64, 10%) on two trees,
# alternating, so that the restructuring can be checked to leave the fast path's speed within noise.
# Usage (after bench/gpu_plain_and_tests.sh put the model in $HOME/model and the wheels in $HOME/site):
#   OLD=$HOME/old OLD_COMMIT=<sha> NEW_COMMIT=<sha> ROUNDS=2 bash bench/gpu_before_after_speed.sh
# OLD: a tree of the earlier commit (git archive); the current tree is the other. Results: $HOME/speed_{old,new}_rN,
# a log in $OUT/speed_before_after.log.
set -uo pipefail
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
NEW=$PWD
for i in $(seq ${ROUNDS:-2}); do
  for tree in old new; do
    dir=$([ $tree = old ] && echo "$OLD" || echo "$NEW")
    echo "# $tree ($dir), round $i" | tee -a $OUT/speed_before_after.log
    commit=$([ $tree = old ] && echo "$OLD_COMMIT" || echo "$NEW_COMMIT")
    (cd "$dir" && ATSKV_COMMIT=$commit python run_experiment.py --benchmark speed --use_fp16 --compile --budgets 0.1 --context_sizes 8192 \
        --methods "${METHODS:-full,atskv[evict_every=64]}" --batch_sizes 64 --decode_steps ${STEPS:-32} \
        --model_name "$M" --output_dir $HOME/speed_${tree}_r$i 2>&1 | grep -E "ms/step|Error|error" \
        | tee -a $OUT/speed_before_after.log)
  done
done
mkdir -p $OUT/speed && for d in $HOME/speed_*; do cp $d/results.jsonl $OUT/speed/$(basename $d).jsonl; done

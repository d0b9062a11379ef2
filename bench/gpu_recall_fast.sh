#!/usr/bin/env bash
# Issue 24 on the GPU (after bench/gpu_model.sh): the CUDA tests of recall on the fast path and of the int8 scoring
# kernel, then the fast path's decode speed (--speed_parts fast: HF's plain loop with recall at batch 64 takes
# minutes) at 8192 tokens x 64 and x 1, bf16, --compile, 10% active KV: full, atskv (eviction only) and atskv
# with external memory: recall every 64 steps with a span of 16 (the steps between attend to the last recall's
# entries), its passive tier in host memory and on the device, then recall every step, both tiers; the scoring
# kernel off
# (einsum), and the largest batch that fits at 8K. Logs and results go to $OUT (speed24.tgz). PARTS="tests" or
# "speed" runs one half.
# Run both alone on the machine: beside a quality sweep's 11 processes the compiled tests did not finish in 400 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
bash bench/gpu_model.sh
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
R=$HOME/speed24
PARTS=${PARTS:-tests speed}
if [[ $PARTS == *tests* ]]; then
  timeout ${TEST_LIMIT:-200} python -m pytest -q --tb=short -p no:warnings tests/test_gpu.py \
    -k "params10 or params11 or params12 or params13 or int8 or host_mapped" 2>&1 | tail -150 > $OUT/test_gpu_recall.log
fi
[[ $PARTS == *speed* ]] || exit 0
speed() { timeout ${SPEED_LIMIT:-400} python run_experiment.py --benchmark speed --use_fp16 --compile --budgets 0.1 \
  --context_sizes 8192 --model_name "$M" --output_dir $R "$@" 2>&1 | grep -v Warning | tail -30 >> $OUT/speed24.log; }
E='atskv[external_memory=true;evict_every=64'; S='recall_every=64;recall_span=16'
speed --speed_parts fast --batch_sizes 64,1 \
  --methods "full,atskv[evict_every=64],$E;$S],$E;$S;passive_device=true],$E],$E;passive_device=true]"
speed --speed_parts fast --batch_sizes 64 --methods "$E;$S]" --kernels_off recall
speed --speed_parts max_batch --methods "full,$E;$S],$E;$S;passive_device=true]"
tar czf $OUT/speed24.tgz -C $HOME speed24

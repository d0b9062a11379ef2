#!/usr/bin/env bash
# Issue 24 on the GPU (after bench/gpu_model.sh): the CUDA tests of recall on the fast path and of the int8 scoring
# kernel, then the fast path's decode speed (--speed_parts fast: HF's plain loop with recall at batch 64 takes
# minutes) at 8192 tokens, bf16, --compile, 10% active KV: full, atskv (eviction only) and atskv with external
# memory recalling every 64 steps with a span of 32 (the steps between attend to the last recall's entries), its
# passive tier in host memory and on the device. PARTS lists the parts to run (default speed64; each resumes from
# $HOME/speed24/results.jsonl while the machine stays warm; every part fits one call):
#   tests_a    the CUDA tests of recall eager, compiled, on the device tier, the int8 kernel, the host view and the
#              decode kernel with extra (recalled) entries
#   tests_b    the compiled tests of held recall and of the tier written in place (each compiles its steps; all
#              in one call, the first run passed three tests in 420 s; -v: each test's name as it ends; TEST_LIMIT s)
#   kernels    the CUDA tests of the recall step's kernels and the int8 kernel (-k "step_recall or int8")
#   attn_split the decode attention alone at batch 1 per split plan (bench/attention_split_tune.py)
#   tune       the recall kernels alone per form, block and warps at batches 64 and 1 (bench/recall_kernel_tune.py)
#   prune      batch 64 on multi_key's prompts (the real model: not with WEIGHTS=random): device1r with the
#              recall kernels' pruning off and on (PRUNE_SUBBLOCKS 0, 16; bench/run_with.py), each in its own
#              directory ($HOME/prune0, $HOME/prune16 -> $OUT/prune.tgz)
#   speed64    batch 64: full, atskv, recall every 64 steps (host tier, device tier)
#   speed1     batch 1: the same
#   profile    batch 64: each step variant's kernels, recall every 64 steps (both tiers)
#   profile1   batch 1: the same for full and the device tier (where a step is a chain of launches)
#   max_batch  the largest batch that fits at 8K: full and recall every 64 steps (both tiers)
#   every      batch 64: recall every step (both tiers), and the scoring kernel off (einsum)
# Logs and results go to $OUT (speed24.log, speed24.tgz). Run it alone on the machine: beside a quality sweep's 11
# processes the compiled tests did not finish in 400 s.
# SETTINGS="full device" (any of full, evict, host, device, host1, device1) times only those settings, in order;
# host1 / device1: recall every step, 2% of the budget a step (the setting the CPU probe kept the facts with);
# host1r / device1r: the same scored on 16 of the 64 key dimensions (recall_dims=16, SparQ's selection);
# host1l / device1l: and only in the 6 layers with the strongest induction heads (recall_layers=6); host1m /
# device1m: in 12.
# WEIGHTS=random: the speed parts time random weights of the default model's shape (`--model_config smollm2-135m`;
# a step's time does not depend on the weights' values), so that no model file has to be carried; the tests
# still need the model.
# SPEED_CONTEXTS=multi_key: the speed parts prefill that task's prompts instead of random tokens (with the real
# model, not WEIGHTS=random: what the recall kernels' pruning skips depends on the attention's values).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
if [ "${WEIGHTS:-}" = random ]; then
  MODEL=(--model_config smollm2-135m)
else
  bash bench/gpu_model.sh > /dev/null 2>&1
  MODEL=(--model_name $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf)
fi
R=$HOME/speed24
PARTS=${PARTS:-speed64}
E='atskv[external_memory=true;evict_every=64'
S='recall_every=64;recall_span=32'
HOST="$E;$S]" DEVICE="$E;$S;passive_device=true]"
# recall every step, a few entries a step (2% of the budget): host1 and device1
SMALL='recall_step_tokens=0.02'
# SETTINGS: which of full, evict (eviction only), host, device (the two tiers), host1 and device1 the speed parts
# time, in order (without SETTINGS each part times its own list)
declare -A SETTING=([full]=full [evict]='atskv[evict_every=64]' [host]="$HOST" [device]="$DEVICE"
                    [host1]="$E;$SMALL]" [device1]="$E;$SMALL;passive_device=true]"
                    [host1r]="$E;$SMALL;recall_dims=16]" [device1r]="$E;$SMALL;recall_dims=16;passive_device=true]"
                    [host1l]="$E;$SMALL;recall_dims=16;recall_layers=6]"
                    [device1l]="$E;$SMALL;recall_dims=16;recall_layers=6;passive_device=true]"
                    [host1m]="$E;$SMALL;recall_dims=16;recall_layers=12]"
                    [device1m]="$E;$SMALL;recall_dims=16;recall_layers=12;passive_device=true]")
pick() { local out=; for s in ${SETTINGS:-$*}; do
    if [ -n "${SETTING[$s]:-}" ]; then out="$out,${SETTING[$s]}"; else echo "unknown setting $s" >&2; fi; done
  echo "${out#,}"; }
speed() { timeout ${SPEED_LIMIT:-500} python run_experiment.py --benchmark speed --use_fp16 --compile --budgets 0.1 \
  --context_sizes 8192 "${MODEL[@]}" --speed_contexts ${SPEED_CONTEXTS:-random} --output_dir $R "$@" 2>&1 \
  | grep -v -e Warning -e warn -e Converting | tail -30 >> $OUT/speed24.log; }
for part in $PARTS; do
  echo "== $part $(date +%T)" >> $OUT/speed24.log
  case $part in
    tests_a|tests_b)
      K="params13 or in_place"
      [ $part = tests_a ] && K="params10 or params11 or params12 or int8 or host_mapped or extra_entries"
      timeout ${TEST_LIMIT:-560} python -m pytest -v --tb=short -p no:warnings tests/test_gpu.py -k "$K" 2>&1 \
        | grep -e PASS -e FAIL -e ERROR -e "^E " -e passed -e failed | tail -150 >> $OUT/test_gpu_recall.log ;;
    kernels)
      timeout ${TEST_LIMIT:-300} python -m pytest -v --tb=short -p no:warnings tests/test_gpu.py \
        -k "step_recall or int8" 2>&1 | grep -e PASS -e FAIL -e ERROR -e "^E " -e passed -e failed | tail -80 \
        >> $OUT/test_gpu_recall.log ;;
    attn_split)
      # batch 1 only, 18 configurations (the full grid of 216 did not finish in 120 s); each row is logged as it ends
      PYTHONPATH=$HOME/site:$PWD timeout ${SPEED_LIMIT:-300} python bench/attention_split_tune.py --batches 1 \
        --slots 836,8192 --min_split 32,64,128 --target 264 --blocks 32 --warps 1,2,4 \
        --out $OUT/attention_split.json >> $OUT/attention_split.log 2>&1 ;;
    tune)
      PYTHONPATH=$HOME/site:$PWD timeout ${SPEED_LIMIT:-300} python bench/recall_kernel_tune.py --batches 64,1 \
        --out $OUT/recall_kernel_tune.json > $OUT/recall_kernel_tune.log 2>&1 ;;
    prune)
      for p in 0 16; do
        PYTHONPATH=$HOME/site:$PWD timeout ${SPEED_LIMIT:-300} python bench/run_with.py \
          recall_kernels.PRUNE_SUBBLOCKS=$p -- --benchmark speed --use_fp16 --compile --budgets 0.1 \
          --context_sizes 8192 "${MODEL[@]}" --speed_contexts multi_key --output_dir $HOME/prune$p \
          --speed_parts fast --batch_sizes 64 --methods "${SETTING[device1r]}" 2>&1 | grep ms/step >> $OUT/speed24.log
      done
      tar czf $OUT/prune.tgz -C $HOME prune0 prune16 2>/dev/null ;;
    speed64) speed --speed_parts fast --batch_sizes 64 --methods "$(pick full evict host device)" ;;
    speed1) speed --speed_parts fast --batch_sizes 1 --methods "$(pick full evict host device)" ;;
    profile) speed --speed_parts profile --batch_sizes 64 --methods "$(pick host device)" ;;
    profile1) speed --speed_parts profile --batch_sizes 1 --methods "$(pick full device)" ;;
    max_batch) speed --speed_parts max_batch --methods "$(pick full device host)" ;;   # the host tier last: slow
    every) speed --speed_parts fast --batch_sizes 64 --methods "$E],$E;passive_device=true]"
           speed --speed_parts fast --batch_sizes 64 --methods "$HOST" --kernels_off recall ;;
    *) echo "unknown part $part (tests_a, tests_b, kernels, attn_split, tune, prune, speed64, speed1, profile," \
            "profile1, max_batch, every)" >&2
       exit 2 ;;
  esac
done
tar czf $OUT/speed24.tgz -C $HOME speed24 2>/dev/null
exit 0

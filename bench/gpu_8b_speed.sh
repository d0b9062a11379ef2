#!/usr/bin/env bash
# Issue 26 on the H200 (random weights of published 8B shapes, `--model_config`; no model file needed): the fast
# path's decode speed in bf16 with --compile, full against atskv at 10% (eviction only, evict_every=64), beside the
# memory floor; the largest batch at 32K; the compression's share of a chunked prefill at 32K. Needs the project's
# wheels in $HOME/site (../shared/gpu/README.md). PARTS lists the parts (each resumes from $HOME/speed26/<part> while
# the machine stays warm; a part stopped by PART_LIMIT keeps its finished cells):
#   llama32k   llama-3.1-8b at 16 x 32768
#   llama8k    llama-3.1-8b at 64 x 8192
#   qwen8k     qwen3-8b at 64 x 8192
#   context    llama-3.1-8b at batch 16 and 4096, 8192, 16384 (with llama32k: the figure against context)
#   max32k     llama-3.1-8b: the largest batch that fits at 32768, full and atskv
#   prefill    llama-3.1-8b: atskv's share of a chunked prefill of 32768 tokens
# Logs and results go to $OUT (speed26.log, speed26.tgz): the results of every part so far, joined by report.py.
#   PARTS="llama8k qwen8k" bash bench/gpu_8b_speed.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
R=$HOME/speed26
METHODS='full,atskv[evict_every=64]'
speed() { local part=$1; shift
  timeout ${PART_LIMIT:-560} python run_experiment.py --benchmark speed --use_fp16 --compile --budgets 0.1 \
    --max_seq_len 32768 --output_dir $R/$part "$@" 2>&1 | grep -v -e Warning -e warn | tail -30 >> $OUT/speed26.log; }
for part in ${PARTS:-llama8k}; do
  echo "== $part $(date +%T)" >> $OUT/speed26.log
  case $part in
    llama32k) speed $part --model_config llama-3.1-8b --speed_parts fast --context_sizes 32768 --batch_sizes 16 \
                --methods "$METHODS" ;;
    llama8k) speed $part --model_config llama-3.1-8b --speed_parts fast --context_sizes 8192 --batch_sizes 64 \
               --methods "$METHODS" ;;
    qwen8k) speed $part --model_config qwen3-8b --speed_parts fast --context_sizes 8192 --batch_sizes 64 \
              --methods "$METHODS" ;;
    context) speed $part --model_config llama-3.1-8b --speed_parts fast --context_sizes 4096,8192,16384 \
               --batch_sizes 16 --methods "$METHODS" ;;
    max32k) speed $part --model_config llama-3.1-8b --speed_parts max_batch --context_sizes 32768 \
              --methods "$METHODS" ;;
    prefill) mkdir -p $R/prefill && timeout ${PART_LIMIT:-560} python run_experiment.py --benchmark prefill_overhead \
               --model_config llama-3.1-8b --use_fp16 --max_seq_len 32768 --context_sizes 32768 \
               --output_dir $R/prefill 2>&1 | tail -3 >> $OUT/speed26.log ;;
    *) echo "unknown part $part (llama32k, llama8k, qwen8k, context, max32k, prefill)" >&2; exit 2 ;;
  esac
done
# one report over the Llama parts (the figure against context needs 32K beside the shorter contexts)
mkdir -p $R/llama && cat $R/llama32k/results.jsonl $R/context/results.jsonl $R/llama8k/results.jsonl \
  $R/max32k/results.jsonl > $R/llama/results.jsonl 2>/dev/null
python report.py $R/llama > /dev/null 2>&1
tar czf $OUT/speed26.tgz -C $HOME speed26 2>/dev/null
exit 0

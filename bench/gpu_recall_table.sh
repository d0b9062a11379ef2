#!/usr/bin/env bash
# Issue 22's quality table on the GPU in calls of at most LIMIT seconds (default 520): bench/gpu_model.sh joins the
# model from the pieces in $HOME/m (../shared/gpu/README.md) the first time, then bench/recall_table.sh runs into
# $HOME/NAME, resuming what an earlier call on the same (still warm) machine finished, and is stopped at LIMIT (each
# part keeps its finished samples). The parts found so far are joined, reported, and packed into $OUT/NAME.tgz.
#   NAME=seed42 SEED=42 bash bench/gpu_recall_table.sh full 'atskv[external_memory=true]' kvpress:kvzip
# CONTEXTS, BUDGETS, NUM, JOBS and THREADS pass through to bench/recall_table.sh. Pass ATSKV_COMMIT in every call
# (the same commit each time) so that a call resumes the samples an earlier one saved. Two such runs at once with
# JOBS=8 each (16 processes, up to 9 GB each at 8K in fp32) ran an H100 out of memory in one part (its saved samples
# stay): JOBS=6 each there.
set -uo pipefail
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
# many processes share the one GPU: segments that grow in place leave less of each process's memory stranded
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
PRELOAD=0 bash "$(dirname "$0")/gpu_model.sh" > /dev/null 2>&1 \
  || { echo "bench/gpu_model.sh failed: are the model's pieces in $HOME/m?" >&2; exit 2; }
out=$HOME/${NAME:?NAME names the run}
export JOBS=${JOBS:-11} THREADS=${THREADS:-1}
timeout ${LIMIT:-520} bash bench/recall_table.sh "$M" "$out" "${SEED:?}" "$@" > "$out.log" 2>&1
echo "recall_table: exit $? after at most ${LIMIT:-520} s" >> "$out.log"
cat "$out"/parts/*/results.jsonl > "$out/results.jsonl" 2>/dev/null
# an unfinished part's saved samples, named as bench/compare_runs.py --partial_a/_b reads them:
# partial/part<n>-<budget>-<task>.jsonl
mkdir -p "$out/partial"
for c in "$out"/parts/*.cell; do
  n=$(basename "$c" .cell)
  for f in "$out/parts/$n"/partial/*.jsonl; do [ -f "$f" ] && cp "$f" "$out/partial/part$n-$(cat "$c").jsonl"; done
done
python report.py "$out" > /dev/null 2>&1
grep -h "exit" "$out.log" | tail -50
tar czf "$OUT/$NAME.tgz" -C "$HOME" "$NAME" --exclude='*.png' 2>/dev/null
cp "$out.log" "$OUT/"

#!/usr/bin/env bash
# Issue 22 item 4 on the GPU: the ablation at 8192 tokens on the seed-42 cells (20 samples, the four tasks, 25% and
# 10%), in calls of at most LIMIT seconds that resume on a warm machine (bench/gpu_recall_table.sh):
#   eviction only (atskv);
#   one shared vote in the prompt's chunks and the question (recall_choice="shared", the default before
#     2026-12-06), against the default's own choice per query (the table's cells, bench/gpu_recall_table.sh);
#   pages instead of tokens (Quest page summaries of 16 entries; with the shared vote, as pages have no own choice);
#   recall while the prompt and the question are read only, not while decoding (recall_every=0);
#   with promotion into the active cache.
# The cells already in results/recall-own/ablation8k-h100 are skipped (SKIP_DONE= runs them all).
#   NAME=ablation8k bash bench/gpu_recall_ablation.sh
set -uo pipefail
export NAME=${NAME:-ablation8k} SEED=42 CONTEXTS=8192 NUM=${NUM:-20}
export SKIP_DONE=${SKIP_DONE-results/recall-own/ablation8k-h100/results.jsonl}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
exec bash "$(dirname "$0")/gpu_recall_table.sh" atskv \
  'atskv[external_memory=true;recall_choice="shared"]' \
  'atskv[external_memory=true;recall_choice="shared";recall_scoring="pages"]' \
  'atskv[external_memory=true;recall_every=0]' 'atskv[external_memory=true;promote=true]'

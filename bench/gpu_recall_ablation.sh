#!/usr/bin/env bash
# Issue 22 item 4 on the GPU: the ablation at 8192 tokens on the seed-42 cells (20 samples, the four tasks, 25% and
# 10%), in calls of at most LIMIT seconds that resume on a warm machine (bench/gpu_recall_table.sh):
#   eviction only; the default (own recall in the prompt's chunks, the group's vote while decoding);
#   one shared vote in the chunks too (recall_choice="shared", the default before 2026-12-06);
#   pages instead of tokens (Quest page summaries, shared choice); votes max-pooled over a span of 15 positions;
#   recall in the prompt's chunks and the question only, not while decoding (recall_every=0);
#   with promotion into the active cache.
#   NAME=ablation8k bash bench/gpu_recall_ablation.sh
set -uo pipefail
export NAME=${NAME:-ablation8k} SEED=42 CONTEXTS=8192 NUM=${NUM:-20}
exec bash "$(dirname "$0")/gpu_recall_table.sh" atskv 'atskv[external_memory=true]' \
  'atskv[external_memory=true;recall_choice="shared"]' \
  'atskv[external_memory=true;recall_choice="shared";recall_scoring="pages"]' \
  'atskv[external_memory=true;recall_choice="shared";recall_scoring="exact";recall_span=15]' \
  'atskv[external_memory=true;recall_every=0]' 'atskv[external_memory=true;promote=true]'

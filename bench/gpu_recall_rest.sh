#!/usr/bin/env bash
# Issue 22's remaining GPU cells, side by side on one GPU (14 processes in all), in calls of at most LIMIT seconds
# that resume on a warm machine: kvpress:kvzip at 8192 and 4096 tokens (NAME kvzip42), the table's missing cell
# (8192, 25%, multi_question: NAME mq25) and the 8K ablation (bench/gpu_recall_ablation.sh). Seed 42, 20 samples.
#   LIMIT=530 bash bench/gpu_recall_rest.sh
# 14 processes filled the H100's 80 GB once KVzip's cells ran (a few cells failed out of memory and ran again on
# the next call): the allocator's expandable segments keep each process's reserve smaller.
set -uo pipefail
cd "$(dirname "$0")/.."
bash bench/gpu_model.sh
export SEED=42 NUM=20 LIMIT=${LIMIT:-530} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
JOBS=4 NAME=kvzip42 CONTEXTS="8192 4096" bash bench/gpu_recall_table.sh kvpress:kvzip &
JOBS=1 NAME=mq25 CONTEXTS=8192 BUDGETS=0.25 TASKS=multi_question bash bench/gpu_recall_table.sh \
  'atskv[external_memory=true]' &
JOBS=9 NAME=ablation8k bash bench/gpu_recall_ablation.sh &
wait

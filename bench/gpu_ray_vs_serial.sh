#!/usr/bin/env bash
# Issue 27 item 2 on the GPU: the default sweep's cells at 8K, serially in one process and with
# `--ray --gpus_per_cell 0.25` (four workers on the one GPU), each timed end to end (model load included).
# The predictor is trained first, outside both timings. Needs the model in $HOME/model, the project's wheels in
# $HOME/site and Ray's in $HOME/raysite (see results/ray-gpu/README.md). Logs and results go to $OUT.
# RUNS: serial, ray, ray_mps (the Ray run with the CUDA MPS daemon up: without it, processes sharing a GPU take
# turns on it, a context at a time, and the plain path's launch-bound cells slowed 1.5-2x side by side).
set -uo pipefail
export PYTHONPATH=$HOME/site:$HOME/raysite PYTHONUNBUFFERED=1
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
R=$HOME/ray_res; mkdir -p $R
python run_experiment.py --train_predictor --model_name $M 2>&1 | tail -1
common="--model_name $M --context_sizes 8192 ${EXTRA:-}"
for run in ${RUNS:-serial ray}; do
  opts=$([ $run != serial ] && echo "--ray --gpus_per_cell 0.25 --cpus_per_cell ${CPUS_PER_CELL:-4}")
  if [ $run = ray_mps ] && ! nvidia-cuda-mps-control -d; then
    echo "ray_mps: no MPS daemon" | tee -a $OUT/ray_vs_serial.log; continue
  fi
  t0=$(date +%s%N)
  python run_experiment.py $common --output_dir $R/$run $opts > $R/$run.log 2>&1
  rc=$?
  echo "$run: rc $rc, wall $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a $OUT/ray_vs_serial.log
  [ $run = ray_mps ] && echo quit | nvidia-cuda-mps-control
done
tail -5 $R/*.log > $OUT/tails.log
mkdir -p $OUT/ray_res && for run in ${RUNS:-serial ray}; do cp $R/$run/results.jsonl $OUT/ray_res/$run.jsonl; done

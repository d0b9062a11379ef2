#!/usr/bin/env bash
# On the H200 (after the model's pieces are in $HOME/m and the wheels in $HOME/site, ../shared/gpu/README.md):
# the plain-path decode benchmark at 8K x 1 in bf16 and fp32, then tests/test_gpu.py. Results go to $OUT.
set -uo pipefail
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
mkdir -p $HOME/model && cat $HOME/m/model.part.* > $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
R=$HOME/res; mkdir -p $R
bash bench/plain_decode.sh "$M" $R/plain_bf16 8192 --use_fp16 2>&1 | grep -v Warn | tee $R/plain_bf16.log
cp $R/plain_bf16.log $OUT/
bash bench/plain_decode.sh "$M" $R/plain_fp32 8192 2>&1 | grep -v Warn | tee $R/plain_fp32.log
cp $R/plain_fp32.log $OUT/
tar czf $OUT/gpu_results.tgz -C $R .
timeout ${GPU_TEST_TIMEOUT:-240} python -m pytest -q -x tests/test_gpu.py 2>&1 | tail -15 | tee $OUT/test_gpu.log

#!/usr/bin/env bash
# On the H200 (after the model's pieces are in $HOME/m and the wheels in $HOME/site, ../shared/gpu/README.md):
# the plain-path decode benchmark at 8K x 1, ROUNDS rounds of CONFIGS (default bf16 and fp32) alternating (the plain loop's times
# vary from process to process), then (PROFILE=1) where the bf16 step's time goes, then (GPU_TESTS=1, the default)
# tests/test_gpu.py. Logs and results go to $OUT: gpu_results.tgz holds each round's results folder.
set -uo pipefail
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
mkdir -p $HOME/model $HOME/.cache/atskv && cat $HOME/m/model.part.* > $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
cp $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf $HOME/.cache/atskv/   # the default alias finds it there (tests)
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
R=$HOME/res; mkdir -p $R
for i in $(seq ${ROUNDS:-2}); do
  for cfg in ${CONFIGS:-bf16 fp32}; do   # bf16, fp32, bf16-nocudnn, fp32-nocudnn
    opts=$([[ $cfg = bf16* ]] && echo --use_fp16)$([[ $cfg = *nocudnn ]] && echo " --no_cudnn_attention")
    echo "# $cfg, round $i" >> $OUT/plain.log
    bash bench/plain_decode.sh "$M" $R/plain_${cfg}_r$i 8192 $opts 2>&1 | grep "plain path" | tee -a $OUT/plain.log
  done
done
tar czf $OUT/gpu_results.tgz -C $R .
[ "${PROFILE:-0}" = 1 ] && python bench/profile_plain.py "$M" 8192 --use_fp16 2>&1 | tail -60 > $OUT/profile_bf16.log
[ "${GPU_TESTS:-1}" = 1 ] || exit 0
timeout ${GPU_TEST_TIMEOUT:-420} python -m pytest -q -x tests/test_gpu.py 2>&1 | tail -15 | tee $OUT/test_gpu.log

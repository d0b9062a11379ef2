#!/usr/bin/env bash
# On the GPU machine (../shared/gpu/README.md), once per warm machine: join the default model's pieces from $HOME/m
# into $HOME/model, put a copy where the default alias finds it (the tests), then convert it and train the relevance
# predictor once, so that parallel runs after it only load them.
set -euo pipefail
export PYTHONPATH=$HOME/site
M=$HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$M" ]; then
  mkdir -p $HOME/model && cat $HOME/m/model.part.* > "$M"
fi
# the tests load the default alias, which looks for the GGUF in its cache (without it they fail at setup)
[ -f $HOME/.cache/atskv/$(basename "$M") ] || { mkdir -p $HOME/.cache/atskv && cp "$M" $HOME/.cache/atskv/; }
cd "$(dirname "$0")/.."
# PRELOAD=0: join and copy only (bench/recall_table.sh loads the model and the predictor itself)
[ "${PRELOAD:-1}" = 0 ] && exit 0
python -c "import utils, relevance_predictor as rp; m, t = utils.load_model_and_tokenizer('$M'); rp.load_or_train(m, t)"

#!/usr/bin/env bash
# Issue 22's quality table: synthetic needle, multi_key, multi_value and multi_question, question-agnostic, fp32,
# NUM samples a cell (default 20), at CONTEXTS (default "8192 4096") and BUDGETS (default 0.25,0.1); TASKS picks
# some of the four tasks.
# Each method x context x task x budget runs as its own process (JOBS at a time, THREADS CPU threads each; their
# times are then not speed results) into OUT_DIR/parts/<n>;
# a part resumes from its results.jsonl, so an interrupted call loses no finished sample. The parts are then joined
# into OUT_DIR/results.jsonl and reported (OUT_DIR/results.md). SKIP_DONE=FILE.jsonl skips the cells that FILE
# already holds without an error (an earlier run's committed records), so that only the missing cells run.
# EXTRA: further run_experiment options for every part, e.g. EXTRA=--fast_decode (issue 24: the same table decoded
# on the fast path; its cells are keyed apart, so do not pass SKIP_DONE a plain run's records with it).
#   bash bench/recall_table.sh MODEL OUT_DIR SEED METHOD [METHOD ...]
# GPU (../shared/gpu/README.md):
#   bash bench/recall_table.sh $HOME/model/SmolLM2-135M-Instruct.Q4_1.gguf out 42 full 'atskv[external_memory=true]' kvpress:kvzip
set -uo pipefail
cd "$(dirname "$0")/.."
model=$1; out=$2; seed=$3; shift 3
mkdir -p "$out/parts"
# load the model once (its conversion is cached) and the relevance predictor (trained once), before the parallel parts
python -c "import utils, relevance_predictor as rp; m, t = utils.load_model_and_tokenizer('$model'); rp.load_or_train(m, t)"
# one "method|context|budget|task" line per finished cell of SKIP_DONE
done_cells=$([ -n "${SKIP_DONE:-}" ] && python -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if not r.get("error"):
        print("%s|%s|%s|%s" % (r["method"], r["context_size"], float(r.get("budget") or 1.0), r["task"]))
' "$SKIP_DONE")
n=0
for ctx in ${CONTEXTS:-8192 4096}; do
  for m in "$@"; do
    budgets=$([ "$m" = full ] && echo 1.0 || echo "${BUDGETS:-0.25 0.1}")
    for b in $budgets; do
      for task in ${TASKS:-needle multi_key multi_value multi_question}; do
        n=$((n + 1))
        echo "$b-$task" > "$out/parts/$n.cell"   # names the part's saved samples (bench/gpu_recall_table.sh)
        if grep -qxF "$m|$ctx|$(python -c "print(float('$b'))")|$task" <<< "$done_cells"; then continue; fi
        ( OMP_NUM_THREADS=${THREADS:-2} python run_experiment.py --model_name "$model" --output_dir "$out/parts/$n" \
            --benchmarks synthetic --tasks $task --context_sizes "$ctx" --budgets "$b" --methods "$m" \
            --num_samples "${NUM:-20}" --seed "$seed" ${EXTRA:-} > "$out/parts/$n.log" 2>&1
          echo "part $n ($m @ $ctx, $b, $task): exit $?" ) &
        while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-11}" ]; do sleep 2; done
      done
    done
  done
done
wait
cat "$out"/parts/*/results.jsonl > "$out/results.jsonl"
python report.py "$out" > /dev/null && echo "report: $out/results.md"

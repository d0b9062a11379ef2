"""KVzip in our harness against NVIDIA kvpress's own pipeline, on the same synthetic samples (seed 42, the default
model from its alias, CPU, float32): our harness (`kvpress:kvzip`, the prompt prefilled under the press, then the
question and greedy decoding) and kvpress's `kv-press-text-generation` pipeline with the model's plain SDPA (which
kvpress patches at import to honour the masks of presses that mask). Prints each sample's two predictions.
    python bench/kvzip_vs_kvpress_pipeline.py TASK CONTEXT SAMPLES BUDGET
    python bench/kvzip_vs_kvpress_pipeline.py multi_key 2048 4 0.25"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kvpress  # noqa: F401  (patches the registered attention functions at import)
import utils
from evals.synthetic import synthetic_samples, score_synthetic
from evals.harness import encode_prompt, make_cache, run_generation
from transformers import pipeline
task, ctx_len, n, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
m, t = utils.load_model_and_tokenizer('smollm2-135m')
samples = synthetic_samples(t, task, ctx_len, n, seed=42)
ours_att = m.config._attn_implementation
so = st = 0
for s in samples:
    ctx, q = encode_prompt(t, s.context, s.question, s.answer_prefix)
    m.set_attn_implementation(ours_att)
    cache, press = make_cache('kvpress:kvzip', m, budget, len(ctx), tokenizer=t)
    ours = run_generation(m, t, cache, ctx, q, 24, press=press)['prediction']
    m.set_attn_implementation('sdpa')
    pipe = pipeline("kv-press-text-generation", model=m, tokenizer=t, device='cpu')
    _, press2 = make_cache('kvpress:kvzip', m, budget, len(ctx), tokenizer=t)
    theirs = pipe(s.context, question="\n\n" + s.question, answer_prefix=s.answer_prefix, press=press2,
                  max_new_tokens=24)['answer']
    a, b = score_synthetic(s, ours), score_synthetic(s, theirs)
    so += a; st += b
    print(f"{s.id}: ours {ours[:40]!r} ({a}) | kvpress pipeline {theirs[:40]!r} ({b})", flush=True)
print(f"mean: ours {100*so/len(samples):.1f}, kvpress pipeline {100*st/len(samples):.1f}")

"""Operators per plain-path decode step (HF's loop through the cache), per method: the top-level aten operators
each step issues, counted by torch.profiler on the CPU. On a GPU nearly each is a kernel launch, and the plain
loop at batch 1 is bound by launches (docs/guide.md), so this count is what ATSKV's plain-path overhead over the
full cache comes down to there. Prints one line per method: the count of each step over one eviction cycle and
their mean, then the same without view operators (they launch no kernel; each still costs its dispatch).
    python bench/plain_op_counts.py [CONTEXT] [METHODS]
    python bench/plain_op_counts.py 2048 full,atskv
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation as ev  # noqa: E402
from evals.speed import PlainStep  # noqa: E402
from utils import load_model_and_tokenizer  # noqa: E402

VIEWS = {"aten::" + n for n in ("select slice view expand unsqueeze reshape transpose as_strided alias detach t "
                                  "flatten squeeze permute split narrow unflatten expand_as view_as _unsafe_view "
                                  "lift_fresh detach_ empty empty_like").split()}
context = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
methods = sys.argv[2].split(",") if len(sys.argv) > 2 else ["full", "atskv"]
model, tok = load_model_and_tokenizer("smollm2-135m")
for m in methods:
    with torch.no_grad():
        cache, logits, _ = ev._prefill_contexts(model, tok, m, None if m == "full" else 0.1, context, 1, {}, 512, 0)
        step = PlainStep(model, cache, logits.argmax(-1), context)
        for _ in range(3):
            step()
        counts, kernels = [], []
        for _ in range(getattr(getattr(cache, "method", None), "evict_every", 1) if m != "full" else 1):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            top = [e.name for e in prof.events() if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
            counts.append(len(top))
            kernels.append(sum(name not in VIEWS for name in top))
    print(f"{m} @ {context}, batch 1, 10%: top-level aten operators per step {counts}, "
          f"mean {sum(counts) / len(counts):.0f}; without views {kernels}, mean {sum(kernels) / len(kernels):.0f}",
          flush=True)

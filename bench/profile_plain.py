"""Where a plain-path decode step's time goes, per method: wall ms, CUDA kernel time and count, host syncs, and the
top host-side operators (torch.profiler). For looking into the plain path's speed on a GPU.

    python bench/profile_plain.py MODEL CONTEXT [--use_fp16] [--methods 'full|atskv|atskv[{"evict_every":1}]']
"""
import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluation as ev  # noqa: E402
from evals.speed import PlainStep  # noqa: E402
from utils import load_model_and_tokenizer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("context", type=int)
ap.add_argument("--use_fp16", action="store_true")
ap.add_argument("--methods", default='full|atskv|atskv[{"evict_every":1}]')
ap.add_argument("--steps", type=int, default=32)
a = ap.parse_args()
model, tok = load_model_and_tokenizer(a.model, use_fp16=a.use_fp16)
dev = model.device
for spec in a.methods.split("|"):
    m, params = (spec.split("[")[0], json.loads(spec.split("[", 1)[1][:-1]) if "[" in spec else {})
    with torch.no_grad():
        cache, logits, _ = ev._prefill_contexts(model, tok, m, None if m == "full" else 0.1, a.context, 1, params,
                                                512, 0)
        step = PlainStep(model, cache, logits.argmax(-1), a.context)
        for _ in range(4):
            step()
        torch.cuda.synchronize() if dev.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize() if dev.type == "cuda" else None
        wall = 1000 * (time.perf_counter() - t0) / a.steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(a.steps):
                step()
            torch.cuda.synchronize() if dev.type == "cuda" else None
    evs = list(prof.events())
    kern = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
    cpu_top = Counter()
    for e in evs:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(("aten::", "cuda")):
            cpu_top[e.name] += e.self_cpu_time_total
    syncs = sum(1 for e in evs if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                                             "aten::_local_scalar_dense"))
    n = a.steps
    print(f"{spec:28s} wall {wall:7.2f} ms/step | kernels {len(kern) / n:6.0f}/step, "
          f"{sum(e.device_time_total for e in kern) / n / 1000:6.2f} ms/step | syncs+copies {syncs / n:5.1f}/step",
          flush=True)
    print("    host self time: " + ", ".join(f"{k} {v / n / 1000:.2f}" for k, v in cpu_top.most_common(8)), flush=True)

"""Decode-speed benchmarks: the plain path (HF's loop through a cache), the fast path, the largest batch that
fits, profiles of a step, and a check that the fast path answers as the plain loop does."""
from __future__ import annotations

import math
import time
import traceback

import torch

from evals.harness import MAX_NEW_TOKENS, _sync, encode_prompt, forward_chunked, make_cache, run_generation
from evals.synthetic import Sample, answer_complete, score_synthetic


# ---------------------------------------------------------------------------------------------------------------
# Speed: the plain decode loop against the fast (static-shape, CUDA-graph) path, beside the memory floor

def device_bandwidth_gbs(device) -> float:
    """Measured copy bandwidth of the device (bytes read + written per second, GB/s): the floor's denominator."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of float32 on a GPU, 64 MiB on a CPU
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.nbytes * reps / (time.perf_counter() - t) / 1e9


def host_bandwidth_gbs(device) -> float:
    """Measured host-to-device copy bandwidth from pinned memory (GB/s): the floor's denominator for bytes a step
    reads from host memory (ATSKV's passive tier). 0 off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    src = torch.ones(1 << 26, pin_memory=True)   # 256 MiB of float32
    dst = torch.empty(src.shape, device=device)
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    _sync(device)
    t = time.perf_counter()
    reps = 8
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    _sync(device)
    return src.nbytes * reps / (time.perf_counter() - t) / 1e9


def _peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> int:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0


def _dtype_name(model) -> str:
    return str(model.dtype).replace("torch.", "")


def _prefill_contexts(model, tokenizer, method: str, budget, context: int, batch: int, params: dict | None,
                      chunk: int, seed: int, contexts: str = "random"):
    """A batch of contexts prefilled with the method (chunked, the plain path), device peak memory counted from the
    prefill on. Returns the cache, the last logits and the prefill's seconds. contexts "random": random tokens (a
    step's work and bytes do not depend on the values); a synthetic task's name: its samples' prompts (context and
    question, the first `context` tokens cut from the front), for what depends on the attention's values, such as
    the recall kernels' pruning."""
    dev = model.device
    if contexts == "random":
        ids = torch.randint(0, model.config.vocab_size, (batch, context),
                            generator=torch.Generator().manual_seed(seed)).to(dev)
    else:
        from evals.harness import encode_prompt
        from evals.synthetic import synthetic_samples
        rows = []
        for s in synthetic_samples(tokenizer, contexts, context, batch, seed):
            c, q = encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
            row = (c + q)[-context:]
            rows.append(c[:context - len(row)] + row if len(row) < context else row)   # too short: the context again
        ids = torch.tensor(rows, device=dev)
    cache, _ = make_cache(method, model, budget, context, params, tokenizer)
    _peak_reset(dev)
    _sync(dev)
    t = time.perf_counter()
    logits = forward_chunked(model, cache, ids, chunk)
    _sync(dev)
    return cache, logits, time.perf_counter() - t


def timing_probe(dev) -> dict:
    """How fast the machine runs a fixed piece of work right now (ms of 8 fp32 256x256 matmuls, median of 5), and
    the load average: the report marks cells whose times were taken on a busier or freer machine."""
    import os
    import statistics
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(dev)  # the global RNG is left alone
    times = []
    for _ in range(5):
        _sync(dev)
        t = time.perf_counter()
        for _ in range(8):
            a = torch.tanh(a @ a)
        _sync(dev)
        times.append(1000 * (time.perf_counter() - t))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"probe_ms": statistics.median(times), "load1": load}


def _time_run(dev, fn, n: int) -> float:
    """Mean milliseconds of `fn` over n consecutive calls (one pair of CUDA events around all of them)."""
    _sync(dev)
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / n
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.perf_counter() - t) / n


class PlainStep:
    """One step of HF's plain decode loop through `cache` per call (one forward, the greedy token); `tok` (B,) and
    `pos` are the next token and its position."""

    def __init__(self, model, cache, tok, pos: int):
        self.model, self.cache, self.tok, self.pos = model, cache, tok, pos

    def __call__(self):
        p = torch.tensor([self.pos], device=self.model.device)
        out = self.model(input_ids=self.tok[:, None], past_key_values=self.cache, use_cache=True, cache_position=p,
                         position_ids=p[None].expand(self.tok.shape[0], -1))
        self.tok = out.logits[:, -1].argmax(-1)
        self.pos += 1


def step_cycle(cache) -> int:
    """Steps after which a method's decode schedule repeats (ATSKV: evict_every and recall_every): a mean over whole
    cycles counts its evicting and recalling steps as often as they come."""
    m = getattr(cache, "method", None)
    if not hasattr(m, "slot_evict_every"):
        return 1
    return math.lcm(m.slot_evict_every(), m.slot_recall_schedule()[0])


def plain_decode_ms(model, cache, tok, pos: int, steps: int, warm_up: int = 2):
    """HF's plain decode loop through `cache` (one forward per token, greedy): the mean milliseconds of a step over
    `steps` consecutive steps, rounded up to whole cycles of a method that evicts every few steps (evict_every), so
    that its evicting steps count as often as they come. Returns (ms, the next token, the next position)."""
    step = PlainStep(model, cache, tok, pos)
    for _ in range(warm_up):
        step()
    every = step_cycle(cache)
    return _time_run(model.device, step, -(-steps // every) * every), step.tok, step.pos


@torch.no_grad()
def measure_plain_decode(model, tokenizer, method: str, budget, context: int, batch: int, steps: int = 32,
                         params: dict | None = None, chunk: int = 512, seed: int = 0,
                         contexts: str = "random") -> list[dict]:
    """The plain path alone (what `model.generate(past_key_values=cache)` runs): a batch of contexts (random tokens
    unless `contexts` names a task: `_prefill_contexts`) prefilled with the method, then the mean decode step over
    whole eviction cycles (`plain_decode_ms`)."""
    from sparse_kv_cache import cache_nbytes
    cache, logits, prefill_s = _prefill_contexts(model, tokenizer, method, budget, context, batch, params, chunk,
                                                 seed, contexts)
    ms, _, _ = plain_decode_ms(model, cache, logits.argmax(-1), context, steps)
    return [{"benchmark": "speed_plain", "method": method, "budget": budget, "context": context, "batch": batch,
             "dtype": _dtype_name(model), "path": "hf_plain", "steps": steps, "decode_ms": ms,
             "tok_s": 1000.0 * batch / ms, "prefill_s": prefill_s, "kv_bytes": cache_nbytes(cache)}]


@torch.no_grad()
def measure_decode_speed(model, tokenizer, method: str, budget, context: int, batch: int, steps: int = 32,
                         plain_steps: int = 10, compile: bool = False, bandwidth_gbs: float = 0.0,
                         params: dict | None = None, chunk: int = 512, seed: int = 0,
                         host_bandwidth_gbs: float = 0.0, contexts: str = "random") -> list[dict]:
    """One speed cell: a batch of contexts (random tokens unless `contexts` names a task: `_prefill_contexts`) is
    prefilled with the method (chunked, the plain path), then decoded by HF's plain loop (`hf_plain`: one forward
    per step through the method's cache) and by the fast path (`fast`: static slots, one CUDA graph per step), and
    for compressed methods by the fast path without the method's scoring and eviction (`fast_bare`: the same slots,
    the oldest entries freed on the method's schedule; the method's share of the step is 1 - bare / fast), and for
    atskv with evict_every > 1 each step variant alone (`variant_ms`: the steps that evict and those that do not,
    with and without scoring).
    Without the plain loop (plain_steps 0) one context is prefilled and the decoder's state repeated to the batch.
    Per path: decode ms per step (plain: the mean of `plain_steps` consecutive steps, none when 0; fast: the mean
    of `steps` consecutive replays; both rounded up to whole cycles of atskv's evict_every), tokens/s, peak device
    memory while decoding, the KV bytes read per step and the memory floor (weights + KV read once at the measured
    bandwidth, plus what a step reads from host memory at the measured host-to-device bandwidth)."""
    from fast_decode import StaticDecoder, memory_floor_ms
    from sparse_kv_cache import cache_nbytes
    dev = model.device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # The fast path alone: one context prefilled, then the decoder's state repeated to the batch (each row holds the
    # same context; a step's work and bytes do not depend on the values). The plain path's batch-64 prefill of
    # ATSKV with external memory took most of a GPU call's minutes (CHANGELOG.md).
    one_row = not plain_steps and batch > 1
    cache, logits, prefill_s = _prefill_contexts(model, tokenizer, method, budget, context, 1 if one_row else batch,
                                                 params, chunk, seed, contexts)
    prefill_peak = _peak(dev)
    _peak_reset(dev)
    if plain_steps:
        plain_ms, tok, pos = plain_decode_ms(model, cache, logits.argmax(-1), context, plain_steps)
    else:   # the fast path alone (--speed_parts fast)
        tok, pos = logits.argmax(-1), context
    base = {"benchmark": "speed", "method": method, "budget": budget, "context": context, "batch": batch,
            "compile": compile, "dtype": _dtype_name(model), "weights_bytes": weights,
            "bandwidth_gbs": bandwidth_gbs, "host_bandwidth_gbs": host_bandwidth_gbs, "prefill_s": prefill_s,
            "prefill_peak_bytes": prefill_peak, "prefill_rows": 1 if one_row else batch}

    def rec(path, ms, kv_read, peak, host_read=0):
        floor = memory_floor_ms(weights, kv_read, bandwidth_gbs) if bandwidth_gbs else None
        if floor is not None and host_read:
            floor = floor + 1000.0 * host_read / (host_bandwidth_gbs * 1e9) if host_bandwidth_gbs else None
        return {**base, "path": path, "decode_ms": ms, "tok_s": 1000.0 * batch / ms, "kv_bytes_read": kv_read,
                "host_bytes_read": host_read, "decode_peak_bytes": peak, "floor_ms": floor,
                "x_floor": ms / floor if floor else None}
    out = [rec("hf_plain", plain_ms, cache_nbytes(cache), _peak(dev))] if plain_steps else []
    every = step_cycle(cache)
    n = -(-steps // every) * every   # whole eviction cycles: a mean over them counts the evicting steps fairly
    dec = StaticDecoder.from_cache(model, method, cache, pos, 2 * n + 4 * every + 16, compile=compile)
    cache = None
    base["attn_kernel"] = dec.attn_kernel   # the Triton decode attention (else SDPA)
    dec.tok.copy_(tok)
    dec.t.zero_()
    if one_row:
        dec = dec.repeated(batch)
    _peak_reset(dev)
    dec.warm_up()  # warm-up steps (and compilation), then each variant of the step captured
    _sync(dev)
    x = dec.extra_nbytes()   # e.g. ATSKV's passive tier: summaries on the device, keys and values on the host
    out.append(rec("fast", _time_run(dev, dec.step, n), dec.kv_bytes() + x["device_read"], _peak(dev),
                   x["host_read"]))
    out[-1].update(extra_device_bytes=x["device"], extra_host_bytes=x["host"])
    def variant_ms():   # atskv with evict_every: each variant's step alone (the evicting one last, so that the
        # state is the one after an eviction again)
        vs = sorted(dec.variants(), key=lambda v: v.partition("/")[0].endswith("evict"))
        return {v: _time_run(dev, lambda: dec.run_variant(v), n) for v in vs} if len(vs) > 1 else None
    out[-1]["variant_ms"] = variant_ms()
    if dec.method != "full":
        dec.set_scoring(False)
        dec.warm_up()
        out.append(rec("fast_bare", _time_run(dev, dec.step, n), dec.kv_bytes(), _peak(dev)))
        out[-1]["variant_ms"] = variant_ms()
    return out


def _one_row_decoder(model, tokenizer, method: str, budget, context: int, params, chunk: int, seed: int,
                     contexts: str, max_steps: int, **decoder_args):
    """One context prefilled with the method (the plain path), its cache taken over by the fast path with the
    context's next token set: a speed measurement repeats this decoder's state to its batch (`repeated`), since a
    step's work and bytes do not depend on the rows' values."""
    from fast_decode import StaticDecoder
    cache, logits, _ = _prefill_contexts(model, tokenizer, method, budget, context, 1, params, chunk, seed, contexts)
    dec = StaticDecoder.from_cache(model, method, cache, context, max_steps, **decoder_args)
    dec.tok.copy_(logits.argmax(-1))
    return dec


@torch.no_grad()
def profile_decode_step(model, tokenizer, method: str, budget, context: int, batch: int, params: dict | None = None,
                        compile: bool = False, steps: int = 2, top: int = 12, chunk: int = 512,
                        seed: int = 0, contexts: str = "random") -> list[dict]:
    """Where a fast decode step's time goes: per variant of the step (atskv with evict_every: the step that evicts
    and the one that does not; compressed methods: also the step without scoring), run eagerly (a replayed CUDA
    graph hides its kernels from the profiler) after two warm-up steps, `steps` steps under torch.profiler (one
    context prefilled, the decoder's state repeated to the batch). On a GPU
    it counts CUDA kernels and their device time, elsewhere CPU operators and their self time."""
    from torch.profiler import ProfilerActivity, profile
    dev = model.device
    cuda = dev.type == "cuda"
    dec = _one_row_decoder(model, tokenizer, method, budget, context, params, chunk, seed, contexts, 8 * (steps + 2),
                           compile=compile, use_graph=False)
    dec = dec.repeated(batch) if batch > 1 else dec
    spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    out = []
    plan = dec.variants()
    if method != "full":
        dec.set_scoring(False)
        plan += dec.variants()
    for variant in plan:
        dec.set_scoring(not variant.startswith("bare"))
        for _ in range(2):
            dec._step(variant)
        _sync(dev)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                dec._step(variant)
            _sync(dev)
        events = [e for e in prof.key_averages() if spent(e) > 0]
        events.sort(key=lambda e: -spent(e))
        out.append({"benchmark": "speed_profile", "method": method, "budget": budget, "context": context,
                    "batch": batch, "variant": variant, "unit": "CUDA kernels" if cuda else "CPU operators",
                    "dtype": _dtype_name(model), "compile": compile,
                    "per_step": sum(e.count for e in events) / steps,
                    "ms_per_step": sum(spent(e) for e in events) / steps / 1000,
                    "top": [{"name": e.key[:120], "ms_per_step": spent(e) / steps / 1000, "per_step": e.count / steps}
                            for e in events[:top]]})
    return out


def _host_room() -> int:
    """60% of the machine's memory: what a pinned host tier may take (pinned pages cannot be swapped out)."""
    import os
    return int(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@torch.no_grad()
def largest_decode_batch(model, tokenizer, method: str, budget, context: int, params: dict | None = None,
                         start: int = 64, limit: int = 1 << 16, chunk: int = 512,
                         host_limit_bytes: int | None = None) -> dict:
    """The largest batch whose decode state fits in the device's memory beside the weights (and whose host-memory
    state, ATSKV's passive tier, fits in `host_limit_bytes`: default 60% of the machine's memory): one random-token
    context is prefilled (the plain path), its slot cache is repeated to batch B and two decode steps run; B doubles
    from `start` until memory runs out, then a bisection narrows it to within 3%. With a host tier the batch its
    room allows is tried first: if the device holds it, it is the answer, exact. Prefill is not part of it (a
    serving system prefills in micro-batches)."""
    import gc
    dev = model.device
    one = _one_row_decoder(model, tokenizer, method, budget, context, params, chunk, 0, "random", 8, use_graph=False)
    per_seq = one.kv_bytes()

    extra = one.extra_nbytes()
    host_room = host_limit_bytes if host_limit_bytes is not None else _host_room()

    def fits(b: int) -> bool:
        if b * extra["host"] > host_room:   # the pinned host tier would not fit beside the rest of the machine
            return False
        dec = None
        try:
            dec = one.repeated(b)
            dec.step()
            dec.step()
            _sync(dev)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del dec
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                # torch caches freed pinned host memory (a host tier) for reuse: without this each larger trial
                # pinned its tier beside the cached ones until the machine ran out of memory
                empty_host = getattr(torch.accelerator, "empty_host_cache", None) or \
                    getattr(torch._C, "_host_emptyCache", None)
                if empty_host is not None:
                    empty_host()
    lo, hi = 0, None   # hi: the smallest batch refused (host memory is the bound when its host tier did not fit)
    host_cap = host_room // extra["host"] if extra["host"] else None
    if host_cap is not None and start <= host_cap <= limit and fits(host_cap):
        # the host tier's room is the bound if the device holds that many: one trial instead of a search whose
        # every trial pins tens of GB of host memory (minutes at 8K)
        lo, hi = host_cap, host_cap + 1
    else:
        b = start
        while b <= limit:
            if fits(b):
                lo, b = b, b * 2
            else:
                hi = b
                break
    while hi is not None and hi - lo > max(1, lo // 33):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    return {"benchmark": "speed_max_batch", "method": method, "budget": budget, "context": context,
            "max_batch": lo, "limit_reached": hi is None, "kv_bytes_per_sequence": per_seq,
            "extra_device_bytes_per_sequence": extra["device"], "host_bytes_per_sequence": extra["host"],
            "host_limit_bytes": host_room, "host_bound": hi is not None and hi * extra["host"] > host_room,
            "device_memory_bytes": total, "dtype": _dtype_name(model)}


@torch.no_grad()
def check_fast_answers(model, tokenizer, method: str, budget, samples: list[Sample], chunk: int = 512,
                       compile: bool = False, params: dict | None = None) -> dict:
    """The synthetic benchmark through the plain loop and through the fast path: the same prompts, prefill and
    stop rules. Returns how many predictions are identical and both scores."""
    same, sp, sf = 0, 0.0, 0.0
    diffs = []
    for s in samples:
        ctx_ids, q_ids = encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
        preds = []
        for fast in (False, True):
            cache, _ = make_cache(method, model, budget, len(ctx_ids), params, tokenizer)
            r = run_generation(model, tokenizer, cache, ctx_ids, q_ids, MAX_NEW_TOKENS.get(s.task, 16),
                               chunk=chunk, stop_when=answer_complete(s), fast=fast, compile=compile)
            preds.append(r["prediction"])
        same += preds[0] == preds[1]
        sp += score_synthetic(s, preds[0])
        sf += score_synthetic(s, preds[1])
        if preds[0] != preds[1]:
            diffs.append({"id": s.id, "plain": preds[0], "fast": preds[1]})
    n = len(samples)
    return {"benchmark": "speed_answers", "method": method, "budget": budget, "task": samples[0].task if n else "",
            "context": samples[0].context_size if n else 0, "n": n, "same": same,
            "score_plain": 100 * sp / max(1, n), "score_fast": 100 * sf / max(1, n), "differences": diffs[:5],
            "dtype": _dtype_name(model)}


SPEED_PARTS = ("timing", "fast", "plain", "max_batch", "answers", "profile")


def run_speed_benchmark(args, methods, budgets, sizes, batches, parts, kernels_off) -> int:
    """--benchmark speed: one record per (method, budget, context, batch, path) appended to results.jsonl as it
    finishes (a rerun resumes), then the report's speed section. methods: (label as given, method, parameters)."""
    import json
    import sys
    from pathlib import Path

    import kernels
    from evals.records import cell_key, environment_info, finished_keys, write_report
    from evals.synthetic import synthetic_samples
    from utils import UserError, append_jsonl, load_model_and_tokenizer
    kernels.switch_off(kernels_off)
    out_dir = Path(args.output_dir)
    results_path = out_dir / "results.jsonl"
    if args.overwrite and results_path.exists():
        results_path.unlink()
    done = finished_keys(results_path)
    model, tok = load_model_and_tokenizer(args.model_name, device=args.device, use_fp16=args.use_fp16)
    env = environment_info(model, args.model_name)
    if "max_batch" in parts and model.device.type != "cuda":
        raise UserError(f"--speed_parts max_batch searches the device's memory: it needs a CUDA device, not "
                        f"{model.device}")
    bw = args.bandwidth_gbs or device_bandwidth_gbs(model.device)
    host_bw = host_bandwidth_gbs(model.device)
    print(f"[atskv] speed benchmark on {env['hardware']} ({env['dtype']}), bandwidth {bw:.0f} GB/s "
          f"{'(given)' if args.bandwidth_gbs else '(measured)'}, host to device {host_bw:.0f} GB/s -> "
          f"{results_path}", file=sys.stderr)

    def save(spec: dict, fn) -> None:
        key = cell_key(spec)
        if f"{key}-0" in done:  # finished in an earlier run
            return
        t = time.perf_counter()
        try:
            recs = fn()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            recs = [{**spec, "status": "error", "error": "out of memory"}]
        except Exception as e:   # recorded as failed (a rerun tries it again); the other cells still run
            traceback.print_exc()
            line = (str(e).strip().splitlines() or [""])[0][:300]
            recs = [{**spec, "status": "error", "error": f"{type(e).__name__}: {line}"}]
            print(f"[atskv] {spec['method']} failed: {recs[0]['error']}", file=sys.stderr)
        for i, r in enumerate(recs):
            r.setdefault("compile", args.compile)
            if "paths" in spec:   # --speed_parts fast: the fast path alone
                r["paths"] = spec["paths"]
            if kernels_off:
                r["kernels_off"] = kernels_off
            if "contexts" in spec:
                r["contexts"] = spec["contexts"]
            r.update(method=spec["method"], base_method=spec["base_method"], params=spec["params"])
            r.update(cell=f"{key}-{i}", status=r.get("status", "ok"), model=args.model_name, env=env,
                     wall_s=time.perf_counter() - t, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
            append_jsonl(results_path, r)
            if r["status"] == "ok" and r["benchmark"] == "speed":
                print(f"[atskv] {r['method']:>14}{' (off: ' + ','.join(kernels_off) + ')' if kernels_off else ''} "
                      f"@ {str(r['budget']):>4} ctx {r['context']:>5} batch "
                      f"{r['batch']:>4} {r['path']:>9}: {r['decode_ms']:8.2f} ms/step {r['tok_s']:9.0f} tok/s "
                      f"floor {r['floor_ms']:.2f} ms (x{r['x_floor']:.1f})", file=sys.stderr)
            elif r["status"] == "ok" and r["benchmark"] == "speed_plain":
                print(f"[atskv] {r['method']:>14} @ {str(r['budget']):>4} ctx {r['context']:>5} batch {r['batch']:>4} "
                      f"plain path: {r['decode_ms']:8.2f} ms/step {r['tok_s']:9.1f} tok/s", file=sys.stderr)
            elif r["status"] == "ok" and r["benchmark"] == "speed_profile":
                print(f"[atskv] profile {r['method']} @ {r['budget']} ctx {r['context']} batch {r['batch']} "
                      f"{r['variant']}: {r['per_step']:.0f} {r['unit']} per step, {r['ms_per_step']:.2f} ms; top: "
                      + "; ".join(f"{t['name'][:50]} {t['ms_per_step']:.3f} ms x{t['per_step']:.0f}"
                                  for t in r["top"][:5]), file=sys.stderr)
            elif r["status"] == "ok":
                print(f"[atskv] {json.dumps({k: v for k, v in r.items() if k not in ('env', 'cell')})}",
                      file=sys.stderr)
    common = {"model": args.model_name, "dtype": env["dtype"], "compile": args.compile, "device": env["hardware"]}
    if kernels_off:   # only then: the cells of earlier runs keep their keys
        common["kernels_off"] = kernels_off
    if args.speed_contexts != "random":   # the same
        common["contexts"] = args.speed_contexts

    def cells(benchmark: str, **fields):
        """(spec, method, params, budget) per method and budget (full once, without one)."""
        for label, m, params in methods:
            for budget in ([None] if m == "full" else budgets):
                yield ({**common, "benchmark": benchmark, "method": label, "base_method": m, "params": params,
                        "budget": budget, **fields}, m, params, budget)
    try:
        for part in ("timing", "fast"):   # fast: the fast path's records alone, without HF's plain loop
            only = {"paths": "fast"} if part == "fast" else {}
            for size in sizes if part in parts else []:
                for batch in batches:
                    for spec, m, params, budget in cells("speed", context=size, batch=batch, steps=args.decode_steps,
                                                         **only):
                        save(spec, lambda: measure_decode_speed(
                            model, tok, m, budget, size, batch, steps=args.decode_steps, compile=args.compile,
                            bandwidth_gbs=bw, params=params, chunk=args.prefill_chunk, seed=args.seed,
                            plain_steps=0 if only else 10, host_bandwidth_gbs=host_bw, contexts=args.speed_contexts))
        for size in sizes if "plain" in parts else []:
            for batch in batches:
                for spec, m, params, budget in cells("speed_plain", context=size, batch=batch, steps=args.decode_steps):
                    save(spec, lambda: measure_plain_decode(model, tok, m, budget, size, batch, args.decode_steps,
                                                               params=params, chunk=args.prefill_chunk,
                                                               seed=args.seed, contexts=args.speed_contexts))
        for size in sizes if "profile" in parts else []:
            for batch in batches:
                for spec, m, params, budget in cells("speed_profile", context=size, batch=batch):
                    save(spec, lambda: profile_decode_step(model, tok, m, budget, size, batch, params,
                                                              compile=args.compile, chunk=args.prefill_chunk,
                                                              seed=args.seed, contexts=args.speed_contexts))
        if "max_batch" in parts:
            for spec, m, params, budget in cells("speed_max_batch", context=max(sizes)):
                save(spec, lambda: [largest_decode_batch(model, tok, m, budget, max(sizes), params,
                                                            chunk=args.prefill_chunk)])
        if "answers" in parts:
            samples = synthetic_samples(tok, "needle", min(sizes), args.check_answers, args.seed)
            for spec, m, params, budget in cells("speed_answers", context=min(sizes), n=args.check_answers,
                                                 seed=args.seed):
                save(spec, lambda: [check_fast_answers(model, tok, m, budget, samples, args.prefill_chunk,
                                                          compile=args.compile, params=params)])
    except KeyboardInterrupt:
        write_report(out_dir, args)
        print("[atskv] interrupted: finished records kept", file=sys.stderr)
        return 130
    write_report(out_dir, args)
    print(f"[atskv] results: {out_dir / 'results.md'}", file=sys.stderr)
    return 0

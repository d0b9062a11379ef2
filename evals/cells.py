"""One cell of a sweep: its samples, its run and its record, whoever runs it (the serial sweep in evals/sweep.py, a
Ray worker in evals/ray_sweep.py)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from evals.records import cell_key, environment_info
from utils import UserError, append_jsonl, read_jsonl


def load_for_sweep(args, sizes) -> tuple:
    """(model, tokenizer, its context limit, env): the model the sweep's cells run on, its sizes checked."""
    from utils import load_model_and_tokenizer, model_max_length
    model, tok = load_model_and_tokenizer(args.model_name, device=args.device, use_fp16=args.use_fp16,
                                          device_map=args.device_map)
    limit = model_max_length(model)
    for s in sizes:
        if limit and s > limit:
            raise UserError(f"context size {s} exceeds the model's limit of {limit} tokens")
    return model, tok, limit, environment_info(model, args.model_name)


def mark_unavailable(results_path: Path, bench: str, reason: str, unavailable: set[str]) -> None:
    unavailable.add(bench)
    skip_benchmark(results_path, bench, reason)
    print(f"\n[atskv] skipping {bench}: {reason}", file=sys.stderr)


def cell_name(cell: dict) -> str:
    """method|budget|task|context: what the progress bar shows and what ATSKV_INJECT_FAULT's substring matches."""
    budget = "100%" if cell["budget"] is None else cell["budget"]
    return f"{cell['method']}|{budget}|{cell['task']}|{cell['context_size']}"


def cell_samples(tok, args, cell: dict, samples_cache: dict):
    """The cell's samples, made once per (benchmark, task, context) and kept in samples_cache; raises UserError
    when the benchmark cannot be loaded."""
    import evals.real_benchmarks as real
    import evals.synthetic as synthetic
    bench = cell["benchmark"]
    key = (bench, cell["task"], cell["context_size"] if bench == "synthetic" else 0)
    if key not in samples_cache:
        from utils import set_seed
        set_seed(args.seed)
        samples_cache[key] = synthetic.synthetic_samples(
            tok, cell["task"], cell["context_size"], args.num_samples, args.seed,
            haystack_dir=args.haystack_dir) if bench == "synthetic" else \
            real.real_samples(bench, cell["task"], args.data_dir, args.num_samples)
    return samples_cache[key]


def run_cell(model, tok, args, cell: dict, samples, env: dict, limit, fault: str, command: str,
             results_path: Path) -> dict:
    """One cell's record: its scores, or status "error" with the exception's first line (a fault inside one cell is
    recorded there; the sweep goes on). fault: ATSKV_INJECT_FAULT (`injected`)."""
    import torch
    from utils import set_seed
    inject = injected(fault, cell)
    set_seed(args.seed)
    import evals.speed as speed
    record = cell_header(cell, command, env, speed.timing_probe(model.device))
    t0 = time.perf_counter()
    try:
        if args.use_api:
            record.update(run_api_cell(args, cell, samples, limit, (model, tok), results_path))
            where = f" at {args.api_base_url}" if args.api_base_url else ""
            record["env"] = {"device": "api", "hardware": f"{cell['model']} via {api_client(args).provider} API{where}"}
        else:
            per_sample = run_samples_saved(model, tok, cell, samples, limit, inject,
                                           partial_path(results_path, cell), env.get("commit"))
            record.update(summarize_cell(cell, per_sample, limit))
        record.setdefault("status", "ok")
    except Exception as e:
        record.update(status="error", error=error_line(e))
        print(f"\n[atskv] cell {cell_name(cell)} failed: {record['error']} (recorded; the sweep goes on)",
              file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - t0
    return record


def injected(fault: str, cell: dict, part=None) -> str | None:
    """ATSKV_INJECT_FAULT, "<kind>:<substring of cell_name>", several separated by spaces (a testing hook): the
    kind of fault this cell gets. Under --ray a part of a cell's samples is named with "#<index>" per sample, so
    that "kill:snapkv|0.25|needle|128#1" hits only the part that starts with sample 1. Kind "kill" ends the process at
    once (a worker killed mid-sweep); the others are raised inside the cell by the harness (oom, nan)."""
    name = cell_name(cell) + "".join(f"#{k}" for k in (part or []))
    kinds = [f.split(":", 1)[0] for f in fault.split() if f.split(":", 1)[-1] in name]
    kind = kinds[0] if kinds else None
    if kind == "kill":
        os._exit(137)
    return kind


def cell_header(cell: dict, command: str, env: dict | None = None, timing_probe: dict | None = None,
                when: str | None = None) -> dict:
    """What every record of a cell starts with (the serial sweep's and the Ray driver's alike)."""
    head = {"cell": cell_key(cell), **cell, "time": when or time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command}
    return head | ({"env": env} if env is not None else {}) | \
        ({"timing_probe": timing_probe} if timing_probe is not None else {})


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def run_samples(model, tok, cell: dict, samples, limit, inject: str | None = None) -> list[dict]:
    """Each of `samples`' results in this cell (a local model; `summarize_cell` makes the record of them)."""
    import evals.real_benchmarks as real
    from evals.harness import run_synthetic_samples
    fast = cell.get("fast_decode", False)
    if cell["benchmark"] == "synthetic":
        return run_synthetic_samples(model, tok, cell["base_method"], cell["budget"], samples, cell["eval_mode"],
                                     cell["prefill_chunk"], cell["params"], fault=inject, fast=fast)
    return real.run_real_samples(model, tok, cell["base_method"], cell["budget"], samples, cell["eval_mode"],
                                 cell["prefill_chunk"], max_prompt_tokens(cell, limit), cell["params"], fault=inject,
                                 fast=fast)


def partial_path(results_path: Path, cell: dict) -> Path:
    """Where a cell's finished samples wait until its record is written (`run_samples_saved`)."""
    return results_path.parent / "partial" / f"{cell_key(cell)}.jsonl"


def run_samples_saved(model, tok, cell: dict, samples, limit, inject, path: Path, commit) -> list[dict]:
    """`run_samples` one sample at a time, each result appended to `path` as it finishes, so that a cell stopped
    midway (a job's time limit, Ctrl-C, an error in a later sample) goes on from its next sample when the sweep is
    run again; results written at another commit are not reused. The sweep deletes the file once the cell's
    finished record is written."""
    done = {r["id"]: r["result"] for r in read_jsonl(path, warn=False) if r.get("commit") == commit}
    out = []
    for s in samples:
        if s.id not in done:
            (done[s.id],) = run_samples(model, tok, cell, [s], limit, inject)
            append_jsonl(path, {"id": s.id, "commit": commit, "result": done[s.id]})
        out.append(done[s.id])
    return out


def summarize_cell(cell: dict, per_sample: list[dict], limit) -> dict:
    """The cell's scores and bytes from its samples' results, however many parts they ran in."""
    import evals.real_benchmarks as real
    from evals.harness import summarize_samples
    if cell["benchmark"] == "synthetic":
        return summarize_samples(per_sample)
    return {"max_prompt_tokens": max_prompt_tokens(cell, limit), **real.summarize_real(per_sample)}


def max_prompt_tokens(cell: dict, limit: int | None) -> int:
    """A LongBench / ZeroSCROLLS prompt's truncation length: the cell's context size, so far as the prompt, the chat
    wrapper and the task's generation still fit in the model's window."""
    import evals.real_benchmarks as real
    gen = (real.LONGBENCH_MAX_NEW_TOKENS if cell["benchmark"] == "longbench" else real.ZEROSCROLLS_MAX_NEW_TOKENS)
    return min(cell["context_size"], (limit or 10 ** 9) - max(gen.get(cell["task"], 0), 1) - 64)


_CLIENT = {}


def api_client(args):
    import api_models
    if "c" not in _CLIENT:
        _CLIENT["c"] = api_models.APIClient(api_models.APIConfig(
            args.api_model, args.api_base_url, args.api_timeout, args.api_max_retries, args.api_concurrency))
    return _CLIENT["c"]


def run_api_cell(args, cell: dict, samples, limit, scorer, results_path: Path) -> dict:
    """One cell through the API; the samples an earlier run of this cell answered are reused, so a rerun asks
    again only the requests that failed."""
    import api_models
    previous = {}
    for r in read_jsonl(results_path):
        if r.get("cell") == cell_key(cell):
            previous.update({s["id"]: s for s in r.get("samples", []) if s.get("status") == "ok"})
    max_prompt = None if cell["benchmark"] == "synthetic" else max_prompt_tokens(cell, limit)
    out = api_models.evaluate_api_cell(api_client(args), cell["base_method"], cell["budget"], samples, max_prompt,
                                       scorer=scorer, tokenizer=scorer[1], previous=previous)
    if out["status"] != "ok":
        print(f"\n[atskv] {cell['method']}|{cell['task']}: {out['error']} (recorded; the sweep goes on)",
              file=sys.stderr)
    return out


def skip_benchmark(results_path: Path, bench: str, reason: str, tasks: list[str] | None = None) -> None:
    """A skipped benchmark (or some of its tasks) is a record too, so that --report_only can still say what was
    skipped and why."""
    append_jsonl(results_path, {"cell": f"skipped:{bench}" + (":" + ",".join(tasks) if tasks else ""),
                                "status": "skipped", "benchmark": bench, "tasks": tasks, "reason": reason,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job): handled as Ctrl-C is, so that the report of what finished is written."""


_SIGTERM = {"received": False}


def stop_on_sigterm() -> None:
    import signal
    _SIGTERM["received"] = False

    def handler(signum, frame):
        _SIGTERM["received"] = True
        raise Terminated()
    signal.signal(signal.SIGTERM, handler)


def interrupted_code(e: KeyboardInterrupt) -> int:
    """The exit code of an interrupted sweep: 143 after SIGTERM, 130 after Ctrl-C. Ray's waits turn the handler's
    Terminated into a plain KeyboardInterrupt, hence the flag."""
    return 143 if isinstance(e, Terminated) or _SIGTERM["received"] else 130

"""The sweep behind `python run_experiment.py`: methods x budgets x context sizes x tasks as cells, run one by one
(each appended to results.jsonl as it finishes, so that a rerun resumes and an interrupted or failing run loses no
finished cell), then the report."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from evals.records import cell_key, command_line, environment_info, finished_keys, write_report
from utils import UserError, append_jsonl, read_jsonl


def parse_method(spec: str) -> tuple[str, dict]:
    """The library's method-spec grammar (KVCacheFactory.parse_spec), unchecked: API model names pass too."""
    from sparse_kv_cache import KVCacheFactory
    return KVCacheFactory.parse_spec(spec, check=False)


def tasks_for(bench: str, args, opts: dict) -> list[str]:
    """Synthetic: the --tasks that are synthetic. A real benchmark: the --tasks that belong to it, else every task
    that --data_dir holds (or all of them, from the hub)."""
    from evals.real_benchmarks import REAL_TASKS, available_real_tasks
    from evals.synthetic import SYNTHETIC_TASKS
    if bench == "synthetic":
        asked = [t for t in opts["tasks"] if t in SYNTHETIC_TASKS]
        return asked or list(args.synthetic_tasks)
    asked = [t for t in opts["tasks"] if t in REAL_TASKS[bench]]
    present = available_real_tasks(bench, args.data_dir)
    if not asked:
        return present
    missing = [t for t in asked if t not in present]
    if missing:  # asked for, but not in --data_dir: said in the report, the rest runs
        skip_benchmark(Path(args.output_dir) / "results.jsonl", bench, f"task(s) {', '.join(missing)} not in "
                       f"--data_dir {args.data_dir!r}", tasks=missing)
    return [t for t in asked if t in present]


def with_cli_defaults(method: str, params: dict, args) -> dict:
    """A method's parameters with --external_memory and --passive_limit applied where the method has them and the
    spec did not set them."""
    from sparse_kv_cache import KVCacheFactory, method_params
    fields = method_params(method) if method in KVCacheFactory.known_methods() else {}
    out = dict(params)
    if args.external_memory and "external_memory" in fields:
        out.setdefault("external_memory", True)
    if args.passive_limit is not None and "passive_limit" in fields:
        out.setdefault("passive_limit", args.passive_limit)
    return out


def plan_cells(args, opts: dict) -> list[dict]:
    cells = []
    for bench in opts["benchmarks"]:
        for task in tasks_for(bench, args, opts):
            for size in opts["sizes"]:
                for spec in opts["methods"]:
                    method, params = parse_method(spec)
                    params = with_cli_defaults(method, params, args)
                    label = method if not params else \
                        method + "[" + ";".join(f"{k}={json.dumps(v)}" for k, v in sorted(params.items())) + "]"
                    for budget in ([None] if method == "full" else opts["budgets"]):
                        cell = {"model": args.model_name, "method": label, "base_method": method,
                                "params": params, "budget": budget,
                                "benchmark": bench, "task": task, "context_size": size,
                                "num_samples": args.num_samples, "seed": args.seed,
                                "eval_mode": args.eval_mode, "prefill_chunk": args.prefill_chunk}
                        if args.use_api:  # the hosted model answers; the local model only scores (atskv)
                            cell.update(model=args.api_model, api=True, api_base_url=args.api_base_url,
                                        scorer=args.model_name)
                        if args.fast_decode and not args.use_api:  # (absent otherwise: old cells keep their keys)
                            cell["fast_decode"] = True
                        if bench == "synthetic":
                            cell["haystack_dir"] = args.haystack_dir
                        else:  # for LongBench / ZeroSCROLLS the context size is the prompt's truncation length
                            cell["data_dir"] = str(Path(args.data_dir).resolve()) if args.data_dir else "hub"
                        cells.append(cell)
    return cells


def run_sweep(args, opts: dict) -> int:
    import torch
    from tqdm import tqdm

    import evals.real_benchmarks as real
    import evals.speed as speed
    import evals.synthetic as synthetic
    from evals.harness import evaluate_synthetic_cell
    from utils import load_model_and_tokenizer, model_max_length, set_seed

    out_dir = Path(args.output_dir)
    results_path = out_dir / "results.jsonl"
    if args.overwrite and results_path.exists():
        results_path.unlink()
    cells = plan_cells(args, opts)
    for b in [b for b in opts["benchmarks"] if b != "synthetic"]:  # a real benchmark with no task to run (its files are not in --data_dir) is skipped, said why
        if not any(c["benchmark"] == b for c in cells):
            skip_benchmark(results_path, b, f"--data_dir {args.data_dir!r} holds none of its files "
                           f"({real.REAL_FILE_HINT[b]})")
    done = finished_keys(results_path)
    todo = [c for c in cells if cell_key(c) not in done]
    print(f"[atskv] {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run "
          f"-> {results_path}", file=sys.stderr)
    if not todo:
        write_report(out_dir, args)
        return nothing_ran(opts, cells)
    model, tok = load_model_and_tokenizer(args.model_name, device=args.device, use_fp16=args.use_fp16,
                                          device_map=args.device_map)
    limit = model_max_length(model)
    for s in opts["sizes"]:
        if limit and s > limit:
            raise UserError(f"context size {s} exceeds the model's limit of {limit} tokens")
    env = environment_info(model, args.model_name)
    fault = os.environ.get("ATSKV_INJECT_FAULT", "")  # testing hook: "oom:<substring of the cell's name>"
    interrupted = False
    samples_cache: dict = {}
    unavailable: set[str] = set()
    bar = tqdm(todo, desc="sweep", unit="cell", file=sys.stderr)
    stop_on_sigterm()
    try:  # Ctrl-C or SIGTERM anywhere in the loop (not only inside a cell) still ends with the report written
        for cell in bar:
            budget = "100%" if cell["budget"] is None else cell["budget"]
            name = f"{cell['method']}|{budget}|{cell['task']}|{cell['context_size']}"
            bar.set_postfix_str(name)
            bench = cell["benchmark"]
            if bench in unavailable:
                continue
            set_seed(args.seed)
            key = (bench, cell["task"], cell["context_size"] if bench == "synthetic" else 0)
            if key not in samples_cache:
                try:
                    samples_cache[key] = synthetic.synthetic_samples(
                        tok, cell["task"], cell["context_size"], args.num_samples, args.seed,
                        haystack_dir=args.haystack_dir) if bench == "synthetic" else \
                        real.real_samples(bench, cell["task"], args.data_dir, args.num_samples)
                except UserError as e:  # e.g. the hub is unreachable: the rest of the sweep still runs
                    unavailable.add(bench)
                    skip_benchmark(results_path, bench, str(e))
                    print(f"\n[atskv] skipping {bench}: {e}", file=sys.stderr)
                    continue
            inject = fault.split(":", 1)[0] if fault and fault.split(":", 1)[-1] in name else None
            record = {"cell": cell_key(cell), **cell, "env": env, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "timing_probe": speed.timing_probe(model.device), "command": command_line()}
            t0 = time.perf_counter()
            try:
                if args.use_api:
                    record.update(run_api_cell(args, cell, samples_cache[key], limit, (model, tok), results_path))
                    where = f" at {args.api_base_url}" if args.api_base_url else ""
                    record["env"] = {"device": "api",
                                     "hardware": f"{cell['model']} via {api_client(args).provider} API{where}"}
                elif bench == "synthetic":
                    record.update(evaluate_synthetic_cell(
                        model, tok, cell["base_method"], cell["budget"], samples_cache[key], cell["eval_mode"],
                        cell["prefill_chunk"], cell["params"], fault=inject, fast=cell.get("fast_decode", False)))
                else:
                    record["max_prompt_tokens"] = max_prompt_tokens(cell, limit)
                    record.update(real.evaluate_real_cell(model, tok, cell["base_method"], cell["budget"],
                                                        samples_cache[key], cell["eval_mode"], cell["prefill_chunk"],
                                                        record["max_prompt_tokens"], cell["params"], fault=inject,
                                                        fast=cell.get("fast_decode", False)))
                record.setdefault("status", "ok")
            except Exception as e:  # a fault inside one cell is recorded there; the sweep goes on
                record.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print(f"\n[atskv] cell {name} failed: {record['error']} (recorded; the sweep goes on)",
                      file=sys.stderr)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            record["wall_s"] = time.perf_counter() - t0
            append_jsonl(results_path, record)
    except KeyboardInterrupt as e:
        interrupted = 143 if isinstance(e, Terminated) else 130
    bar.close()
    write_report(out_dir, args)
    if interrupted:
        print("[atskv] interrupted: finished cells are saved; rerun the same command to resume", file=sys.stderr)
        return interrupted
    return nothing_ran(opts, cells, unavailable)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job): handled as Ctrl-C is, so that the report of what finished is written."""


def stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, handler)


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


def nothing_ran(opts: dict, cells: list[dict], unavailable: set[str] = frozenset()) -> int:
    """A sweep that asked only for benchmarks that could not be loaded fails; otherwise the rest has run."""
    runnable = [c for c in cells if c["benchmark"] not in unavailable]
    if not runnable:
        raise UserError(f"nothing to run: {', '.join(opts['benchmarks'])} could not be loaded (see results.md); "
                        f"pass --data_dir with the benchmarks' jsonl files or run where the Hugging Face hub is "
                        f"reachable")
    return 0



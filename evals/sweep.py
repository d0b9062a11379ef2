"""The sweep behind `python run_experiment.py`: methods x budgets x context sizes x tasks as cells, run one by one
(each appended to results.jsonl as it finishes, so that a rerun resumes and an interrupted or failing run loses no
finished cell), then the report."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from evals.cells import (cell_name, cell_samples, interrupted_code, load_for_sweep, mark_unavailable, partial_path,
                         run_cell, skip_benchmark, stop_on_sigterm)
from evals.records import cell_key, command_line, finished_keys, write_report
from utils import UserError, append_jsonl


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
    import evals.real_benchmarks as real
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
    unavailable: set[str] = set()   # benchmarks that could not be loaded: skipped, said why, the rest runs
    stop_on_sigterm()
    try:  # Ctrl-C or SIGTERM anywhere (not only inside a cell) still ends with the report written
        if args.ray is not None:
            from evals.ray_sweep import run_on_ray
            run_on_ray(args, opts, todo, results_path, unavailable)
        else:
            run_serially(args, opts, todo, results_path, unavailable)
        interrupted = 0
    except KeyboardInterrupt as e:
        interrupted = interrupted_code(e)
    write_report(out_dir, args)
    if interrupted:
        print("[atskv] interrupted: finished cells are saved; rerun the same command to resume", file=sys.stderr)
        return interrupted
    return nothing_ran(opts, cells, unavailable)


def run_serially(args, opts: dict, todo: list[dict], results_path: Path, unavailable: set[str]) -> None:
    """The cells one after another in this process, each appended to results.jsonl as it finishes."""
    from tqdm import tqdm
    model, tok, limit, env = load_for_sweep(args, opts["sizes"])
    fault = os.environ.get("ATSKV_INJECT_FAULT", "")  # testing hook: "oom:<substring of the cell's name>"
    samples_cache: dict = {}
    with tqdm(todo, desc="sweep", unit="cell", file=sys.stderr) as bar:
        for cell in bar:
            bar.set_postfix_str(cell_name(cell))
            if cell["benchmark"] in unavailable:
                continue
            try:
                samples = cell_samples(tok, args, cell, samples_cache)
            except UserError as e:  # e.g. the hub is unreachable: the rest of the sweep still runs
                mark_unavailable(results_path, cell["benchmark"], str(e), unavailable)
                continue
            record = run_cell(model, tok, args, cell, samples, env, limit, fault, command_line(), results_path)
            append_jsonl(results_path, record)
            if record["status"] == "ok":   # its samples are in the record now (a failed cell keeps them for a rerun)
                partial_path(results_path, cell).unlink(missing_ok=True)


def nothing_ran(opts: dict, cells: list[dict], unavailable: set[str] = frozenset()) -> int:
    """A sweep that asked only for benchmarks that could not be loaded fails; otherwise the rest has run."""
    runnable = [c for c in cells if c["benchmark"] not in unavailable]
    if not runnable:
        raise UserError(f"nothing to run: {', '.join(opts['benchmarks'])} could not be loaded (see results.md); "
                        f"pass --data_dir with the benchmarks' jsonl files or run where the Hugging Face hub is "
                        f"reachable")
    return 0



"""Sweep methods x budgets x context sizes x benchmarks, append each finished cell to results.jsonl, write the report.

    python run_experiment.py                      # quick sweep on the embedded default model -> outputs/results.md
    python run_experiment.py --report_only --output_dir outputs   # rebuild the report from results.jsonl

Every option is listed by --help and in the README.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from utils import DEFAULT_MODEL, UserError, append_jsonl, check_device, check_model_name, parse_budget, read_jsonl

BENCHMARKS = ("synthetic", "longbench", "zeroscrolls")
MIN_CONTEXT = 128
DEFAULT_MAX_SEQ_LEN = 8192
# A preset fills the sweep options that are not given on the command line. "quick" (the default) shows the
# toolkit's point within minutes on a laptop CPU; "paper" is the sweep behind the published tables.
PRESETS = {
    "quick": {"methods": "full,sliding_window,snapkv,atskv,atskv[external_memory=true]", "budgets": "0.25,0.1",
              "context_sizes": "2048", "synthetic_tasks": "needle", "num_samples": 5},
    "paper": {"methods": "full,sliding_window,snapkv,h2o,pyramidkv,dynamic_kv,atskv,atskv[external_memory=true]",
              "budgets": "0.5,0.25,0.1", "context_sizes": "2048,4096,8192",
              "synthetic_tasks": "needle,multi_key,multi_value,multi_question", "num_samples": 20},
}
PRESET_OPTIONS = ("methods", "budgets", "context_sizes", "num_samples")


def apply_preset(args) -> None:
    """Options left out take the preset's value; the synthetic tasks too, when --tasks is not given."""
    if args.preset not in PRESETS:
        raise UserError(f"unknown --preset {args.preset!r}; accepted: {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    for name in PRESET_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.synthetic_tasks = tuple(split_list(preset["synthetic_tasks"]))


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless its text already says it or there is none (a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_experiment.py", formatter_class=HelpWithDefaults,
                                description="ATSKV: KV-cache compression sweeps on Hugging Face causal LMs")
    a = p.add_argument
    preset_help = lambda name: f" (default: the preset's; quick: {PRESETS['quick'][name]}, paper: {PRESETS['paper'][name]})"  # noqa: E731,E501
    a("--preset", default="quick", help="sweep size for the options not given: quick (a first run, minutes on a "
      "laptop CPU) or paper (the full tables: more methods, budgets, context sizes, tasks and samples)")
    a("--model_name", default=DEFAULT_MODEL, help=f"'{DEFAULT_MODEL}' (embedded default), a hub id, a local "
      "directory or a .gguf file")
    a("--max_seq_len", type=int, default=None, help="largest prompt length in tokens (default: the model's limit)")
    a("--use_fp16", action="store_true", help="half precision (bf16 where supported) on CUDA; CPU stays fp32")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    a("--methods", default=None,
      help="comma list: full, sliding_window, snapkv, h2o, pyramidkv, dynamic_kv, rocket_kv, atskv, "
      "kvpress:<press>; parameters in brackets, separated by ';', e.g. atskv[external_memory=true;span=5]"
      + preset_help("methods"))
    a("--budgets", default=None, help="comma list of KV budgets: fractions of the context (0.25) "
      "or tokens per layer (512); 'full' ignores them" + preset_help("budgets"))
    a("--external_memory", action="store_true", help="give every atskv method the external memory (passive "
      "store + recall)")
    a("--passive_limit", type=int, default=None, help="entries per layer the passive store may hold (default: "
      "unlimited)")
    a("--train_predictor", action="store_true", help="(re)train ATSKV's relevance predictor for --model_name, "
      "print its held-out ranking quality, and exit")
    a("--calibration_file", default=None, help="text file to train the predictor on (default: text the model "
      "generates itself)")
    a("--context_sizes", default=None, help="comma list of context sizes in tokens; for LongBench and "
      "ZeroSCROLLS, the prompt's truncation length" + preset_help("context_sizes"))
    a("--benchmarks", default="synthetic", help=f"comma list of {', '.join(BENCHMARKS)}")
    a("--tasks", default=None, help="synthetic tasks (needle, passkey, multi_key, multi_value, multi_question; "
      f"default: the preset's, quick: {PRESETS['quick']['synthetic_tasks']}, paper: "
      f"{PRESETS['paper']['synthetic_tasks']}) and LongBench / ZeroSCROLLS task names (default: every task present)")
    a("--num_samples", type=int, default=None, help="samples per cell, spread evenly over the needle depths"
      + preset_help("num_samples"))
    a("--eval_mode", default="question_agnostic", help="question_agnostic (compress the context before the "
      "question is read) or question_aware")
    a("--prefill_chunk", type=int, default=512, help="prefill chunk in tokens; compression runs after each chunk")
    a("--output_dir", default="outputs", help="where results.jsonl, results.md, tables/ and figures/ go")
    a("--seed", type=int, default=42, help="seed of the samples and of everything random")
    a("--data_dir", default=None, help="folder with LongBench (<task>.jsonl) / ZeroSCROLLS (<task>.validation.jsonl) "
      "files in the hub's schema, directly or in subfolders longbench/ and zero_scrolls/ (instead of the hub)")
    a("--haystack_dir", default=None, help="folder of .txt files to use as the synthetic benchmark's haystack")
    a("--overwrite", action="store_true", help="start over instead of resuming from results.jsonl")
    a("--report_only", action="store_true", help="rebuild figures, tables and results.md from results.jsonl")
    a("--benchmark", default=None, help="'prefill_overhead': time ATSKV's scoring against the model's own "
      "prefill (context from --context_sizes, first value) and exit; 'speed': decode speed of the plain loop and "
      "the fast path per method, context (--context_sizes) and batch (--batch_sizes), beside the memory floor")
    a("--batch_sizes", default="1,16,64", help="speed benchmark: comma list of batch sizes")
    a("--decode_steps", type=int, default=32, help="speed benchmark: timed decode steps per path")
    a("--compile", action="store_true", help="fast path: compile each layer's step with torch.compile (once per "
      "shape, then captured in the CUDA graph)")
    a("--speed_parts", default="timing", help="speed benchmark: comma list of timing (per method, context, batch "
      "and path), max_batch (the largest decode batch that fits, at the largest context), answers (synthetic needle "
      "samples at the smallest context through the plain loop and the fast path: identical answers?), profile (per "
      "method, context and batch: the kernels of one fast step and their time, by torch.profiler), plain (HF's plain "
      "decode loop alone, what model.generate(past_key_values=cache) runs: the mean step over whole eviction "
      "cycles)")
    a("--check_answers", type=int, default=20, help="speed benchmark: samples for the answers part")
    a("--no_cudnn_attention", action="store_true", help="switch off PyTorch's cuDNN backend of scaled_dot_product_"
      "attention for every method (CUDA): its per-shape set-up dominates HF's decode loop in bf16 when KV lengths "
      "change every step; recorded in each result's env")
    a("--kernels_off", default="", help="speed benchmark: comma list of the fast path's Triton kernels to switch "
      "off, to measure what each brings: attention (SDPA / matmul + softmax instead), gemm (F.linear), evict "
      "(ATSKV's scoring and eviction in tensor form), greedy (the step's argmax and bookkeeping in tensor form); "
      "recorded with each result")
    a("--bandwidth_gbs", type=float, default=None, help="memory bandwidth for the floor (default: measured)")
    a("--fast_decode", action="store_true", help="sweeps: decode with the fast path (full, sliding_window, snapkv, "
      "pyramidkv, dynamic_kv, h2o, atskv without external memory)")
    a("--device_map", default=None, help="accelerate device map for models larger than one GPU: auto, balanced, "
      "sequential (the plain path; compression runs on each layer's device)")
    a("--use_api", action="store_true", help="run a hosted model instead of a local one: methods full (the whole "
      "prompt) and atskv (the prompt compressed to the budget with the local model's relevance predictor); the key "
      "comes from ANTHROPIC_API_KEY / OPENAI_API_KEY")
    a("--api_model", default=None, help="claude-* (anthropic SDK, Messages API) or gpt-* / o<N>* (openai SDK, Chat "
      "Completions)")
    a("--api_base_url", default=None, help="base URL of a compatible server (default: the provider's)")
    a("--api_concurrency", type=int, default=4, help="requests in flight at once")
    a("--api_timeout", type=float, default=60.0, help="seconds per request before it is retried")
    a("--api_max_retries", type=int, default=5, help="retries per request on 429, 5xx, timeouts and malformed "
      "answers (exponential backoff, Retry-After honoured)")
    return p


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def split_list(text: str) -> list[str]:
    """Split on commas outside brackets: 'full,atskv[a=1;b=2]' -> ['full', 'atskv[a=1;b=2]']."""
    out, depth, cur = [], 0, ""
    for ch in str(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [t for t in out if t]


def parse_method(spec: str) -> tuple[str, dict]:
    """The library's method-spec grammar (KVCacheFactory.parse_spec), unchecked: API model names pass too."""
    from sparse_kv_cache import KVCacheFactory
    return KVCacheFactory.parse_spec(spec, check=False)


def validate(args) -> dict:
    """Check every option before any model is loaded; raise UserError naming the bad value and what is accepted."""
    from evaluation import EVAL_MODES, SYNTHETIC_TASKS
    from sparse_kv_cache import KVCacheFactory
    known = KVCacheFactory.known_methods()
    methods = split_list(args.methods)
    if not methods:
        raise UserError("--methods is empty; known methods: " + ", ".join(known))
    for spec in methods:
        KVCacheFactory.parse_spec(spec)     # the method and its parameters, checked by the library
    if args.fast_decode:
        from fast_decode import check_fast_method
        for spec in methods:
            m, params = parse_method(spec)
            try:
                check_fast_method(m, with_cli_defaults(m, params, args))
            except UserError as e:
                raise UserError(f"--fast_decode: {e}") from None
    benchmarks = split_list(args.benchmarks)
    for b in benchmarks:
        if b not in BENCHMARKS:
            raise UserError(f"unknown benchmark {b!r}; accepted: {', '.join(BENCHMARKS)}")
    budgets = [parse_budget(b) for b in split_list(args.budgets)]
    if not budgets and any(m != "full" for m in methods):
        raise UserError("--budgets is empty; give fractions in (0, 1] or token counts >= 1")
    sizes = parse_context_sizes(args)
    if args.eval_mode not in EVAL_MODES:
        raise UserError(f"unknown --eval_mode {args.eval_mode!r}; accepted: {', '.join(EVAL_MODES)}")
    tasks = split_list(args.tasks) if args.tasks is not None else []  # [] : each benchmark's default
    from evaluation import REAL_TASKS
    accepted = (list(SYNTHETIC_TASKS) if "synthetic" in benchmarks else []) + \
        [t for b in benchmarks if b in REAL_TASKS for t in REAL_TASKS[b]]
    for t in tasks:
        if t not in accepted:
            raise UserError(f"unknown task {t!r} for benchmarks {', '.join(benchmarks)}; accepted: "
                            f"{', '.join(dict.fromkeys(accepted))}")
    if args.num_samples < 1:
        raise UserError(f"--num_samples {args.num_samples} must be >= 1")
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill_chunk {args.prefill_chunk} must be >= 1")
    if args.haystack_dir and not Path(args.haystack_dir).is_dir():
        raise UserError(f"--haystack_dir {args.haystack_dir!r} is not a directory")
    if args.data_dir:
        check_data_dir(args.data_dir, [b for b in benchmarks if b != "synthetic"])
    check_model_name(args.model_name)
    check_writable(args.output_dir)
    if args.use_api:
        import api_models
        api_models.api_key(api_models.provider_for(args.api_model))  # a missing key fails here, before any work
        for spec in methods:
            if parse_method(spec)[0] not in api_models.API_METHODS:
                raise UserError(f"method {spec!r} cannot run with --use_api; accepted: "
                                f"{', '.join(api_models.API_METHODS)}")
        if args.api_concurrency < 1 or args.api_max_retries < 0 or args.api_timeout <= 0:
            raise UserError(f"--api_concurrency {args.api_concurrency} must be >= 1, --api_max_retries "
                            f"{args.api_max_retries} >= 0 and --api_timeout {args.api_timeout} > 0")
    return {"methods": methods, "benchmarks": benchmarks, "budgets": budgets, "sizes": sizes, "tasks": tasks}


def parse_context_sizes(args) -> list[int]:
    sizes = []
    limit = args.max_seq_len or DEFAULT_MAX_SEQ_LEN
    for s in split_list(args.context_sizes):
        try:
            n = int(s)
        except ValueError:
            raise UserError(f"bad context size {s!r}: accepted are whole numbers from {MIN_CONTEXT} to {limit}")
        if not MIN_CONTEXT <= n <= limit:
            raise UserError(f"context size {n} out of range: accepted are {MIN_CONTEXT} to {limit} tokens "
                            f"(the model's limit; raise --max_seq_len for a model with a longer window)")
        sizes.append(n)
    return sizes


def check_data_dir(data_dir: str, benchmarks: list[str]) -> None:
    """Every jsonl file a real benchmark would read must exist and parse: name the file and line that do not."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"--data_dir {data_dir!r} is not a directory")
    files = sorted(d.glob("*.jsonl")) + sorted(d.glob("*/*.jsonl"))
    if benchmarks and not files:
        raise UserError(f"--data_dir {data_dir!r} holds no .jsonl files (expected LongBench or ZeroSCROLLS "
                        f"files such as hotpotqa.jsonl or qasper.validation.jsonl)")
    for f in files:
        with open(f, errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"corrupt data file {f}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"corrupt data file {f}: line {n} is not a JSON object")


def check_writable(path: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {path!r} is not writable ({e.strerror})") from None


def cell_key(spec: dict) -> str:
    """A cell is identified by everything that changes its result."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tasks_for(bench: str, args, opts: dict) -> list[str]:
    """Synthetic: the --tasks that are synthetic. A real benchmark: the --tasks that belong to it, else every task
    that --data_dir holds (or all of them, from the hub)."""
    from evaluation import REAL_TASKS, SYNTHETIC_TASKS, available_real_tasks
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
    from sparse_kv_cache import method_params
    from sparse_kv_cache import KVCacheFactory
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


def finished_keys(results_path: Path) -> set[str]:
    return {r["cell"] for r in read_jsonl(results_path) if r.get("status") == "ok" and "cell" in r}


def run_sweep(args, opts: dict) -> int:
    import torch
    from tqdm import tqdm

    import evaluation as ev
    from utils import load_model_and_tokenizer, model_max_length, set_seed

    out_dir = Path(args.output_dir)
    results_path = out_dir / "results.jsonl"
    if args.overwrite and results_path.exists():
        results_path.unlink()
    cells = plan_cells(args, opts)
    real = [b for b in opts["benchmarks"] if b != "synthetic"]
    for b in real:  # a real benchmark with no task to run (its files are not in --data_dir) is skipped, said why
        if not any(c["benchmark"] == b for c in cells):
            skip_benchmark(results_path, b, f"--data_dir {args.data_dir!r} holds none of its files "
                           f"({ev.REAL_FILE_HINT[b]})")
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
                    samples_cache[key] = ev.synthetic_samples(
                        tok, cell["task"], cell["context_size"], args.num_samples, args.seed,
                        haystack_dir=args.haystack_dir) if bench == "synthetic" else \
                        ev.real_samples(bench, cell["task"], args.data_dir, args.num_samples)
                except UserError as e:  # e.g. the hub is unreachable: the rest of the sweep still runs
                    unavailable.add(bench)
                    skip_benchmark(results_path, bench, str(e))
                    print(f"\n[atskv] skipping {bench}: {e}", file=sys.stderr)
                    continue
            inject = fault.split(":", 1)[0] if fault and fault.split(":", 1)[-1] in name else None
            record = {"cell": cell_key(cell), **cell, "env": env, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "timing_probe": ev.timing_probe(model.device), "command": command_line()}
            t0 = time.perf_counter()
            try:
                if args.use_api:
                    record.update(run_api_cell(args, cell, samples_cache[key], limit, (model, tok), results_path))
                    where = f" at {args.api_base_url}" if args.api_base_url else ""
                    record["env"] = {"device": "api",
                                     "hardware": f"{cell['model']} via {api_client(args).provider} API{where}"}
                elif bench == "synthetic":
                    record.update(ev.evaluate_synthetic_cell(
                        model, tok, cell["base_method"], cell["budget"], samples_cache[key], cell["eval_mode"],
                        cell["prefill_chunk"], cell["params"], fault=inject, fast=cell.get("fast_decode", False)))
                else:
                    record["max_prompt_tokens"] = max_prompt_tokens(cell, limit)
                    record.update(ev.evaluate_real_cell(model, tok, cell["base_method"], cell["budget"],
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
    import evaluation as ev
    gen = (ev.LONGBENCH_MAX_NEW_TOKENS if cell["benchmark"] == "longbench" else ev.ZEROSCROLLS_MAX_NEW_TOKENS)
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
    import evaluation as ev
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


def environment_info(model, model_name: str | None = None) -> dict:
    import torch
    import transformers
    from utils import cpu_name, model_provenance
    dev = str(model.device)
    hw = torch.cuda.get_device_name(model.device) if dev.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    env = {"device": dev, "hardware": hw, "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
           "dtype": str(model.dtype).replace("torch.", ""), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    if model_name:
        env["model_source"] = model_provenance(model_name, model)
    env["commit"] = source_commit()
    if dev.startswith("cuda") and not torch.backends.cuda.cudnn_sdp_enabled():
        env["sdpa"] = "cuDNN backend off"
    return env


def source_commit() -> str | None:
    """The project's git commit, with '-dirty' when the tree has uncommitted changes; $ATSKV_COMMIT when set (a copy
    of the tree on another machine, whose .git may be another commit's); None outside a checkout."""
    import subprocess
    here = Path(__file__).resolve().parent
    if os.environ.get("ATSKV_COMMIT"):   # named by the caller: a copy of the tree whose .git is not its own
        return os.environ["ATSKV_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command as a user would type it again."""
    import shlex
    return " ".join(["python run_experiment.py", *(shlex.quote(a) for a in sys.argv[1:])])


def write_report(out_dir: Path, args) -> None:
    from report import build_report
    build_report(out_dir, command=command_line())


def print_summary(out_dir: Path) -> None:
    """Where the report is, and three lines of it: the full cache, then the compressed methods at the smallest
    budget, best first, each with the memory it holds."""
    from report import run_summary
    print(f"[atskv] results: {(out_dir / 'results.md').resolve()} (figures in {out_dir / 'figures'})",
          file=sys.stderr)
    for line in run_summary(out_dir):
        print(f"  {line}", file=sys.stderr)


def train_predictor_cli(args) -> int:
    import relevance_predictor as rp
    from utils import load_model_and_tokenizer
    check_model_name(args.model_name)
    if args.calibration_file and not Path(args.calibration_file).is_file():
        raise UserError(f"--calibration_file {args.calibration_file!r} not found")
    model, tok = load_model_and_tokenizer(args.model_name, device=args.device, use_fp16=args.use_fp16)
    t0 = time.perf_counter()
    pred, rep = rp.train_predictor(model, tok, corpus_file=args.calibration_file, seed=args.seed)
    path = rp.save_predictor(model, pred, rep)
    print(f"[atskv] predictor trained in {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr)
    print(f"[atskv] held-out top-k recall of the most-attended tokens: {rp.format_ranking(rep)}", file=sys.stderr)
    return 0


SPEED_DEFAULT_METHODS = "full,sliding_window,atskv"


SPEED_PARTS = ("timing", "plain", "max_batch", "answers", "profile")


def speed_cli(args) -> int:
    """--benchmark speed: one record per (method, budget, context, batch, path) appended to results.jsonl as it
    finishes (a rerun resumes), then the report's speed section."""
    import torch

    import evaluation as ev
    from fast_decode import check_fast_method
    from utils import load_model_and_tokenizer
    check_model_name(args.model_name)
    check_writable(args.output_dir)
    specs = split_list(args.methods if args.methods_given else SPEED_DEFAULT_METHODS)
    methods = [(spec, *parse_method(spec)) for spec in specs]   # (label as given, method, its parameters)
    for _, m, params in methods:
        check_fast_method(m, params)
    budgets = [parse_budget(b) for b in split_list(args.budgets)]
    sizes = parse_context_sizes(args)
    try:
        batches = [int(x) for x in split_list(args.batch_sizes)]
    except ValueError:
        raise UserError(f"--batch_sizes {args.batch_sizes!r}: expected a comma list of positive integers") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch_sizes {args.batch_sizes!r}: expected a comma list of positive integers")
    parts = split_list(args.speed_parts)
    bad = [p for p in parts if p not in SPEED_PARTS] or ([] if parts else ["(empty)"])
    if bad:
        raise UserError(f"--speed_parts: unknown part(s) {', '.join(bad)}; accepted: {', '.join(SPEED_PARTS)}")
    if args.check_answers < 1:
        raise UserError(f"--check_answers {args.check_answers}: at least 1 sample")
    if args.decode_steps < 4:
        raise UserError(f"--decode_steps {args.decode_steps}: at least 4 (the timed steps, after the warm-up)")
    kernels_off = sorted(set(split_list(args.kernels_off)))
    import kernels
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
    bw = args.bandwidth_gbs or ev.device_bandwidth_gbs(model.device)
    print(f"[atskv] speed benchmark on {env['hardware']} ({env['dtype']}), bandwidth {bw:.0f} GB/s "
          f"{'(given)' if args.bandwidth_gbs else '(measured)'} -> {results_path}", file=sys.stderr)

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
        for i, r in enumerate(recs):
            r.setdefault("compile", args.compile)
            if kernels_off:
                r["kernels_off"] = kernels_off
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

    def cells(benchmark: str, **fields):
        """(spec, method, params, budget) per method and budget (full once, without one)."""
        for label, m, params in methods:
            for budget in ([None] if m == "full" else budgets):
                yield ({**common, "benchmark": benchmark, "method": label, "base_method": m, "params": params,
                        "budget": budget, **fields}, m, params, budget)
    try:
        for size in sizes if "timing" in parts else []:
            for batch in batches:
                for spec, m, params, budget in cells("speed", context=size, batch=batch, steps=args.decode_steps):
                    save(spec, lambda: ev.measure_decode_speed(
                        model, tok, m, budget, size, batch, steps=args.decode_steps, compile=args.compile,
                        bandwidth_gbs=bw, params=params, chunk=args.prefill_chunk, seed=args.seed))
        for size in sizes if "plain" in parts else []:
            for batch in batches:
                for spec, m, params, budget in cells("speed_plain", context=size, batch=batch, steps=args.decode_steps):
                    save(spec, lambda: ev.measure_plain_decode(model, tok, m, budget, size, batch, args.decode_steps,
                                                               params=params, chunk=args.prefill_chunk,
                                                               seed=args.seed))
        for size in sizes if "profile" in parts else []:
            for batch in batches:
                for spec, m, params, budget in cells("speed_profile", context=size, batch=batch):
                    save(spec, lambda: ev.profile_decode_step(model, tok, m, budget, size, batch, params,
                                                              compile=args.compile, chunk=args.prefill_chunk,
                                                              seed=args.seed))
        if "max_batch" in parts:
            for spec, m, params, budget in cells("speed_max_batch", context=max(sizes)):
                save(spec, lambda: [ev.largest_decode_batch(model, tok, m, budget, max(sizes), params,
                                                            chunk=args.prefill_chunk)])
        if "answers" in parts:
            samples = ev.synthetic_samples(tok, "needle", min(sizes), args.check_answers, args.seed)
            for spec, m, params, budget in cells("speed_answers", context=min(sizes), n=args.check_answers,
                                                 seed=args.seed):
                save(spec, lambda: [ev.check_fast_answers(model, tok, m, budget, samples, args.prefill_chunk,
                                                          compile=args.compile, params=params)])
    except KeyboardInterrupt:
        write_report(out_dir, args)
        print("[atskv] interrupted: finished records kept", file=sys.stderr)
        return 130
    write_report(out_dir, args)
    print(f"[atskv] results: {out_dir / 'results.md'}", file=sys.stderr)
    return 0


def benchmark_cli(args) -> int:
    if args.benchmark == "speed":
        return speed_cli(args)
    if args.benchmark != "prefill_overhead":
        raise UserError(f"unknown --benchmark {args.benchmark!r}; accepted: prefill_overhead, speed")
    import evaluation as ev
    from utils import atomic_write_text, load_model_and_tokenizer
    check_model_name(args.model_name)
    check_writable(args.output_dir)
    n = int(split_list(args.context_sizes)[0])
    model, tok = load_model_and_tokenizer(args.model_name, device=args.device, use_fp16=args.use_fp16)
    res = ev.measure_prefill_overhead(model, tok, n_tokens=n, chunk=args.prefill_chunk)
    res["env"] = environment_info(model)
    atomic_write_text(Path(args.output_dir) / "prefill_overhead.json", json.dumps(res, indent=1))
    print(f"prefill of {res['tokens']} tokens (chunk {args.prefill_chunk}): full {res['full']['prefill_s']:.3f} s, "
          f"atskv {res['atskv']['prefill_s']:.3f} s; ATSKV scoring {res['atskv']['scoring_s']:.3f} s = "
          f"{100 * res['scoring_share_of_model_prefill']:.1f}% of the model's prefill; total overhead incl. eviction "
          f"{100 * res['total_overhead_share']:.1f}%")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.methods_given = args.methods is not None
        apply_preset(args)
        check_device(args.device)     # before any work: nothing is planned, created or loaded for a bad device
        if args.no_cudnn_attention:
            import torch
            torch.backends.cuda.enable_cudnn_sdp(False)
        if args.train_predictor:
            return train_predictor_cli(args)
        if args.benchmark is not None:
            return benchmark_cli(args)
        if args.report_only:
            results = Path(args.output_dir) / "results.jsonl"
            if not results.exists():
                raise UserError(f"--report_only: no results.jsonl in {args.output_dir!r}")
            check_writable(args.output_dir)
            write_report(Path(args.output_dir), args)
            print(f"[atskv] report rebuilt: {Path(args.output_dir) / 'results.md'}", file=sys.stderr)
            return 0
        opts = validate(args)
        code = run_sweep(args, opts)
        print_summary(Path(args.output_dir))
        return code
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("[atskv] interrupted", file=sys.stderr)
        return 130


def cli() -> None:
    """The `atskv` command that the package installs: the same as `python run_experiment.py`."""
    sys.exit(main())


if __name__ == "__main__":
    cli()

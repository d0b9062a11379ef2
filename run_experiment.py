"""The command line: argument parsing, checks, and hand-off to the sweep (evals/sweep.py), the speed benchmark
(evals/speed.py), the predictor's training or the report. Sweeps methods x budgets x context sizes x benchmarks,
appending each finished cell to results.jsonl, then writes the report.

    python run_experiment.py                      # quick sweep on the embedded default model -> outputs/results.md
    python run_experiment.py --report_only --output_dir outputs   # rebuild the report from results.jsonl

Every option is listed by --help and in the README.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from evals.records import environment_info, print_summary, write_report
from evals.sweep import parse_method, run_sweep, with_cli_defaults
from utils import DEFAULT_MODEL, UserError, check_device, check_model_name, parse_budget

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
    preset_help = lambda name: (f" (default: the preset's; quick: {PRESETS['quick'][name]}, "  # noqa: E731
                                f"paper: {PRESETS['paper'][name]})")
    a("--preset", default="quick", help="sweep size for the options not given: quick (a first run, minutes on a "
      "laptop CPU) or paper (the full tables: more methods, budgets, context sizes, tasks and samples)")
    a("--model_name", default=DEFAULT_MODEL, help=f"'{DEFAULT_MODEL}' (embedded default), a hub id, a local "
      "directory or a .gguf file")
    a("--model_config", default=None, help="speed and memory runs at real model sizes without weights: random "
      "weights of a published configuration (llama-3.1-8b, qwen3-8b, qwen2.5-7b, mistral-7b, smollm2-135m: the "
      "default model's shape; model_configs/) or of a config.json path; --benchmark speed or prefill_overhead only")
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
      "and path), fast (timing without HF's plain loop), max_batch (the largest decode batch that fits, at the "
      "largest context), answers (synthetic needle "
      "samples at the smallest context through the plain loop and the fast path: identical answers?), profile (per "
      "method, context and batch: the kernels of one fast step and their time, by torch.profiler), plain (HF's plain "
      "decode loop alone, what model.generate(past_key_values=cache) runs: the mean step over whole eviction "
      "cycles)")
    a("--check_answers", type=int, default=20, help="speed benchmark: samples for the answers part")
    a("--speed_contexts", default="random", help="speed benchmark: what is prefilled: random tokens (a step's "
      "work does not depend on the values), or a synthetic task's prompts (e.g. multi_key), for what depends on "
      "the attention's values (the recall kernels' pruning); the largest-batch part always prefills random tokens")
    a("--no_cudnn_attention", action="store_true", help="switch off PyTorch's cuDNN backend of scaled_dot_product_"
      "attention for every method (CUDA): its per-shape set-up dominates HF's decode loop in bf16 when KV lengths "
      "change every step; recorded in each result's env")
    a("--kernels_off", default="", help="speed benchmark: comma list of the fast path's Triton kernels to switch "
      "off, to measure what each brings: attention (SDPA / matmul + softmax instead), gemm (F.linear), evict "
      "(ATSKV's scoring and eviction in tensor form), greedy (the step's argmax and bookkeeping in tensor form), "
      "recall (recall's scores against the int8 passive keys by einsum); recorded with each result")
    a("--bandwidth_gbs", type=float, default=None, help="memory bandwidth for the floor (default: measured)")
    a("--fast_decode", action="store_true", help="sweeps: decode with the fast path (full, sliding_window, snapkv, "
      "pyramidkv, dynamic_kv, h2o, atskv; atskv's external memory with its defaults)")
    a("--device_map", default=None, help="accelerate device map for models larger than one GPU: auto, balanced, "
      "sequential (the plain path; compression runs on each layer's device)")
    a("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help="run the sweep's cells on Ray "
      "workers, one model per worker: --ray alone starts a local Ray cluster on this machine's GPUs (its CPUs when "
      "it has none); --ray ADDRESS joins a running one (e.g. started by `ray start` on SLURM nodes; they need this "
      "checkout at the same path and its requirements)")
    a("--gpus_per_cell", type=float, default=1.0, help="--ray: GPUs a worker takes; a fraction shares a GPU "
      "(0.25: four workers on one)")
    a("--cpus_per_cell", type=float, default=1.0, help="--ray: CPUs a worker takes (its torch threads on a "
      "CPU-only cluster)")
    a("--ray_workers", type=int, default=None, help="--ray: at most this many workers (default: as many as fit)")
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
    if args.ray is not None:
        if args.use_api:
            raise UserError("--ray runs local models; with --use_api the hosted model's requests already run "
                            "concurrently (--api_concurrency)")
        if not args.gpus_per_cell > 0 or not args.cpus_per_cell > 0:
            raise UserError(f"--gpus_per_cell {args.gpus_per_cell} and --cpus_per_cell {args.cpus_per_cell}: "
                            f"accepted are numbers > 0 (fractions share a device)")
        if args.ray_workers is not None and args.ray_workers < 1:
            raise UserError(f"--ray_workers {args.ray_workers}: accepted are whole numbers >= 1")
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


def speed_cli(args) -> int:
    """--benchmark speed: the options checked here, then evals.speed.run_speed_benchmark."""
    from evals.speed import SPEED_PARTS, run_speed_benchmark
    from fast_decode import check_fast_method
    check_model_name(args.model_name)
    check_writable(args.output_dir)
    specs = split_list(args.methods if args.methods_given else SPEED_DEFAULT_METHODS)
    methods = [(spec, *parse_method(spec)) for spec in specs]   # (label as given, method, its parameters)
    if set(split_list(args.speed_parts)) != {"plain"}:   # every part but plain runs the fast path
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
    from evals.synthetic import SYNTHETIC_TASKS
    accepted = ("random",) + tuple(t for t in SYNTHETIC_TASKS if t != "multi_question")
    if args.speed_contexts not in accepted:
        raise UserError(f"--speed_contexts {args.speed_contexts!r}: accepted: {', '.join(accepted)}")
    from utils import RANDOM_WEIGHTS
    if args.speed_contexts != "random" and str(args.model_name).startswith(RANDOM_WEIGHTS):
        raise UserError(f"--speed_contexts {args.speed_contexts!r} with --model_config {args.model_config!r}: a "
                        "task's prompts mean nothing to random weights; accepted there: random")
    kernels_off = sorted(set(split_list(args.kernels_off)))
    return run_speed_benchmark(args, methods, budgets, sizes, batches, parts, kernels_off)


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


def use_model_config(args) -> None:
    """--model_config NAME: the model becomes 'config:NAME' (random weights), for the speed benchmarks alone."""
    from utils import RANDOM_WEIGHTS, model_config_file
    if args.model_name != DEFAULT_MODEL:
        raise UserError(f"--model_config {args.model_config!r} and --model_name {args.model_name!r}: give one of them")
    model_config_file(args.model_config)
    if args.benchmark not in ("speed", "prefill_overhead") or args.train_predictor:
        raise UserError(f"--model_config {args.model_config!r} has random weights: accepted with --benchmark speed "
                        f"or --benchmark prefill_overhead only (a quality sweep or a predictor needs --model_name)")
    if "answers" in split_list(args.speed_parts):
        raise UserError("--speed_parts answers compares generated answers: it needs real weights (--model_name), "
                        "not --model_config")
    args.model_name = RANDOM_WEIGHTS + args.model_config


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.methods_given = args.methods is not None
        apply_preset(args)
        check_device(args.device)     # before any work: nothing is planned, created or loaded for a bad device
        if args.model_config is not None:
            use_model_config(args)
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

"""`run_experiment.py --ray [ADDRESS]`: the sweep's cells as Ray tasks on a pool of workers, one actor per worker
holding the model, on a local Ray cluster (all this machine's GPUs, or its CPUs when it has none) or on an existing
one (`ray start` on SLURM nodes). A cell runs in parts of its samples when there are few cells per worker, so that
a few long cells do not leave the other workers idle; the driver summarizes the parts into the record a serial run
writes. The driver is the only writer of results.jsonl: it appends (and fsyncs) each cell once all its parts are
back, so resume, failed cells and Ctrl-C behave as in the serial sweep (evals/sweep.py); a cell's finished parts
are lost if the run stops before the rest. A worker that dies (killed, out of host memory) costs the cell it was
running, recorded as failed (a rerun retries it); a new worker takes its place."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from evals.cells import (cell_header, cell_name, cell_samples, error_line, injected, load_for_sweep, mark_unavailable,
                         run_samples, stop_on_sigterm, summarize_cell)
from evals.records import command_line
from utils import UserError, append_jsonl

ROOT = Path(__file__).resolve().parent.parent


class CellWorker:
    """One worker: the model loaded once, then parts of cells one at a time (made a Ray actor by `run_on_ray`)."""

    def __init__(self, args, sizes, fault: str):
        import torch
        if args.device is None and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.args, self.fault = args, fault
        self.model, self.tok, self.limit, self.env = load_for_sweep(args, sizes)
        self.samples: dict = {}

    def ready(self) -> int | None:
        return self.limit

    def prepare(self, cells: list[dict]) -> None:
        """Create each method's cache once, so that what a method builds on first use and caches on disk (ATSKV's
        relevance predictor) is built by this worker alone, before the others start."""
        from evals.harness import make_cache
        for cell in {c["method"]: c for c in cells}.values():
            try:
                make_cache(cell["base_method"], self.model, cell["budget"], cell["context_size"], cell["params"],
                           tokenizer=self.tok)
            except Exception:  # noqa: BLE001 - the cell itself will record the error
                pass

    def run(self, cell: dict, part: range) -> tuple[str, object]:
        """The results of the cell's samples in `part`: ("ok", {per_sample, env, time, timing_probe, wall_s}),
        ("error", its first line) or ("unavailable", why) when the benchmark cannot be loaded."""
        import evals.speed as speed
        from utils import set_seed
        try:
            samples = cell_samples(self.tok, self.args, cell, self.samples)
        except UserError as e:
            return "unavailable", str(e)
        inject = injected(self.fault, cell)
        set_seed(self.args.seed)
        out = {"env": self.env, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "timing_probe": speed.timing_probe(self.model.device)}
        t0 = time.perf_counter()
        try:
            mine = [samples[i] for i in part if i < len(samples)]   # a real benchmark may hold fewer samples
            out["per_sample"] = run_samples(self.model, self.tok, cell, mine, self.limit, inject)
        except Exception as e:  # noqa: BLE001 - recorded as the cell's error by the driver
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return "error", error_line(e)
        out["wall_s"] = time.perf_counter() - t0
        return "ok", out


def run_on_ray(args, opts: dict, todo: list[dict], results_path: Path, unavailable: set[str]) -> None:
    """Run `todo` on Ray workers, appending each record to results_path as it comes back."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray (ray==2.60.0 in requirements.txt): pip install -r requirements.txt") \
            from None
    from tqdm import tqdm
    started = not ray.is_initialized()
    if started:
        address = None if args.ray == "local" else args.ray
        # workers import this project: from this checkout (on a cluster, a path the nodes share)
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
        try:
            ray.init(address=address, include_dashboard=False, runtime_env=None if address is None else env,
                     logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"--ray {args.ray}: cannot start or join the Ray cluster ({str(e).splitlines()[0]})") \
                from None
        stop_on_sigterm()   # ray.init replaced the handler: SIGTERM ends the sweep as Ctrl-C does, report written
    try:
        _run(ray, args, opts, todo, results_path, unavailable, tqdm)
    finally:
        if started:
            ray.shutdown()


def _run(ray, args, opts, todo, results_path, unavailable, tqdm) -> None:
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    per = {"num_gpus": args.gpus_per_cell, "num_cpus": args.cpus_per_cell} if gpus else \
        {"num_cpus": args.cpus_per_cell}
    fit = int(gpus / args.gpus_per_cell + 1e-9) if gpus else int(cpus / args.cpus_per_cell + 1e-9)
    n = min(args.ray_workers or fit, fit, len(todo))
    if n < 1:
        raise UserError(f"--ray: no worker fits the cluster ({gpus:g} GPUs, {cpus:g} CPUs) with --gpus_per_cell "
                        f"{args.gpus_per_cell} and --cpus_per_cell {args.cpus_per_cell}")
    worker_cls = ray.remote(**per)(CellWorker)
    args = with_absolute_paths(args)
    fault = os.environ.get("ATSKV_INJECT_FAULT", "")
    command = command_line()
    where = f"{gpus:g} GPUs" if gpus else f"{cpus:g} CPUs"
    print(f"[atskv] Ray: {n} workers on {where} ({', '.join(f'{k[4:]} {v:g}' for k, v in per.items())} each)",
          file=sys.stderr)

    def started(refs):
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:   # the model did not load: say why, in one line
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            raise UserError(f"--ray: a worker could not start: {str(cause).splitlines()[-1]}") from None

    def start_worker():
        w = worker_cls.remote(args, opts["sizes"], fault)
        started(w.ready.remote())
        return w

    first = worker_cls.remote(args, opts["sizes"], fault)
    limit = started(first.ready.remote())
    # the first worker creates each method's cache (a predictor is trained and cached before the others need it)
    # while the others load the model
    others = [worker_cls.remote(args, opts["sizes"], fault) for _ in range(n - 1)]
    started([first.prepare.remote(todo)] + [w.ready.remote() for w in others])
    idle = [first] + others
    # a cell runs in parts of its samples, so that a few long cells do not leave the other workers idle
    ranges = split_samples(args.num_samples, max(1, min(args.num_samples, -(-8 * n // len(todo)))))
    queue = [(i, part) for i in range(len(todo)) for part in ranges]
    parts: dict[int, dict] = {}     # cell index -> {part start: results} so far
    closed: set[int] = set()        # cells recorded (finished or failed)
    running = {}
    with tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr) as bar:

        def close(i, record):
            closed.add(i)
            append_jsonl(results_path, record)
            bar.set_postfix_str(cell_name(todo[i]))
            bar.update(1)
        try:
            while queue or running:
                while idle and queue:
                    i, part = queue.pop(0)
                    if i in closed or todo[i]["benchmark"] in unavailable:
                        if i not in closed:
                            closed.add(i)
                            bar.update(1)
                        continue
                    w = idle.pop()
                    running[w.run.remote(todo[i], part)] = (w, i, part)
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1)
                w, i, part = running.pop(ready[0])
                cell = todo[i]
                try:
                    kind, out = ray.get(ready[0])
                except ray.exceptions.RayActorError as e:
                    kind, out = "error", f"WorkerDied: {str(e).splitlines()[0][:300]}"
                    print(f"\n[atskv] cell {cell_name(cell)}: its worker died (a new worker takes its place)",
                          file=sys.stderr)
                    w = start_worker()
                idle.append(w)
                if i in closed:
                    continue
                if kind == "unavailable":
                    if cell["benchmark"] not in unavailable:
                        mark_unavailable(results_path, cell["benchmark"], out, unavailable)
                    closed.add(i)
                    bar.update(1)
                elif kind == "error":
                    print(f"\n[atskv] cell {cell_name(cell)} failed: {out} (recorded; the sweep goes on)",
                          file=sys.stderr)
                    close(i, cell_header(cell, command) | {"status": "error", "error": out})
                else:
                    parts.setdefault(i, {})[part.start] = out
                    if len(parts[i]) == len(ranges):
                        done = parts.pop(i)
                        close(i, merged_record(cell, [done[k] for k in sorted(done)], limit, command))
        finally:   # Ctrl-C, SIGTERM or an error in the driver: stop the workers; what came back is saved
            for w, _, _ in running.values():
                ray.kill(w)


def split_samples(n: int, parts: int) -> list[range]:
    """range(n) in `parts` contiguous parts of near-equal size."""
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def merged_record(cell: dict, outs: list[dict], limit, command: str) -> dict:
    """The cell's record from its parts, as the serial sweep writes it: the samples in order, summarized together;
    env, time and timing probe from the first part; wall_s summed over the parts (its compute time), parts their
    count."""
    per_sample = [r for o in outs for r in o["per_sample"]]
    return cell_header(cell, command, outs[0]["env"], outs[0]["timing_probe"], outs[0]["time"]) | \
        summarize_cell(cell, per_sample, limit) | \
        {"status": "ok", "wall_s": sum(o["wall_s"] for o in outs), "parts": len(outs)}
def with_absolute_paths(args):
    """A copy of args whose local paths (data, haystack, a model file or folder) do not depend on the working
    directory, which a worker on another node does not share."""
    import copy
    out = copy.copy(args)
    for name in ("data_dir", "haystack_dir", "model_name"):
        value = getattr(out, name, None)
        if value and Path(value).exists():
            setattr(out, name, str(Path(value).resolve()))
    return out


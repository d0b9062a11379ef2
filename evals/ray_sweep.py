"""`run_experiment.py --ray [ADDRESS]`: the sweep's cells as Ray tasks on a pool of workers, one actor per worker
holding the model, on a local Ray cluster (all this machine's GPUs, or its CPUs when it has none) or on an existing
one (`ray start` on SLURM nodes). The driver is the only writer of results.jsonl: it appends (and fsyncs) each cell
as it comes back, so resume, failed cells and Ctrl-C behave as in the serial sweep (evals/sweep.py). A worker that
dies (killed, out of host memory) costs the cell it was running, recorded as failed (a rerun retries it); a new
worker takes its place."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from evals.records import command_line
from evals.cells import cell_name, cell_samples, load_for_sweep, mark_unavailable, run_cell, stop_on_sigterm
from utils import UserError, append_jsonl

ROOT = Path(__file__).resolve().parent.parent


class CellWorker:
    """One worker: the model loaded once, then cells one at a time (made a Ray actor by `run_on_ray`)."""

    def __init__(self, args, sizes, fault: str):
        import torch
        if args.device is None and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.args, self.fault = args, fault
        self.model, self.tok, self.limit, self.env = load_for_sweep(args, sizes)
        self.samples: dict = {}

    def ready(self) -> str:
        return self.env["hardware"]

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

    def run(self, cell: dict, command: str) -> tuple[str, dict | str]:
        """("ok", the cell's record), or ("unavailable", why) when its benchmark cannot be loaded."""
        try:
            samples = cell_samples(self.tok, self.args, cell, self.samples)
        except UserError as e:
            return "unavailable", str(e)
        return "ok", run_cell(self.model, self.tok, self.args, cell, samples, self.env, self.limit, self.fault,
                              command, None)


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

    def start_worker():
        w = worker_cls.remote(args, opts["sizes"], fault)
        try:
            ray.get(w.ready.remote())
        except ray.exceptions.RayActorError as e:   # the model did not load: say why, in one line
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            raise UserError(f"--ray: a worker could not start: {str(cause).splitlines()[-1]}") from None
        return w

    first = start_worker()
    ray.get(first.prepare.remote(todo))     # a cached predictor exists before the other workers need it
    idle = [first] + [start_worker() for _ in range(n - 1)]
    queue, running = list(todo), {}
    with tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr) as bar:
        try:
            while queue or running:
                while idle and queue:
                    cell = queue.pop(0)
                    if cell["benchmark"] in unavailable:
                        bar.update(1)
                        continue
                    w = idle.pop()
                    running[w.run.remote(cell, command)] = (w, cell)
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1)
                w, cell = running.pop(ready[0])
                try:
                    kind, out = ray.get(ready[0])
                except ray.exceptions.RayActorError as e:
                    append_jsonl(results_path, worker_died(cell, e))
                    print(f"\n[atskv] cell {cell_name(cell)}: its worker died (recorded; a new worker takes its "
                          f"place)", file=sys.stderr)
                    w = start_worker()
                else:
                    if kind == "unavailable":
                        if cell["benchmark"] not in unavailable:
                            mark_unavailable(results_path, cell["benchmark"], out, unavailable)
                    else:
                        append_jsonl(results_path, out)
                        bar.set_postfix_str(cell_name(cell))
                idle.append(w)
                bar.update(1)
        finally:   # Ctrl-C, SIGTERM or an error in the driver: stop the workers; what came back is saved
            for w, _ in running.values():
                ray.kill(w)


def worker_died(cell: dict, err: Exception) -> dict:
    import time
    from evals.records import cell_key
    return {"cell": cell_key(cell), **cell, "status": "error", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "error": f"WorkerDied: {str(err).splitlines()[0][:300]}", "command": command_line()}


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


"""`run_experiment.py --ray [ADDRESS]`: the sweep's cells as Ray tasks on a pool of workers, one actor per worker
holding the model, on a local Ray cluster (all this machine's GPUs, or its CPUs when it has none) or on an existing
one (`ray start` on SLURM nodes). A cell runs in parts of its samples when there are few cells per worker, so that
a few long cells do not leave the other workers idle; the driver summarizes the parts into the record a serial run
writes. The driver is the only writer of results.jsonl: it appends (and fsyncs) each cell once all its parts are
back, so resume, failed cells and Ctrl-C behave as in the serial sweep (evals/sweep.py). Until then it keeps each
finished part's samples in the cell's partial file (as the serial sweep keeps each sample), so that a run stopped
midway goes on from the samples not yet back; it deletes the file once the cell's finished record is written. A
worker that dies (killed, out of host memory) costs the cell it was running, recorded as failed (a rerun retries
it); a new worker takes its place."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from evals.cells import (cell_header, cell_name, cell_samples, error_line, injected, load_for_sweep, mark_unavailable,
                         partial_path, run_samples, stop_on_sigterm, summarize_cell)
from evals.records import command_line, source_commit
from utils import UserError, append_jsonl, read_jsonl

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
        inject = injected(self.fault, cell, part)
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
    # a cell runs in parts of its samples, so that a few long cells do not leave the other workers idle; the
    # samples an earlier run brought back (the cell's partial file, this commit) are not run again
    n_parts = max(1, min(args.num_samples, -(-8 * n // len(todo))))
    commit = source_commit()
    got = [saved_samples(partial_path(results_path, cell), commit, args.num_samples) for cell in todo]
    queue, waiting = [], {}         # waiting: cell index -> parts still out
    for i in range(len(todo)):
        rest = [k for k in range(args.num_samples) if k not in got[i]]
        parts_i = [[rest[k] for k in r] for r in split_samples(len(rest), min(n_parts, len(rest)))] if rest else []
        queue += [(i, part) for part in parts_i]
        waiting[i] = len(parts_i)
    closed: set[int] = set()        # cells recorded (finished or failed)
    running = {}
    with tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr) as bar:

        def close(i, record):
            closed.add(i)
            append_jsonl(results_path, record)
            if record["status"] == "ok":   # its samples are in the record now (a failed cell keeps them for a rerun)
                partial_path(results_path, todo[i]).unlink(missing_ok=True)
            bar.set_postfix_str(cell_name(todo[i]))
            bar.update(1)
        for i in range(len(todo)):   # every sample back in an earlier run
            if not waiting[i] and got[i] and todo[i]["benchmark"] not in unavailable:
                close(i, merged_record(todo[i], got[i], limit, command))
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
                if kind == "ok":   # saved even when the cell failed meanwhile: a rerun takes them up
                    meta = {k: out[k] for k in ("env", "time", "timing_probe")} | {
                        "wall_s": out["wall_s"] / max(1, len(out["per_sample"])), "part": part[0]}
                    for k, result in zip(part, out["per_sample"]):
                        got[i][k] = line = {"id": result.get("id"), "index": k, "commit": commit,
                                            "result": result} | meta
                        append_jsonl(partial_path(results_path, cell), line)
                    waiting[i] -= 1
                    if not waiting[i] and i not in closed:
                        close(i, merged_record(cell, got[i], limit, command) if got[i] else
                              cell_header(cell, command) | {"status": "error", "error": "no samples"})
                elif i in closed:
                    continue
                elif kind == "unavailable":
                    if cell["benchmark"] not in unavailable:
                        mark_unavailable(results_path, cell["benchmark"], out, unavailable)
                    closed.add(i)
                    bar.update(1)
                else:
                    print(f"\n[atskv] cell {cell_name(cell)} failed: {out} (recorded; the sweep goes on)",
                          file=sys.stderr)
                    close(i, cell_header(cell, command) | {"status": "error", "error": out})
        finally:   # Ctrl-C, SIGTERM or an error in the driver: stop the workers; what came back is saved
            for w, _, _ in running.values():
                ray.kill(w)


def split_samples(n: int, parts: int) -> list[range]:
    """range(n) in `parts` contiguous parts of near-equal size."""
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def saved_samples(path: Path, commit, n: int) -> dict[int, dict]:
    """The samples of a cell that came back before (its partial file, written at this commit): index -> line."""
    return {r["index"]: r for r in read_jsonl(path, warn=False)
            if r.get("commit") == commit and "part" in r and 0 <= r.get("index", -1) < n}


def merged_record(cell: dict, got: dict[int, dict], limit, command: str) -> dict:
    """The cell's record from its samples (index -> the line `_run` keeps of each), as the serial sweep writes it:
    the samples in order, summarized together; env, time and timing probe from the first sample's part; wall_s
    summed (its compute time); parts: how many parts ran."""
    lines = [got[k] for k in sorted(got)]
    first = lines[0]
    return cell_header(cell, command, first["env"], first["timing_probe"], first["time"]) | \
        summarize_cell(cell, [x["result"] for x in lines], limit) | \
        {"status": "ok", "wall_s": sum(x["wall_s"] for x in lines), "parts": len({x["part"] for x in lines})}


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


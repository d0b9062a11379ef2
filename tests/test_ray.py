"""--ray: on a local Ray cluster with 2 workers, a sweep in which one cell's worker is killed and another cell
raises, then run again, ends with the serial run's records; the killed worker and the raising cell cost only their
own cells, and the rerun runs only what did not finish."""
import json

import pytest

# 2 tasks x 4 methods (one budget): 8 small cells of 2 samples; on 2 workers each cell runs in 2 parts
CELLS = ["--tasks", "needle,passkey", "--context_sizes", "128", "--num_samples", "2", "--budgets", "0.25",
         "--methods", "full,sliding_window,snapkv,h2o"]
RAY = ["--ray", "--ray_workers", "2"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster of 2 CPUs for the module: the sweep joins it instead of starting its own."""
    ray = pytest.importorskip("ray", reason="Ray is in requirements.txt; this environment lacks it")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def outcomes(out):
    """cell -> (status, score, each sample's prediction), for the cells' last records."""
    return {r["cell"]: (r["status"], r.get("score"), [s["prediction"] for s in r.get("samples", [])])
            for r in records(out)}


@pytest.fixture(scope="module")
def faulty_sweep(ray_cluster, tmp_path_factory):
    """A Ray sweep in which one cell's worker is killed and another cell raises, then the same command again."""
    import contextlib
    import io

    import run_experiment

    def run(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run_experiment.main([str(a) for a in args])
        return code, err.getvalue()
    out = tmp_path_factory.mktemp("faulty")
    with pytest.MonkeyPatch.context() as mp:
        # the worker dies in the part that starts with the cell's second sample: its first part may have finished
        mp.setenv("ATSKV_INJECT_FAULT", "kill:snapkv|0.25|needle|128#1 oom:h2o|0.25|passkey")
        first = run("--output_dir", out, *CELLS, *RAY)
        first_records, first_md = records(out), (out / "results.md").read_text()
    saved = {p.name: [json.loads(line)["index"] for line in p.read_text().splitlines()]
             for p in (out / "partial").glob("*.jsonl")}
    return {"first": first, "records": first_records, "md": first_md, "saved": saved,
            "rerun": run("--output_dir", out, *CELLS, *RAY), "out": out}


def test_a_ray_sweep_gives_the_serial_runs_cells_and_scores(faulty_sweep, tmp_path, run_main):
    assert "Ray: 2 workers" in faulty_sweep["first"][1]
    code, err = run_main("--output_dir", tmp_path / "serial", *CELLS)
    assert code == 0, err[-5:]
    serial, parallel = outcomes(tmp_path / "serial"), outcomes(faulty_sweep["out"])
    assert len(serial) == 8 and all(status == "ok" for status, _, _ in serial.values())
    assert parallel == serial   # the cells' last records: 4 from the faulty run, 2 from the rerun
    assert {r["parts"] for r in records(faulty_sweep["out"]) if r["status"] == "ok"} == {2}


def test_a_killed_worker_loses_no_finished_cell_and_the_rerun_runs_only_the_rest(faulty_sweep):
    assert faulty_sweep["first"][0] == 0, faulty_sweep["first"][1][-500:]
    recs = faulty_sweep["records"]
    killed = [r for r in recs if r["status"] == "error" and "WorkerDied" in r["error"]]
    assert [(r["method"], r["task"]) for r in killed] == [("snapkv", "needle")]
    assert sum(r["status"] == "ok" for r in recs) == 6          # all but the killed and the raising cell
    code, err = faulty_sweep["rerun"]
    assert code == 0 and "8 cells, 6 already finished, 2 to run" in err, err[-500:]
    assert sorted(s for s, _, _ in outcomes(faulty_sweep["out"]).values()) == ["ok"] * 8


def test_a_killed_workers_cell_keeps_its_finished_part_for_the_rerun(faulty_sweep):
    """The killed cell's first part came back before its worker died: its sample waits in the cell's partial file,
    the rerun runs only the other part (the merged record equals the serial run's: the test above), and once the
    cell's record is written no partial file is left."""
    killed = next(r for r in faulty_sweep["records"] if r["status"] == "error" and "WorkerDied" in r["error"])
    assert faulty_sweep["saved"] == {f"{killed['cell']}.jsonl": [0]}
    assert not list((faulty_sweep["out"] / "partial").glob("*.jsonl"))


def test_a_cell_that_raises_is_recorded_failed_while_the_others_finish(faulty_sweep):
    raised = [r for r in faulty_sweep["records"] if r["status"] == "error" and "WorkerDied" not in r["error"]]
    assert [(r["method"], r["task"]) for r in raised] == [("h2o", "passkey")]
    assert "OutOfMemoryError" in raised[0]["error"]
    assert "Failed cells" in faulty_sweep["md"]


def test_ray_with_a_bad_worker_share_exits_2_with_one_line(tmp_path, run_main):
    code, lines = run_main("--output_dir", tmp_path / "o", *CELLS, "--ray", "--gpus_per_cell", "0")
    assert code == 2 and len(lines) == 1 and "--gpus_per_cell 0.0" in lines[0], lines

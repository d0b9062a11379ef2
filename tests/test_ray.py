"""--ray: the sweep's cells on a local Ray cluster with 2 workers give the serial run's records; a killed worker or a
cell that raises costs only its own cell, and a rerun runs only what did not finish."""
import json

import pytest

# 2 tasks x 4 methods (one budget): 8 small cells
CELLS = ["--tasks", "needle,passkey", "--context_sizes", "256", "--num_samples", "1", "--budgets", "0.25",
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


def test_a_ray_sweep_gives_the_serial_runs_cells_and_scores(ray_cluster, tmp_path, run_main):
    code, err = run_main("--output_dir", tmp_path / "serial", *CELLS)
    assert code == 0, err[-5:]
    code, err = run_main("--output_dir", tmp_path / "ray", *CELLS, *RAY)
    assert code == 0, err[-5:]
    assert any("Ray: 2 workers" in line for line in err), err
    serial, parallel = outcomes(tmp_path / "serial"), outcomes(tmp_path / "ray")
    assert len(serial) == 8 and all(status == "ok" for status, _, _ in serial.values())
    assert parallel == serial
    assert (tmp_path / "ray" / "results.md").exists()


def test_a_killed_worker_loses_no_finished_cell_and_the_rerun_runs_only_the_rest(ray_cluster, tmp_path, run_main,
                                                                                  monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv("ATSKV_INJECT_FAULT", "kill:snapkv|0.25|needle")   # the worker's process exits in that cell
    code, err = run_main("--output_dir", out, *CELLS, *RAY)
    assert code == 0, err[-5:]
    by_status = {}
    for r in records(out):
        by_status.setdefault(r["status"], []).append(r["method"] + "|" + r["task"])
    assert by_status["error"] == ["snapkv|needle"] and len(by_status["ok"]) == 7
    assert "WorkerDied" in next(r["error"] for r in records(out) if r["status"] == "error")
    monkeypatch.delenv("ATSKV_INJECT_FAULT")
    code, err = run_main("--output_dir", out, *CELLS, *RAY)
    assert code == 0 and any("8 cells, 7 already finished, 1 to run" in line for line in err), err
    assert sorted(s for s, _, _ in outcomes(out).values()) == ["ok"] * 8


def test_a_cell_that_raises_is_recorded_failed_while_the_others_finish(ray_cluster, tmp_path, run_main, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv("ATSKV_INJECT_FAULT", "oom:h2o|0.25|passkey")
    code, err = run_main("--output_dir", out, *CELLS, *RAY)
    assert code == 0, err[-5:]
    failed = [r for r in records(out) if r["status"] != "ok"]
    assert [(r["method"], r["task"]) for r in failed] == [("h2o", "passkey")]
    assert "OutOfMemoryError" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in records(out)) == 7
    assert "Failed cells" in (out / "results.md").read_text()


def test_ray_with_a_bad_worker_share_exits_2_with_one_line(tmp_path, run_main):
    code, lines = run_main("--output_dir", tmp_path / "o", *CELLS, "--ray", "--gpus_per_cell", "0")
    assert code == 2 and len(lines) == 1 and "--gpus_per_cell 0.0" in lines[0], lines

"""bench/compare_runs.py and bench/compare_partial.py: the sample-by-sample comparisons the fast path's quality
table rests on (results/recall-fast-quality-h100)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_dir(path: Path, method: str, answers: dict, task="multi_key", budget=0.25) -> Path:
    """A results.jsonl with one finished cell: sample id -> (prediction, score)."""
    path.mkdir(parents=True)
    record = {"status": "ok", "method": method, "context_size": 8192, "budget": budget, "task": task,
              "samples": [{"id": i, "prediction": p, "score": s} for i, (p, s) in answers.items()]}
    (path / "results.jsonl").write_text(json.dumps(record) + "\n")
    return path


def _script(name: str, *args) -> str:
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *map(str, args)], capture_output=True,
                          text=True, check=True).stdout


def test_compare_runs_counts_identical_predictions_and_scores_only_the_samples_both_hold(tmp_path):
    a = _run_dir(tmp_path / "a", "m", {"s1": (" 123.", 1.0), "s2": (" 45.", 0.0), "s3": (" 7.", 1.0)})
    b = _run_dir(tmp_path / "b", "m", {"s1": (" 123.", 1.0), "s2": (" 456.", 1.0)})
    out = _script("compare_runs.py", a, b)
    assert "| 8192 | 0.25 | multi_key | 2 | 1 | 50.0 | 100.0 | -50.0 |" in out
    assert out.strip().endswith("largest difference: 50.0 points")


def test_compare_runs_takes_an_unfinished_cell_from_its_partial_files(tmp_path):
    a = _run_dir(tmp_path / "a", "m", {"s1": (" 1.", 1.0)}, task="needle")
    partial = tmp_path / "partial"
    partial.mkdir()
    rows = [{"id": "multi_key-8192-d0.00-s1", "result": {"prediction": " 9.", "score": 0.0}}]
    (partial / "fast-0.25-multi_key.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = _run_dir(tmp_path / "b", "m", {"multi_key-8192-d0.00-s1": (" 9.", 0.0),
                                       "multi_key-8192-d0.25-s2": (" 8.", 1.0)})
    out = _script("compare_runs.py", a, b, "--partial_a", partial)
    assert "| 8192 | 0.25 | multi_key | 1 | 1 | 0.0 | 0.0 | +0.0 |" in out


def test_compare_runs_compares_two_unfinished_runs_on_the_samples_both_saved(tmp_path):
    def unfinished(name, answers):
        run = tmp_path / name
        (run / "partial").mkdir(parents=True)
        (run / "results.jsonl").write_text("")
        rows = [{"id": i, "result": {"prediction": p, "score": s}} for i, (p, s) in answers.items()]
        (run / "partial" / "part2-0.1-needle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run
    a = unfinished("a", {"needle-8192-d0.00-s1": (" 9.", 1.0), "needle-8192-d0.25-s2": (" 8.", 1.0)})
    b = unfinished("b", {"needle-8192-d0.00-s1": (" 7.", 0.0)})
    out = _script("compare_runs.py", a, b, "--partial_a", a / "partial", "--partial_b", b / "partial")
    assert "| 8192 | 0.1 | needle | 1 | 0 | 100.0 | 0.0 | +100.0 |" in out


def test_compare_partial_scores_the_saved_samples_against_the_finished_run(tmp_path):
    run = _run_dir(tmp_path / "run", "atskv[external_memory=true]",
                   {"multi_key-8192-d0.00-s1": (" 9.", 1.0), "multi_key-8192-d0.25-s2": (" 8.", 0.0)})
    partial = tmp_path / "partial"
    partial.mkdir()
    rows = [{"id": "multi_key-8192-d0.00-s1", "result": {"prediction": " 9.", "score": 0.0}}]
    (partial / "promote-0.25-multi_key.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _script("compare_partial.py", partial, run)
    assert "multi_key at 0.25: 1 samples at 8192 tokens, 0.0 against 100.0" in out
    assert out.strip().endswith("all: 1 samples, 0.0 against 1.0 points")

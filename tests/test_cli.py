"""The command line: bad input fails fast with one line and exit code 2; sweeps resume, survive faults and corrupt lines."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--tasks", "needle", "--context_sizes", "256", "--num_samples", "1", "--budgets", "0.5,0.25",
        "--methods", "full,sliding_window"]


def cli(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "run_experiment.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


BAD_INPUT = [
    (["--methods", "full,bogus"], "unknown method 'bogus'; known methods: "),
    (["--methods", "atskv[retrieval_layers=3,span=5]"], "bad value '3,span=5' for 'retrieval_layers'"),
    (["--benchmarks", "mmlu"], "unknown benchmark 'mmlu'; accepted: synthetic, longbench, zeroscrolls"),
    (["--context_sizes", "100000"], "context size 100000 out of range: accepted are 128 to 8192"),
    (["--context_sizes", "16"], "context size 16 out of range"),
    (["--context_sizes", "abc"], "bad context size 'abc'"),
    (["--budgets", "1.5"], "budget '1.5' out of range"),
    (["--budgets", "0"], "budget '0' out of range"),
    (["--budgets", "half"], "bad budget 'half'"),
    (["--eval_mode", "sometimes"], "unknown --eval_mode 'sometimes'"),
    (["--tasks", "sudoku"], "unknown task 'sudoku' for benchmarks synthetic; accepted: passkey"),
    (["--num_samples", "0"], "--num_samples 0 must be >= 1"),
    (["--model_name", "not a model"], "unknown model name 'not a model'"),
    (["--model_name", "/nonexistent/m.gguf"], "model file not found"),
    (["--model_config", "qwen3-8b"], "--model_config 'qwen3-8b' has random weights: accepted with --benchmark speed"),
    (["--model_config", "gpt-9", "--benchmark", "speed"], "unknown --model_config 'gpt-9'; accepted: llama-3.1-8b"),
]


def test_bad_input_exits_2_with_one_line_from_the_command_line(tmp_path):
    """One real process: the exit status, and nothing else on stderr (no import-time warnings)."""
    args, message = BAD_INPUT[0]
    proc = cli(*args, "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_before_loading_a_model(args, message, tmp_path, run_main):
    """The same entry point in this process (a process per case cost 5 s each, mostly importing torch)."""
    code, lines = run_main(*args, "--output_dir", tmp_path / "o")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_missing_data_dir_exits_2(tmp_path, run_main):
    code, err = run_main("--data_dir", tmp_path / "nope", "--output_dir", tmp_path / "o")
    assert code == 2 and len(err) == 1 and "is not a directory" in err[0]


def test_corrupt_data_file_names_the_file_and_line(tmp_path, run_main):
    d = tmp_path / "data"
    d.mkdir()
    (d / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c"}\n{"input": "q2", "cont\n')
    code, err = run_main("--data_dir", d, "--output_dir", tmp_path / "o")
    assert code == 2 and len(err) == 1
    assert f"corrupt data file {d / 'hotpotqa.jsonl'}: line 2 is not valid JSON" in err[0]


def test_malformed_gguf_exits_2(tmp_path, run_main):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"\x00" * 64)
    code, err = run_main("--model_name", bad, "--output_dir", tmp_path / "o", *TINY)
    assert code == 2 and any("malformed .gguf" in ln for ln in err)


def test_unwritable_output_directory_exits_2(tmp_path, run_main):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_main("--output_dir", blocker / "sub")
    assert code == 2 and len(err) == 1 and "is not writable" in err[0]



def wait_for_first_cell(out, limit_s=300):
    """Poll until the sweep in `out` has written its first finished cell."""
    deadline = time.time() + limit_s
    p = out / "results.jsonl"
    while time.time() < deadline and not (p.exists() and p.read_text().splitlines()):
        time.sleep(0.05)


def _records(out):
    return [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines() if l.strip()]


def test_sweep_writes_one_line_per_cell_and_a_report(tmp_path, run_main):
    out = tmp_path / "o"
    code, lines = run_main("--output_dir", out, *TINY)
    assert code == 0, lines[-20:]
    # it ends by saying where the report is, then three lines of it
    where = max(i for i, ln in enumerate(lines) if ln.startswith("[atskv] results: "))
    assert lines[where] == f"[atskv] results: {(out / 'results.md').resolve()} (figures in {out / 'figures'})"
    summary = lines[where + 1:]
    assert len(summary) == 2                    # one compressed method: no "then" line
    assert summary[0].startswith("  Synthetic benchmark, full cache: score ") and "MB on the device" in summary[0]
    assert summary[1].startswith("  Synthetic benchmark at 25%, best: sliding_window ")
    recs = _records(out)
    assert [(r["method"], r["budget"]) for r in recs] == [("full", None), ("sliding_window", 0.5),
                                                         ("sliding_window", 0.25)]
    assert all(r["status"] == "ok" and r["n_samples"] == 1 for r in recs)
    md = (out / "results.md").read_text()
    assert "| full | 100% |" in md and "| sliding_window | 25% |" in md
    assert (out / "figures" / "synthetic_accuracy_vs_budget.png").stat().st_size > 1000
    # rerun: everything is finished, nothing is run again
    code, lines = run_main("--output_dir", out, *TINY)
    assert code == 0 and len(_records(out)) == 3 and any("3 already finished, 0 to run" in ln for ln in lines)


def test_resume_after_a_kill_runs_no_cell_twice_and_loses_none(tmp_path, run_main):
    out = tmp_path / "o"
    args = [sys.executable, "run_experiment.py", "--output_dir", str(out), *TINY]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_cell(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _records(out)
    assert 1 <= len(first) <= 3
    assert run_main("--output_dir", out, *TINY)[0] == 0   # the rerun in this process (the killed run was not)
    recs = _records(out)
    cells = [r["cell"] for r in recs]
    assert len(cells) == len(set(cells)) == 3
    assert [r["cell"] for r in recs[:len(first)]] == [r["cell"] for r in first]


def test_corrupt_last_line_is_ignored_with_a_warning(tmp_path, run_main):
    out = tmp_path / "o"
    assert run_main("--output_dir", out, *TINY)[0] == 0
    with open(out / "results.jsonl", "a") as f:
        f.write('{"cell": "abc", "status": "o')  # a crash mid-write
    code, err = run_main("--output_dir", out, *TINY)
    assert code == 0 and any("ignoring corrupt line 4" in line for line in err)
    assert run_main("--report_only", "--output_dir", out)[0] == 0
    assert "3 finished" in (out / "results.md").read_text()


def test_injected_out_of_memory_in_one_cell_is_recorded_and_the_sweep_goes_on(tmp_path, run_main, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv("ATSKV_INJECT_FAULT", "oom:sliding_window|0.5|")
    code, err = run_main("--output_dir", out, *TINY)
    assert code == 0, err[-20:]
    monkeypatch.delenv("ATSKV_INJECT_FAULT")
    recs = {(r["method"], r["budget"]): r for r in _records(out)}
    assert recs[("sliding_window", 0.5)]["status"] == "error"
    assert "OutOfMemoryError" in recs[("sliding_window", 0.5)]["error"]
    assert recs[("full", None)]["status"] == "ok" and recs[("sliding_window", 0.25)]["status"] == "ok"
    assert "Failed cells" in (out / "results.md").read_text()
    # a rerun retries only the failed cell
    code, err = run_main("--output_dir", out, *TINY)
    assert code == 0 and any("2 already finished, 1 to run" in line for line in err)
    assert len(_records(out)) == 4


def test_injected_nan_is_recorded(tmp_path):
    out = tmp_path / "o"
    proc = cli("--output_dir", str(out), *TINY[:-2], "--methods", "full", env={"ATSKV_INJECT_FAULT": "nan:full"})
    assert proc.returncode == 0
    (rec,) = _records(out)
    assert rec["status"] == "error" and "NaN" in rec["error"]


def test_same_command_and_seed_give_the_same_results_apart_from_timings(tmp_path, run_main):
    timing = {"time", "wall_s", "prefill_s", "decode_ms_per_token", "timing_probe", "command"}   # command: the dir
    runs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert run_main("--output_dir", out, *TINY[:-4], "--methods", "sliding_window", "--budgets", "0.25")[0] == 0
        runs.append([{k: v for k, v in r.items() if k not in timing} for r in _records(out)])
    assert runs[0] == runs[1]


def test_report_only_needs_no_model_and_rebuilds_results_md(tmp_path, run_main, monkeypatch):
    out = tmp_path / "o"
    assert run_main("--output_dir", out, *TINY)[0] == 0
    (out / "results.md").unlink()
    import utils

    def no_model(*a, **k):
        raise AssertionError("--report_only loaded a model")
    monkeypatch.setattr(utils, "load_model_and_tokenizer", no_model)
    assert run_main("--report_only", "--output_dir", out)[0] == 0 and (out / "results.md").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_with_the_finished_cells_and_a_report_and_resumes(tmp_path, sig, code, run_main):
    """Ctrl-C, or a scheduler stopping the job (SIGTERM): every finished cell stays, whole, with a report of them,
    and the same command then runs only what is left."""
    out = tmp_path / "o"
    args = [sys.executable, "run_experiment.py", "--output_dir", str(out), *TINY]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_first_cell(out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    recs = _records(out)  # every line parses: no half-written cell
    if len(recs) < 3:  # interrupted inside the sweep (not after its last cell)
        assert proc.returncode == code and "interrupted" in err
        assert "| full | 100% |" in (out / "results.md").read_text()
    assert run_main("--output_dir", out, *TINY)[0] == 0   # the rerun in this process (the stopped run was not)
    assert len({r["cell"] for r in _records(out)}) == 3 == len(_records(out))
    assert not list((out / "partial").glob("*.jsonl"))   # each cell's saved samples went into its record


def test_a_cell_stopped_midway_goes_on_from_its_next_sample(tmp_path, monkeypatch):
    """A cell's finished samples are saved as they finish: a rerun after a stop runs only the samples left, and
    samples saved at another commit are run again."""
    from types import SimpleNamespace
    import evals.cells as cells
    calls, stop_at = [], ["c"]

    def one_sample(model, tok, cell, samples, limit, inject=None):
        (s,) = samples
        calls.append(s.id)
        if s.id in stop_at:
            stop_at.clear()   # once
            raise RuntimeError("stopped while the third sample runs")
        return [{"id": s.id, "score": 1.0}]
    monkeypatch.setattr(cells, "run_samples", one_sample)
    samples = [SimpleNamespace(id=i) for i in "abcd"]
    path = tmp_path / "partial" / "cell.jsonl"
    with pytest.raises(RuntimeError, match="stopped"):
        cells.run_samples_saved(None, None, {}, samples, None, None, path, "c1")
    out = cells.run_samples_saved(None, None, {}, samples, None, None, path, "c1")
    assert calls == ["a", "b", "c", "c", "d"] and [r["id"] for r in out] == list("abcd")
    calls.clear()
    cells.run_samples_saved(None, None, {}, samples, None, None, path, "c2")
    assert calls == list("abcd")


def unusable_devices():
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return (["cuda"] if not n else []) + [f"cuda:{n + 2}"] + ([] if mps else ["mps"]) + ["tpu", "gpu0"]


@pytest.mark.parametrize("device", unusable_devices())
def test_a_device_this_machine_cannot_use_exits_2_with_one_line_before_any_work(device, tmp_path, run_main):
    code, lines = run_main("--device", device, "--output_dir", tmp_path / "o")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and repr(device) in lines[0] and "accepted" in lines[0]
    assert not (tmp_path / "o").exists()      # nothing planned or created


def test_help_shows_every_options_default():
    from run_experiment import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "--seed SEED seed of the samples and of everything random (default: 42)" in text
    assert "--output_dir OUTPUT_DIR where results.jsonl, results.md, tables/ and figures/ go (default: outputs)" in text
    assert "--preset PRESET" in text and "(default: quick)" in text


def test_a_named_full_commit_is_written_as_a_checkout_writes_its_own(monkeypatch):
    # a sweep resumes saved samples only at an equal commit string: a call on a copy of the tree (ATSKV_COMMIT, the
    # full hash) and a call that reads .git must agree, or the second redoes every finished sample
    from evals.records import source_commit
    monkeypatch.setenv("ATSKV_COMMIT", "050a3014653922e29c2783c2def81969992e43b4")
    assert source_commit() == "050a301465"
    monkeypatch.setenv("ATSKV_COMMIT", "my-build-7")
    assert source_commit() == "my-build-7"

"""Running Triton kernel tests on a CPU machine: scripts in a subprocess with TRITON_INTERPRET=1 (the interpreter
must be set before Triton is imported), from the project's root; each prints "ok" at its end.

A test module registers its script when it is imported (`register`); every registered script runs in one
subprocess (one import of torch, Triton and the project instead of one per test), started in the background as
soon as collection ends when a collected test runs one (`start_in_background`, from conftest.py: the interpreter is
single-threaded Python, so on a 2-core machine it overlaps the other tests), else by the first test that needs it;
each test then checks its own script's outcome."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs Triton (it ships with CUDA builds of torch, not with the CPU build)")

_RUNNER = r"""
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])
outcomes = []
for script in json.load(sys.stdin):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(script, "<interpreted>", "exec"), {"__name__": "__interpreted__"})
        outcomes.append({"ok": out.getvalue().strip().endswith("ok"), "error": "no ok printed"})
    except Exception:
        outcomes.append({"ok": False, "error": traceback.format_exc()[-3000:]})
print("OUTCOMES " + json.dumps(outcomes))
"""
_registered: list = []
_outcomes: dict = {}


def register(script: str) -> str:
    """Queue `script` (with {root!r} filled in) for the shared subprocess; returns the filled-in script."""
    script = script.replace("{root!r}", repr(ROOT))
    if script not in _registered:
        _registered.append(script)
    return script


_background: dict = {}


def _start(scripts: list):
    """The subprocess, its input and output in temporary files (no pipe to fill while nobody reads it)."""
    files = [tempfile.TemporaryFile("w+") for _ in range(3)]
    json.dump(scripts, files[0])
    files[0].seek(0)
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, ROOT], stdin=files[0], stdout=files[1],
                            stderr=files[2], env=dict(os.environ, TRITON_INTERPRET="1"), text=True, cwd=ROOT)
    return proc, scripts, files


def _finish(proc, scripts: list, files) -> None:
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out, err = [(f.seek(0), f.read())[1] for f in files[1:]]
    for f in files:
        f.close()
    lines = [line for line in out.splitlines() if line.startswith("OUTCOMES ")]
    outcomes = json.loads(lines[-1][len("OUTCOMES "):]) if lines else \
        [{"ok": False, "error": f"the interpreter's process exited {proc.returncode}: {err[-3000:]}"}] * len(scripts)
    _outcomes.update(zip(scripts, outcomes))


def start_in_background(items) -> None:
    """After collection: start the registered scripts' subprocess now if any collected test runs one."""
    codes = [getattr(getattr(item, "function", None), "__code__", None) for item in items]
    if any(c is not None and "run_interpreted" in c.co_names for c in codes) and _registered \
            and importlib.util.find_spec("triton") is not None:
        _background["batch"] = _start(list(_registered))


def stop_background() -> None:
    """At the session's end: a batch that no test waited for (its tests deselected or the run interrupted)."""
    if "batch" in _background:
        proc, _, files = _background.pop("batch")
        proc.kill()
        proc.wait()
        for f in files:
            f.close()


def _run_batch(scripts: list) -> None:
    _finish(*_start(scripts))


def run_interpreted(script: str) -> None:
    """Fail with the script's traceback unless it ran under Triton's interpreter and printed ok."""
    script = register(script)
    if script not in _outcomes and "batch" in _background:
        _finish(*_background.pop("batch"))
    if script not in _outcomes:
        _run_batch([s for s in _registered if s not in _outcomes])
    outcome = _outcomes[script]
    if "only 0-dimensional arrays can be converted" in outcome["error"] and not outcome["ok"]:
        pytest.skip("Triton's interpreter fails on this NumPy (it needs numpy < 2.3)")
    assert outcome["ok"], outcome["error"]

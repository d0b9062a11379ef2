"""Running Triton kernel tests on a CPU machine: scripts in a subprocess with TRITON_INTERPRET=1 (the interpreter
must be set before Triton is imported), from the project's root; each prints "ok" at its end.

A test module registers its script when it is imported (`register`); the first test to run one runs every registered
script in one subprocess (one import of torch, Triton and the project instead of one per test), and each test then
checks its own script's outcome."""
import importlib.util
import json
import os
import subprocess
import sys

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


def _run_batch(scripts: list) -> None:
    r = subprocess.run([sys.executable, "-c", _RUNNER, ROOT], input=json.dumps(scripts),
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
    lines = [line for line in r.stdout.splitlines() if line.startswith("OUTCOMES ")]
    outcomes = json.loads(lines[-1][len("OUTCOMES "):]) if lines else \
        [{"ok": False, "error": f"the interpreter's process exited {r.returncode}: {r.stderr[-3000:]}"}] * len(scripts)
    _outcomes.update(zip(scripts, outcomes))


def run_interpreted(script: str) -> None:
    """Fail with the script's traceback unless it ran under Triton's interpreter and printed ok."""
    script = register(script)
    if script not in _outcomes:
        _run_batch([s for s in _registered if s not in _outcomes])
    outcome = _outcomes[script]
    if "only 0-dimensional arrays can be converted" in outcome["error"] and not outcome["ok"]:
        pytest.skip("Triton's interpreter fails on this NumPy (it needs numpy < 2.3)")
    assert outcome["ok"], outcome["error"]

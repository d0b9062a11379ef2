"""Running a Triton kernel test on a CPU machine: a script in a subprocess with TRITON_INTERPRET=1 (the interpreter
must be set before Triton is imported), from the project's root; it prints "ok" at its end."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs Triton (it ships with CUDA builds of torch, not with the CPU build)")


def run_interpreted(script: str) -> None:
    """Run `script` (with {root} filled in) under Triton's interpreter; fail with its stderr unless it printed ok."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script.replace("{root!r}", repr(ROOT))], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    if "only 0-dimensional arrays can be converted" in r.stderr:
        pytest.skip("Triton's interpreter fails on this NumPy (it needs numpy < 2.3)")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

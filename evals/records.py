"""What every run records about itself and where: a cell's identity, the cells already finished, the environment,
commit and command of the run, and its report."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
from pathlib import Path

from utils import read_jsonl


def cell_key(spec: dict) -> str:
    """A cell is identified by everything that changes its result."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def finished_keys(results_path: Path) -> set[str]:
    return {r["cell"] for r in read_jsonl(results_path) if r.get("status") == "ok" and "cell" in r}


def environment_info(model, model_name: str | None = None) -> dict:
    import torch
    import transformers
    from utils import cpu_name, model_provenance
    dev = str(model.device)
    hw = torch.cuda.get_device_name(model.device) if dev.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    env = {"device": dev, "hardware": hw, "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
           "dtype": str(model.dtype).replace("torch.", ""), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    if model_name:
        env["model_source"] = model_provenance(model_name, model)
    env["commit"] = source_commit()
    if dev.startswith("cuda") and not torch.backends.cuda.cudnn_sdp_enabled():
        env["sdpa"] = "cuDNN backend off"
    return env


def source_commit() -> str | None:
    """The project's git commit (10 hex digits), with '-dirty' when the tree has uncommitted changes; $ATSKV_COMMIT
    when set (a copy of the tree on another machine, whose .git may be another commit's), a full hash shortened
    alike; None outside a checkout."""
    import subprocess
    here = Path(__file__).resolve().parent.parent
    named = os.environ.get("ATSKV_COMMIT")
    if named:   # named by the caller: a copy of the tree whose .git is not its own
        # one spelling per commit: a sweep resumes a cell's saved samples only where the commit string is equal, so a
        # call that names the commit and one that reads it from .git must write the same string
        return named[:10] if re.fullmatch(r"[0-9a-f]{11,40}", named) else named
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command as a user would type it again."""
    import shlex
    return " ".join(["python run_experiment.py", *(shlex.quote(a) for a in sys.argv[1:])])


def write_report(out_dir: Path, args) -> None:
    from report import build_report
    build_report(out_dir, command=command_line())


def print_summary(out_dir: Path) -> None:
    """Where the report is, and three lines of it: the full cache, then the compressed methods at the smallest
    budget, best first, each with the memory it holds."""
    from report import run_summary
    print(f"[atskv] results: {(out_dir / 'results.md').resolve()} (figures in {out_dir / 'figures'})",
          file=sys.stderr)
    for line in run_summary(out_dir):
        print(f"  {line}", file=sys.stderr)

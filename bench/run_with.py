"""Run `run_experiment.py` with module constants of the kernels set first, e.g. to time the recall kernels' pruning
on a task's contexts (which only the real model's attention can show):

    python bench/run_with.py recall_kernels.PRUNE_SUBBLOCKS=16 -- --benchmark speed --speed_contexts multi_key ...

Each SETTING is MODULE.NAME=VALUE, MODULE a module of kernels/ and VALUE a Python literal. The records name only the
commit, so the settings are also written to the output directory's `run_with.json` (one line a run, appended)."""
import ast
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: run_with.py MODULE.NAME=VALUE ... -- <run_experiment.py arguments>")
    settings, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    applied = {}
    for s in settings:
        target, _, text = s.partition("=")
        module, _, name = target.rpartition(".")
        try:
            mod = importlib.import_module(f"kernels.{module}")
            value = ast.literal_eval(text)
        except (ImportError, ValueError, SyntaxError):
            raise SystemExit(f"setting {s!r}: expected MODULE.NAME=VALUE, MODULE in kernels/, VALUE a literal")
        if not hasattr(mod, name):
            raise SystemExit(f"setting {s!r}: kernels.{module} has no {name}")
        setattr(mod, name, value)
        applied[target] = value
    out = Path(rest[rest.index("--output_dir") + 1]) if "--output_dir" in rest else Path("outputs")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run_with.json", "a") as f:
        f.write(json.dumps({"settings": applied, "args": rest}) + "\n")
    import run_experiment
    return run_experiment.main(rest)


if __name__ == "__main__":
    sys.exit(main())

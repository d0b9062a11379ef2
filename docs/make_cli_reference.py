"""Write docs/cli.md from run_experiment's argparse (`python docs/make_cli_reference.py`); a test checks that the
file matches `--help`, so the reference cannot drift from the code."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cli_reference() -> str:
    from run_experiment import build_parser
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"   # argparse wraps at the terminal's width: a fixed one keeps the file stable
    try:
        text = build_parser().format_help()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return ("# `run_experiment.py` command-line reference\n\n"
            "Generated from `--help` by `python docs/make_cli_reference.py`; do not edit by hand.\n\n"
            "```text\n" + text + "```\n")


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(cli_reference())
    print(f"wrote {ROOT / 'docs' / 'cli.md'}")

"""The README's promises: its Python snippets run as written from any directory, and the CLI reference in docs/
is what --help prints."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readmes_python_snippets_run_as_written_from_another_directory(tmp_path):
    """The snippets in order, as one script, in an empty directory: the project must be importable from there
    (requirements.txt installs it). They answer a real question about a real context, and say what was expected."""
    snippets = python_snippets()
    assert len(snippets) >= 2
    script = tmp_path / "snippets.py"
    script.write_text("\n".join(snippets))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # no help from the test runner's path
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    full = next(ln for ln in lines if ln.startswith("full "))
    expected = re.search(r"\(expected (\d+)\)", full).group(1)
    assert expected in full.split("(expected")[0], full          # the full cache answers the question
    assert any(ln.startswith("atskv {'external_memory': True}:") and "host store" in ln for ln in lines), lines


def test_the_cli_reference_in_docs_is_what_help_prints():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from make_cli_reference import cli_reference
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), \
        "docs/cli.md is stale: run `python docs/make_cli_reference.py`"

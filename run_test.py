"""Run the test suite: `python run_test.py` (extra arguments go to pytest, e.g. `-k cache -x` or a test file)."""
import sys

import pytest

if __name__ == "__main__":
    args = sys.argv[1:]
    paths = [a for a in args if not a.startswith("-")]
    sys.exit(pytest.main(["-ra"] + ([] if paths else ["tests"]) + args))

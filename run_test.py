"""Run the test suite: `python run_test.py` (extra arguments go to pytest, e.g. `-k cache -x`)."""
import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-ra", "tests"] + sys.argv[1:]))

"""The benchmarks, by job: synthetic.py (the synthetic tasks), harness.py (prefill, generation and one cell through
any cache), speed.py (decode-speed benchmarks), real_benchmarks.py (LongBench and ZeroSCROLLS); sweep.py runs a sweep
of cells and records.py records each run. `evaluation.py` gathers the benchmarks' public names."""

"""The benchmarks, by job: synthetic.py (the synthetic tasks), harness.py (prefill, generation and one cell through
any cache), speed.py (decode-speed benchmarks), real_benchmarks.py (LongBench and ZeroSCROLLS). `evaluation.py`
gathers their public names."""

"""Benchmarks and the evaluation harness, by job (this module gathers them; import from here or from each):

- synthetic.py: the synthetic benchmark (tasks, haystacks, samples, scoring);
- harness.py: prompts, chunked prefill, generation through any cache, one cell at a time, summaries;
- speed.py: decode-speed benchmarks (plain path, fast path, largest batch, profiles, answers);
- real_benchmarks.py: LongBench and ZeroSCROLLS (prompts, loaders, scoring, cells).
"""
from __future__ import annotations

from evals.synthetic import (  # noqa: F401
    DEFAULT_DEPTHS, EVAL_MODES, REPETITIVE_FILLER, SYNTHETIC_TASKS, Sample, answer_complete, build_haystack,
    file_sentences, make_synthetic_sample, natural_sentences, score_synthetic, synthetic_samples)
from evals.harness import (  # noqa: F401
    MAX_NEW_TOKENS, encode_prompt, evaluate_synthetic_cell, forward_chunked, make_cache, make_kvpress,
    measure_prefill_overhead, run_generation, run_multi_question, summarize_samples)
from evals.speed import (  # noqa: F401
    _prefill_contexts, check_fast_answers, device_bandwidth_gbs, largest_decode_batch, measure_decode_speed,
    measure_plain_decode, plain_decode_ms, profile_decode_step, timing_probe)
from evals.real_benchmarks import (  # noqa: F401
    LONGBENCH_HUB_ZIP, LONGBENCH_MAX_NEW_TOKENS, LONGBENCH_NO_CHAT, LONGBENCH_PROMPTS, LONGBENCH_TASKS,
    REAL_FILE_HINT, REAL_SUBDIRS, REAL_TASKS, ZEROSCROLLS_HUB_ZIP, ZEROSCROLLS_MAX_NEW_TOKENS, ZEROSCROLLS_TASKS,
    available_real_tasks, encode_real, evaluate_real_cell, first_line_done, longbench_samples, real_samples,
    score_real, zeroscrolls_samples)

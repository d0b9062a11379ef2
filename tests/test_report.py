"""results.md from results.jsonl alone: every memory tier, times with their conditions, intervals, provenance."""
import json
import os
import stat

import pytest

import report


def record(method, budget, score, *, size=2048, active=4e6, summaries=0, passive=0, probe=8.0, hardware="cpu box",
           n=5, prefill=1.0, decode=50.0):
    per = [1.0] * round(score * n / 100) + [0.0] * (n - round(score * n / 100))
    return {"cell": f"{method}-{budget}-{size}-{probe}", "status": "ok", "benchmark": "synthetic", "task": "needle",
            "method": method, "budget": budget, "score": score, "context_size": size, "model": "smollm2-135m",
            "seed": 42, "eval_mode": "question_agnostic", "num_samples": n, "n_samples": n, "kv_bytes": active,
            "active_kv_bytes": active, "summary_bytes": summaries, "passive_bytes": passive, "prefill_s": prefill,
            "decode_ms_per_token": decode, "command": "python run_experiment.py",
            "samples": [{"id": str(i), "depth": i / max(1, n - 1), "score": s} for i, s in enumerate(per)],
            "timing_probe": {"probe_ms": probe, "load1": 1.0},
            "env": {"hardware": hardware, "device": "cpu", "dtype": "float32", "cpu": "Test CPU, 2 cores",
                    "commit": "abc1234567", "model_source": "SmolLM2-135M-Instruct, Q4_1 GGUF, run in float32"}}


def build(tmp_path, recs):
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    report.build_report(tmp_path, command="python run_experiment.py")
    return (tmp_path / "results.md").read_text()


def test_results_md_shows_every_tier_that_a_method_holds(tmp_path):
    md = build(tmp_path, [record("full", None, 100, active=45e6),
                          record("atskv[external_memory=true]", 0.1, 100, active=4.5e6, summaries=0.25e6,
                                 passive=40e6)])
    assert "device MB @2048: KV + summaries | host MB @2048" in md
    assert "| atskv[external_memory=true] | 10% | 100.0 | 100.0 [57-100] | 5 | 100% | 4.3 + 0.24 | 38.1 |" in md
    assert "| full | 100% | 100.0 | 100.0 [57-100] | 5 | 100% | 42.9 | - |" in md
    assert (tmp_path / "figures" / "synthetic_memory_by_tier.png").stat().st_size > 1000


def test_a_passive_tier_kept_on_the_device_counts_as_device_memory_and_the_header_says_so(tmp_path):
    tier = record("atskv[external_memory=true;passive_device=true]", 0.1, 100, active=4.5e6, summaries=0.25e6)
    tier["device_tier_bytes"] = 40e6
    md = build(tmp_path, [record("full", None, 100, active=45e6), tier])
    assert "device MB @2048: KV + summaries (+ passive tier kept there) | host MB @2048" in md
    assert "| 100% | 4.3 + 38.39 | - |" in md


def test_the_summary_ranks_methods_by_score_with_the_memory_each_holds(tmp_path):
    md = build(tmp_path, [record("full", None, 100, active=45e6), record("snapkv", 0.1, 20, active=4.5e6),
                          record("atskv[external_memory=true]", 0.1, 100, active=4.5e6, passive=40e6)])
    summary = md.split("## Summary: score at a stated memory")[1]
    assert "- Synthetic benchmark, full cache: score 100 [57-100], 42.9 MB on the device" in summary
    assert ("- Synthetic benchmark at 10%: atskv[external_memory=true] 100 [57-100] (4.3 MB on the device + 38.1 MB "
            "on the host); snapkv 20 [4-62] (4.3 MB on the device)") in summary


def test_each_cells_times_are_in_the_table_and_cells_timed_under_other_conditions_are_marked(tmp_path):
    md = build(tmp_path, [record("full", None, 100, probe=8.0, prefill=2.0, decode=60.0),
                          record("snapkv", 0.25, 40, probe=8.2, prefill=2.1, decode=61.0),
                          record("snapkv", 0.1, 20, probe=20.0, prefill=5.0, decode=150.0),
                          record("atskv", 0.1, 20, hardware="another box", prefill=2.0, decode=62.0)])
    assert "| prefill s | decode ms/token |" in md
    assert "| 2.00 | 60.0 |" in md                     # full: the run's usual conditions, unmarked
    assert "| 5.00† | 150.0† |" in md                  # its probe ran 2.5x slower than the run's median
    assert "| 2.00‡ | 62.0‡ |" in md                   # other hardware
    assert "† a CPU-speed probe" in md


def test_decode_times_of_cells_decoded_on_the_fast_path_are_marked_as_such(tmp_path):
    fast = record("atskv", 0.1, 20, prefill=2.0, decode=9.0) | {"fast_decode": True}
    md = build(tmp_path, [record("full", None, 100, prefill=2.0, decode=60.0), fast])
    assert "| 2.00 | 60.0 |" in md                     # the plain loop: unmarked
    assert "| 2.00 | 9.0§ |" in md                     # the prefill is the plain path's in both
    assert "§ decoded on the fast path" in md


def test_results_md_states_the_models_source_hardware_commit_intervals_and_the_floor(tmp_path):
    md = build(tmp_path, [record("full", None, 100), record("sliding_window", 0.1, 20)])
    assert "- model: smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF, run in float32)" in md
    assert "- hardware: Test CPU, 2 cores; device cpu, float32" in md
    assert "- commit: abc1234567" in md
    assert "95% interval" in md and "one sample moves a cell's score by 20 points" in md
    assert "**The floor.**" in md and "a floor of about 20 points" in md


@pytest.mark.parametrize("scores,expected", [([1.0] * 5, (57, 100)), ([0.0] * 5, (0, 43)),
                                              ([1.0] * 10 + [0.0] * 10, (30, 70))])
def test_the_interval_of_a_right_or_wrong_score_is_wilsons(scores, expected):
    lo, hi = report.interval95(scores)
    assert (round(lo), round(hi)) == expected


def test_report_files_are_readable_by_everyone_as_a_plain_open_would_make_them(tmp_path):
    old = os.umask(0o022)
    try:
        build(tmp_path, [record("full", None, 100), record("snapkv", 0.1, 20)])
    finally:
        os.umask(old)
    for p in [tmp_path / "results.md", tmp_path / "tables" / "synthetic.csv",
              tmp_path / "figures" / "synthetic_accuracy_vs_budget.png"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_the_readmes_results_at_a_glance_are_the_reports_of_the_committed_results():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- glance: generated by `python report.py --glance")[1]
    dirs, body = block.split("` -->\n", 1)
    body = body.split("<!-- /glance -->")[0]
    assert body.strip() == report.glance(dirs.split(), root=root).strip()


def test_a_row_missing_a_task_is_compared_with_the_full_cache_on_the_tasks_it_has(tmp_path):
    def task_rec(method, budget, score, task):
        r = record(method, budget, score)
        return r | {"task": task, "cell": f"{method}-{budget}-{task}"}
    md = build(tmp_path, [task_rec("full", None, 100, "needle"), task_rec("full", None, 20, "multi_key"),
                          task_rec("atskv", 0.1, 100, "needle")])
    # the full cache scores 100 on needle: the row's 100 there is 100% of it, not 100 / 60
    assert "| atskv | 10% | 100.0 (1 of 2 tasks) | 100.0 [57-100] | 5 | 100% |" in md


def speed_record(method, budget, context, batch, decode_ms, floor_ms):
    return {"cell": f"{method}-{budget}-{context}-{batch}", "status": "ok", "benchmark": "speed", "path": "fast",
            "method": method, "base_method": method, "params": {}, "budget": budget, "context": context,
            "batch": batch, "decode_ms": decode_ms, "floor_ms": floor_ms, "x_floor": decode_ms / floor_ms,
            "tok_s": 1000 * batch / decode_ms, "prefill_s": 1.0, "kv_bytes_read": 1e6, "dtype": "bfloat16",
            "compile": True, "bandwidth_gbs": 4300.0, "steps": 32, "model": "llama-3.1-8b (random weights)",
            "env": {"hardware": "gpu box", "device": "cuda", "dtype": "bfloat16", "commit": "abc1234567"}}


def test_speed_runs_at_several_contexts_get_a_figure_of_decode_time_against_context(tmp_path):
    recs = [speed_record(m, b, c, 16, ms * c / 8192, fl * c / 8192) for c in (8192, 16384, 32768)
            for m, b, ms, fl in (("full", None, 20.0, 16.0), ("atskv", 0.1, 6.0, 5.0))]
    md = build(tmp_path, recs + [speed_record("full", None, 8192, 64, 50.0, 40.0)])   # batch 64: one context only
    assert "![decode speed against context](figures/speed_decode_context.png)" in md
    assert (tmp_path / "figures" / "speed_decode_context.png").stat().st_size > 0


def test_speed_runs_at_one_context_get_no_figure_against_context(tmp_path):
    md = build(tmp_path, [speed_record(m, b, 8192, n, 10.0, 8.0) for n in (16, 64)
                          for m, b in (("full", None), ("atskv", 0.1))])
    assert "decode speed against context" not in md
    assert not (tmp_path / "figures" / "speed_decode_context.png").exists()

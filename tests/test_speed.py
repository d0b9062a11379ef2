"""The speed benchmark: records per path beside the memory floor, the report's speed section, resuming, bad input."""
import json
from pathlib import Path

import pytest

from fast_decode import memory_floor_ms

# a 4-layer Llama of random weights: what these tests check (records, paths, variants, the report) does not depend
# on the weights, and a step of the default model's 30 layers costs them several seconds each on a CPU
TINY = ["--model_config", str(Path(__file__).with_name("tiny_llama.json"))]
CELL = ["--benchmark", "speed", "--context_sizes", "256", "--batch_sizes", "2", "--budgets", "0.25",
        "--methods", "full,atskv[evict_every=2]", "--decode_steps", "4", "--device", "cpu"]
SPEED = CELL + TINY
ATSKV = "atskv[evict_every=2]"


def test_memory_floor_is_weights_plus_kv_read_once_at_the_bandwidth():
    assert memory_floor_ms(3_000_000_000, 1_300_000_000, 4300.0) == pytest.approx(1000 * 4.3e9 / 4.3e12)


@pytest.mark.parametrize("args,message", [
    (["--methods", "rocket_kv"], "method 'rocket_kv' has no fast decode path (its decode attention is sparse"),
    (["--speed_parts", "timing,warp"],
     "--speed_parts: unknown part(s) warp; accepted: timing, fast, plain, max_batch, answers, profile"),
    (["--batch_sizes", "0"], "--batch_sizes '0': expected a comma list of positive integers"),
    (["--decode_steps", "2"], "--decode_steps 2: at least 4"),
    (["--kernels_off", "gemm,rope"], "--kernels_off: unknown kernel(s) rope; accepted: attention, gemm, evict, greedy"),
    (["--speed_contexts", "lorem"], "--speed_contexts 'lorem': accepted: random, passkey, needle, multi_key"),
    (["--speed_contexts", "needle", "--model_config", "smollm2-135m"],
     "--speed_contexts 'needle' with --model_config 'smollm2-135m': a task's prompts mean nothing to random weights"),
])
def test_speed_benchmark_bad_input_exits_2_with_one_line(args, message, tmp_path, run_main):
    code, err = run_main(*SPEED, *args, "--output_dir", tmp_path)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_speed_benchmark_records_every_path_and_writes_the_speed_section_then_resumes(tmp_path, run_main):
    code, err = run_main(*SPEED, "--output_dir", tmp_path)
    assert code == 0, err[-5:]
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    paths = sorted((r["method"], r["path"]) for r in recs)
    assert paths == [(ATSKV, "fast"), (ATSKV, "fast_bare"), (ATSKV, "hf_plain"), ("full", "fast"),
                     ("full", "hf_plain")]
    for r in recs:   # no step beats reading its weights and KV once; the memory floor is a lower bound
        assert 0 < r["floor_ms"] < r["decode_ms"], r
    fastest, slowest = min(recs, key=lambda r: r["decode_ms"]), max(recs, key=lambda r: r["decode_ms"])
    assert fastest["tok_s"] > slowest["tok_s"]
    by = {(r["method"], r["path"]): r for r in recs}
    # the fast path reads every slot: at least what the plain cache holds
    assert by[ATSKV, "fast"]["kv_bytes_read"] >= by[ATSKV, "hf_plain"]["kv_bytes_read"]
    assert by[ATSKV, "hf_plain"]["kv_bytes_read"] < by["full", "hf_plain"]["kv_bytes_read"] / 2
    # evict_every: the steps that evict and those that do not, each timed alone
    assert set(by[ATSKV, "fast"]["variant_ms"]) == {"keep", "evict"}
    assert set(by[ATSKV, "fast_bare"]["variant_ms"]) == {"bare_keep", "bare_evict"}
    assert all(v > 0 for p in ("fast", "fast_bare") for v in by[ATSKV, p]["variant_ms"].values())
    md = (tmp_path / "results.md").read_text()
    assert "## Decode speed" in md and f"| {ATSKV} @ 25% | 256 | 2 | fast path |" in md
    assert "evicting step ms" in md
    assert (tmp_path / "figures" / "speed_decode.png").stat().st_size > 0
    assert run_main(*SPEED, "--output_dir", tmp_path)[0] == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(recs)  # nothing re-measured
    # with a kernel switched off: new cells, recorded and labelled as such beside the others
    import kernels
    try:
        code, err = run_main(*SPEED, "--methods", "full", "--kernels_off", "evict", "--speed_parts", "fast",
                             "--output_dir", tmp_path)
    finally:
        kernels.switch_off([])   # this process's later tests use every kernel
    assert code == 0, err[-5:]
    new = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()][len(recs):]
    assert [r["path"] for r in new] == ["fast"] and all(r["kernels_off"] == ["evict"] for r in new)
    md = (tmp_path / "results.md").read_text()
    assert "| full (kernels off: evict) | 256 | 2 | fast path |" in md and "| full | 256 | 2 | fast path |" in md


def test_fast_part_times_the_fast_path_without_hf_plain_loop_from_one_prefilled_row(tmp_path, run_main):
    """Without the plain loop one context is prefilled and the decoder's state repeated to the batch (the report
    says so)."""
    code, err = run_main(*SPEED, "--methods", "full", "--speed_parts", "fast", "--output_dir", tmp_path)
    assert code == 0, err[-5:]
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["path"], r["paths"]) for r in recs] == [("fast", "fast")] and recs[0]["decode_ms"] > 0
    assert (recs[0]["batch"], recs[0]["prefill_rows"]) == (2, 1)
    assert " (1 row) |" in (tmp_path / "results.md").read_text()


def test_task_contexts_prefill_the_tasks_prompts_and_are_recorded_and_labelled(tmp_path, run_main, monkeypatch,
                                                                                tokenizer):
    """--speed_contexts needle: the prefilled rows are needle prompts of the context's length, question last, and
    the records and the report say so (their cells apart from random contexts')."""
    import evals.speed
    seen, forward = [], evals.speed.forward_chunked
    monkeypatch.setattr(evals.speed, "forward_chunked", lambda model, cache, ids, chunk: (
        seen.append(ids.clone()), forward(model, cache, ids, chunk))[1])
    code, err = run_main(*CELL, "--methods", "full", "--speed_parts", "fast", "--speed_contexts", "needle",
                         "--output_dir", tmp_path)
    assert code == 0, err[-5:]
    assert [tuple(ids.shape) for ids in seen] == [(1, 256)]     # one row prefilled, repeated to the batch
    assert "?" in tokenizer.decode(seen[0][0, -40:])              # the question at the end
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["contexts"] for r in recs] == ["needle"]
    assert "| full (needle contexts) | 256 | 2 | fast path" in (tmp_path / "results.md").read_text()


def test_profile_part_records_each_step_variant_with_its_largest_operators(tmp_path, run_main):
    args = ["--benchmark", "speed", "--speed_parts", "profile", "--context_sizes", "256", "--batch_sizes", "1",
            "--budgets", "0.25", "--methods", "full,atskv[evict_every=4]", "--device", "cpu", *TINY]
    code, err = run_main(*args, "--output_dir", tmp_path)
    assert code == 0, err[-5:]
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["variant"]) for r in recs) == [
        ("atskv[evict_every=4]", "bare_evict"), ("atskv[evict_every=4]", "bare_keep"),
        ("atskv[evict_every=4]", "evict"), ("atskv[evict_every=4]", "keep"), ("full", "step")]
    by = {r["variant"]: r for r in recs}
    for r in recs:
        assert r["unit"] == "CPU operators" and r["per_step"] > 0
        assert sum(t["ms_per_step"] for t in r["top"]) <= r["ms_per_step"] + 1e-9
        assert r["top"] == sorted(r["top"], key=lambda t: -t["ms_per_step"])
    assert by["evict"]["per_step"] > by["keep"]["per_step"]   # the scoring and the controller run only there
    assert "Profile of one fast step (CPU operators" in (tmp_path / "results.md").read_text()


def test_plain_part_alone_times_methods_the_fast_path_refuses(tmp_path, run_main):
    """--speed_parts plain runs HF's decode loop only: atskv with exact recall scoring is timed there, while the
    parts that use the fast path still refuse it."""
    method = 'atskv[external_memory=true;recall_scoring="exact"]'
    args = ["--benchmark", "speed", "--context_sizes", "512", "--batch_sizes", "1", "--budgets", "0.25",
            "--methods", method, "--decode_steps", "4", "--output_dir", tmp_path, *TINY]
    code, err = run_main(*args, "--speed_parts", "plain")
    assert code == 0, err[-5:]
    (rec,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok" and rec["method"] == method and rec["decode_ms"] > 0
    code, err = run_main(*args, "--speed_parts", "plain,timing")
    assert code == 2 and "external memory" in err[-1], err[-1]


def test_a_speed_cell_that_raises_is_recorded_as_failed_and_the_others_still_run(tmp_path, run_main, monkeypatch):
    import evals.speed as sp
    real = sp.measure_decode_speed

    def broken_for_atskv(model, tok, method, *args, **kwargs):
        if method == "atskv":
            raise RuntimeError("compiled step failed\nsecond line")
        return real(model, tok, method, *args, **kwargs)
    monkeypatch.setattr(sp, "measure_decode_speed", broken_for_atskv)
    code, err = run_main(*SPEED, "--speed_parts", "fast", "--methods", f"{ATSKV},full", "--output_dir", tmp_path)
    assert code == 0, err[-5:]
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["status"]) for r in recs] == [(ATSKV, "error"), ("full", "ok")]
    assert recs[0]["error"] == "RuntimeError: compiled step failed"
    assert "## Failed cells" in (tmp_path / "results.md").read_text()


def test_largest_batch_of_a_host_tier_stops_at_the_host_limit_and_says_so(model, tokenizer, monkeypatch):
    """A pinned host tier bounds the batch by host memory. Here the tier's size is given and every batch fits the
    device (the search alone is under test): with room for 500.5 sequences' tiers the largest batch is 500, found
    with one trial, and the record names host memory as the bound; with room to spare, the search's own limit is
    the bound."""
    import gc
    import types

    from evals.speed import largest_decode_batch
    from fast_decode import StaticDecoder
    monkeypatch.setattr(StaticDecoder, "extra_nbytes",
                        lambda self: {"device": 0, "host": 1000, "device_read": 0, "host_read": 0})
    trials = []
    monkeypatch.setattr(StaticDecoder, "repeated",
                        lambda self, b: trials.append(b) or types.SimpleNamespace(step=lambda: None))
    monkeypatch.setattr(gc, "collect", lambda: 0)   # each trial's clean-up: nothing was allocated
    r = largest_decode_batch(model, tokenizer, "full", None, 64, start=256, limit=4096, host_limit_bytes=500_500)
    assert r["max_batch"] == 500 and r["host_bound"] and not r["limit_reached"] and trials == [500], (r, trials)
    r = largest_decode_batch(model, tokenizer, "full", None, 64, start=256, limit=256, host_limit_bytes=500_500)
    assert r["max_batch"] == 256 and r["limit_reached"] and not r["host_bound"], r


def test_largest_batch_searches_below_a_host_limit_the_device_cannot_hold(model, tokenizer, monkeypatch):
    """Room for 500 host tiers, but the device holds only 300 sequences: the batch the host allows is refused, and
    the search finds the device's bound within its 3%, not naming host memory."""
    import gc
    import types

    import torch

    from evals.speed import largest_decode_batch
    from fast_decode import StaticDecoder

    def repeated(self, b):
        if b > 300:
            raise torch.OutOfMemoryError("device full")
        return types.SimpleNamespace(step=lambda: None)
    monkeypatch.setattr(StaticDecoder, "extra_nbytes",
                        lambda self: {"device": 0, "host": 1000, "device_read": 0, "host_read": 0})
    monkeypatch.setattr(StaticDecoder, "repeated", repeated)
    monkeypatch.setattr(gc, "collect", lambda: 0)
    r = largest_decode_batch(model, tokenizer, "full", None, 64, start=64, limit=4096, host_limit_bytes=500_500)
    assert 300 - 300 // 33 <= r["max_batch"] <= 300 and not r["host_bound"] and not r["limit_reached"], r

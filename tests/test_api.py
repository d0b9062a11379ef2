"""--use_api against a local stand-in for both APIs (tests/api_server.py on 127.0.0.1): a normal run, 429 then
success, 500s until the retry limit, malformed JSON, a timeout, bounded concurrency; through the CLI, failed
requests recorded without stopping the sweep and retried alone by a rerun, and no key in any output file."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from api_server import FakeAPI  # noqa: E402

import api_models as am  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-DO-NOT-LEAK-4242"
PROMPT = "Text. The special magic number for Orsk is 52817. More text.\n\nWhat is the special magic number for Orsk?"


@pytest.fixture
def server():
    srv = FakeAPI().start()
    yield srv
    srv.shutdown()


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def client(server, provider="anthropic", **kw):
    model, url = ("claude-test", server.url) if provider == "anthropic" else ("gpt-test", server.url + "/v1")
    return am.APIClient(am.APIConfig(model, url, **{"backoff": 0.01, **kw}))


@pytest.mark.parametrize("provider,path", [("anthropic", "/v1/messages"), ("openai", "/v1/chat/completions")])
def test_normal_run_answers_through_each_sdk(server, provider, path):
    out = client(server, provider).complete_many([(PROMPT, 16)] * 3)
    assert [o["status"] for o in out] == ["ok"] * 3
    assert out[0]["text"].strip() == "52817." and out[0]["input_tokens"] == len(PROMPT.split())
    assert out[0]["attempts"] == 1
    assert all(r["path"] == path for r in server.requests) and len(server.requests) == 3
    sent = {k.lower(): v for k, v in server.requests[0]["headers"].items()}
    assert KEY in (sent.get("x-api-key", "") + sent.get("authorization", ""))  # the key goes to the server only


def test_429_then_success_honours_retry_after(server):
    server.mode = "429-once"
    t = time.perf_counter()
    (out,) = client(server, backoff=5.0).complete_many([(PROMPT, 16)])  # Retry-After 0.05 s, not the 5 s backoff
    assert out["status"] == "ok" and out["attempts"] == 2
    assert time.perf_counter() - t < 2.0 and len(server.requests) == 2


def test_500s_until_the_retry_limit_give_a_failed_record(server):
    server.mode = "500"
    out = client(server, max_retries=2).complete(PROMPT, 16)
    assert out["status"] == "failed" and out["attempts"] == 3 and len(server.requests) == 3
    assert "HTTP 500" in out["error"] and KEY not in out["error"]


def test_a_malformed_json_answer_is_retried_then_failed(server):
    server.mode = "malformed"
    out = client(server, "openai", max_retries=1).complete(PROMPT, 16)
    assert out["status"] == "failed" and out["attempts"] == 2 and len(server.requests) == 2


def test_a_timeout_is_retried_then_failed(server):
    server.mode, server.delay = "slow", 1.5
    out = client(server, timeout=0.3, max_retries=1).complete(PROMPT, 16)
    assert out["status"] == "failed" and out["attempts"] == 2 and "Timeout" in out["error"]


def test_concurrency_is_bounded(server):
    server.mode, server.delay = "slow", 0.2
    out = client(server, concurrency=2).complete_many([(PROMPT + str(i), 16) for i in range(6)])
    assert all(o["status"] == "ok" for o in out)
    assert server.max_inflight == 2


def test_prompt_compression_keeps_whole_units_and_the_budget(model, tokenizer):
    text = "".join(f"Line {i} is about apples and pears.\n" for i in range(40))
    kept, info = am.compress_context(model, tokenizer, text, 0.25)
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert info["tokens"] == n and info["tokens_kept"] <= 0.25 * n and info["units"] == 40
    lines = kept.splitlines()
    assert lines[0] == "Line 0 is about apples and pears." and lines[-1] == "Line 39 is about apples and pears."
    assert all(ln in text.splitlines() for ln in lines) and len(lines) == info["units_kept"]


def cli(*args, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")}
    e.update(env or {})
    return subprocess.run([sys.executable, "run_experiment.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=e)


def test_missing_key_is_one_line_before_any_work(tmp_path, run_main, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    code, err = run_main("--use_api", "--api_model", "claude-test", "--output_dir", tmp_path)
    assert code == 2
    assert err == ["error: --use_api with a anthropic model needs the environment variable ANTHROPIC_API_KEY"]
    assert not (tmp_path / "results.jsonl").exists()


def test_unknown_api_model_and_local_only_method_are_refused(tmp_path, run_main, monkeypatch):
    code, err = run_main("--use_api", "--api_model", "llama-3", "--output_dir", tmp_path)
    assert code == 2 and len(err) == 1 and "unknown API model 'llama-3'" in err[0]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    code, err = run_main("--use_api", "--api_model", "gpt-test", "--methods", "snapkv", "--output_dir", tmp_path)
    assert code == 2 and len(err) == 1 and "method 'snapkv' cannot run with --use_api; accepted: full, atskv" in err[0]


def test_cli_records_failed_requests_goes_on_and_a_rerun_retries_only_them(server, tmp_path, capsys, monkeypatch):
    import run_experiment

    def cli_here(*args):   # the command in this process (a process costs seconds); what it printed
        code = run_experiment.main(list(args))
        out = capsys.readouterr()
        return code, out.out + out.err
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    server.mode, server.fail_first = "fail-first", 2
    args = ["--use_api", "--api_model", "claude-test", "--api_base_url", server.url, "--methods", "full",
            "--tasks", "needle", "--context_sizes", "256", "--num_samples", "5", "--api_max_retries", "1",
            "--output_dir", str(tmp_path)]
    code, printed_first = cli_here(*args)
    assert code == 0, printed_first[-2000:]
    (rec,) = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rec["status"] == "error" and rec["n_failed"] == 2 and "2 of 5 requests failed" in rec["error"]
    assert sorted(s["status"] for s in rec["samples"]) == ["failed"] * 2 + ["ok"] * 3
    assert "## Failed cells" in (tmp_path / "results.md").read_text()
    asked_first = len(server.requests)
    assert asked_first == 3 + 2 * 2  # three answered at once, two asked twice (one retry) and failed

    server.mode = "ok"
    code, printed_second = cli_here(*args)
    assert code == 0, printed_second[-2000:]
    assert len(server.requests) - asked_first == 2  # only the failed requests were asked again
    last = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "ok" and last["score"] == 100.0 and last["n_failed"] == 0
    md = (tmp_path / "results.md").read_text()
    assert "## API models" in md and "| claude-test | full | 100% | 100.0 |" in md and "## Failed cells" not in md
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in printed_first + printed_second

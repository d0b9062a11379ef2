"""LongBench and ZeroSCROLLS: the official metrics against hand-worked examples, the loaders on fixture files in both
hub schemas (truncation and the context / question split), the report built from records alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluation as ev
import metrics as m
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent


# --- metrics -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("another theatre", "another theatre"),        # articles only as whole words
    ("U.S.-based", "usbased"),                      # punctuation removed, not replaced by spaces
    ("  \n\t ", ""),
])
def test_normalize_answer_lowercases_drops_punctuation_articles_and_extra_space(text, expected):
    assert m.normalize_answer(text) == expected


def test_qa_f1_is_token_f1_after_normalisation():
    # pred tokens [cat, sat]; gold [cat, sat, down]: precision 1, recall 2/3, F1 0.8
    assert m.qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert m.qa_f1_score("dog", "cat") == 0.0
    assert m.qa_f1_score("", "cat") == 0.0
    assert m.qa_f1_score("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens count once each


def test_rouge_l_is_the_lcs_f_measure():
    assert m.rouge_l_score("cat dog eel fox", "cat eel fox gnu") == pytest.approx(0.75)  # LCS 3 of 4 and 4
    assert m.rouge_l_score("same words here", "same words here") == pytest.approx(1.0)
    assert m.rouge_l_score("", "anything") == 0.0


def test_longbench_rouge_l_counts_distinct_words_as_the_rouge_package_does():
    """LongBench's metrics.py scores with the `rouge` package (1.0.1), whose summary-level ROUGE-L counts a text's
    distinct words: "the cat sat on the mat" is 5 of them, so the LCS of 3 gives R = 3/5, P = 1 and
    F = 2PR / (P + R) = 0.75 (Google's rouge-score, which counts tokens, gives 2/3)."""
    assert abs(m.rouge_l_score("the cat sat", "the cat sat on the mat") - 0.75) < 1e-6


def test_longbench_code_similarity_is_fuzzywuzzys_integer_ratio():
    """fuzz.ratio rounds 100 x 2M / T to an integer: 2 x 12 matching characters of 13 + 13 -> 92.3 -> 0.92."""
    assert abs(m.code_sim_score("x = foo(a, b)\n# done", "x = foo(a, c)") - 0.92) < 1e-6


def test_zeroscrolls_rouge_is_the_geometric_mean_of_rouge_1_2_and_lsum():
    # unigrams 3/4 both ways, bigrams: (cat dog) only -> 1/3 both ways, LCS 3/4: geometric mean of 0.75, 1/3, 0.75
    got = m.rouge_geometric_mean("cat dog eel fox", "cat dog fox gnu")
    assert got == pytest.approx((0.75 * (1 / 3) * 0.75) ** (1 / 3))


def test_classification_drops_classes_that_are_only_part_of_the_gold_name():
    classes = ["Other", "Other entity", "City", "Individual"]
    assert m.classification_score("Other entity", "Other entity", all_classes=classes) == 1.0
    assert m.classification_score("City or Individual", "Individual", all_classes=classes) == 0.5
    assert m.classification_score("City", "Individual", all_classes=classes) == 0.0


def test_retrieval_and_count_score_the_share_of_right_numbers():
    assert m.retrieval_score("Paragraph 19", "Paragraph 19") == 1.0
    assert m.retrieval_score("Paragraph 19 or Paragraph 3", "Paragraph 19") == 0.5
    assert m.retrieval_score("no idea", "Paragraph 19") == 0.0
    assert m.count_score("46", "46") == 1.0
    assert m.count_score("between 46 and 50", "46") == 0.5
    assert m.count_score("many", "46") == 0.0


def test_code_similarity_scores_the_first_line_that_is_not_a_comment_or_fence():
    assert m.code_sim_score("# set it\n    x = 1\nmore", "    x = 1") == 1.0
    assert m.code_sim_score("```python\nfoo(bar)\n```", "foo(bar)") == 1.0
    assert 0.0 < m.code_sim_score("foo(baz)", "foo(bar)") < 1.0


def test_longbench_score_takes_the_first_line_for_trec_triviaqa_samsum_and_the_max_over_answers():
    classes = ["City", "Individual"]
    assert m.longbench_score("trec", "Individual\nCity City", ["Individual"], classes) == 1.0
    assert m.longbench_score("triviaqa", "Paris\nLondon", ["London"]) == 0.0   # only "Paris" is scored
    assert m.longbench_score("hotpotqa", "Paris\nLondon", ["London"]) == pytest.approx(2 / 3)
    assert m.longbench_score("hotpotqa", "Bob Dylan", ["Dylan", "Bob Dylan"]) == 1.0
    with pytest.raises(ValueError, match="unknown LongBench task 'lsht2'"):
        m.longbench_score("lsht2", "x", ["x"])


def test_zeroscrolls_task_metrics():
    assert m.zeroscrolls_score("quality", "The answer is (B) a dog", ["B"]) == 1.0
    assert m.zeroscrolls_score("quality", "C", ["(B) a dog"]) == 0.0
    assert m.zeroscrolls_score("quality", "I am not sure", ["B"]) == 0.0
    assert m.zeroscrolls_score("space_digest", "40%", ["50%"]) == pytest.approx(0.5)
    assert m.zeroscrolls_score("space_digest", "about 50 %", ["50%"]) == 1.0
    assert m.zeroscrolls_score("book_sum_sort", "1, 3, 2", ["1, 2, 3"]) == pytest.approx(2 / 3)
    assert m.zeroscrolls_score("book_sum_sort", "3, 2, 1", ["1, 2, 3"]) == 0.0
    assert m.zeroscrolls_score("qasper", "unanswerable", ["Unanswerable", "yes"]) == 1.0


# --- loaders -----------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def longbench_record(task="hotpotqa", n_words=40, question="Who wrote it?"):
    return {"input": question, "context": " ".join(f"w{i}" for i in range(n_words)), "answers": ["Bob Dylan"],
            "length": n_words, "dataset": task, "language": "en", "all_classes": None, "_id": f"{task}-0"}


def zeroscrolls_record(n_words=40, rid="r1", output="D"):
    head = "Read the story and answer.\n\nStory:\n"
    doc = " ".join(f"w{i}" for i in range(n_words))
    query = "What happened?\n\n (A) a\n (B) b\n (C) c\n (D) d"
    tail = "\n\nQuestion and Possible Answers:\n" + query + "\n\nAnswer:\n"
    inp = head + doc + tail
    q0 = inp.index(query)
    return {"id": rid, "pid": rid, "input": inp, "output": output, "document_start_index": len(head),
            "document_end_index": len(head) + len(doc), "query_start_index": q0, "query_end_index": q0 + len(query),
            "truncation_seperator": "... [The rest of the story is omitted]\n\n"}


def test_longbench_fixture_loads_with_the_official_template_split_at_the_context(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [longbench_record()])
    (s,) = ev.longbench_samples("hotpotqa", str(tmp_path))
    head, tail = ev.LONGBENCH_PROMPTS["hotpotqa"].split("{context}")
    assert s.context == head + longbench_record()["context"]
    assert s.question == tail.replace("{input}", "Who wrote it?") and s.question.endswith("Answer:")
    assert s.answers == ["Bob Dylan"] and s.meta["max_new_tokens"] == 32 and s.meta["use_chat"]


def test_longbench_no_chat_tasks_are_not_wrapped_in_the_chat_template(tmp_path, tokenizer):
    write_jsonl(tmp_path / "trec.jsonl", [longbench_record("trec", question="Question: Why?\nType:")])
    write_jsonl(tmp_path / "hotpotqa.jsonl", [longbench_record()])
    (trec,) = ev.longbench_samples("trec", str(tmp_path))
    (hot,) = ev.longbench_samples("hotpotqa", str(tmp_path))
    start, end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    trec_ids = sum(ev.encode_real(tokenizer, trec, 4096), [])
    # as LongBench's pred.py tokenizes it: the tokenizer's BOS (here <|im_start|>, id 1) and the raw prompt
    assert trec_ids[0] == tokenizer("a").input_ids[0] == start and start not in trec_ids[1:] and end not in trec_ids
    hot_ids = sum(ev.encode_real(tokenizer, hot, 4096), [])
    assert hot_ids[0] == start and end in hot_ids                # the chat template


def test_longbench_truncation_keeps_the_first_and_last_half_and_the_question_whole(tmp_path, tokenizer):
    write_jsonl(tmp_path / "trec.jsonl", [longbench_record("trec", n_words=3000, question="Question: Why?\nType:")])
    (s,) = ev.longbench_samples("trec", str(tmp_path))
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    full = enc(s.context) + enc(s.question)
    ctx, q = ev.encode_real(tokenizer, s, 300)
    assert len(ctx) + len(q) == 300                              # the BOS counted, as LongBench's pred.py does
    assert ctx[0] == tokenizer("a").input_ids[0] and ctx[1:150] == full[:149] and (ctx + q)[150:] == full[-150:]
    assert q == enc(s.question)


def test_zeroscrolls_fixture_splits_document_and_query_by_the_index_fields(tmp_path):
    rec = zeroscrolls_record()
    write_jsonl(tmp_path / "zero_scrolls" / "quality.validation.jsonl", [rec])
    (s,) = ev.zeroscrolls_samples("quality", str(tmp_path))  # found in the benchmark's subfolder
    assert s.context == rec["input"][:rec["document_end_index"]] and s.context.endswith("w39")
    assert s.question.startswith("\n\nQuestion and Possible Answers:") and s.question.endswith("Answer:\n")
    assert s.meta["max_new_tokens"] == 10 and s.answers == ["D"]


def test_zeroscrolls_truncation_cuts_the_document_end_and_inserts_the_separator(tmp_path, tokenizer):
    rec = zeroscrolls_record(n_words=3000)
    write_jsonl(tmp_path / "quality.validation.jsonl", [rec])
    (s,) = ev.zeroscrolls_samples("quality", str(tmp_path))
    s.meta["use_chat"] = False  # compare raw token streams
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    ctx, q = ev.encode_real(tokenizer, s, 400)
    assert len(ctx) + len(q) == 400
    head, sep = enc(rec["input"][:rec["document_start_index"]]), enc(rec["truncation_seperator"])
    assert ctx[:len(head)] == head and ctx[-len(sep):] == sep
    assert ctx[len(head):-len(sep)] == enc(s.context[rec["document_start_index"]:])[:400 - len(head) - len(sep) - len(q)]
    assert q == enc(s.question)
    short = ev.zeroscrolls_samples("quality", str(tmp_path))[0]
    short.meta["use_chat"] = False
    short.context = short.context[:200]  # fits: nothing cut, no separator
    assert ev.encode_real(tokenizer, short, 400)[0] == enc(short.context)


def test_zeroscrolls_records_sharing_an_id_are_one_sample_with_several_answers(tmp_path):
    write_jsonl(tmp_path / "qasper.validation.jsonl",
                [zeroscrolls_record(rid="a", output="yes"), zeroscrolls_record(rid="a", output="Yes, it does"),
                 zeroscrolls_record(rid="b", output="no")])
    samples = ev.zeroscrolls_samples("qasper", str(tmp_path))
    assert [(s.id, s.answers) for s in samples] == [("a", ["yes", "Yes, it does"]), ("b", ["no"])]


def test_a_record_missing_a_field_is_named(tmp_path):
    rec = longbench_record()
    del rec["answers"]
    write_jsonl(tmp_path / "hotpotqa.jsonl", [rec])
    with pytest.raises(UserError, match=r"LongBench hotpotqa: record 'hotpotqa-0' lacks field\(s\) \['answers'\]"):
        ev.longbench_samples("hotpotqa", str(tmp_path))


def test_offline_hub_load_fails_with_one_clear_line(monkeypatch):
    import datasets

    def unreachable(*a, **k):
        raise ConnectionError("no route to huggingface.co")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)  # offline, whatever this machine can reach
    with pytest.raises(UserError, match="cannot load longbench task 'qasper' from the Hugging Face hub .*--data_dir"):
        ev.longbench_samples("qasper", None)


# --- the command line and the report -----------------------------------------------------------------------------

def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "run_experiment.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_offline_sweep_of_only_a_hub_benchmark_fails_with_one_line(tmp_path):
    proc = cli("--benchmarks", "longbench", "--tasks", "qasper", "--methods", "full", "--num_samples", "1",
               "--output_dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: nothing to run: longbench could not be loaded")
    assert "cannot load longbench task 'qasper'" in (tmp_path / "results.md").read_text()


def test_offline_sweep_runs_the_rest_and_reports_the_skipped_benchmark(tmp_path):
    write_jsonl(tmp_path / "data" / "longbench" / "trec.jsonl",
                [longbench_record("trec", n_words=200, question="Question: Who?\nType:") |
                 {"answers": ["Individual"], "all_classes": ["Individual", "City"]}])
    out = tmp_path / "o"
    proc = cli("--benchmarks", "longbench,zeroscrolls", "--data_dir", str(tmp_path / "data"), "--methods",
               "full,sliding_window", "--budgets", "0.5", "--context_sizes", "256", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (out / "results.md").read_text()
    assert "## LongBench" in md and "| full | 100% | 256 |" in md and "| sliding_window | 50% | 256 |" in md
    assert "## Skipped" in md and "ZeroSCROLLS: --data_dir" in md and "holds none of its files" in md
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in recs) == ["ok", "ok", "skipped"]
    assert all(r["max_prompt_tokens"] == 256 and 0 <= r["score"] <= 100 for r in recs if r["status"] == "ok")


def fake_record(bench, task, method, budget, score, size=2048):
    return {"cell": f"{bench}-{task}-{method}-{budget}-{size}", "status": "ok", "benchmark": bench, "task": task,
            "method": method, "budget": budget, "score": score, "context_size": size, "model": "m", "seed": 1,
            "eval_mode": "question_agnostic", "num_samples": 2, "n_samples": 2, "kv_bytes": 1e6 * (budget or 1),
            "prefill_s": 0.1, "decode_ms_per_token": 20.0, "data_dir": "hub", "samples": [],
            "env": {"hardware": "test", "device": "cpu", "dtype": "float32"}}


def test_report_only_builds_per_benchmark_tables_retention_and_figures_from_records(tmp_path):
    recs = [fake_record("longbench", "qasper", "full", None, 40.0), fake_record("longbench", "trec", "full", None, 20.0),
            fake_record("longbench", "qasper", "atskv", 0.25, 30.0), fake_record("longbench", "trec", "atskv", 0.25, 15.0),
            fake_record("zeroscrolls", "quality", "full", None, 50.0),
            fake_record("zeroscrolls", "quality", "sliding_window", 0.1, 25.0)]
    write_jsonl(tmp_path / "results.jsonl", recs)
    proc = cli("--report_only", "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "results.md").read_text()
    assert "| full | 100% | 2048 | 40.0 | 20.0 | 30.0 | 100% |" in md
    assert "| atskv | 25% | 2048 | 30.0 | 15.0 | 22.5 | 75% |" in md          # 22.5 / 30
    assert "| sliding_window | 10% | 2048 | 25.0 | 25.0 | 50% |" in md
    assert "- LongBench, full cache: score 30 [" in md and "- LongBench at 25%: atskv 22 [" in md
    for bench in ("longbench", "zeroscrolls"):
        assert (tmp_path / "tables" / f"{bench}.csv").read_text().startswith("method,budget,prompt tokens,")
        assert (tmp_path / "figures" / f"{bench}_accuracy_vs_budget.png").stat().st_size > 1000
        assert f"(figures/{bench}_accuracy_vs_budget.png)" in md


def test_space_digest_scores_0_when_the_prediction_has_no_percent_sign():
    assert m.zeroscrolls_score("space_digest", "50", ["50%"]) == 0.0
    assert m.zeroscrolls_score("space_digest", "50%", ["50%"]) == 1.0


def test_book_sum_sort_scores_0_unless_the_prediction_is_a_permutation_of_the_gold_ids():
    assert m.zeroscrolls_score("book_sum_sort", "1, 2", ["1, 2, 3"]) == 0.0          # one id missing
    assert m.zeroscrolls_score("book_sum_sort", "1, 2, 3, 3", ["1, 2, 3"]) == 0.0    # one id twice
    assert m.zeroscrolls_score("book_sum_sort", "1, 2, 4", ["1, 2, 3"]) == 0.0       # one id not the gold's
    assert m.zeroscrolls_score("book_sum_sort", "2, 1, 3", ["1, 2, 3"]) == pytest.approx(2 / 3)


def test_zeroscrolls_summary_task_score_is_the_geometric_mean_of_corpus_level_rouge():
    # the first summary has every word but no bigram of its reference (its own geometric mean is 0), the second is exact
    pairs = [("dog cat", "cat dog"), ("cat dog", "cat dog")]
    parts = [m.rouge_parts(p, g) for p, g in pairs]
    means = [sum(p[i] for p in parts) / 2 for i in range(3)]
    want = (means[0] * means[1] * means[2]) ** (1 / 3)
    assert m.corpus_rouge_geometric_mean(parts) == pytest.approx(want, abs=1e-6)
    per_sample = sum(m.rouge_geometric_mean(p, g) for p, g in pairs) / 2
    assert want == pytest.approx((1.0 * 0.5 * 0.75) ** (1 / 3), abs=1e-6) and per_sample == pytest.approx(0.5)

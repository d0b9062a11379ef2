"""The synthetic benchmark: deterministic samples, exact-match scoring, and what it measures on the default model."""
import pytest

import evaluation as ev
from sparse_kv_cache import KVCacheFactory


def test_samples_are_deterministic_in_the_seed(tokenizer):
    a = ev.make_synthetic_sample(tokenizer, "multi_key", 512, 0.25, 7)
    b = ev.make_synthetic_sample(tokenizer, "multi_key", 512, 0.25, 7)
    c = ev.make_synthetic_sample(tokenizer, "multi_key", 512, 0.25, 8)
    assert a == b and a.context != c.context


@pytest.mark.parametrize("task", ev.SYNTHETIC_TASKS)
def test_context_has_about_the_requested_size_and_holds_the_answer(tokenizer, task):
    s = ev.make_synthetic_sample(tokenizer, task, 1024, 0.5, 1)
    ctx_ids, q_ids = ev.encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
    assert 900 <= len(ctx_ids) <= 1100
    assert all(a in s.context for a in s.answers) and not any(a in s.question for a in s.answers)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(tokenizer, depth):
    s = ev.make_synthetic_sample(tokenizer, "needle", 1024, depth, 3)
    rel = s.context.index(s.answers[0]) / len(s.context)
    assert abs(rel - depth) < 0.08


def test_multi_key_has_distractors(tokenizer):
    s = ev.make_synthetic_sample(tokenizer, "multi_key", 1024, 0.5, 3)
    assert len(s.meta["distractors"]) == 3 and all(k in s.context for k in s.meta["distractors"])


def test_repetitive_haystack_for_passkey_and_natural_text_for_needles(tokenizer):
    p = ev.make_synthetic_sample(tokenizer, "passkey", 512, 0.5, 0)
    n = ev.make_synthetic_sample(tokenizer, "needle", 512, 0.5, 0)
    assert ev.REPETITIVE_FILLER.strip() in p.context
    assert ev.REPETITIVE_FILLER.strip() not in n.context and len(set(n.context.split(". "))) > 20


def test_haystack_dir_supplies_the_text(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("Zebras graze on the plain. " * 200)
    s = ev.make_synthetic_sample(tokenizer, "needle", 512, 0.5, 0, haystack_dir=str(tmp_path))
    assert "Zebras graze" in s.context


@pytest.mark.parametrize("pred,score", [(" 48213.", 1.0), (" 48213 and more", 1.0), (" 4821", 0.0),
                                        (" 148213", 0.0), ("none\n48213", 0.0), (" the number", 0.0)])
def test_exact_match_scoring(pred, score):
    s = ev.Sample("x", "needle", "", "", "", ["48213"])
    assert ev.score_synthetic(s, pred) == score


def test_multi_value_needs_every_value():
    s = ev.Sample("x", "multi_value", "", "", "", ["11111", "22222"])
    assert ev.score_synthetic(s, " 11111 and 22222.") == 1.0
    assert ev.score_synthetic(s, " 11111 and 2222") == 0.0


def test_question_part_starts_after_the_context(tokenizer):
    ctx, q = ev.encode_prompt(tokenizer, "Some context.", "What?", "Answer:")
    text = tokenizer.decode(ctx + q)
    assert text.index("Some context.") < text.index("What?") < text.index("Answer:")
    assert "What?" not in tokenizer.decode(ctx)


def _run(model, tok, method, budget, samples):
    out = []
    for s in samples:
        ci, qi = ev.encode_prompt(tok, s.context, s.question, s.answer_prefix)
        cache = KVCacheFactory.create(method, model, budget=budget, context_length=len(ci))
        r = ev.run_generation(model, tok, cache, ci, qi, 8, stop_when=ev.answer_complete(s))
        out.append(ev.score_synthetic(s, r["prediction"]))
    return out


def test_full_cache_retrieves_needles_at_the_start_middle_and_end_of_1k_and_at_2k(model, tokenizer):
    samples = [ev.make_synthetic_sample(tokenizer, "needle", 1024, d, 11) for d in (0.0, 0.5, 1.0)] + \
              [ev.make_synthetic_sample(tokenizer, "needle", 2048, 0.25, 11)]
    assert _run(model, tokenizer, "full", None, samples) == [1.0] * 4


def test_sliding_window_fails_outside_its_window_and_succeeds_inside(model, tokenizer):
    inside = [ev.make_synthetic_sample(tokenizer, "needle", 1024, 1.0, 12)]
    outside = [ev.make_synthetic_sample(tokenizer, "needle", 1024, d, 12) for d in (0.25, 0.5)]
    assert _run(model, tokenizer, "sliding_window", 0.25, inside) == [1.0]
    assert _run(model, tokenizer, "sliding_window", 0.25, outside) == [0.0] * 2


def test_multi_question_sample_asks_about_four_facts_at_spread_depths(tokenizer):
    s = ev.make_synthetic_sample(tokenizer, "multi_question", 1024, 0.25, 4)
    qs = s.meta["questions"]
    assert len(qs) == 4 and len({q for q, _, _ in qs}) == 4
    assert all(a[0] in s.context for _, _, a in qs) and len(set(s.meta["depths"])) == 4


def test_multi_question_compresses_once_and_answers_each_question_from_a_copy(model, tokenizer, monkeypatch):
    s = ev.make_synthetic_sample(tokenizer, "multi_question", 512, 0.25, 4)
    made, context_reads = [], []
    from evals import harness                                  # where run_multi_question finds them
    make_cache, forward_chunked = harness.make_cache, harness.forward_chunked

    def spy_make_cache(*a, **k):
        made.append(make_cache(*a, **k))
        return made[-1]

    def spy_forward(model_, cache, ids, chunk, start=0):
        if made and cache is made[0][0]:
            context_reads.append(ids.shape[1])
        return forward_chunked(model_, cache, ids, chunk, start)

    monkeypatch.setattr(harness, "make_cache", spy_make_cache)
    monkeypatch.setattr(harness, "forward_chunked", spy_forward)
    r = ev.run_multi_question(model, tokenizer, s, "sliding_window", 0.5, {}, "question_agnostic", 256)
    assert len(made) == 1 and context_reads == [r["context_tokens"]]        # one cache, the context read once
    assert made[0][0].get_seq_length() == r["context_tokens"]              # the questions went into copies
    assert len(r["prediction"].split(" | ")) == 4
    assert 0.0 <= r["score"] <= 1.0 and r["context_tokens"] > 400
    assert r["active_kv_bytes"] < 0.6 * r["context_tokens"] * 23040 * 2  # fp32: twice the bf16 per-token bytes

"""The fast (static-shape) decode path makes the plain path's decisions: same tokens, same entries kept."""
from dataclasses import dataclass

import pytest
import torch

import evaluation as ev
from atskv import controller_keep, hidden_logit, logit_coefs, step_hidden_logit
from cache_framework import METHODS, KVMethod, put, register_method
from evals.harness import run_synthetic_samples
from fast_decode import StaticDecoder, check_fast_method, first_free_slot, free_queue, lean_weights, step_head
from sparse_kv_cache import KVCacheFactory, ThresholdController
from tests.triton_interpreter import needs_triton, register, run_interpreted
from utils import UserError

N_STEPS = 8    # decode steps compared: two evictions at evict_every=4, several recalls on each schedule


def kept_positions(positions_bhs):
    return [[sorted(row.tolist()) for row in b] for b in positions_bhs]


@pytest.fixture(scope="module")
def prompt(tokenizer):
    s = ev.synthetic_samples(tokenizer, "needle", 320, 1, seed=3)[0]
    c, q = ev.encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
    return torch.tensor([c + q])


@pytest.mark.parametrize("method", ["full", "sliding_window", "snapkv", "pyramidkv", "h2o", "dynamic_kv", "atskv",
                                    'knorm[decode="hold"]'])   # knorm under grow runs as snapkv's grow does
def test_fast_path_generates_the_same_tokens_and_keeps_the_same_entries_as_the_plain_path(
        model, tokenizer, prompt, method, plain_decode):
    ids = prompt.expand(2, -1)  # batch 2
    budget = 96
    method, params = KVCacheFactory.parse_spec(method)
    plain = KVCacheFactory.create(method, model, budget=budget, tokenizer=tokenizer, **params)
    want = plain_decode(model, plain, ids, N_STEPS)

    cache = KVCacheFactory.create(method, model, budget=budget, tokenizer=tokenizer, **params)
    logits = ev.forward_chunked(model, cache, ids, chunk=128)
    dec = StaticDecoder.from_cache(model, method, cache, ids.shape[1], N_STEPS)
    got = dec.generate(logits.argmax(-1), N_STEPS + 1)
    assert torch.equal(got, want)
    if method == "full":
        assert all(int(s.present[0, 0].sum()) == ids.shape[1] + N_STEPS for s in dec.slots)
        return
    # both fed the same N_STEPS tokens after the prefill: the same entries must be kept, per batch row and head
    for layer, sl in zip(plain.layers, dec.slots):
        fast = [[sorted(p[m].tolist()) for p, m in zip(pb, mb)] for pb, mb in zip(sl.pos, sl.present)]
        assert fast == kept_positions(layer.positions)
        if getattr(plain.method, "decode", None) == "grow":   # the prompt compressed, every generated token kept
            assert all(set(range(ids.shape[1], ids.shape[1] + N_STEPS)) <= set(r) for b in fast for r in b)
        else:
            assert max(len(r) for b in fast for r in b) <= sl.budget


def test_a_small_budgets_protected_entries_fit_a_decode_evictions_target_and_both_paths_keep_the_same(
        model, tokenizer, prompt, plain_decode):
    """At 40 tokens some layers get a budget of about 30: a decode eviction (every 16 steps) keeps 15, fewer than
    the 4 sinks and a window of half the budget. The window shrinks to fit (`recent_tokens`), so no protected entry
    is dropped and the fast path keeps what the plain path keeps (the plain path once dropped sinks in no particular
    order; the fast path kept them all, beyond its free slots)."""
    ids = prompt.expand(2, -1)
    plain = KVCacheFactory.create("atskv", model, budget=40, tokenizer=tokenizer)
    m = plain.method   # evict_every 16 and 4 sinks by default
    small = [b for b in (plain.layer_budget(i) for i in range(len(model.model.layers)))
             if m.decode_target(b) < m.n_sink + b // 2]
    assert small and all(m.recent_tokens(b) + m.n_sink <= m.decode_target(b) for b in small)
    want = plain_decode(model, plain, ids, N_STEPS)
    cache = KVCacheFactory.create("atskv", model, budget=40, tokenizer=tokenizer)
    logits = ev.forward_chunked(model, cache, ids, chunk=128)
    got = StaticDecoder.from_cache(model, "atskv", cache, ids.shape[1], N_STEPS).generate(logits.argmax(-1),
                                                                                      N_STEPS + 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("params", [{}, {"evict_every": 1}, {"evict_every": 4}, {"retrieval_layers": 3}])
def test_fast_path_holds_each_layers_budget_and_the_same_entries_after_every_step(model, tokenizer, prompt, params):
    """Step by step against the plain cache, for atskv (the controller decides every step, or every 4th step; or
    with retrieval layers, whose budgets differ from the other layers')."""
    ids = prompt
    plain = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, **params)
    logits = ev.forward_chunked(model, plain, ids, chunk=128)
    cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, **params)
    ev.forward_chunked(model, cache, ids, chunk=128)
    dec = StaticDecoder.from_cache(model, "atskv", cache, ids.shape[1], N_STEPS)
    tok = logits.argmax(-1)
    dec.tok.copy_(tok)
    pos = ids.shape[1]
    for step in range(N_STEPS):
        p = torch.tensor([pos])
        out = model(input_ids=tok[:, None], past_key_values=plain, use_cache=True, cache_position=p,
                    position_ids=p[None])
        dec.step()
        tok = out.logits[:, -1].argmax(-1)
        assert torch.equal(dec.tok, tok), f"step {step}"
        for l, (layer, sl) in enumerate(zip(plain.layers, dec.slots)):
            fast = sorted(sl.pos[0, 0][sl.present[0, 0]].tolist())
            assert fast == sorted(layer.positions[0, 0].tolist()), f"step {step} layer {l}"
            assert len(fast) <= sl.budget
        pos += 1


def test_controller_keep_keeps_what_the_threshold_controller_keeps():
    torch.manual_seed(0)
    ctl = ThresholdController(1, beta=[1.1], gain=0.5)
    delta = torch.tensor(0.0, dtype=torch.float64)
    for _ in range(6):
        S, budget = 301, 300
        r = torch.rand(2, 3, S) ** 2
        protected = torch.zeros(2, 3, S, dtype=torch.bool)
        protected[..., :4] = protected[..., -20:] = True
        idx = ctl.select(0, r, protected, budget)
        present = torch.ones(2, 3, S + 11, dtype=torch.bool)
        present[..., S:] = False   # free slots are not entries
        pad = lambda t, v: torch.cat([t, torch.full((2, 3, 11), v, dtype=t.dtype)], -1)  # noqa: E731
        kept, delta = controller_keep(pad(r, 0.0), pad(protected, False), present, budget, 1.1, delta, 0.5, None)
        assert [[row.nonzero()[:, 0].tolist() for row in b] for b in kept] == idx.tolist()
        assert abs(float(delta) - ctl.delta[0]) < 1e-9


def test_fast_path_refuses_atskv_with_consensus(model, tokenizer, prompt):
    cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, consensus=True)
    ev.forward_chunked(model, cache, prompt, chunk=128)
    with pytest.raises(UserError, match="atskv without consensus"):
        StaticDecoder.from_cache(model, "atskv", cache, prompt.shape[1], 4)


def test_fast_path_refuses_a_method_it_does_not_implement(model, tokenizer, prompt):
    cache = KVCacheFactory.create("rocket_kv", model, budget=64, tokenizer=tokenizer)
    ev.forward_chunked(model, cache, prompt, chunk=128)
    with pytest.raises(UserError, match="rocket_kv.*accepted: full, sliding_window"):
        StaticDecoder.from_cache(model, "rocket_kv", cache, prompt.shape[1], 4)


def test_compiled_step_makes_the_same_decisions_as_the_eager_step(model, tokenizer, prompt):
    """torch.compile of the whole layer step (atskv, every 4th step evicting): the same tokens and kept entries as
    the eager step, every step. (It once lost the controller's in-place update of a 0-dim CPU tensor.)"""
    decs = []
    for compile in (False, True):
        cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, evict_every=4)
        logits = ev.forward_chunked(model, cache, prompt.expand(2, -1), chunk=128)
        decs.append(StaticDecoder.from_cache(model, "atskv", cache, prompt.shape[1], N_STEPS, compile=compile))
        decs[-1].tok.copy_(logits.argmax(-1))
    for step in range(N_STEPS):
        for d in decs:
            d.step()
        assert torch.equal(decs[0].tok, decs[1].tok), f"step {step}"
        for l, (a, b) in enumerate(zip(decs[0].slots, decs[1].slots)):
            assert torch.equal(a.state["delta"], b.state["delta"]), f"step {step} layer {l}"
            assert [[sorted(p[m].tolist()) for p, m in zip(pb, mb)] for pb, mb in zip(a.pos, a.present)] == \
                   [[sorted(p[m].tolist()) for p, m in zip(pb, mb)] for pb, mb in zip(b.pos, b.present)], \
                   f"step {step} layer {l}"


def test_free_queue_lists_the_slots_that_a_first_free_search_would_pick_in_turn():
    torch.manual_seed(0)
    present = torch.rand(2, 3, 40) < 0.7         # every row has more than 4 free slots
    queue = free_queue(present, 4)
    p = present.clone()
    for j in range(4):
        slot = first_free_slot(p)
        assert torch.equal(queue[..., j], slot[..., 0]), j
        put(p, slot, torch.ones(slot.shape[:2], dtype=torch.bool))


def test_free_queue_pads_a_row_with_too_few_free_slots_with_the_last_slot():
    present = torch.ones(1, 1, 40, dtype=torch.bool)
    present[0, 0, 5] = False
    assert free_queue(present, 4)[0, 0].tolist() == [5, 39, 39, 39]


def test_folded_hidden_state_term_equals_the_projected_one(model, tokenizer):
    """The fast step scores its new entry's hidden state by one dot product: the predictor's projection and
    weights folded into one vector per layer."""
    from relevance_predictor import project
    pred = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer).method.predictor
    h = torch.randn(5, pred.h_mean.shape[1], generator=torch.Generator().manual_seed(0))
    for l, co in enumerate(logit_coefs(pred)):
        want = hidden_logit(co, project(h, pred.h_mean[l], pred.h_proj[l]))
        assert torch.allclose(step_hidden_logit(co, h), want, rtol=1e-5, atol=1e-5), l


def test_repeated_decoder_decodes_every_row_as_the_original_does(model, tokenizer, prompt):
    """`repeated` (the largest-batch search) copies the whole decode state, evict_every's free-slot queue too."""
    cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, evict_every=4)
    logits = ev.forward_chunked(model, cache, prompt, chunk=128)
    dec = StaticDecoder.from_cache(model, "atskv", cache, prompt.shape[1], N_STEPS)
    dec.tok.copy_(logits.argmax(-1))
    rep = dec.repeated(3)
    for _ in range(N_STEPS - 1):
        dec.step()
        rep.step()
    assert all(torch.equal(rep.out[i], dec.out[0]) for i in range(3))
    for a, b in zip(dec.slots, rep.slots):
        assert all(torch.equal(b.present[i], a.present[0]) for i in range(3))
        assert int(b.present[0, 0].sum()) <= b.budget


def test_step_without_scoring_holds_each_layers_budget_on_evict_everys_schedule(model, tokenizer, prompt):
    """The benchmark's reference step (no scoring: the oldest entries freed, on atskv's evict_every schedule) keeps
    each layer within its budget, down to budget - evict_every + 1 at each eviction, and writes to free slots only."""
    cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, evict_every=4)
    logits = ev.forward_chunked(model, cache, prompt, chunk=128)
    dec = StaticDecoder.from_cache(model, "atskv", cache, prompt.shape[1], N_STEPS)
    dec.tok.copy_(logits.argmax(-1))
    dec.set_scoring(False)
    assert dec.variants() == ["bare_evict", "bare_keep"]
    seen = prompt.shape[1]
    for step in range(N_STEPS - 1):
        v = dec.variant()
        dec.step()
        seen += 1
        for sl in dec.slots:
            n = int(sl.present[0, 0].sum())
            assert n <= sl.budget and (v == "bare_keep" or n == sl.budget - 3), (step, v, n)
            # every position seen is stored at most once (no entry overwritten), the newest one included
            stored = sl.pos[0, 0][sl.present[0, 0]].tolist()
            assert len(set(stored)) == len(stored) and seen - 1 in stored


def test_step_head_counts_each_rows_new_token_once_clamped_to_the_counted_vocabulary(model):
    w = lean_weights(model)
    counts = torch.zeros(3, 50)
    counts[0, 7] = 2
    step_head(w.embed.weight, w.rotary, torch.tensor([7, 7, 60]), torch.tensor([5, 5, 5]), counts)
    want = torch.zeros(3, 50)
    want[0, 7], want[1, 7], want[2, 49] = 3, 1, 1
    assert torch.equal(counts, want)


@dataclass
class KeepEvenPositions(KVMethod):
    """A toy method defined here alone: the even positions first, then the most recent. Its plain-path `score` and
    its fast-path `slot_scores` stand side by side; nothing outside this file knows its name."""
    name = "toy_keep_even"

    def score(self, layer):
        return (layer.positions % 2 == 0).float() * 1e6 + layer.positions.float()

    def slot_scores(self, s):
        return (s["pos"] % 2 == 0).float() * 1e6 + s["pos"].float()


@pytest.fixture
def toy_method():
    register_method(KeepEvenPositions)
    yield KeepEvenPositions.name
    del METHODS[KeepEvenPositions.name]


def test_a_method_defined_in_a_test_file_alone_decodes_the_same_on_the_plain_and_the_fast_path(
        model, tokenizer, prompt, toy_method, plain_decode):
    ids = prompt.expand(2, -1)
    plain = KVCacheFactory.create(toy_method, model, budget=96, tokenizer=tokenizer)
    want = plain_decode(model, plain, ids, N_STEPS)
    cache = KVCacheFactory.create(toy_method, model, budget=96, tokenizer=tokenizer)
    logits = ev.forward_chunked(model, cache, ids, chunk=128)
    dec = StaticDecoder.from_cache(model, toy_method, cache, ids.shape[1], N_STEPS)
    assert torch.equal(dec.generate(logits.argmax(-1), N_STEPS + 1), want)
    for layer, sl in zip(plain.layers, dec.slots):
        fast = [[sorted(p[m].tolist()) for p, m in zip(pb, mb)] for pb, mb in zip(sl.pos, sl.present)]
        assert fast == kept_positions(layer.positions)
        assert sum(p % 2 == 0 for p in fast[0][0]) > len(fast[0][0]) // 2 + 2   # the toy rule did decide


def test_a_method_without_a_slot_step_is_refused_by_the_fast_path_with_its_reason():
    @dataclass
    class ScoreOnly(KVMethod):   # plain-path scoring alone
        name = "toy_score_only"

        def score(self, layer):
            return layer.positions.float()
    register_method(ScoreOnly)
    try:
        with pytest.raises(UserError, match="'toy_score_only' has no fast decode path \\(it has no slot step\\)"):
            check_fast_method("toy_score_only")
    finally:
        del METHODS["toy_score_only"]


@pytest.mark.parametrize("schedule", [{}, {"recall_every": 4, "recall_span": 8, "recall_step_tokens": 0.25},
                                      {"recall_dims": 16, "recall_layers": 4, "recall_step_tokens": 0.25}])
def test_fast_path_with_external_memory_recalls_and_offloads_as_the_plain_path(model, tokenizer, prompt,
                                                                               plain_decode, schedule):
    """atskv[external_memory=true] on the fast path: the same tokens as the plain path, the same entries active,
    and the same positions in the passive tier as in the plain path's store; with recall_every 4, the steps
    between recalls attend to the last recall's entries on both paths, and with recall_span 8 both choose the
    same neighbours of the voted entries (recall_step_tokens: a quarter of the budget at a decode step, where a
    prompt chunk recalls half); with recall_dims 16 and recall_layers 4 both score a decode step on the same 16 of
    64 dimensions, in the same 4 layers only."""
    ids = prompt.expand(2, -1)
    params = {"external_memory": True, **schedule}
    plain = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, **params)
    want = plain_decode(model, plain, ids, N_STEPS)
    cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, **params)
    logits = ev.forward_chunked(model, cache, ids, chunk=128)
    dec = StaticDecoder.from_cache(model, "atskv", cache, ids.shape[1], N_STEPS)
    assert torch.equal(dec.generate(logits.argmax(-1), N_STEPS + 1), want)
    b = dec.extra_nbytes()   # the tier on the device (off CUDA); a step reads its int8 keys and the recalled entries
    assert 0 < b["device_read"] < b["device"] and b["host"] == b["host_read"] == 0
    for l, (layer, sl) in enumerate(zip(plain.layers, dec.slots)):
        fast = [[sorted(p[m].tolist()) for p, m in zip(pb, mb)] for pb, mb in zip(sl.pos, sl.present)]
        assert fast == kept_positions(layer.positions)
        if l not in plain.method.decode_recall:   # recall_layers: no tier where decode steps do not recall
            assert "pok" not in sl.state
            continue
        store = plain.method.passive[l]
        store.settle()
        tier = [[torch.nonzero(m).flatten().tolist() for m in mb] for mb in sl.state["pok"]]   # indexed by position
        assert tier == kept_positions(store.pos), f"layer {l}"


def test_the_fast_paths_passive_tier_keeps_its_validity_in_the_recall_kernels_form(model, tokenizer, prompt):
    """uint8, as the recall kernels read it: a bool tier would be converted in every recalling layer and step
    (tests/test_recall_kernels.py traces the compiled form)."""
    cache = KVCacheFactory.create("atskv", model, budget=64, tokenizer=tokenizer, external_memory=True)
    ev.forward_chunked(model, cache, prompt, chunk=128)
    dec = StaticDecoder.from_cache(model, "atskv", cache, prompt.shape[1], 2)
    assert {sl.state["pok"].dtype for sl in dec.slots} == {torch.uint8}


MERGED_INTERPRETED = r"""
import sys, torch
sys.path.insert(0, {root!r})
import fast_decode as fd
from kernels import decode_attention as da
torch.manual_seed(0)
B, H, G, D, N, R = 2, 3, 3, 64, 100, 40
q, K, V = torch.randn(B, H, G, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
cos, sin = torch.randn(B, 1, D), torch.randn(B, 1, D)
bias = torch.where(torch.rand(B, H, N) < 0.8, 0.0, fd.HIDDEN)
keys, values = torch.randn(B, H, R, D), torch.randn(B, H, R, D)
valid = torch.rand(B, H, R) < 0.7
valid[1, 2] = False                                   # a head with no recalled entry: the slots' attention alone
# the reference: the plain path's two attentions merged by their log-sum-exps (what the CPU runs)
want, probs = da.decode_attention(q, K, V, bias, 0.125, True, False, cos=cos, sin=sin, extra=(keys, values, valid))
da.kernel_available = lambda device: True             # the kernels, interpreted on the CPU
got, _ = da.decode_attention(q, K, V, bias, 0.125, cos=cos, sin=sin, extra=(keys, values, valid))
assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
# a step that evicts wants the slots' probabilities; one that does not adds them to the running statistic
got, p = da.decode_attention(q, K, V, bias, 0.125, True, cos=cos, sin=sin, extra=(keys, values, valid))
assert (got - want).abs().max() < 1e-5 and (p - probs).abs().max() < 1e-6
acc = torch.zeros(B, H, N)
got, _ = da.decode_attention(q, K, V, bias, 0.125, acc=acc, cos=cos, sin=sin, extra=(keys, values, valid))
assert (got - want).abs().max() < 1e-5 and (acc - probs.mean(2)).abs().max() < 1e-6
print("ok")
"""
register(MERGED_INTERPRETED)


@needs_triton
def test_recalled_entries_attended_in_the_decode_kernels_give_the_plain_paths_merged_attention():
    """The fast path attends recalled entries in further splits of the slots' decode kernels; the result equals the
    plain path's attention_lse + merge_attention, and the probabilities (or the running statistic) stay the slots'
    own, in the Triton interpreter."""
    run_interpreted(MERGED_INTERPRETED)


def test_fast_paths_passive_tier_holds_the_plain_stores_keys_and_values_for_decoded_entries_evicted(
        model, tokenizer, prompt, plain_decode):
    """evict_every 4: the steps between evictions write nothing to the tier; an evicting step writes back what was
    decoded since the last one. After 28 steps at a budget of 32 (16 recent tokens protected), decoded entries
    have been evicted: the tier holds, at every stored position, the plain store's key and value (those of
    decoded entries to float tolerance: the fast step projects them itself)."""
    ids = prompt
    params = {"external_memory": True, "evict_every": 4}
    plain = KVCacheFactory.create("atskv", model, budget=32, tokenizer=tokenizer, **params)
    want = plain_decode(model, plain, ids, 28)
    cache = KVCacheFactory.create("atskv", model, budget=32, tokenizer=tokenizer, **params)
    logits = ev.forward_chunked(model, cache, ids, chunk=128)
    dec = StaticDecoder.from_cache(model, "atskv", cache, ids.shape[1], 28)
    assert torch.equal(dec.generate(logits.argmax(-1), 29), want)
    decoded_evicted = 0
    for l, sl in enumerate(dec.slots):
        store = plain.method.passive[l]
        store.settle()
        for h in range(store.pos.shape[1]):   # batch row 0, each KV head
            ok = store.valid[0, h]
            pos = store.pos[0, h][ok]
            assert torch.equal(sl.state["pok"][0, h].nonzero().flatten(), pos.sort().values), (l, h)
            # decoded entries' keys come from the fast step's own projections: equal to float tolerance
            assert torch.allclose(sl.state["pk"][0, h, pos], store.k[0, h][ok], atol=1e-4), (l, h)
            assert torch.allclose(sl.state["pv"][0, h, pos], store.v[0, h][ok], atol=1e-4), (l, h)
            decoded_evicted += int((pos >= ids.shape[1]).sum())
    assert decoded_evicted > 0


def test_a_fast_decode_cell_decodes_each_question_of_multi_question_on_the_fast_path_as_the_plain_path_does(
        model, tokenizer, monkeypatch):
    """--fast_decode: every answer of a cell, the several questions of a multi_question sample included, is decoded
    by a StaticDecoder, gives the plain path's answer, and records the method's state beside the slots (here the
    passive tier and its int8 keys: off CUDA the tier lives on the device)."""
    samples = [ev.make_synthetic_sample(tokenizer, task, 300, 0.5, 0) for task in ("needle", "multi_question")]
    params = {"external_memory": True}
    plain = run_synthetic_samples(model, tokenizer, "atskv", 0.25, samples, "question_agnostic", 128, params)
    built = []
    from_cache = StaticDecoder.from_cache
    monkeypatch.setattr(StaticDecoder, "from_cache",
                        classmethod(lambda cls, *a, **k: built.append(a[1]) or from_cache(*a, **k)))
    fast = run_synthetic_samples(model, tokenizer, "atskv", 0.25, samples, "question_agnostic", 128, params,
                                    fast=True)
    assert len(built) == 1 + len(samples[1].meta["questions"])
    assert [r["prediction"] for r in fast] == [r["prediction"] for r in plain]
    for r in fast:   # multi_question's record too: the decoder's tiers, not the plain cache's after the context;
        # off CUDA the passive tier is kept on the device: recorded apart from the int8 keys (the summaries)
        assert r["device_tier_bytes"] > r["active_kv_bytes"] > r["summary_bytes"] > 0 and r["passive_bytes"] == 0

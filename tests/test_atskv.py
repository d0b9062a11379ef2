"""ATSKV: the controller, the predictor's persistence, budgets, positions and the external memory."""
import copy

import pytest
import torch

import evaluation as ev
import relevance_predictor as rp
from sparse_kv_cache import KVCacheFactory, ThresholdController, tier_bytes


@pytest.fixture(scope="module")
def predictor(model, tokenizer):
    return rp.load_or_train(model, tokenizer)  # trains once (about 2 minutes on 2 cores), then cached


@pytest.mark.parametrize("beta,target", [(1.0, 0.25), (1.3, 0.25), (0.8, 0.1)])
def test_controller_kept_fraction_tracks_the_target_within_2_points(beta, target):
    torch.manual_seed(0)
    ctl = ThresholdController(1, beta=[beta], gain=0.5)
    S = 2000
    fracs = []
    for step in range(40):
        r = torch.rand(1, 3, S) ** 2  # a skewed relevance distribution
        protected = torch.zeros(1, 3, S, dtype=torch.bool)
        ctl.select(0, r, protected, int(target * S))
        fracs.append(ctl.history[-1][1])
    assert abs(sum(fracs[-10:]) / 10 - target) <= 0.02, fracs[-10:]


def test_controller_never_keeps_more_than_the_budget():
    ctl = ThresholdController(1, beta=[0.1])  # a threshold far too low: the cap must hold
    idx = ctl.select(0, torch.rand(2, 3, 500), torch.zeros(2, 3, 500, dtype=torch.bool), 100)
    assert idx.shape[-1] <= 100


def test_saved_predictor_loads_back_bit_identical(predictor, tmp_path):
    path = tmp_path / "p.safetensors"
    predictor.save(path, {"test": 1})
    loaded = rp.TokenRelevancePredictor.load(path)
    a, b = predictor.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k]) for k in a)


def test_predictor_beats_recency_and_key_norm_on_held_out_ranking(predictor, model, tokenizer):
    # held-out text the predictor never saw: the synthetic benchmark's generated haystack
    s = ev.make_synthetic_sample(tokenizer, "needle", 1000, 0.5, 9)
    ids = tokenizer(s.context, add_special_tokens=False).input_ids[:900]
    rows = rp.build_training_rows(model, torch.tensor([ids]), predictor.token_flags, 256, 256, 32)
    rep = rp.evaluate_ranking(predictor, [rows], budgets=(0.25,))[0.25]
    assert rep["predictor"] > rep["recency"] and rep["predictor"] > rep["key_norm"]


def test_kvzip_target_is_the_largest_attention_from_a_repetition_and_leaves_the_features_alone(predictor, model,
                                                                                                tokenizer):
    """The `kvzip` variant's training rows: the same features as the default's (they come from the first reading of
    the context), and as target each token's largest attention from the repeated context's queries."""
    s = ev.make_synthetic_sample(tokenizer, "needle", 600, 0.5, 9)
    ids = torch.tensor([tokenizer(s.context, add_special_tokens=False).input_ids[:520]])
    rep = torch.tensor([tokenizer(rp.REPEAT_REQUEST, add_special_tokens=False).input_ids])
    plain = rp.build_training_rows(model, ids, predictor.token_flags, 256, 256, 32)
    kvzip = rp.build_training_rows(model, ids, predictor.token_flags, 256, 256, 32, repeat_ids=rep)
    a0, f0, h0, _, t0, _, _ = plain[5][0]      # layer 5, the first decision (chunk end 256)
    a1, f1, h1, _, t1, _, _ = kvzip[5][0]
    assert torch.allclose(a0, a1, atol=1e-4) and torch.allclose(f0, f1, atol=1e-4) and torch.allclose(h0, h1, atol=1e-4)
    assert not torch.allclose(t0, t1) and 0 < float(t1.max()) <= 1
    assert len(kvzip[5]) > len(plain[5])      # no future horizon is needed: a decision at every chunk end


def _prefill(model, tok, n, budget, chunk=128, **params):
    s = ev.make_synthetic_sample(tok, "needle", n, 0.5, 0)
    ci, qi = ev.encode_prompt(tok, s.context, s.question, s.answer_prefix)
    cache = KVCacheFactory.create("atskv", model, budget=budget, context_length=len(ci), tokenizer=tok, **params)
    ev.forward_chunked(model, cache, torch.tensor([ci]), chunk)
    return cache, ci, qi


def test_atskv_never_exceeds_its_budget_per_layer_and_in_total(model, tokenizer, predictor):
    cache, ci, qi = _prefill(model, tokenizer, 700, 0.2)
    budget = cache.budget_tokens
    for step in range(3):
        pos = len(ci) + step
        p = torch.tensor([pos])
        model(input_ids=torch.tensor([[qi[step]]]), past_key_values=cache, cache_position=p, position_ids=p[None])
        lens = cache.stored_lengths()
        assert all(n <= cache.layer_budget(i) for i, n in enumerate(lens))
        assert sum(lens) <= budget * len(lens) + len(lens)  # per-layer rounding of the shares
        assert cache.get_seq_length() == pos + 1


def test_evict_every_evicts_on_its_schedule_and_never_exceeds_the_budget(model, tokenizer, predictor):
    every = 4
    cache, ci, qi = _prefill(model, tokenizer, 700, 0.2, evict_every=every)
    assert all(n <= cache.layer_budget(i) for i, n in enumerate(cache.stored_lengths()))  # prefill: to the budget
    before = cache.stored_lengths()
    for step in range(9):
        p = torch.tensor([len(ci) + step])
        model(input_ids=torch.tensor([[qi[step]]]), past_key_values=cache, cache_position=p, position_ids=p[None])
        lens = cache.stored_lengths()
        for i, (n, b) in enumerate(zip(lens, before)):
            budget = cache.layer_budget(i)
            assert n <= budget
            if step % every == 0:          # a scheduled eviction: down to budget - every + 1
                assert n <= budget - every + 1
            else:                          # in between: the new entry is added, nothing evicted
                assert n == b + 1
        before = lens


def test_consensus_keeps_one_ranking_for_every_head_within_each_layers_budget(model, tokenizer, predictor):
    cache, ci, qi = _prefill(model, tokenizer, 700, 0.2, consensus=True)
    for step in range(2):
        p = torch.tensor([len(ci) + step])
        model(input_ids=torch.tensor([[qi[step]]]), past_key_values=cache, cache_position=p, position_ids=p[None])
    for i, layer in enumerate(cache.layers):
        assert layer.stored_length() <= cache.layer_budget(i)
        assert all(torch.equal(layer.positions[:, 0], layer.positions[:, h]) for h in range(layer.positions.shape[1]))
    # layers of the same budget that keep as many entries keep the same positions: one ranking
    by_budget = {}
    for i, layer in enumerate(cache.layers):
        by_budget.setdefault((cache.layer_budget(i), layer.stored_length()), []).append(
            set(layer.positions[0, 0].tolist()))
    assert any(len(v) > 1 for v in by_budget.values())
    assert all(all(s == v[0] for s in v) for v in by_budget.values() if len(v) > 1)


def test_induction_scores_single_out_a_few_copying_layers_of_the_default_model(model):
    s = rp.induction_scores(model)
    assert s.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert ((s >= 0) & (s <= 1)).all()
    per_layer = s.mean(1)
    assert per_layer.max() > 0.1 and per_layer.median() < 0.02   # a few layers copy, most do not


def test_retrieval_layers_keep_the_whole_context_where_their_share_allows_and_the_rest_share_the_remainder(
        model, tokenizer, predictor):
    cache, ci, qi = _prefill(model, tokenizer, 700, 0.2, retrieval_layers=3, retrieval_share=0.6)
    m, n_layers = cache.method, len(cache.layers)
    assert m.retrieval == set(rp.induction_scores(model).mean(1).topk(3).indices.tolist())
    total = cache.budget_tokens * n_layers                  # 140 x 30
    budgets = [cache.layer_budget(i) for i in range(n_layers)]
    assert sum(budgets) <= total
    for i, layer in enumerate(cache.layers):
        if i in m.retrieval:    # 60% of the total / 3 = 840 > 700: the whole context, nothing evicted
            assert budgets[i] == len(ci) and layer.stored_length() == len(ci)
        else:
            assert budgets[i] == (total - 3 * len(ci)) // (n_layers - 3)
            assert layer.stored_length() <= budgets[i]


@pytest.mark.parametrize("params,match", [({"retrieval_layers": -1}, "retrieval_layers -1"),
                                          ({"retrieval_layers": 30}, "retrieval_layers 30: accepted are 0 to 29"),
                                          ({"retrieval_layers": 2, "retrieval_share": 1.5}, "retrieval_share 1.5"),
                                          ({"recall_choice": "all"}, "recall_choice 'all': accepted are 'own' and"),
                                          ({"recall_step_tokens": 0}, "recall_step_tokens 0: accepted are None and"),
                                          ({"recall_tokens": -0.5}, "recall_tokens -0.5: accepted are fractions"),
                                          ({"recall_dims": -1}, "recall_dims -1: accepted are integers >= 0"),
                                          ({"recall_dims": 65}, r"recall_dims 65: accepted are 0 \(all\) to 64"),
                                          ({"recall_layers": 31}, r"recall_layers 31: accepted are 0 \(all\) to 30")])
def test_bad_retrieval_parameters_are_refused(model, tokenizer, predictor, params, match):
    from utils import UserError
    with pytest.raises(UserError, match=match):
        _prefill(model, tokenizer, 300, 50, **params)


def test_unknown_predictor_variant_is_refused(model, tokenizer):
    from utils import UserError
    with pytest.raises(UserError, match="unknown predictor variant 'nope'; accepted: default, .*no_pos"):
        rp.load_or_train(model, tokenizer, variant="nope")


def test_evict_every_below_1_is_refused(model, tokenizer, predictor):
    from utils import UserError
    with pytest.raises(UserError, match="evict_every 0.*accepted"):
        _prefill(model, tokenizer, 300, 50, evict_every=0)


def test_atskv_positions_stay_right_across_chunks_and_decoding(model, tokenizer, predictor):
    cache, ci, qi = _prefill(model, tokenizer, 600, 100, chunk=100)
    for layer in cache.layers:
        pos = layer.positions
        assert int(pos.max()) == len(ci) - 1 and int(pos.min()) == 0  # sinks kept, last token kept
        assert bool((pos[..., 1:] > pos[..., :-1]).all())  # stored in position order, no duplicates


def test_external_memory_keeps_active_bytes_flat_while_the_context_grows_8x(model, tokenizer, predictor):
    sizes = {}
    for n in (200, 1600):
        cache, ci, _ = _prefill(model, tokenizer, n, 64, chunk=256, external_memory=True)
        sizes[n] = (tier_bytes(cache), len(ci))
    (small, n_small), (big, n_big) = sizes[200], sizes[1600]
    assert n_big >= 7 * n_small
    assert big["active_kv_bytes"] == small["active_kv_bytes"]
    assert big["passive_bytes"] > 6 * small["passive_bytes"]


def test_external_memory_drops_nothing_without_a_limit(model, tokenizer, predictor):
    cache, ci, _ = _prefill(model, tokenizer, 600, 64, chunk=128, external_memory=True)
    for l, layer in enumerate(cache.layers):
        store = cache.method.passive[l]
        pending = 0 if store.pend is None else store.pend[0].shape[2]
        assert layer.stored_length() + store.size + pending == len(ci)


def test_passive_limit_bounds_the_store(model, tokenizer, predictor):
    cache, ci, _ = _prefill(model, tokenizer, 600, 64, chunk=128, external_memory=True, passive_limit=128)
    assert all(s.size <= 128 for s in cache.method.passive.values())


def test_recall_attends_more_entries_than_the_active_cache_holds(model, tokenizer, predictor):
    cache, ci, qi = _prefill(model, tokenizer, 600, 64, chunk=128, external_memory=True)
    ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))
    assert cache.method.last_recall > 0
    assert all(n <= cache.layer_budget(i) for i, n in enumerate(cache.stored_lengths()))


@torch.no_grad()
def test_a_decode_step_recalls_recall_step_tokens_of_the_budget_and_the_question_recall_tokens(model, tokenizer,
                                                                                                predictor):
    """recall_step_tokens 0.1: each decode step brings a tenth of the layer's budget per KV head; the question's
    forward (each query its own top recall_tokens x budget entries, 0.5 by default) brings at least half of it."""
    cache, ci, qi = _prefill(model, tokenizer, 400, 64, chunk=128, external_memory=True, recall_step_tokens=0.1)
    m = cache.method
    budget = cache.layer_budget(len(cache.layers) - 1)   # m.last_recall: the last layer's
    logits = ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))
    assert m.last_recall >= int(0.5 * budget) > int(0.1 * budget) > 0
    for step in range(2):
        pos = torch.tensor([[len(ci) + len(qi) + step]])
        logits = model(logits.argmax(-1).view(1, 1), past_key_values=cache, position_ids=pos,
                       use_cache=True).logits[:, -1]
        assert m.last_recall == int(0.1 * budget)


@torch.no_grad()
def test_recall_every_k_recalls_on_every_kth_decode_step_and_attends_to_its_entries_in_between(model, tokenizer,
                                                                                                  predictor):
    """recall_every=3: the first decode step after the question recalls, then every third; the steps between copy
    nothing and attend to what the last recall brought (a different output than without it)."""
    cache, ci, qi = _prefill(model, tokenizer, 400, 64, chunk=128, external_memory=True, recall_every=3)
    m = cache.method
    logits = ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))
    tok, copied = logits.argmax(-1).view(1, 1), []
    for step in range(5):
        before, held = m.recall_bytes["decode"], dict(m.held)
        pos = torch.tensor([[len(ci) + len(qi) + step]])
        alt = copy.deepcopy(cache)   # the same step without the held entries
        alt.method.held = {}
        without = model(tok, past_key_values=alt, position_ids=pos, use_cache=True).logits[:, -1]
        out = model(tok, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]
        copied.append(m.recall_bytes["decode"] > before)
        if step % 3:   # between recalls: the same entries again, and they change the step's output
            assert held and m.held.keys() == held.keys() and all(m.held[l] is held[l] for l in held)
            assert not torch.allclose(without, out)
        tok = out.argmax(-1).view(1, 1)
    assert copied == [True, False, False, True, False]


@torch.no_grad()
def test_recall_layers_recall_at_decode_steps_only_in_the_layers_with_the_strongest_induction_heads(
        model, tokenizer, predictor, monkeypatch):
    """recall_layers 4: the question's forward recalls in every layer, a decode step only in the 4 layers whose KV
    heads copy from context most (induction_scores), and those 4 recall at every decode step."""
    from external_memory import PassiveStore
    calls = []
    recall = PassiveStore.recall
    monkeypatch.setattr(PassiveStore, "recall", lambda self, query, *a, **k: calls.append((self, query.shape[2]))
                        or recall(self, query, *a, **k))
    cache, ci, qi = _prefill(model, tokenizer, 400, 64, chunk=128, external_memory=True, recall_layers=4)
    m = cache.method
    want = set(rp.induction_scores(model).mean(1).topk(4).indices.tolist())
    assert m.decode_recall == want
    layer_of = {id(store): l for l, store in m.passive.items()}
    calls.clear()
    logits = ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))   # the question: every layer
    assert {layer_of[id(st)] for st, _ in calls} == set(m.passive) and len(m.passive) == 30
    for step in range(3):                                                              # a decode step: those 4
        calls.clear()
        pos = torch.tensor([[len(ci) + len(qi) + step]])
        logits = model(logits.argmax(-1).view(1, 1), past_key_values=cache, position_ids=pos,
                       use_cache=True).logits[:, -1]
        assert sorted(layer_of[id(st)] for st, _ in calls) == sorted(want), step


def test_int8_key_summaries_recall_what_exact_scoring_recalls(model, tokenizer, predictor):
    """recall_scoring="int8" scores the passive keys from an int8 copy on the device: the same question's recall
    picks (almost) the entries that q.k against the full-precision keys picks, per layer and KV head."""
    picked = {}
    for scoring in ("exact", "int8"):
        cache, ci, qi = _prefill(model, tokenizer, 400, 64, chunk=128, external_memory=True, recall_scoring=scoring)
        ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))
        stores = [s for _, s in sorted(cache.method.passive.items())]
        picked[scoring] = [[set(h.tolist()) for h in s.last_positions[0]] for s in stores]
        if scoring == "int8":
            # one int8 key per passive entry (the host store joins its copies in flight lazily: count by size)
            assert all(s.kq.dtype == torch.int8 and s.kq.shape[2] == s.size for s in cache.method.passive.values())
    pairs = [(a, b) for la, lb in zip(picked["exact"], picked["int8"]) for a, b in zip(la, lb)]
    assert min(len(a & b) / len(a) for a, b in pairs) >= 0.8
    assert sum(len(a & b) for a, b in pairs) / sum(len(a) for a, _ in pairs) >= 0.95


def test_atskv_generates_with_batch_3(model, tokenizer, predictor):
    prompts = ["The capital of France is", "Write a short poem about the sea. The sea is",
               "List three prime numbers: 2, 3,"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    for em in (False, True):
        cache = KVCacheFactory.create("atskv", model, budget=0.6, tokenizer=tokenizer, external_memory=em)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, past_key_values=cache)
        assert out.shape == (3, enc.input_ids.shape[1] + 6) and cache.get_seq_length() == out.shape[1] - 1


def test_attention_split_in_two_and_merged_by_log_sum_exp_equals_attention_over_the_union():
    from sparse_kv_cache import attention_lse, merge_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=g)
    k1, v1 = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    k2, v2 = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 4, 8, generator=g)
    m1 = torch.rand(2, 6, 5, 7, generator=g) > 0.3
    m1[..., 0] = True
    m2 = torch.rand(2, 6, 5, 4, generator=g) > 0.5
    m2[1] = False  # a part with no allowed entry at all contributes nothing
    o1, l1 = attention_lse(q, k1, v1, m1, 0.35)
    o2, l2 = attention_lse(q, k2, v2, m2, 0.35)
    rep = lambda t: t.repeat_interleave(3, dim=1)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(
        q, rep(torch.cat([k1, k2], 2)), rep(torch.cat([v1, v2], 2)), attn_mask=torch.cat([m1, m2], -1), scale=0.35)
    assert torch.allclose(merge_attention(o1, l1, o2, l2), want, atol=1e-5)


def test_promotion_moves_recalled_entries_into_the_active_cache_within_budget_and_loses_none(model, tokenizer,
                                                                                            predictor):
    cache, ci, qi = _prefill(model, tokenizer, 600, 64, chunk=128, external_memory=True, promote=True)
    before = [layer.positions.clone() for layer in cache.layers]
    ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))
    seen = len(ci) + len(qi)
    moved = 0
    for l, layer in enumerate(cache.layers):
        assert layer.stored_length() <= cache.layer_budget(l)
        store = cache.method.passive[l]
        store.settle()
        for h in range(layer.positions.shape[1]):   # the store's promoted entries are tombstones (not valid)
            passive = [store.pos[0, h][store.valid[0, h]]] if store.pos is not None else []
            held = torch.cat([layer.positions[0, h], *passive]).sort().values
            assert held.tolist() == list(range(seen))  # every token in exactly one tier
        old = set(before[l][0, 0].tolist())
        moved += sum(1 for p in layer.positions[0, 0].tolist() if p not in old and p < len(ci))
    assert moved > 0  # some evicted context entries won their way back into the active cache


def _store_of(N, B=2, Hkv=2, D=8, q=1, seed=0, **kw):
    """A store of N random entries per (row, KV head), every one valid, and a query (B, Hkv * 3, q, D)."""
    from external_memory import PassiveStore
    g = torch.Generator().manual_seed(seed)
    store = PassiveStore(page_size=1, **kw)
    store.add(torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
              torch.arange(N).expand(B, Hkv, N).clone(), torch.ones(B, Hkv, N, dtype=torch.bool))
    return store, torch.randn(B, Hkv * 3, q, D, generator=g)


@pytest.mark.parametrize("int8_keys", [False, True])
def test_promoted_entries_never_come_back_from_the_store_and_the_others_still_do(int8_keys):
    store, query = _store_of(40, int8_keys=int8_keys)
    first = store.recall(query, 6).wait()
    promoted = store.last_positions.clone()
    store.remove_recalled()
    assert store.dead == 6 and store.size == 40   # tombstones until they are half of the store
    second = store.recall(query, 6).wait()
    for b in range(2):
        for h in range(2):
            assert not set(store.last_positions[b, h].tolist()) & set(promoted[b, h].tolist())
    assert first.valid.all() and second.valid.all()


def test_a_store_half_of_tombstones_is_compacted_to_its_live_entries_in_stored_order():
    store, query = _store_of(40)
    removed = [[set() for _ in range(2)] for _ in range(2)]
    for _ in range(4):   # 4 x 6 = 24 > 20 tombstones: compacted at the fourth
        store.recall(query, 6)
        for b in range(2):
            for h in range(2):
                removed[b][h] |= set(store.last_positions[b, h].tolist())
        store.remove_recalled()
    assert store.size == 16 and store.dead == 0 and store.valid.all()
    for b in range(2):
        for h in range(2):
            assert store.pos[b, h].tolist() == sorted(set(range(40)) - removed[b][h])


def test_own_recall_gives_each_query_of_each_head_exactly_its_top_entries():
    """recall_choice="own" (a forward of several tokens): every query of every query head attends to the n passive
    entries with its largest q.k, and to no other recalled entry."""
    B, Hkv, G, q, N, n = 2, 2, 3, 5, 40, 6
    store, query = _store_of(N, B, Hkv, q=q)
    rec = store.recall(query, n, per_query=True).wait()
    k = store.k
    attended = rec.mask(Hkv * G, q)                                        # (B, H_q, q, U) over the recalled
    for b in range(B):
        for h in range(Hkv * G):
            scores = query[b, h] @ k[b, h // G].T                           # (q, N)
            for i in range(q):
                want = set(scores[i].topk(n).indices.tolist())
                got = {int(p) for p, a in zip(store.last_positions[b, h // G], attended[b, h, i]) if a}
                assert got == want


def test_recall_of_every_passive_entry_reproduces_the_full_cache(model, tokenizer, predictor):
    """With room to recall the whole store (recall_tokens x budget >= the context), ATSKV with external memory
    attends as the full cache does in every chunk of the prompt and at the question: the logits agree."""
    s = ev.make_synthetic_sample(tokenizer, "needle", 500, 0.5, 0)
    ci, qi = ev.encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
    logits = {}
    for name, params in (("full", {}), ("atskv", {"external_memory": True, "recall_tokens": 20.0})):
        cache = KVCacheFactory.create(name, model, budget=64, context_length=len(ci), tokenizer=tokenizer, **params)
        ev.forward_chunked(model, cache, torch.tensor([ci]), 128)
        logits[name] = ev.forward_chunked(model, cache, torch.tensor([qi]), 64, start=len(ci))[0]
        if name == "atskv":
            assert all(n <= cache.layer_budget(i) for i, n in enumerate(cache.stored_lengths()))
            assert min(s.size for s in cache.method.passive.values()) > 300
    assert torch.allclose(logits["atskv"], logits["full"], atol=1e-3, rtol=1e-3)

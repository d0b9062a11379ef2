"""Baselines: known answers on small tensors, budgets, generate with batch > 1, and kvpress cross-checks."""
import math

import pytest
import torch

import evaluation as ev
from baselines import DynamicKV, hybrid_select, largest_remainder, rocketkv_params
from cache_framework import _PENDING
from sparse_kv_cache import CompressedCache, KVCacheFactory, cache_nbytes

METHODS = ["sliding_window", "snapkv", "h2o", "pyramidkv", "dynamic_kv", "rocket_kv", "knorm"]


def test_rocketkv_budget_split_matches_the_worked_example():
    p = rocketkv_params(S=32768, B=256, max_new=128, head_dim=128)
    assert abs(p["alpha"] - 0.62) < 0.005
    assert abs(p["capacity"] - 1618) <= 2
    assert p["topk"] == 128 and p["chunk"] == 3 and p["channels"] == 61


def test_rocketkv_stage2_equals_exact_topk_with_all_channels_and_chunks_of_one():
    torch.manual_seed(0)
    B, Hkv, G, S, D, k = 2, 3, 1, 200, 16, 20
    q = torch.randn(B, Hkv, G, D)
    keys = torch.randn(B, Hkv, S, D)
    sel = hybrid_select(q, keys, keys, r=D, g=1, k=k, scaling=D ** -0.5)
    exact = (q @ keys.transpose(-1, -2))[:, :, 0].topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(sel, exact)


def test_rocketkv_stage2_with_gqa_groups_equals_exact_topk_of_group_attention():
    torch.manual_seed(1)
    B, Hkv, G, S, D, k = 1, 2, 3, 100, 8, 10
    q = torch.randn(B, Hkv, G, D)
    keys = torch.randn(B, Hkv, S, D)
    sel = hybrid_select(q, keys, keys, r=D, g=1, k=k, scaling=D ** -0.5)
    # with r = d the SparQ temperature is sqrt(d): exact softmax attention, summed over the group
    probs = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(D), dim=-1).sum(2)
    assert torch.equal(sel, probs.topk(k, dim=-1).indices.sort(-1).values)


def test_rocketkv_chunks_bound_every_key_in_them():
    torch.manual_seed(2)
    q = torch.randn(1, 1, 1, 8)
    keys = torch.randn(1, 1, 12, 8)
    k = keys.unflatten(2, (4, 3))
    sel = hybrid_select(q, k.amin(3), k.amax(3), r=8, g=3, k=3, scaling=8 ** -0.5)
    assert sel.shape[-1] == 3 and int(sel[0, 0, 0]) % 3 == 0 and torch.equal(sel[0, 0], sel[0, 0, 0] + torch.arange(3))


def test_rocketkv_stage2_takes_each_channels_bound_by_the_groups_summed_query():
    """One channel, a group of two heads with q = +1 and -2 (sum -1: both read the chunks' minima), chunks of 2
    tokens: A (min -4, max -3), B (min -3, max 1). Head 0 scores A -4, B -3; head 1 scores A 8, B 6; softmax per
    head, summed: A 0.27 + 0.88 > B 0.73 + 0.12, so A's tokens. Each head's own sign (head 0 reading maxima: A -3,
    B 1) would pick B."""
    q = torch.tensor([[[[1.0], [-2.0]]]])
    kmin, kmax = torch.tensor([[[[-4.0], [-3.0]]]]), torch.tensor([[[[-3.0], [1.0]]]])
    assert hybrid_select(q, kmin, kmax, r=1, g=2, k=2, scaling=1.0).tolist() == [[[0, 1]]]


def test_rocketkv_stage2_reads_exactly_k_tokens():
    torch.manual_seed(3)
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 14, 8)
    lo = torch.nn.functional.pad(k, (0, 0, 0, 1), value=float("inf")).unflatten(2, (5, 3)).amin(3)
    hi = torch.nn.functional.pad(k, (0, 0, 0, 1), value=float("-inf")).unflatten(2, (5, 3)).amax(3)
    sel = hybrid_select(q, lo, hi, r=4, g=3, k=4, scaling=8 ** -0.5, n_tokens=14)
    assert sel.shape == (1, 2, 4) and int(sel.max()) < 14


def test_rocketkv_sizes_its_cache_with_the_tasks_generation_length(model, tokenizer):
    """A 1 000-token prompt, budget 100, 128 new tokens: S = 1 128, c = 11.28, alpha = 0.2 + 0.06 log2 c = 0.4097,
    C = int(1128 / c^alpha) = 417, prompt budget min(S - 128, C - 128) = 289 entries a layer after the prefill."""
    from evals.harness import make_cache
    ids = torch.tensor([tokenizer("The sky is blue and the grass is green. " * 120).input_ids[:1000]])
    cache, _ = make_cache("rocket_kv", model, 100, 1000, None, tokenizer, max_new_tokens=128)
    assert cache.method.max_new_tokens == 128
    ev.forward_chunked(model, cache, ids, 1000)
    assert cache.stored_lengths() == [289] * model.config.num_hidden_layers
    assert cache.method.params["capacity"] == 417 and cache.method.params["topk"] == 50


def _filled_cache(n_layers=4, H=2, S=50, budget=20, window=8):
    m = DynamicKV(window=window)
    cache = CompressedCache(m, n_layers, budget=budget, context_length=S)
    for l in range(n_layers):
        cache.layers[l].update(torch.randn(1, H, S, 4), torch.randn(1, H, S, 4))
        _PENDING.layer = None
    return m, cache


def _observed(m, layer, scores):
    """What DynamicKV.observe leaves for a prefill chunk: the layer's scores and its uncut candidates."""
    layer.extras["score"] = scores
    m.prefix_scores[layer.layer_idx] = scores.masked_fill(layer.protected() | ~layer.valid, float("-inf")).flatten(1)


def test_dynamickv_budgets_sum_to_the_total_and_follow_the_attention_hits():
    torch.manual_seed(0)
    m, cache = _filled_cache()
    weights = [0.1, 1.0, 3.0, 10.0]  # layer 3's scores dominate the global top-k
    for l, w in enumerate(weights):
        _observed(m, cache.layers[l], w * torch.rand(1, 2, 50))
    m.on_layer_done(cache, 3)
    budgets = [m.alloc[l] for l in range(4)]
    assert sum(budgets) == (20 - 8) * 4
    assert budgets[3] > budgets[2] > budgets[0] and budgets == sorted(budgets)
    assert cache.stored_lengths() == [b + 8 for b in budgets]


def test_dynamickv_only_reallocates_every_fourth_layer_and_at_the_last():
    m, cache = _filled_cache(n_layers=6)
    for l in range(6):
        _observed(m, cache.layers[l], torch.rand(1, 2, 50))
    m.on_layer_done(cache, 1)
    assert m.alloc == {}
    m.on_layer_done(cache, 5)
    assert sorted(m.alloc) == list(range(6)) and sum(m.alloc.values()) == 12 * 6


def test_dynamickv_global_top_k_ranks_every_layers_full_prefix_scores(model, tokenizer):
    """One prefill chunk, budget 24 (base 16): the last reallocation's budgets are the official ones, from the global
    top-(16 x 3 heads x 30 layers) over every layer's scores as its observation computed them, before any layer was
    cut to its temporary budget (10 x 16 + 8 per head)."""
    from cache_framework import install_attention
    s = ev.make_synthetic_sample(tokenizer, "needle", 800, 0.5, 0)
    ids = ev.encode_prompt(tokenizer, s.context, s.question)[0]
    seen = {}

    class Spy(DynamicKV):
        def observe(self, layer, query, scaling):
            super().observe(layer, query, scaling)
            sc = layer.extras["score"].masked_fill(layer.protected() | ~layer.valid, float("-inf"))
            seen[layer.layer_idx] = sc.flatten(1).clone()
    install_attention(model)
    m = Spy()
    cache = CompressedCache(m, model.config.num_hidden_layers, budget=24, context_length=len(ids))
    ev.forward_chunked(model, cache, torch.tensor([ids]), len(ids))
    stacked = torch.cat([seen[l] for l in range(30)], 1)
    top = stacked.topk(16 * 3 * 30, dim=1).indices[0]
    hits = [float(((top >= l * seen[0].shape[1]) & (top < (l + 1) * seen[0].shape[1])).sum()) for l in range(30)]
    assert [m.alloc[l] for l in range(30)] == largest_remainder(hits, 16 * 30)


def test_dynamickv_keeps_the_whole_window_whatever_budget_a_layer_is_given():
    m, cache = _filled_cache(n_layers=4, budget=20, window=8)
    m.alloc = {0: 2, 1: 0, 2: 20, 3: 26}   # layer 0 is given 2 entries besides its window, layer 1 none
    for l, layer in enumerate(cache.layers):
        assert int(layer.protected()[0, 0].sum()) == 8, l   # the last 8 positions, as the official window_size
        assert sorted(layer.positions[0, 0][layer.protected()[0, 0]].tolist()) == list(range(42, 50))


def test_largest_remainder_sums_exactly():
    assert sum(largest_remainder([1, 2, 3.3], 17)) == 17 and largest_remainder([0, 0], 4) == [2, 2]


def test_pyramidkv_layers_hold_the_official_progression_after_a_chunked_prefill(model, tokenizer):
    """Budget 200, window 8: min 192 // 20 = 9, max 384 - 9 = 375, step (375 - 9) // 29 = 12. The official integer
    step makes the layers hold a little more than 200 each on average (6 270 entries, not 6 000)."""
    s = ev.make_synthetic_sample(tokenizer, "needle", 800, 0.5, 0)
    ids = ev.encode_prompt(tokenizer, s.context, s.question)[0]
    cache = KVCacheFactory.create("pyramidkv", model, budget=200, context_length=len(ids))
    ev.forward_chunked(model, cache, torch.tensor([ids]), 256)
    assert cache.stored_lengths() == [383 - 12 * l for l in range(30)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_generates_with_batch_3(model, tokenizer, method):
    prompts = ["The capital of France is", "Write a short poem about the sea. The sea is",
               "List three prime numbers: 2, 3,"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    cache = KVCacheFactory.create(method, model, budget=0.5)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert out.shape[0] == 3 and out.shape[1] == enc.input_ids.shape[1] + 6
    assert cache.get_seq_length() == out.shape[1] - 1
    assert "Paris" in tokenizer.decode(out[0, enc.input_ids.shape[1]:])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rocket_kv"])   # RocketKV holds more (below)
def test_every_method_holds_its_budget_after_prefill_and_decoding_under_decode_hold(model, tokenizer, method):
    s = ev.make_synthetic_sample(tokenizer, "needle", 700, 0.5, 0)
    ci, qi = ev.encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
    params = {"decode": "hold"} if method in ("snapkv", "pyramidkv", "dynamic_kv", "knorm") else {}
    cache = KVCacheFactory.create(method, model, budget=0.25, context_length=len(ci), **params)
    ev.run_generation(model, tokenizer, cache, ci, qi, 6, chunk=256)
    budget = round(0.25 * len(ci))
    assert all(n <= cache.layer_budget(l) for l, n in enumerate(cache.stored_lengths()))
    if method != "pyramidkv":   # its official integer progression holds a little more in total (test above)
        assert sum(cache.stored_lengths()) <= budget * model.config.num_hidden_layers
    assert cache.get_seq_length() >= len(ci) + len(qi)


def test_rocketkv_holds_its_stage1_capacity_and_counts_its_chunk_summaries(model, tokenizer):
    s = ev.make_synthetic_sample(tokenizer, "needle", 1000, 0.5, 0)
    ci, qi = ev.encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
    cache = KVCacheFactory.create("rocket_kv", model, budget=0.1, context_length=len(ci))
    ev.run_generation(model, tokenizer, cache, ci, qi, 4, chunk=256)
    p = cache.method.params
    assert p["chunk"] > 1 and max(cache.stored_lengths()) <= p["capacity"]
    kv_only = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
    assert cache_nbytes(cache) > kv_only  # the chunk min/max it holds are counted


def kvpress_kept_positions(model, ids, press) -> list[list[set]]:
    """Per layer and KV head, the positions a kvpress press keeps in one prefill (its kept keys matched against the
    full cache's keys)."""
    from transformers import DynamicCache
    full, ref = DynamicCache(), DynamicCache()
    model(ids, past_key_values=full)
    with press(model):
        model(ids, past_key_values=ref)
    return [[set(torch.cdist(rk, fk).argmin(1).tolist()) for rk, fk in zip(r.keys[0], f.keys[0])]
            for r, f in zip(ref.layers, full.layers)]


def kvpress_ratio(L: int, kept: int) -> float:
    """kvpress keeps int(L * (1 - ratio)) entries: half an entry of slack makes that `kept` whatever the rounding."""
    return 1 - (kept + 0.5) / L


@pytest.fixture(scope="module")
def needle_ids(tokenizer):
    s = ev.make_synthetic_sample(tokenizer, "needle", 600, 0.5, 0)
    return torch.tensor([ev.encode_prompt(tokenizer, s.context, s.question)[0]])


def test_snapkv_keeps_the_same_entries_as_kvpress_snapkvpress(model, needle_ids):
    """kvpress's SnapKVPress at its defaults (window 64, kernel 5, average pooling), against ours set the same way,
    in one prefill pass as kvpress compresses."""
    import kvpress
    L, kept = needle_ids.shape[1], 150
    ref = kvpress_kept_positions(model, needle_ids, kvpress.SnapKVPress(compression_ratio=kvpress_ratio(L, kept),
                                                                        window_size=64, kernel_size=5))
    ours = KVCacheFactory.create("snapkv", model, budget=kept, window=64, kernel=5, pool="avg")
    ev.forward_chunked(model, ours, needle_ids, L)
    for l, heads in enumerate(ref):
        assert [set(p.tolist()) for p in ours.layers[l].positions[0]] == heads, l


@pytest.mark.parametrize("chunk", [600, 128], ids=["one_pass", "chunked"])
def test_sliding_window_keeps_the_same_entries_as_kvpress_streamingllmpress(model, needle_ids, chunk):
    """4 sinks and the most recent tokens, whether the prompt comes in one pass or in chunks."""
    import kvpress
    L, kept = needle_ids.shape[1], 150
    ref = kvpress_kept_positions(model, needle_ids, kvpress.StreamingLLMPress(kvpress_ratio(L, kept), n_sink=4))
    ours = KVCacheFactory.create("sliding_window", model, budget=kept)
    ev.forward_chunked(model, ours, needle_ids, min(chunk, L))
    for l, heads in enumerate(ref):
        assert all(len(h) == kept for h in heads)
        assert [set(p.tolist()) for p in ours.layers[l].positions[0]] == heads, l


def test_pyramidkv_keeps_a_nested_top_k_of_kvpress_pyramidkvpress_scores(model, needle_ids):
    """Set to kvpress's scoring (window 64, kernel 5, average pooling), in one prefill pass: each layer and head keeps
    the top entries of the same scores. The per-layer counts differ by design: ours follow the official integer
    progression with the window on top (KVCache-Factory), kvpress rounds a float progression that counts the window
    in. So one kept set contains the other, and each holds its own formula's count."""
    import kvpress
    L, B = needle_ids.shape[1], 214
    press = kvpress.PyramidKVPress(compression_ratio=1 - (B - 64) / L, window_size=64, kernel_size=5)
    ref = kvpress_kept_positions(model, needle_ids, press)
    ours = KVCacheFactory.create("pyramidkv", model, budget=B, window=64, kernel=5, pool="avg", context_length=L)
    ev.forward_chunked(model, ours, needle_ids, L)
    counts = {len(ours.layers[0].positions[0, 0]), len(ours.layers[-1].positions[0, 0])}
    assert len(counts) == 2                                   # a pyramid, not a uniform budget
    for l, heads in enumerate(ref):
        want_ref = press.get_layer_budget(model.model.layers[l].self_attn, L)
        for h, kept in enumerate(heads):
            mine = set(ours.layers[l].positions[0, h].tolist())
            assert len(mine) == ours.layer_budget(l) and len(kept) == want_ref, (l, h)
            assert mine <= kept or kept <= mine, (l, h)


def test_knorm_keeps_the_same_entries_as_kvpress_knormpress(model, needle_ids):
    """The lowest key norms, in one prefill pass as kvpress compresses. (Chunked, the keys of layers after the first
    depend on what earlier chunks kept, so there is no one-pass reference to hold it to.)"""
    import kvpress
    L, kept = needle_ids.shape[1], 150
    ref = kvpress_kept_positions(model, needle_ids, kvpress.KnormPress(kvpress_ratio(L, kept)))
    ours = KVCacheFactory.create("knorm", model, budget=kept)
    ev.forward_chunked(model, ours, needle_ids, L)
    for l, heads in enumerate(ref):
        assert [set(p.tolist()) for p in ours.layers[l].positions[0]] == heads, l


def test_snapkv_defaults_are_the_official_longbench_configuration():
    """FasterDecoding/SnapKV's LongBench run: ablation_c4096_w32_k7_maxpool (window 32, kernel 7, max pooling)."""
    from baselines import SnapKV
    m = SnapKV()
    assert (m.window, m.kernel, m.pool, m.decode) == (32, 7, "max", "grow")


class _Context:
    """What PyramidKV reads of its cache: the prompt's length."""
    def __init__(self, S):
        self.context_length, self.layers = S, []


@pytest.mark.parametrize("S,budget,n_layers,expected", [
    # min = 248 // 20 = 12, max = 496 - 12 = 484, step (484 - 12) // 29 = 16; plus the window 8
    (8192, 256, 30, {0: 492, 1: 476, 29: 28}),
    # a prompt shorter than 2 (B - w) = 496: every layer keeps B
    (400, 256, 30, {0: 256, 15: 256, 29: 256}),
    # max = 110 >= S - w = 108: max = 108, min = 112 - 108 = 4, step (108 - 4) // 3 = 34
    (116, 64, 4, {0: 116, 1: 82, 2: 48, 3: 14}),
])
def test_pyramidkv_layer_budgets_follow_the_official_integer_progression_clamp_and_uniform_fallback(
        S, budget, n_layers, expected):
    from baselines import PyramidKV
    m = PyramidKV()
    m.bind(_Context(S))
    assert (m.window, m.kernel, m.pool) == (8, 7, "max")
    assert {l: m.layer_budget(l, n_layers, budget) for l in expected} == expected


def test_under_decode_hold_generated_tokens_are_scored_by_the_queries_that_follow(model, tokenizer):
    ids = torch.tensor([tokenizer("The sky is blue and the grass is green. " * 40).input_ids])
    cache = KVCacheFactory.create("snapkv", model, budget=128, tokenizer=tokenizer, decode="hold")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    assert max(cache.stored_lengths()) <= 128                       # the budget holds while decoding
    layer = cache.layers[5]
    generated = layer.positions[0, 0] >= ids.shape[1]
    older = generated & (layer.positions[0, 0] < out.shape[1] - 1 - 32)   # outside the protected window by now
    assert older.any() and (layer.extras["score"][0, 0][older] > 0).all()


def test_an_unknown_decode_policy_is_refused_in_one_line(model):
    from utils import UserError
    with pytest.raises(UserError, match="decode 'keep' for method 'snapkv': accepted are grow, hold"):
        KVCacheFactory.create("snapkv", model, budget=16, decode="keep")


def test_a_kvpress_press_that_masks_attends_through_kvpress_patch_and_is_marked(model, tokenizer):
    """AdaKV over SnapKV keeps every entry and masks the dropped ones: our attention function must carry kvpress's
    masking patch (else the press would attend to everything), and the record says the press masks."""
    import kvpress
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from cache_framework import ATTN_IMPL, atskv_attention
    from evals.harness import encode_prompt, make_kvpress, run_generation
    from evals.synthetic import make_synthetic_sample
    s = make_synthetic_sample(tokenizer, "needle", 400, 0.5, 1)
    ci, qi = encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
    evicting = run_generation(model, tokenizer, DynamicCache(), ci, qi, 4, press=make_kvpress("snapkv", 0.5, len(ci)))
    assert ALL_ATTENTION_FUNCTIONS[ATTN_IMPL] is not atskv_attention   # wrapped by kvpress's attention_patch
    masking = run_generation(model, tokenizer, DynamicCache(), ci, qi, 4,
                             press=kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.5)))
    assert evicting["press_masks"] is False and masking["press_masks"] is True
    assert masking["kv_bytes"] > 1.8 * evicting["kv_bytes"]   # what it really holds

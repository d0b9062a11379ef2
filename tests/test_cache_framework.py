"""The cache framework: full == HF's DynamicCache, sliding window keeps sinks + recent, logical vs stored length."""
import pytest
import torch
from transformers import DynamicCache

import evaluation as ev
from sparse_kv_cache import CompressedCache, KVCacheFactory, cache_nbytes
from utils import UserError

PROMPTS = ["The capital of France is", "Write a short poem about the sea. The sea is",
           "List three prime numbers: 2, 3,"]


def _greedy(model, tok, prompts, cache=None, n=20):
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = {} if cache is None else {"past_key_values": cache}
    return model.generate(**enc, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("batch", [1, 3])
def test_full_cache_generation_is_token_identical_to_hf_default(model, tokenizer, batch):
    prompts = PROMPTS[:batch]
    ref = _greedy(model, tokenizer, prompts)  # HF's default cache
    out = _greedy(model, tokenizer, prompts, KVCacheFactory.create("full", model))
    assert torch.equal(ref, out)


def test_full_cache_is_a_dynamic_cache(model):
    assert isinstance(KVCacheFactory.create("full", model), DynamicCache)


def _prefill(model, tok, n_tokens, method, budget, chunk=128):
    s = ev.make_synthetic_sample(tok, "needle", n_tokens, 0.5, 0)
    ids, _ = ev.encode_prompt(tok, s.context, s.question)
    cache = KVCacheFactory.create(method, model, budget=budget, context_length=len(ids))
    ev.forward_chunked(model, cache, torch.tensor([ids]), chunk)
    return cache, ids


def test_sliding_window_stores_exactly_sinks_and_recent_tokens_in_every_layer(model, tokenizer):
    cache, ids = _prefill(model, tokenizer, 600, "sliding_window", 100)
    L = len(ids)
    expected = list(range(4)) + list(range(L - 96, L))
    for layer in cache.layers:
        assert layer.keys.shape[2] == 100
        for b in range(layer.positions.shape[0]):
            for h in range(layer.positions.shape[1]):
                assert layer.positions[b, h].tolist() == expected


def test_logical_length_is_tokens_seen_while_fewer_are_stored(model, tokenizer):
    cache, ids = _prefill(model, tokenizer, 600, "sliding_window", 100)
    assert cache.get_seq_length() == len(ids)
    assert cache.stored_lengths() == [100] * model.config.num_hidden_layers


def test_sliding_window_bytes_fall_with_the_budget(model, tokenizer):
    sizes = [cache_nbytes(_prefill(model, tokenizer, 600, "sliding_window", b)[0]) for b in (0.5, 0.25, 0.1)]
    full = cache_nbytes(_prefill(model, tokenizer, 600, "full", None)[0])
    assert full > sizes[0] > sizes[1] > sizes[2]
    layer_bytes = 2 * model.config.num_key_value_heads * 64 * 4  # K and V, fp32, head_dim 64
    cache, ids = _prefill(model, tokenizer, 600, "sliding_window", 0.25)
    assert cache_nbytes(cache) == round(0.25 * len(ids)) * layer_bytes * model.config.num_hidden_layers


def test_token_budget_is_tokens_per_layer(model, tokenizer):
    cache, _ = _prefill(model, tokenizer, 600, "sliding_window", 64)
    assert set(cache.stored_lengths()) == {64}


def test_decoding_never_exceeds_the_budget_and_positions_advance(model, tokenizer):
    cache, ids = _prefill(model, tokenizer, 400, "sliding_window", 50)
    pos = len(ids)
    for step in range(5):
        p = torch.tensor([pos])
        model(input_ids=torch.tensor([[tokenizer.eos_token_id]]), past_key_values=cache, cache_position=p,
              position_ids=p[None])
        pos += 1
        assert cache.get_seq_length() == pos
        assert cache.stored_lengths() == [50] * model.config.num_hidden_layers
        assert int(cache.layers[0].positions.max()) == pos - 1


def test_chunked_prefill_with_full_cache_matches_one_pass(model, tokenizer):
    s = ev.make_synthetic_sample(tokenizer, "needle", 300, 0.5, 0)
    ids = torch.tensor([ev.encode_prompt(tokenizer, s.context, s.question)[0]])
    a = ev.forward_chunked(model, KVCacheFactory.create("full", model), ids, 64)
    b = ev.forward_chunked(model, KVCacheFactory.create("full", model), ids, 4096)
    assert torch.allclose(a, b, atol=1e-3)


def test_compressed_cache_with_budget_above_context_equals_full(model, tokenizer):
    s = ev.make_synthetic_sample(tokenizer, "needle", 300, 0.5, 0)
    ids = torch.tensor([ev.encode_prompt(tokenizer, s.context, s.question)[0]])
    a = ev.forward_chunked(model, KVCacheFactory.create("full", model), ids, 64)
    b = ev.forward_chunked(model, KVCacheFactory.create("sliding_window", model, budget=4096), ids, 64)
    assert torch.allclose(a, b, atol=1e-3)


def test_sliding_window_works_through_generate_with_batch_3(model, tokenizer):
    cache = KVCacheFactory.create("sliding_window", model, budget=8)
    out = _greedy(model, tokenizer, PROMPTS, cache, n=12)
    assert out.shape[0] == 3
    assert isinstance(cache, CompressedCache) and max(cache.stored_lengths()) <= 8
    assert cache.get_seq_length() == out.shape[1] - 1  # the last generated token is never fed back


def test_padding_entries_are_marked_invalid_in_batches(model, tokenizer):
    cache = KVCacheFactory.create("sliding_window", model, budget=1.0)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model(**enc, past_key_values=cache)
    n_pad = (enc.attention_mask == 0).sum(1)
    valid = cache.layers[0].valid[:, 0]
    assert valid.sum(1).tolist() == (enc.attention_mask.sum(1)).tolist()
    assert n_pad.max() > 0


def test_unknown_method_error_lists_the_known_ones(model):
    with pytest.raises(UserError, match="known methods: .*full.*sliding_window"):
        KVCacheFactory.create("nope", model)


def test_unknown_method_parameter_is_rejected(model):
    with pytest.raises(UserError, match="unknown parameter"):
        KVCacheFactory.create("sliding_window", model, budget=0.5, window=3)


def test_a_method_spec_is_parsed_and_checked_by_the_library():
    from sparse_kv_cache import KVCacheFactory
    from utils import UserError
    assert KVCacheFactory.parse_spec("atskv[external_memory=true;evict_every=4;recall_scoring=\"pages\"]") == \
        ("atskv", {"external_memory": True, "evict_every": 4, "recall_scoring": "pages"})
    assert KVCacheFactory.parse_spec("kvpress:tova") == ("kvpress:tova", {})
    with pytest.raises(UserError, match=r"unknown parameter\(s\) \['windw'\] for method 'snapkv'; accepted: "):
        KVCacheFactory.parse_spec("snapkv[windw=64]")
    with pytest.raises(UserError, match="unknown method 'snapkvv'; known methods: .*h2o"):
        KVCacheFactory.parse_spec("snapkvv")


def test_from_spec_creates_the_cache_that_create_would_with_those_parameters(model):
    from sparse_kv_cache import KVCacheFactory
    cache = KVCacheFactory.from_spec("sliding_window[n_sink=2]", model, budget=64)
    assert cache.method.n_sink == 2 and cache.budget_tokens == 64

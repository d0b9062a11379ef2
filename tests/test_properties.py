"""Property-based tests (hypothesis) for every cache method, on a tiny random Llama so that many cases run fast:
the cache never exceeds its budget, the logical length equals the tokens seen, and with a 100% budget every method
reproduces the full cache's greedy output."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import evaluation as ev
import relevance_predictor as rp
from sparse_kv_cache import KVCacheFactory

METHODS = ["sliding_window", "snapkv", "h2o", "pyramidkv", "dynamic_kv", "rocket_kv", "atskv"]
GROWING = ["snapkv", "pyramidkv", "dynamic_kv", "rocket_kv"]    # decode="grow" by default (the papers' policy)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg._name_or_path = "tiny-random-llama"
    model = LlamaForCausalLM(cfg).eval()
    # ATSKV needs a predictor for this model: an untrained one (fixed random weights) is enough for invariants
    pred = rp.TokenRelevancePredictor(4, 64, 96)
    pred.w.data = torch.randn(pred.w.shape, generator=torch.Generator().manual_seed(1))
    pred.h_proj.copy_(torch.randn(pred.h_proj.shape, generator=torch.Generator().manual_seed(2)) / 8)
    rp.use_predictor(model, pred)
    return model


def _run(model, method, budget, ids, chunk, n_decode, **params):
    cache = KVCacheFactory.create(method, model, budget=budget, context_length=ids.shape[1], **params)
    logits = ev.forward_chunked(model, cache, ids, chunk)
    out, pos = [], ids.shape[1]
    lens = [cache.stored_lengths()]
    for _ in range(n_decode):
        tok = logits.argmax(-1)
        out.append(tok)
        p = torch.tensor([pos])
        logits = model(input_ids=tok[:, None], past_key_values=cache, cache_position=p,
                       position_ids=p[None].expand(ids.shape[0], -1)).logits[:, -1]
        pos += 1
        lens.append(cache.stored_lengths())
    return cache, torch.stack(out, 1), lens


SETTINGS = dict(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("method", METHODS)
@settings(**SETTINGS)
@given(budget=st.floats(0.05, 0.9), chunk=st.integers(1, 64), length=st.integers(8, 120),
       batch=st.integers(1, 3), seed=st.integers(0, 1000))
@example(budget=0.875, chunk=7, length=8, batch=1, seed=0)   # the prompt's last token alone: DynamicKV kept growing
def test_cache_never_exceeds_its_budget_and_counts_every_token(tiny, method, budget, chunk, length, batch, seed):
    ids = torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    params = {"external_memory": True} if method == "atskv" and seed % 2 else \
        {"decode": "hold"} if method in GROWING else {}     # grow keeps generated tokens: its own test below
    cache, _, history = _run(tiny, method, budget, ids, chunk, 3, **params)
    n_layers = tiny.config.num_hidden_layers
    assert cache.get_seq_length() == length + 3
    B = cache.budget_tokens
    for lens in history:
        if method == "rocket_kv":  # holds its stage-1 capacity (more than the per-step budget)
            cap = cache.method.params["capacity"] if cache.method.params else length + 3
            assert max(lens) <= max(cap, B)
        elif method in ("pyramidkv", "dynamic_kv", "atskv"):  # per-layer budgets; the total holds
            assert sum(lens) <= B * n_layers + n_layers
        else:
            assert max(lens) <= B


@pytest.mark.parametrize("method", GROWING)
@settings(**SETTINGS)
@given(budget=st.floats(0.05, 0.9), length=st.integers(40, 120), batch=st.integers(1, 3), seed=st.integers(0, 1000))
def test_under_decode_grow_the_compressed_prompt_keeps_every_generated_token(tiny, method, budget, length, batch,
                                                                            seed):
    ids = torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    cache, _, history = _run(tiny, method, budget, ids, length, 4)
    after_prompt = history[0]
    for step, lens in enumerate(history):
        assert lens == [n + step for n in after_prompt], (step, lens, after_prompt)
    for layer in cache.layers:
        assert set(range(length, length + 4)) <= set(layer.positions[0, 0].tolist())


@pytest.mark.parametrize("method", METHODS)
@settings(**SETTINGS)
@given(chunk=st.integers(1, 64), length=st.integers(8, 120), batch=st.integers(1, 3), seed=st.integers(0, 1000))
def test_full_budget_reproduces_the_full_cache_greedy_output(tiny, method, chunk, length, batch, seed):
    ids = torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    _, ref, _ = _run(tiny, "full", None, ids, chunk, 5)
    _, out, _ = _run(tiny, method, 1.0, ids, chunk, 5)
    assert torch.equal(ref, out)

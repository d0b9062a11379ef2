"""Users run inference under torch.no_grad() or torch.inference_mode(): every method's cache is created and used
there, and the first atskv cache of a model trains its predictor there too."""
import pytest
import torch

import relevance_predictor as rp
from sparse_kv_cache import KVCacheFactory

GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.fixture
def empty_predictor_cache(tmp_path, monkeypatch):
    """A fresh $ATSKV_CACHE (no trained predictor), short calibration text (two 512-token training contexts), 30
    training steps instead of 300, so that training takes seconds: the grad mode matters from the first step."""
    monkeypatch.setenv("ATSKV_CACHE", str(tmp_path))
    text = " ".join(f"Item {i} costs {i * 7 % 100} coins at the market, said the clerk." for i in range(70))
    monkeypatch.setattr(rp, "cached_calibration_texts", lambda *a, **k: [text])
    train = rp.train_predictor
    monkeypatch.setattr(rp, "train_predictor", lambda *a, **k: train(*a, **k, steps=30, context_tokens=512))
    return tmp_path


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_every_method_creates_its_cache_and_generates_under_the_callers_grad_mode_on_an_empty_predictor_cache(
        model, tokenizer, empty_predictor_cache, mode):
    ids = tokenizer("The code is 4711. " + "The sky is blue. " * 40 + "What is the code?", return_tensors="pt")
    n = ids.input_ids.shape[1]
    specs = [(m, {}) for m in KVCacheFactory.known_methods()] + [("atskv", {"external_memory": True})]
    with GRAD_MODES[mode]():
        for method, params in specs:
            cache = KVCacheFactory.create(method, model, budget=64, tokenizer=tokenizer, **params)
            out = model.generate(**ids, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert out.shape[1] == n + 3, method
            assert cache.get_seq_length() == n + 2, method        # the last token is generated, not yet read
            stored = cache.stored_lengths()
            if method == "rocket_kv":       # holds its stage-1 capacity, more than the budget (its docstring)
                assert sum(stored) < n * len(stored), method
            elif method != "full":          # per-layer budgets may differ; the total holds
                grown = 2 if getattr(cache.method, "decode", None) == "grow" else 0   # kept generated tokens
                if method != "pyramidkv":   # its official integer progression holds a little more in total
                    assert sum(stored) <= (64 + grown) * len(stored), method
                assert sum(stored) < n * len(stored), method
    assert rp.predictor_path(model).exists()                      # trained here, under the grad mode

"""The fast decode path on each architecture it supports (Llama with Llama-3's rope scaling, Mistral, Qwen2 with q/k/v
biases, Qwen3 with per-head q/k norms): tiny random models in fp32, the same tokens and kept entries as the plain
path for every method the fast path supports; the published configurations behind --model_config."""
import pytest
import torch

import evaluation as ev
from fast_decode import StaticDecoder, check_fast_model
from sparse_kv_cache import KVCacheFactory
from utils import UserError

N_STEPS = 8
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def tiny(arch: str):
    import transformers as tf
    cfg = {"llama3": lambda: tf.LlamaConfig(**TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 128}),
           "mistral": lambda: tf.MistralConfig(**TINY, sliding_window=None),
           "qwen2": lambda: tf.Qwen2Config(**TINY),
           "qwen3": lambda: tf.Qwen3Config(**TINY, head_dim=16)}[arch]()
    model_cls = {"llama3": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
                 "qwen3": tf.Qwen3ForCausalLM}[arch]
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    if arch == "qwen3":   # random norms, so that a step that skipped them could not pass
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.data = 0.5 + torch.rand_like(norm.weight)
    return model


# every method the fast path supports; atskv evicts every 4 steps so that it evicts while decoding here
FAST_METHODS = [("full", {}), ("sliding_window", {}), ("snapkv", {}), ("pyramidkv", {}), ("dynamic_kv", {}),
                ("h2o", {}), ("knorm", {}), ("atskv", {"evict_every": 4})]


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method,params", FAST_METHODS, ids=[m for m, _ in FAST_METHODS])
def test_fast_path_decodes_each_architecture_as_the_plain_path(arch, method, params, plain_decode):
    from relevance_predictor import random_predictor, use_predictor
    model = tiny(arch)
    use_predictor(model, random_predictor(model))   # atskv's predictor: random, as for --model_config
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = KVCacheFactory.create(method, model, budget=48, **params)
        want = plain_decode(model, plain, ids, N_STEPS, chunk=64)
        cache = KVCacheFactory.create(method, model, budget=48, **params)
        logits = ev.forward_chunked(model, cache, ids, chunk=64)
        dec = StaticDecoder.from_cache(model, method, cache, ids.shape[1], N_STEPS)
        got = dec.generate(logits.argmax(-1), N_STEPS + 1)
    assert torch.equal(got, want)
    if method != "full":
        for layer, sl in zip(plain.layers, dec.slots):
            fast = [[sorted(p[m].tolist()) for p, m in zip(pb, mb)] for pb, mb in zip(sl.pos, sl.present)]
            assert fast == [[sorted(r.tolist()) for r in b] for b in layer.positions]


def test_a_model_with_sliding_window_attention_is_refused_by_the_fast_path_with_the_reason():
    import transformers as tf
    model = tf.MistralForCausalLM(tf.MistralConfig(**TINY, sliding_window=128))
    with pytest.raises(UserError, match="sliding-window attention \\(128 tokens\\): use the plain path"):
        check_fast_model(model)


def test_an_architecture_the_fast_path_does_not_implement_is_refused_naming_the_supported_ones():
    import transformers as tf
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                        "Qwen3ForCausalLM; GPT2LMHeadModel is not one of them"):
        check_fast_model(model)


# parameters of the published models (their model cards), billions
PUBLISHED_SIZE = {"llama-3.1-8b": 8.03, "qwen3-8b": 8.19, "qwen2.5-7b": 7.62, "mistral-7b": 7.25,
                  "smollm2-135m": 0.135}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZE))
def test_each_shipped_model_config_builds_its_published_architecture_and_size(name):
    from transformers import AutoModelForCausalLM
    from fast_decode import FAST_MODELS
    from utils import model_config
    with torch.device("meta"):   # shapes only: no memory
        model = AutoModelForCausalLM.from_config(model_config(name))
    assert type(model).__name__ in FAST_MODELS
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_SIZE[name], rel=0.01)
    check_fast_model(model)   # no sliding window, an architecture the fast path implements


def test_the_smollm2_config_has_the_default_models_shape(model):
    from utils import model_config
    shipped, default = model_config("smollm2-135m"), model.config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                  "rms_norm_eps", "rope_parameters"):
        assert getattr(shipped, field) == pytest.approx(getattr(default, field)), field


def test_speed_benchmark_times_random_weights_of_a_config_file_and_names_them(tmp_path, run_main):
    import json
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "qwen3", "head_dim": 16, **TINY}))
    code, err = run_main("--benchmark", "speed", "--model_config", cfg, "--context_sizes", "256", "--batch_sizes",
                         "2", "--methods", "full,atskv", "--budgets", "0.25", "--decode_steps", "4",
                         "--output_dir", tmp_path / "o")
    assert code == 0, err[-5:]
    recs = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["path"]) for r in recs if r["status"] == "ok"} >= {("full", "fast"), ("atskv", "fast")}
    assert all(r["env"]["model_source"].startswith("random weights (seed 0) of the configuration") for r in recs)

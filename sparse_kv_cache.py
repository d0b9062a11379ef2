"""The library's entry point: `KVCacheFactory` creates any method's cache for a HF model, and every public name of
the framework and of the methods is importable from here (`from sparse_kv_cache import KVCacheFactory, ATSKV`).

Where things live: the framework (layers, caches, registry, attention hook) in cache_framework.py; the baselines in
baselines.py; ATSKV in atskv.py, its external memory in external_memory.py. Importing this module registers them all.
"""
from __future__ import annotations

import dataclasses

import baselines  # noqa: F401  (registers its methods)
from atskv import ATSKV, ThresholdController  # noqa: F401  (registers atskv)
from cache_framework import *  # noqa: F401,F403
from cache_framework import METHODS, CompressedCache, FullCache, _num_layers, install_attention
from external_memory import PassiveStore, Recalled, attention_lse, merge_attention, side_stream  # noqa: F401
from utils import UserError


class KVCacheFactory:
    """`KVCacheFactory.create(method, model, budget=0.25 | 512 | None, **params)` -> a `transformers.Cache`."""

    @staticmethod
    def known_methods() -> list[str]:
        return sorted(METHODS)

    @staticmethod
    def parse_spec(spec: str, check: bool = True) -> tuple[str, dict]:
        """'atskv[external_memory=true;span=5]' -> ('atskv', {'external_memory': True, 'span': 5}): the method-spec
        grammar that the CLI and scripts share. Values are JSON, or true / false / none. With `check`, the method
        must be known (or `kvpress:<press>`) and its parameters fields of its dataclass."""
        import json
        name, params = spec.strip(), {}
        if "[" in name:
            if not name.endswith("]"):
                raise UserError(f"bad method spec {spec!r}: expected name[key=value;...]")
            name, body = name[:-1].split("[", 1)
            for item in filter(None, (s.strip() for s in body.split(";"))):
                if "=" not in item:
                    raise UserError(f"bad parameter {item!r} in {spec!r}: expected key=value")
                k, v = (s.strip() for s in item.split("=", 1))
                if v.lower() in ("true", "false", "none"):
                    params[k] = {"true": True, "false": False, "none": None}[v.lower()]
                    continue
                try:
                    params[k] = json.loads(v)
                except json.JSONDecodeError:
                    raise UserError(f"bad value {v!r} for {k!r} in {spec!r}: accepted are numbers, true, false, "
                                    "none and quoted strings; parameters are separated by ';'") from None
        if check and not name.startswith("kvpress:"):
            KVCacheFactory.check(name, params)
        return name, params

    @staticmethod
    def check(method: str, params: dict) -> None:
        """A one-line UserError unless `method` is known and `params` are fields of its dataclass."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}, "
                            "kvpress:<press>")
        if dataclasses.is_dataclass(METHODS[method]):
            accepted = {f.name for f in dataclasses.fields(METHODS[method])}
            bad = sorted(set(params) - accepted)
            if bad:
                raise UserError(f"unknown parameter(s) {bad} for method {method!r}; accepted: {sorted(accepted)}")

    @staticmethod
    def from_spec(spec: str, model, budget=None, **kwargs):
        """`KVCacheFactory.from_spec("atskv[evict_every=4]", model, budget=0.1, tokenizer=tok)`: parse_spec, then
        create (keyword arguments override the spec's parameters)."""
        name, params = KVCacheFactory.parse_spec(spec)
        if name.startswith("kvpress:"):
            raise UserError(f"{spec!r}: a kvpress press is not a cache; run it through evaluation.make_cache")
        return KVCacheFactory.create(name, model, budget, **{**params, **kwargs})

    @staticmethod
    def create(method: str, model, budget=None, context_length: int | None = None, tokenizer=None, **params):
        KVCacheFactory.check(method, params)
        install_attention(model)
        cls = METHODS[method]
        if cls is FullCache:
            return FullCache()
        if isinstance(budget, float) and not 0.0 < budget <= 1.0 or isinstance(budget, int) and budget < 1:
            raise UserError(f"budget {budget!r} out of range: a fraction in (0, 1] or a token count >= 1")
        m = cls(**params)
        if hasattr(m, "attach_model"):
            m.attach_model(model, tokenizer)
        return CompressedCache(m, _num_layers(model), budget=budget, context_length=context_length)

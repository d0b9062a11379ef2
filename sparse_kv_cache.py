"""The cache framework: compressed KV caches behind Hugging Face's `Cache` interface, and the method registry.

How a compressed cache plugs into a HF model (transformers 5.x):
- `CompressedCache` is a `transformers.Cache` whose layers (`CompressedLayer`) store fewer entries than they have seen.
  `get_seq_length()` is the logical length (tokens seen), as in `DynamicSlidingWindowLayer`, so `generate()` and RoPE
  positions stay right; each kept key keeps the rotation of its original position (no re-rotation).
- `Cache.update` never sees queries, and HF builds one mask from layer 0's sizes, which is wrong once layers hold
  different numbers of entries. So the factory registers an attention function, `atskv`, with HF's
  `AttentionInterface`. A compressed layer's `update` marks itself pending; the attention function then lets that layer
  attend (`CompressedLayer.attend`): it builds the right mask (stored entries are all in the past; causal among the new
  tokens; padding from HF's mask for the new tokens and from a per-entry `valid` flag for the stored ones), hands the
  queries to the method (`observe`, e.g. SnapKV's window attention) and evicts down to the budget (`compress`).
  With no pending layer (a plain `DynamicCache`, kvpress, no cache) the function is exactly HF's SDPA attention.
- A method is one small dataclass (kvpress style): its hyperparameters, and hooks `score()` (which entries to keep),
  optionally `observe()` (statistics from the queries), `layer_budget()` (per-layer budgets) and `attend()`.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from utils import UserError, resolve_budget

ATTN_IMPL = "atskv"
_PENDING = threading.local()  # the layer whose update() ran last, consumed by the attention call that follows
_RECORDER = None  # training hook: called with (layer_idx, query, key, value) on uncompressed forwards


class recording:
    """`with recording(fn): model(...)`: fn(layer_idx, query, key, value) is called by every attention layer of the
    forwards inside (the relevance predictor's training reads the attention this way)."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        global _RECORDER
        _RECORDER = self.fn
        return self.fn

    def __exit__(self, *exc):
        global _RECORDER
        _RECORDER = None


def atskv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    layer = getattr(_PENDING, "layer", None)
    if layer is None:
        if _RECORDER is not None:
            _RECORDER(module.layer_idx, query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    _PENDING.layer = None
    return layer.attend(module, query, key, value, attention_mask, scaling), None


AttentionInterface.register(ATTN_IMPL, atskv_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def install_attention(model) -> None:
    """Route the model's attention through `atskv_attention` (identical to SDPA for caches that are not ours), and
    remember each forward's input ids and each attention layer's input hidden states for methods that score tokens
    with them (ATSKV). The hooks only keep references: no copies, no effect on the outputs."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPL:
        model.set_attn_implementation(ATTN_IMPL)
    if getattr(model, "_atskv_hooked", False):
        return
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def keep_ids(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        _PENDING.input_ids = ids
        _PENDING.hidden = {}

    def keep_hidden(module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if getattr(_PENDING, "hidden", None) is not None:
            _PENDING.hidden[module.layer_idx] = hs

    base.register_forward_pre_hook(keep_ids, with_kwargs=True)
    for layer in base.layers:
        layer.self_attn.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    model._atskv_hooked = True


def current_input_ids():
    return getattr(_PENDING, "input_ids", None)


def current_hidden(layer_idx: int):
    return (getattr(_PENDING, "hidden", None) or {}).get(layer_idx)


def repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H_kv, ...) -> (B, H_kv * n, ...), the GQA expansion."""
    if n == 1:
        return x
    # expand + reshape: the same result as repeat_interleave(n, dim=1), several times faster on CPU
    return x.unsqueeze(2).expand(x.shape[0], x.shape[1], n, *x.shape[2:]).reshape(x.shape[0], x.shape[1] * n,
                                                                                  *x.shape[2:])


def gather_entries(t: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entries `idx` (B, H, k) along dim 2 of a per-entry tensor: (B, H, S) or (B, H, S, D)."""
    ix = idx if t.dim() == 3 else idx[..., None].expand(-1, -1, -1, t.shape[-1])
    return torch.gather(t, 2, ix, out=out)


def window_attention(query, keys, valid, n_new, scaling, window, q_new_idx=None):
    """Softmax attention of the last `window` queries over all keys, (B, H_q, w, S): what SnapKV-like methods score.

    Computed here because SDPA does not return weights; it costs w x S per head, never the full S x S matrix.
    q_new_idx (w,): which of the n_new newest entries each query is (default: the last w of them), for queries
    gathered from several steps."""
    w = min(window, query.shape[2])
    q = query[:, :, -w:]
    n_kv = query.shape[1] // keys.shape[1]
    logits = torch.matmul(q.float(), repeat_heads(keys, n_kv).float().transpose(-1, -2)) * scaling
    S = keys.shape[2]
    # key j (stored index) is a new token iff j >= S - n_new; query i (of the window) is new token n_new - w + i
    key_new_idx = torch.arange(S, device=keys.device) - (S - n_new)
    if q_new_idx is None:
        q_new_idx = torch.arange(n_new - w, n_new, device=keys.device)
    allowed = key_new_idx[None, :] <= q_new_idx[:, None]  # (w, S); old keys have negative index: always allowed
    allowed = allowed[None, None] & repeat_heads(valid, n_kv)[:, :, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


@dataclass
class KVMethod:
    """Base of all compression methods. Subclasses set `name` and override `score` (higher = keep)."""
    name = "base"
    n_sink: int = 0          # first tokens never evicted (attention sinks)
    n_recent: int = 0        # most recent tokens never evicted

    def layer_budget(self, layer_idx: int, n_layers: int, budget: int) -> int:
        return budget

    def recent_tokens(self, budget: int | None) -> int:
        return self.n_recent

    wants_evicted = False
    # the method pads its per-entry extras itself when it next scores (ATSKV scores on a schedule); otherwise every
    # update pads them with zeros for the new entries
    pads_own_extras = False

    def on_evict(self, layer: "CompressedLayer", idx: torch.Tensor) -> None:
        """Entries `idx` (B, H, e) of `layer` are about to be evicted (only called if `wants_evicted`)."""

    def bind(self, cache: "CompressedCache") -> None:
        """Called once by the cache that this method instance drives (methods hold per-cache state)."""
        self.cache = cache

    def observe(self, layer: "CompressedLayer", query: torch.Tensor, scaling: float) -> None:
        """Called after each attention call with the queries (B, H_q, q, D) of the new tokens."""

    def score(self, layer: "CompressedLayer") -> torch.Tensor:
        """(B, H_kv, S) scores of the stored entries; the top `budget` are kept."""
        raise NotImplementedError

    def select(self, layer: "CompressedLayer", budget: int) -> torch.Tensor:
        """Indices (B, H_kv, k <= budget) to keep: by default the top `budget` scores, protected entries first."""
        scores = self.score(layer).float()
        scores = scores.masked_fill(layer.protected(), float("inf")).masked_fill(~layer.valid, float("-inf"))
        return scores.topk(budget, dim=-1).indices.sort(dim=-1).values

    def attend(self, layer, module, query, keys, values, mask, scaling) -> torch.Tensor:
        """Attention output (B, H_q, q, D) over the stored entries; methods with sparse attention override it."""
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                              enable_gqa=query.shape[1] != keys.shape[1])

    def aux_nbytes(self, layer: "CompressedLayer") -> int:
        return 0

    def on_layer_done(self, cache: "CompressedCache", layer_idx: int) -> None:
        """Cross-layer coordination hook (DynamicKV) after a layer evicted."""

    def evict_to(self, layer: "CompressedLayer", budget: int) -> int | None:
        """How many entries this update's eviction keeps (None: no eviction now). Default: the budget, every time."""
        return budget


class CompressedLayer(CacheLayerMixin):
    """One layer of a compressed cache: keys/values (B, H_kv, S, D) plus per-entry position, validity and extras.

    `cumulative_length` counts the tokens seen (the logical length); `keys.shape[2]` is what is stored."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: "CompressedCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.cumulative_length = 0
        self.positions = self.valid = None      # valid: a property (its host-side "all valid" flag is reset)
        self.extras: dict[str, torch.Tensor] = {}   # per-entry method state (B, H_kv, S), gathered on eviction
        self.n_new = 0
        self.decode_steps = -1   # one-token updates since the last longer chunk, the current one excluded

    @property
    def method(self) -> KVMethod:
        return self.cache.method

    @property
    def valid(self) -> torch.Tensor | None:
        return self._valid

    @valid.setter
    def valid(self, t: torch.Tensor | None) -> None:
        self._valid, self._all_valid = t, None

    def all_valid(self) -> bool:
        """Whether no stored entry is padding; known on the host where it can be, so that a decode step does not
        wait for the device to find out."""
        if self._all_valid is None:
            self._all_valid = bool(self._valid.all())
        return self._all_valid

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.keys = key_states.new_zeros((B, H, 0, D))
        self.values = value_states.new_zeros((B, H, 0, value_states.shape[-1]))
        self.positions = torch.zeros((B, H, 0), dtype=torch.long, device=self.device)
        self.valid = torch.zeros((B, H, 0), dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs: dict[str, Any] | None = None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, q, _ = key_states.shape
        self.cache.on_update(self.layer_idx, q)
        pos = torch.arange(self.cumulative_length, self.cumulative_length + q, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, pos.expand(B, H, q)], dim=2)
        was_all_valid = self._all_valid
        self.valid = torch.cat([self.valid, torch.ones((B, H, q), dtype=torch.bool, device=self.device)], dim=2)
        self._all_valid = was_all_valid          # appending valid entries changes nothing about padding
        if not self.method.pads_own_extras:
            self.pad_extras()
        self.cumulative_length += q
        self.n_new = q
        self.decode_steps = -1 if q > 1 else self.decode_steps + 1
        _PENDING.layer = self
        return self.keys, self.values

    def pad_extras(self) -> None:
        """Extend every per-entry extra with zeros up to the stored length (entries added since it was written)."""
        S = self.keys.shape[2]
        for k, t in self.extras.items():
            if t.shape[2] < S:
                self.extras[k] = torch.cat([t, t.new_zeros(t.shape[:2] + (S - t.shape[2],) + t.shape[3:])], dim=2)

    def attend(self, module, query, keys, values, hf_mask, scaling):
        B, Hq, q, _ = query.shape
        S = keys.shape[2]
        n_old = S - q
        if hf_mask is not None and hf_mask.dtype == torch.bool:
            new_ok = hf_mask[:, :, -q:, -q:]  # padding + causal among the new tokens, from HF's mask
            self.valid[:, :, n_old:] &= torch.diagonal(new_ok[:, 0], dim1=-2, dim2=-1)[:, None, :]
            self._all_valid = None
        need_mask = q > 1 or not self.all_valid()
        mask = None
        if need_mask:
            causal = torch.ones((q, q), dtype=torch.bool, device=query.device).tril()
            mask = torch.cat([torch.ones((q, n_old), dtype=torch.bool, device=query.device), causal], dim=1)
            mask = mask[None, None] & repeat_heads(self.valid, Hq // keys.shape[1])[:, :, None, :]
            mask[..., n_old:] |= torch.eye(q, dtype=torch.bool, device=query.device)  # pad rows: no NaN
        out = self.method.attend(self, module, query, keys, values, mask, scaling)
        self.method.observe(self, query, scaling)
        self.compress()
        self.method.on_layer_done(self.cache, self.layer_idx)
        return out.transpose(1, 2).contiguous()

    def budget(self) -> int | None:
        return self.cache.layer_budget(self.layer_idx)

    def protected(self) -> torch.Tensor:
        """(B, H, S) entries a method never evicts: the first n_sink and the last n_recent positions seen."""
        m = self.method
        prot = self.positions < m.n_sink
        n_recent = m.recent_tokens(self.budget())
        if n_recent > 0:
            prot |= self.positions >= self.cumulative_length - n_recent
        return prot

    def compress(self, budget: int | None = None) -> None:
        budget = self.budget() if budget is None else budget
        if budget is None or self.cache.fits():
            return
        keep = self.method.evict_to(self, budget)
        if keep is None or self.keys.shape[2] <= keep:
            return
        self.keep_indices(self.method.select(self, keep))

    def keep_indices(self, idx: torch.Tensor) -> None:
        """Keep only entries `idx` (B, H, k) of every per-entry tensor: memory really shrinks (new tensors).
        The method sees what is evicted first (`on_evict`): ATSKV moves it to its passive store."""
        if self.method.wants_evicted:
            drop = torch.ones(self.positions.shape, dtype=torch.bool, device=idx.device).scatter_(2, idx, False)
            n_drop = self.positions.shape[2] - idx.shape[2]
            evicted = torch.argsort(drop.to(torch.int8), dim=2, descending=True, stable=True)[..., :n_drop]
            self.method.on_evict(self, evicted.sort(dim=2).values)
        take = lambda t: gather_entries(t, idx)  # noqa: E731 - a gather makes new, contiguous tensors
        self.keys, self.values = take(self.keys), take(self.values)
        was_all_valid = self._all_valid
        self.positions, self.valid = take(self.positions), take(self.valid)
        self._all_valid = True if was_all_valid else None   # a subset of valid entries is valid
        self.extras = {k: take(t) for k, t in self.extras.items()}

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, cache_position):
        q = cache_position.shape[0]
        stored = 0 if self.keys is None else self.keys.shape[2]
        return stored + q, self.cumulative_length - stored

    def get_max_cache_shape(self) -> int:
        return -1

    def stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        """K and V bytes held, plus any auxiliary per-entry tensors a method keeps on the device (RocketKV's
        chunk min/max): nothing a method holds is left out of the count."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes + self.method.aux_nbytes(self)

    def _batch_apply(self, fn):
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.positions, self.valid = fn(self.positions), fn(self.valid)
        self.extras = {k: fn(t) for k, t in self.extras.items()}

    def reorder_cache(self, beam_idx):
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._batch_apply(lambda t: t[indices])

    def crop(self, max_length: int):
        raise NotImplementedError("a compressed cache cannot be cropped: evicted entries are gone")


class CompressedCache(Cache):
    """A `transformers.Cache` of `CompressedLayer`s, one per decoder layer, driven by a `KVMethod`."""

    def __init__(self, method: KVMethod, num_layers: int, budget=None, context_length: int | None = None):
        self.method = method
        self.num_layers = num_layers
        self.context_length = context_length
        budget = None if isinstance(budget, float) and budget >= 1.0 else budget  # 100% of the KV: nothing evicted
        self.budget_spec = budget
        self.budget_tokens = None if budget is None else (
            resolve_budget(budget, context_length) if context_length else
            (int(budget) if not isinstance(budget, float) else None))
        super().__init__(layers=[CompressedLayer(self, i) for i in range(num_layers)])
        method.bind(self)

    def on_update(self, layer_idx: int, q_len: int) -> None:
        if self.context_length is None and layer_idx == 0:
            self.context_length = q_len
        # A fractional budget without a given context length is resolved against the first input (the prompt)
        if self.budget_spec is not None and self.budget_tokens is None and layer_idx == 0:
            self.budget_tokens = resolve_budget(self.budget_spec, q_len)

    def fits(self) -> bool:
        """Nothing is compressed while every token seen fits in the nominal budget (as the original methods skip
        compression when the prompt is shorter than their capacity): a 100% budget is the full cache."""
        return self.budget_tokens is None or self.layers[0].cumulative_length <= self.budget_tokens

    def layer_budget(self, layer_idx: int) -> int | None:
        if self.budget_tokens is None:
            return None
        return self.method.layer_budget(layer_idx, self.num_layers, self.budget_tokens)

    def stored_lengths(self) -> list[int]:
        return [layer.stored_length() for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class FullCache(DynamicCache):
    """`full`: exactly HF's DynamicCache (no compression), under the same factory."""
    method = None

    def stored_lengths(self) -> list[int]:
        return [0 if l.keys is None or not l.keys.numel() else l.keys.shape[2] for l in self.layers]


def cache_nbytes(cache) -> int:
    """Bytes of K and V tensors a cache really holds (any HF cache)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.nbytes + layer.values.nbytes
    return total


# ---------------------------------------------------------------------------------------------------------------
# Methods of the foundation: full and sliding window

@dataclass
class SlidingWindow(KVMethod):
    """StreamingLLM (Xiao et al., arXiv 2309.17453; mit-han-lab/streaming-llm): `n_sink` attention-sink tokens and
    the most recent tokens up to the budget. Unlike the paper's cache we keep original RoPE positions (no re-rotation),
    like kvpress's StreamingLLMPress."""
    name = "sliding_window"
    n_sink: int = 4

    def score(self, layer):
        return layer.positions.float()


METHODS: dict[str, type] = {"full": FullCache, "sliding_window": SlidingWindow}


def register_method(cls):
    METHODS[cls.name] = cls
    return cls


def method_params(name: str) -> dict:
    cls = METHODS[name]
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _num_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


class KVCacheFactory:
    """`KVCacheFactory.create(method, model, budget=0.25 | 512 | None, **params)` -> a `transformers.Cache`."""

    @staticmethod
    def known_methods() -> list[str]:
        import baselines  # noqa: F401  (registers its methods)
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
            known = KVCacheFactory.known_methods()
            if name not in known:
                raise UserError(f"unknown method {name!r}; known methods: {', '.join(known)}, kvpress:<press>")
            if dataclasses.is_dataclass(METHODS[name]):
                accepted = {f.name for f in dataclasses.fields(METHODS[name])}
                bad = sorted(set(params) - accepted)
                if bad:
                    raise UserError(f"unknown parameter(s) {bad} for method {name!r}; accepted: {sorted(accepted)}")
        return name, params

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
        known = KVCacheFactory.known_methods()
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; known methods: {', '.join(known)} (and kvpress:<press>)")
        install_attention(model)
        cls = METHODS[method]
        if cls is FullCache:
            return FullCache()
        if isinstance(budget, float) and not 0.0 < budget <= 1.0 or isinstance(budget, int) and budget < 1:
            raise UserError(f"budget {budget!r} out of range: a fraction in (0, 1] or a token count >= 1")
        accepted = {f.name for f in dataclasses.fields(cls)}
        bad = set(params) - accepted
        if bad:
            raise UserError(f"unknown parameter(s) {sorted(bad)} for method {method!r}; accepted: {sorted(accepted)}")
        m = cls(**params)
        if hasattr(m, "attach_model"):
            m.attach_model(model, tokenizer)
        return CompressedCache(m, _num_layers(model), budget=budget, context_length=context_length)


# ---------------------------------------------------------------------------------------------------------------
# ATSKV: trained relevance, adaptive threshold, external memory

class ThresholdController:
    """Keeps token i of layer l while r_i > tau_l(t) = beta_l * quantile(r_l, q_l(t)).

    q_l(t) = 1 - target_l(t) + delta_l: the target fraction (budget / stored) sets it, and delta_l is adapted after
    every decision (an integral controller on the kept-fraction error) so that the kept count tracks the budget
    whatever beta_l and the shape of r do to the threshold; the budget is also a hard cap (top-budget by r among the
    kept), so the cache never exceeds it. beta_l scales the threshold of layer l (1.0 = the quantile itself)."""

    def __init__(self, n_layers: int, beta=None, gain: float = 1.0, fixed_threshold: float | None = None):
        self.beta = list(beta) if beta is not None else [1.0] * n_layers
        self.delta = [0.0] * n_layers
        self.q: list[float | None] = [None] * n_layers
        self.gain = gain
        self.fixed = fixed_threshold
        self.history: list[tuple[int, float, float]] = []  # (layer, kept fraction, target fraction)

    def select(self, layer_idx: int, r: torch.Tensor, protected: torch.Tensor, budget: int) -> torch.Tensor:
        """r, protected: (B, H, S). Returns kept indices (B, H, k), k <= budget, sorted by stored order."""
        S = r.shape[-1]
        target = min(1.0, budget / S)
        free = ~protected
        if self.fixed is not None:
            tau = torch.full_like(r[..., :1], self.fixed)
        else:
            q = min(1.0, max(0.0, 1.0 - target + self.delta[layer_idx]))
            self.q[layer_idx] = q
            cand = r.masked_fill(~free, float("nan")).flatten(0, 1).float()
            tau = self.beta[layer_idx] * torch.nanquantile(cand, q, dim=-1).view(r.shape[0], r.shape[1], 1)
        keep = protected | (r > tau)
        n_keep = int(keep.sum(-1).max())
        k = max(1, min(budget, n_keep))
        # protected first, then the kept by r; a row that kept fewer than k is topped up with its most relevant others
        score = torch.where(keep, r.float(), r.float() - 4.0).masked_fill(protected, float("inf"))
        idx = score.topk(k, dim=-1).indices.sort(-1).values
        kept_frac = float(keep.sum(-1).float().mean()) / S
        if self.fixed is None:  # raise q when keeping too much, lower it when keeping too little
            self.delta[layer_idx] = min(1.0, max(-1.0, self.delta[layer_idx] + self.gain * (kept_frac - target)))
        self.history.append((layer_idx, min(kept_frac, k / S), target))
        return idx


@dataclass
class ATSKV(KVMethod):
    """ATSKV: a trained per-layer relevance predictor r = sigmoid(w . [h; a; f] + b) scores every stored entry
    after every chunk and decode step (old entries are re-scored as attention statistics arrive); the
    `ThresholdController` keeps r > tau_l(t) within each layer's budget (budget x beta_l, the calibrated share);
    attention sinks and a short recent window are protected; `span` max-pools r over neighbours so that whole spans
    survive. With `external_memory`, every evicted entry goes to a passive store (CPU; pinned when CUDA is present)
    and pages of it are recalled into attention when the current queries need them (see `PassiveStore`)."""
    name = "atskv"
    n_sink: int = 4
    n_recent: int = 64                # protected recent tokens, at most half the budget (16 lost end-of-context
    window: int = 32                  # needles to the question's arrival: 1/10 vs 2/10 at 1K, needle, 25%)
    span: int = 1
    variant: str = "default"          # which trained predictor: default, no_h, no_a, no_f, no_pos, kvzip (KVzip's
                                      #   target), kvzip_no_h, kvzip_no_a, kvzip_no_f
    random_predictor: bool = False    # ablation: untrained (random) weights
    fixed_threshold: float | None = None  # ablation: keep r > this value instead of the controller's tau
    layer_shares: bool = True         # beta_l from calibration (False: equal budgets)
    external_memory: bool = False
    recall_tokens: float = 0.5        # tokens recalled per step, as a fraction of the active budget
    recall_every: int = 1             # decode steps between recalls (the question's forward always recalls)
    recall_scoring: str = "exact"     # "exact": q.k against every passive key where it lives (host); "pages": Quest
    page_size: int = 16               #   min/max page summaries on the device (measured worse here, see README)
    passive_limit: int | None = None  # entries per layer the passive store may hold (None: unlimited)
    promote: bool = False             # recalled entries compete for the active cache by the controller's rule
    consensus: bool = False           # one ranking for all layers and heads: each position's r averaged over the
                                      #   layers and heads that store it, applied after the forward's last layer
    retrieval_layers: int = 0         # > 0: the k layers with the strongest induction heads (a data-free calibration
                                      #   on repeated random tokens, relevance_predictor.induction_scores) hold
    retrieval_share: float = 0.8      #   this share of the total budget, each at most the whole context; the other
                                      #   layers share the rest equally (instead of the calibrated beta_l shares)
    evict_every: int = 16             # decoding scores and evicts every this many steps, down to budget -
                                      #   evict_every + 1, so that the layer never holds more than its budget and
                                      #   a decode step in between costs about what the full cache's does (the
                                      #   plain and the fast path alike; docs/design.md)

    wants_evicted = True
    pads_own_extras = True

    def __post_init__(self):
        if not isinstance(self.evict_every, int) or isinstance(self.evict_every, bool) or self.evict_every < 1:
            raise UserError(f"evict_every {self.evict_every!r}: accepted are integers >= 1")
        if not isinstance(self.retrieval_layers, int) or isinstance(self.retrieval_layers, bool) \
                or self.retrieval_layers < 0:
            raise UserError(f"retrieval_layers {self.retrieval_layers!r}: accepted are integers >= 0")
        if not 0.0 < self.retrieval_share < 1.0:
            raise UserError(f"retrieval_share {self.retrieval_share!r}: accepted are fractions in (0, 1)")

    def attach_model(self, model, tokenizer=None):
        from relevance_predictor import load_or_train
        pred = load_or_train(model, tokenizer, variant=self.variant)
        if self.random_predictor:
            import copy
            pred = copy.deepcopy(pred)
            g = torch.Generator().manual_seed(0)
            pred.w.data = torch.randn(pred.w.shape, generator=g).to(pred.w.device)
        self.predictor = pred
        share = pred.layer_share.tolist() if self.layer_shares else [1.0] * pred.n_layers
        self.shares = share
        self.retrieval = set()
        if self.retrieval_layers:
            if self.retrieval_layers >= pred.n_layers:
                raise UserError(f"retrieval_layers {self.retrieval_layers}: accepted are 0 to {pred.n_layers - 1}")
            from relevance_predictor import induction_scores
            scores = induction_scores(model).mean(1)
            self.retrieval = set(scores.topk(self.retrieval_layers).indices.tolist())
        self.controller = ThresholdController(pred.n_layers, fixed_threshold=self.fixed_threshold)
        self.counts = None
        self.passive: dict[int, PassiveStore] = {}
        self.steps = 0

    def recent_tokens(self, budget):
        return self.n_recent if budget is None else min(self.n_recent, budget // 2)

    def evict_to(self, layer, budget):
        """With `consensus`, nothing here: `on_layer_done` evicts every layer after the last one."""
        return None if self.consensus else self.keep_target(layer, budget)

    def keep_target(self, layer, budget):
        """A prefill chunk evicts to the budget. Decode step s (from 0 after the last chunk) evicts only when
        s % period == 0, to budget - period + 1: the steps in between add one entry each and stay within the
        budget (period: evict_every, or a smaller layer budget)."""
        if self.evict_every == 1 or layer.n_new > 1:
            return budget
        every = self.period(layer)
        return max(1, budget - every + 1) if layer.decode_steps % every == 0 else None

    def layer_budget(self, layer_idx, n_layers, budget):
        if not self.retrieval:
            return max(1, int(round(budget * self.shares[layer_idx])))
        k, total = len(self.retrieval), budget * n_layers
        context = self.cache.context_length or total
        per_retrieval = min(context, int(total * self.retrieval_share / k))
        if layer_idx in self.retrieval:
            return max(1, per_retrieval)
        return max(1, (total - k * per_retrieval) // (n_layers - k))

    def _token_counts(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.predictor.token_flags.shape[0]
        if self.counts is None or self.counts.shape[0] != ids.shape[0]:
            self.counts = torch.zeros((ids.shape[0], V), device=ids.device)
        from relevance_predictor import HandcraftedFeatureExtractor
        return HandcraftedFeatureExtractor.count_tokens(self.counts, ids)

    def predictor_on(self, device):
        """The predictor on a layer's device (layers may sit on several devices under --device_map)."""
        if self.predictor.w.device == device:
            return self.predictor
        copies = self.__dict__.setdefault("_pred_copies", {})
        if str(device) not in copies:
            import copy
            copies[str(device)] = copy.deepcopy(self.predictor).to(device)
        return copies[str(device)]

    def observe(self, layer, query, scaling):
        """Remember what this update brings (its queries' window, token ids and hidden states), and score the layer
        when it is due to evict (`scoring_due`): between evictions a decode step adds no scoring work, and the
        scoring step then adds every pending step's attention to the running statistic, one step after another."""
        if layer.layer_idx == 0 and current_input_ids() is not None:
            self._token_counts(current_input_ids().to(layer.device))
        q = layer.n_new
        ids, hid = current_input_ids(), current_hidden(layer.layer_idx)
        self.scaling = scaling
        pending = self.__dict__.setdefault("_pending", {}).setdefault(layer.layer_idx, [])
        pending.append((query[:, :, -min(self.window, q):], ids[:, -q:] if ids is not None and ids.shape[1] >= q
                        else None, hid[:, -q:] if hid is not None else None, q))
        if self.scoring_due(layer):
            self.score_pending(layer)

    def scoring_due(self, layer) -> bool:
        """A chunk always scores; a decode step scores when it evicts (every evict_every steps), or always with
        promotion (recalled entries compete at once) or consensus (one ranking across layers)."""
        return (layer.n_new > 1 or self.evict_every == 1 or self.promote or self.consensus
                or layer.decode_steps % self.period(layer) == 0)

    def period(self, layer) -> int:
        """Decode steps between evictions: evict_every, or the layer's budget when that is smaller (the steps in
        between add one entry each, and must fit in the budget)."""
        budget = layer.budget()
        return self.evict_every if budget is None else max(1, min(self.evict_every, budget))

    def settle(self, cache) -> None:
        """Score what is pending on every layer now (before the fast path takes the cache over)."""
        for layer in cache.layers:
            if self.__dict__.get("_pending", {}).get(layer.layer_idx):
                self.score_pending(layer)

    def score_pending(self, layer):
        from relevance_predictor import AttentionStatisticsExtractor as A, HandcraftedFeatureExtractor as Hf
        pred, l = self.predictor_on(layer.device), layer.layer_idx
        pending = self._pending.pop(l)
        B, Hkv, S = layer.positions.shape
        n = sum(p[3] for p in pending)        # the newest n entries came with the pending steps
        layer.pad_extras()
        if "tok" not in layer.extras:
            layer.extras["tok"] = torch.zeros((B, Hkv, S), device=layer.device)
            layer.extras["h"] = torch.zeros((B, Hkv, S, pred.h_proj.shape[-1]), device=layer.device)
            layer.extras["acc"] = torch.zeros((B, Hkv, S), device=layer.device)
        new_ids = torch.cat([p[1] if p[1] is not None else torch.zeros((B, p[3]), dtype=torch.long)
                             for p in pending], 1).to(layer.device)
        layer.extras["tok"][:, :, S - n:] = new_ids[:, None, :].float()
        if all(p[2] is not None for p in pending):
            new_h = pred.project_hidden(l, torch.cat([p[2] for p in pending], 1))
            layer.extras["h"][:, :, S - n:] = new_h[:, None].float()
        # every pending step's window over the keys it saw: its queries are new entries offset + q - w .. offset + q
        rows, offset = [], 0
        for win, _, _, q in pending:
            rows.append(torch.arange(offset + q - win.shape[2], offset + q, device=layer.device))
            offset += q
        queries = torch.cat([p[0] for p in pending], 2)
        attn = window_attention(queries, layer.keys, layer.valid, n, scaling=self.scaling,
                                window=queries.shape[2], q_new_idx=torch.cat(rows))
        first = 0
        for win, _, _, _ in pending:
            w = win.shape[2]
            mean, mx, spread = A.window_stats(attn[:, :, first:first + w], Hkv)
            layer.extras["acc"] = layer.extras["acc"] + mean
            first += w
        a = A.features(mean, mx, layer.extras["acc"], spread)     # the last step's window, as when it came
        tok = layer.extras["tok"].long()
        counts = self.counts.to(layer.device) if self.counts is not None else None
        freq = counts.gather(1, tok.flatten(1)).view(B, Hkv, S) if counts is not None else \
            torch.zeros_like(layer.extras["acc"])
        f = Hf.features(layer.positions, layer.cumulative_length, layer.keys, layer.values, tok,
                        pred.token_flags, freq, self.n_sink)
        x = torch.cat([layer.extras["h"], a, f], dim=-1)
        r = pred(l, x)
        if self.span > 1:  # keep spans: an entry is as relevant as its most relevant neighbour
            r = F.max_pool1d(r.flatten(0, 1)[:, None], self.span, 1, self.span // 2)[:, 0].view(B, Hkv, -1)[..., :S]
        layer.extras["r"] = r

    def score(self, layer):
        return layer.extras["r"]

    def select(self, layer, budget):
        return self.controller.select(layer.layer_idx, self.score(layer).masked_fill(~layer.valid, -1.0),
                                      layer.protected(), budget)

    def on_layer_done(self, cache, layer_idx):
        """consensus: after the last layer, every layer keeps its budget by one ranking of the positions, their r
        averaged over all the layers and heads that store them, so that a span is kept or lost everywhere at once
        (feasibility: a needle partly kept across layers and heads is a needle lost)."""
        if not self.consensus or layer_idx != cache.num_layers - 1 or cache.fits():
            return
        dev = cache.layers[0].device
        B, T = cache.layers[0].positions.shape[0], cache.layers[0].cumulative_length
        total = torch.zeros((B, T), device=dev)
        count = torch.zeros((B, T), device=dev)
        for layer in cache.layers:
            pos = layer.positions.flatten(1).to(dev)
            total.scatter_add_(1, pos, layer.extras["r"].flatten(1).float().to(dev))
            count.scatter_add_(1, pos, torch.ones_like(pos, dtype=torch.float))
        mean_r = total / count.clamp(min=1)
        for layer in cache.layers:
            keep = self.keep_target(layer, layer.budget())
            if keep is None or layer.stored_length() <= keep:
                continue
            # the consensus replaces the layer's own r for this decision (observe recomputes r every update)
            layer.extras["r"] = mean_r.to(layer.device).gather(1, layer.positions.flatten(1)).view(
                layer.positions.shape)
            layer.keep_indices(self.select(layer, keep))

    def on_evict(self, layer, idx):
        if not self.external_memory:
            return
        if self.recall_scoring not in ("exact", "pages"):
            from utils import UserError
            raise UserError(f"recall_scoring {self.recall_scoring!r}: accepted are 'exact' and 'pages'")
        page = self.page_size if self.recall_scoring == "pages" else 1
        if layer.layer_idx not in self.passive:
            self.passive[layer.layer_idx] = PassiveStore(page, self.passive_limit, layer.device.type == "cuda")
        take = lambda t: gather_entries(t, idx)  # noqa: E731
        extras = {n: take(t) for n, t in layer.extras.items() if n in ("tok", "h", "acc")} if self.promote else None
        self.passive[layer.layer_idx].add(take(layer.keys), take(layer.values), take(layer.positions),
                                          take(layer.valid), extras)

    def attend(self, layer, module, query, keys, values, mask, scaling):
        store = self.passive.get(layer.layer_idx) if self.external_memory else None
        if layer.layer_idx == 0:
            self.steps += 1
        due = layer.n_new > 1 or (self.steps % max(1, self.recall_every) == 0)
        if store is None or (store.size == 0 and store.pend is None) or not due:
            return super().attend(layer, module, query, keys, values, mask, scaling)
        n_tok = max(store.page_size, int(self.recall_tokens * (layer.budget() or keys.shape[2])))
        rec = store.recall(query[:, :, -self.window:], n_tok // store.page_size)  # the copy starts (side stream)
        o1, lse1 = attention_lse(query, keys, values, mask, scaling)             # meanwhile: the active cache
        rec.wait()
        B, Hq, q, _ = query.shape
        rmask = repeat_heads(rec.valid, Hq // keys.shape[1])[:, :, None, :].expand(B, Hq, q, -1)
        o2, lse2 = attention_lse(query, rec.k, rec.v, rmask, scaling)
        self.last_recall = rec.k.shape[2]
        if self.promote and store.k is not None and store.page_size == 1:
            self._promote(layer, store, rec)
        return merge_attention(o1, lse1, o2, lse2).to(query.dtype)

    def _promote(self, layer, store, rec):
        """Move the recalled entries into the active cache, in front of the stored ones (the new tokens stay
        last). The relevance of every entry is then recomputed (`observe`) and the controller's eviction keeps the
        layer within budget: recalled entries whose r beats tau_l stay active, the others go back to the store."""
        n = store.last_idx.shape[2]
        dev = layer.device
        k, v = rec.k[:, :, :n], rec.v[:, :, :n]
        layer.keys, layer.values = torch.cat([k, layer.keys], 2), torch.cat([v, layer.values], 2)
        layer.positions = torch.cat([store.last_positions.to(dev), layer.positions], 2)
        layer.valid = torch.cat([rec.valid[:, :, :n], layer.valid], 2)
        for name, t in layer.extras.items():
            old = store.last_extras.get(name)
            old = old.to(dev, t.dtype) if old is not None else t.new_zeros(t.shape[:2] + (n,) + t.shape[3:])
            layer.extras[name] = torch.cat([old, t], 2)
        store.remove_recalled()

    def aux_nbytes(self, layer):
        store = self.passive.get(layer.layer_idx) if self.external_memory else None
        return 0 if store is None else store.device_nbytes()


class PassiveStore:
    """One layer's evicted KV (CPU memory, pinned when CUDA is present). Recall copies the entries the current
    queries need to the device for the current attention call; each query votes with a softmax over the candidates,
    summed over the queries and the group's heads, and the top candidates are taken per KV head.

    page_size 1 ("exact" scoring): candidates are single entries scored by q.k against the passive keys where they
    live (host memory: no device summaries). page_size > 1 ("pages", Quest): candidates are pages of `page_size`
    evicted entries, scored by the upper bound of q.k from the element-wise min/max of their keys, kept on the
    device.

    On CUDA both directions are asynchronous on a side stream (`stream`): an eviction's device-to-host copy into
    pinned memory runs while the model computes on (the host side waits for it only when it next reads the store),
    and a recall's host-to-device copy runs while the attention over the active cache is computed (`Recalled.wait`
    makes the compute stream wait for it just before the recalled entries are used)."""

    def __init__(self, page_size: int = 16, limit: int | None = None, use_stream: bool = False):
        self.page_size, self.limit, self.use_stream = page_size, limit, use_stream
        self.k = self.v = self.pos = self.valid = None   # (B, H, N, D) / (B, H, N) on the host
        self.extras: dict[str, torch.Tensor] = {}        # per-entry method state kept with the entry (promotion)
        self.kmin = self.kmax = None                     # (B, H, N_pages, D) on the device
        self.pend = None                                 # entries not yet forming a whole page (device)
        self.pend_extras: dict[str, torch.Tensor] = {}
        self.chunks: list[tuple] = []                    # offloads in flight: (host tensors, extras, done event)
        self._buf: dict[str, torch.Tensor] = {}          # host buffers with spare capacity; k, v, ... are views
        self.size = 0

    def add(self, k, v, pos, valid, extras: dict | None = None):
        """Append evicted entries. Entries wait in a small device-side buffer until a whole page has formed (so
        single-token evictions during decoding do not make pages of one); the buffer is always attended."""
        cat = lambda a, b: b if a is None else torch.cat([a, b], 2)  # noqa: E731
        k, v = k.detach(), v.detach()  # the store holds data, never a piece of an autograd graph
        extras = {n: t.detach() for n, t in (extras or {}).items()}
        self.pend = [cat(a, b) for a, b in zip(self.pend, (k, v, pos, valid))] if self.pend else [k, v, pos, valid]
        self.pend_extras = {n: cat(self.pend_extras.get(n), t) for n, t in extras.items()}
        P = self.page_size
        n_full = (self.pend[0].shape[2] // P) * P
        if n_full:
            whole = [t[:, :, :n_full] for t in self.pend]
            whole_ex = {n: t[:, :, :n_full] for n, t in self.pend_extras.items()}
            self.pend = [t[:, :, n_full:] for t in self.pend]
            self.pend_extras = {n: t[:, :, n_full:] for n, t in self.pend_extras.items()}
            self._add_pages(*whole, whole_ex)

    def _offload(self, tensors: list[torch.Tensor]):
        """Device -> host copies; on CUDA into pinned buffers on the side stream, not waited for here."""
        if not (self.use_stream and tensors[0].is_cuda):
            return [t.to("cpu") for t in tensors], None
        stream = side_stream(tensors[0].device)
        ready = torch.cuda.Event()
        ready.record()                                  # the tensors are complete on the compute stream
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
                t.record_stream(stream)                 # keep the device memory alive until the copy is done
            done = torch.cuda.Event()
            done.record()
        return host, done

    def _add_pages(self, k, v, pos, valid, extras):
        P = self.page_size
        if P > 1:
            pages = k.unflatten(2, (-1, P))
            cat = lambda a, b: b if a is None else torch.cat([a, b], 2)  # noqa: E731
            self.kmin, self.kmax = cat(self.kmin, pages.amin(3)), cat(self.kmax, pages.amax(3))
        names = sorted(extras)
        host, done = self._offload([k, v, pos, valid] + [extras[n] for n in names])
        self.chunks.append((host[:4], dict(zip(names, host[4:])), done))
        self.size += k.shape[2]
        if self.limit is not None and self.size > self.limit:
            self.settle()

    def settle(self):
        """Join the offloads in flight into the host store (waiting for their copies) and apply the limit."""
        if not self.chunks:
            return
        for _, _, done in self.chunks:
            if done is not None:
                done.synchronize()
        n, new = self.size_settled(), sum(c[0][0].shape[2] for c in self.chunks)
        fields = {"k": 0, "v": 1, "pos": 2, "valid": 3}
        for name in list(fields) + [f"x:{e}" for e in self.chunks[0][1]]:
            parts = [c[0][fields[name]] if name in fields else c[1][name[2:]] for c in self.chunks]
            held = getattr(self, name) if name in fields else self.extras.get(name[2:])
            buf = self._buf.get(name)
            if buf is None or buf.shape[2] < n + new:  # grow by doubling: appending is amortised O(new)
                cap = max(n + new, 2 * n)
                buf = torch.empty(parts[0].shape[:2] + (cap,) + parts[0].shape[3:], dtype=parts[0].dtype,
                                  pin_memory=self.use_stream)  # pinned: recall's copies to the device start there
                if n:
                    buf[:, :, :n] = held
                self._buf[name] = buf
            o = n
            for t in parts:
                buf[:, :, o:o + t.shape[2]] = t
                o += t.shape[2]
            if name in fields:
                setattr(self, name, buf[:, :, :n + new])
            else:
                self.extras[name[2:]] = buf[:, :, :n + new]
        self.chunks = []
        P = self.page_size
        if self.limit is not None and self.k.shape[2] > self.limit:  # drop the oldest pages beyond the limit
            drop = ((self.k.shape[2] - self.limit + P - 1) // P) * P
            self._keep(slice(drop, None))
            if self.kmin is not None:
                self.kmin, self.kmax = self.kmin[:, :, drop // P:], self.kmax[:, :, drop // P:]
        self.size = self.k.shape[2]

    def size_settled(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def __getstate__(self):  # a deep copy (one compressed context, several questions) joins the copies in flight
        self.settle()
        state = dict(self.__dict__)
        state["_buf"] = {}  # the views are copied, not the spare capacity behind them
        return state

    def _keep(self, sel):
        self.k, self.v, self.pos, self.valid = (t[:, :, sel] for t in (self.k, self.v, self.pos, self.valid))
        self.extras = {n: t[:, :, sel] for n, t in self.extras.items()}
        self._buf = {}  # compacted: the next settle starts new buffers

    def recall(self, query: torch.Tensor, n_pages: int) -> "Recalled":
        """query (B, H_q, q, D) -> the recalled entries (B, H_kv, n_pages x P + pending, D), on their way to the
        device (`Recalled.wait()` before use)."""
        self.settle()
        dev = query.device
        if self.k is None:
            self.last_positions = self.pend[2].cpu()
            return Recalled(self.pend[0], self.pend[1], self.pend[3], None, None)
        B, Hq, q, D = query.shape
        Hkv = self.k.shape[1]
        if self.page_size == 1:  # exact q.k where the keys live
            qg = query.view(B, Hkv, Hq // Hkv, q, D).to(self.k.device, torch.float32)
            ub = torch.einsum("bhgqd,bhnd->bhgqn", qg, self.k.float())
            ub = ub.masked_fill(~self.valid[:, :, None, None, :], float("-inf"))
        else:
            qg = query.view(B, Hkv, Hq // Hkv, q, D).float()
            # upper bound of q.k over a page: per channel, q times the page's max (q > 0) or min (q < 0)
            ub = torch.maximum(qg[..., None, :] * self.kmin[:, :, None, None].float(),
                               qg[..., None, :] * self.kmax[:, :, None, None].float()).sum(-1)  # (B,Hkv,G,q,pages)
        # each query votes with a softmax over the pages (as SnapKV's window votes over tokens): a few queries with
        # large bounds everywhere (sink-like heads) then cannot drown the query that looks for one page
        page_score = torch.softmax(ub * D ** -0.5, dim=-1).sum(dim=(2, 3))
        n_pages = min(n_pages, page_score.shape[-1])
        pages = page_score.topk(n_pages, dim=-1).indices.sort(-1).values.cpu()
        P = self.page_size
        idx = (pages[..., None] * P + torch.arange(P)).flatten(-2)  # (B, Hkv, n_pages x P), host
        self.last_idx = idx
        pinned = self.use_stream and dev.type == "cuda"

        def gather(t):  # into a pinned buffer when the copy to the device is to be asynchronous
            return gather_entries(t, idx, out=torch.empty(idx.shape + t.shape[3:], dtype=t.dtype, pin_memory=pinned))
        host = [gather(self.k), gather(self.v), gather(self.valid)]
        self.last_positions = gather_entries(self.pos, idx)
        self.last_extras = {n: gather_entries(t, idx) for n, t in self.extras.items()}
        if pinned:
            with torch.cuda.stream(side_stream(dev)):
                k, v, valid = (t.to(dev, non_blocking=True) for t in host)
                done = torch.cuda.Event()
                done.record()
        else:
            (k, v, valid), done = (t.to(dev) for t in host), None
        return Recalled(k, v, valid, self.pend, done)

    def remove_recalled(self) -> None:
        """Take the entries of the last recall out of the store (they were promoted into the active cache)."""
        keep = torch.ones(self.valid.shape, dtype=torch.bool).scatter_(2, self.last_idx, False)
        n = int(keep[0, 0].sum())
        take = lambda t: t[keep].view(t.shape[0], t.shape[1], n, *t.shape[3:])  # noqa: E731
        self.k, self.v, self.pos, self.valid = take(self.k), take(self.v), take(self.pos), take(self.valid)
        self.extras = {name: take(t) for name, t in self.extras.items()}
        self._buf = {}
        self.size = n

    def nbytes(self) -> int:
        held = [(self.k, self.v)] + [(h[0], h[1]) for h, _, _ in self.chunks]
        return sum(k.nbytes + v.nbytes for k, v in held if k is not None)

    def device_nbytes(self) -> int:
        pend = 0 if self.pend is None else self.pend[0].nbytes + self.pend[1].nbytes
        return pend + (0 if self.kmin is None else self.kmin.nbytes + self.kmax.nbytes)


_SIDE_STREAMS: dict = {}


def side_stream(device) -> "torch.cuda.Stream":
    """One side stream per CUDA device for the passive stores' copies (kept out of the caches so they deep-copy)."""
    key = torch.device(device)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(key)
    return _SIDE_STREAMS[key]


class Recalled:
    """Recalled entries on their way to the device, plus the store's pending (device) buffer."""

    def __init__(self, k, v, valid, pend, done):
        self.k, self.v, self.valid, self.pend, self.done = k, v, valid, pend, done

    def wait(self):
        """Make the compute stream wait for the copy, then append the pending buffer."""
        if self.done is not None:
            torch.cuda.current_stream().wait_event(self.done)
            for t in (self.k, self.v, self.valid):
                t.record_stream(torch.cuda.current_stream())
            self.done = None
        if self.pend is not None and self.pend[0].shape[2]:
            self.k, self.v = torch.cat([self.k, self.pend[0]], 2), torch.cat([self.v, self.pend[1]], 2)
            self.valid = torch.cat([self.valid, self.pend[3]], 2)
            self.pend = None
        return self


def attention_lse(query, keys, values, mask, scaling):
    """Softmax attention (B, H_q, q, D) and its log-sum-exp (B, H_q, q, 1), float32: two parts of one attention
    computed apart (the active cache, then the recalled entries) merge exactly by their log-sum-exps."""
    n_kv = query.shape[1] // keys.shape[1]
    logits = torch.matmul(query.float(), repeat_heads(keys, n_kv).float().transpose(-1, -2)) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - lse.clamp_min(-1e30)).nan_to_num(0.0)
    return torch.matmul(probs, repeat_heads(values, n_kv).float()), lse


def merge_attention(o1, lse1, o2, lse2):
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m).nan_to_num(0.0), torch.exp(lse2 - m).nan_to_num(0.0)
    return (w1 * o1 + w2 * o2) / (w1 + w2)


METHODS["atskv"] = ATSKV


def tier_bytes(cache) -> dict:
    """Bytes per tier of a cache: active KV (device), page summaries (device), passive store (host)."""
    out = {"active_kv_bytes": 0, "summary_bytes": 0, "passive_bytes": 0}
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is None:
            continue
        out["active_kv_bytes"] += layer.keys.nbytes + layer.values.nbytes
    m = getattr(cache, "method", None)
    for store in (getattr(m, "passive", None) or {}).values() if getattr(m, "external_memory", False) else []:
        out["summary_bytes"] += store.device_nbytes()
        out["passive_bytes"] += store.nbytes()
    return out

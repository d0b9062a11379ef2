"""The cache framework: compressed KV caches behind Hugging Face's `Cache` interface, the method registry, and the
simplest method (a sliding window). Methods live in their own modules (baselines.py, atskv.py) and import this one;
sparse_kv_cache.py gathers them behind the factory.

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

__all__ = ['ATTN_IMPL', 'recording', 'atskv_attention', 'install_attention', 'current_input_ids', 'current_hidden',
           'repeat_heads', 'gather_entries', 'window_attention', 'KVMethod', 'CompressedLayer', 'CompressedCache',
           'FullCache', 'cache_nbytes', 'SlidingWindow', 'METHODS', 'register_method', 'method_params', 'tier_bytes']

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


def registered_attention():
    """What is registered as our attention. NVIDIA kvpress wraps every attention function registered when it is
    imported with its masking patch (presses that give heads different budgets, AdaKV or KVzip, mask the keys they
    drop); imported before us, it could not wrap ours, so it is wrapped here the same way."""
    import sys
    if "kvpress" in sys.modules:
        from kvpress.attention_patch import attention_patch
        return attention_patch(atskv_attention)
    return atskv_attention


AttentionInterface.register(ATTN_IMPL, registered_attention())
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


def rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding of q (..., D) with cos, sin broadcastable to it."""
    half = q.shape[-1] // 2
    return q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin


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


def put(t, slot, value):
    """t[b, h, slot[b, h]] = value[b, h] in place, for every row b and head h (slot (B, H, 1))."""
    put_rows(t, slot, value.unsqueeze(2))


def put_rows(t, idx, value):
    """t[b, h, idx[b, h, j]] = value[b, h, j] in place, for idx (B, H, N). An index_put_, which torch.compile
    keeps in place (a scatter_ into a large buffer could become a copy of the whole buffer)."""
    B, H, N = idx.shape
    b = torch.arange(B, device=t.device)[:, None, None].expand(B, H, N)
    h = torch.arange(H, device=t.device)[None, :, None].expand(B, H, N)
    t.index_put_((b, h, idx), value)


def protection(present, pos, seen, n_sink: int, n_recent):
    """Entries never evicted: the first n_sink positions and the last n_recent seen (KVMethod.protected)."""
    return present & ((pos < n_sink) | (pos >= seen[:, None, None] - n_recent))


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

    # -- the fast decode path (fast_decode.StaticDecoder): the same decisions over a fixed number of slots ----------
    # A method gives either `slot_scores` (the decoder keeps the top budget by them, as `select` does) or its own
    # `slot_step`. Both run inside the captured step: tensor code only, no host syncs. `s` holds the layer's slots
    # (present, valid, bias, pos: (B, H_kv, N); keys (B, H_kv, N, D)), its per-slot `state`, its `layer_args`, the
    # step's `consts`, the new entry's `slot` (B, H_kv, 1), `seen`, `cur`, `tok`, `counts`, `h`, `k`, `v`, `evict`
    # and, after attention, `probs` (B, H_kv, group, N) when the method wants them.
    def fast_path_refusal(self) -> str | None:
        """Why this method, with these parameters, has no fast decode path (None: it has one)."""
        if type(self).slot_scores is KVMethod.slot_scores and not self.has_own_slot_step():
            return "it has no slot step"
        return None

    def has_own_slot_step(self) -> bool:
        return type(self).slot_step is not KVMethod.slot_step

    def slot_state(self, layer: "CompressedLayer", max_steps: int) -> tuple[dict, dict]:
        """(per-entry state (B, H_kv, S, ...) that the decoder moves into slots, per-layer state kept as it is) for
        a decode of at most max_steps steps."""
        return {}, {}

    def slot_shared_state(self) -> dict:
        """State shared by the layers: "counts" (B, vocab), token counts the step keeps up to date."""
        return {}

    def slot_layer_args(self, layer_idx: int, device) -> dict:
        """Per-layer constants of the step, as device tensors."""
        return {}

    def slot_consts(self) -> dict:
        """Constants of the step, the same for every layer."""
        return {}

    def slot_wants_probs(self, evict: bool) -> bool:
        return False

    def slot_before_attention(self, s: dict):
        """Work on the new entry before attention; returns a running statistic (B, H_kv, N) that the attention
        kernel adds this step's probabilities to, or None."""
        return None

    def slot_extra_entries(self, s: dict):
        """Entries outside the slots that this step's query attends to as well, (keys, values (B, H_kv, R, D),
        valid (B, H_kv, R) bool), or None. The step merges the two attentions by their log-sum-exps (ATSKV: what
        it recalls from its passive tier)."""
        return None

    def slot_extra_nbytes(self, state: dict, layer_args: dict) -> dict:
        """Bytes of a layer's state outside the slots: held on the device ("device") and in host memory ("host"),
        and what a step reads of each ("device_read", "host_read"); "device_tier": the part of "device" that is
        evicted KV kept on the device (not a summary). ATSKV: its passive tier; a step reads its int8 keys on the
        device and the entries it recalls from where the tier keeps them."""
        return {"device": 0, "host": 0, "device_read": 0, "host_read": 0, "device_tier": 0}

    def slot_evict_every(self) -> int:
        """The fast path's step scores and evicts every this many steps (ATSKV's evict_every); the steps between
        only add their entry. Also the plain loop's cycle that a speed measurement covers whole."""
        return 1

    def decode_target(self, budget: int) -> int:
        """What a decode step's eviction keeps: budget - slot_evict_every() + 1, so that the steps until the next
        one stay within the budget (the budget itself when evicting every step); both paths use it."""
        return max(1, budget - self.slot_evict_every() + 1)

    def slot_recall_schedule(self) -> tuple[int, int]:
        """(k, offset): the fast path's step recalls (s["recall"] True) where (offset + t) % k == 0 for its t-th step;
        the others hold what the last recall brought. (1, 0): every step."""
        return 1, 0

    def slot_state_repeated(self, state: dict, batch: int) -> dict:
        """A layer's slot state with its rows repeated to `batch` (StaticDecoder.repeated, for memory searches)."""
        return {k: v.clone() if k == "delta" else v.repeat(batch, *([1] * (v.dim() - 1))) for k, v in state.items()}

    def slot_scores(self, s: dict) -> torch.Tensor:
        """`score` over the slots (B, H_kv, N), the new entry in s["slot"] included."""
        raise NotImplementedError

    def slot_step(self, s: dict) -> bool:
        """The method's own eviction over the slots (in place); True when it also refreshed the bias and the
        free-slot queue."""
        raise NotImplementedError


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
        pos = self.cache.counting(self.device, self.cumulative_length + q)[self.cumulative_length:]
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, pos.expand(B, H, q)], dim=2)
        was_all_valid = self._all_valid
        self.valid = torch.cat([self.valid, self.cache.trues(self.device, q).expand(B, H, q)], dim=2)
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

    def counting(self, device, n: int) -> torch.Tensor:
        """0 .. n - 1 on the device, kept between calls: appending positions slices it where an arange would cost
        a kernel launch per layer and step (the plain path's decode step is bound by launches on a GPU)."""
        return self._constant("arange", device, n, lambda m: torch.arange(m, device=device))

    def trues(self, device, n: int) -> torch.Tensor:
        """n True values on the device, kept between calls (the validity of appended entries)."""
        return self._constant("trues", device, n, lambda m: torch.ones(m, dtype=torch.bool, device=device))

    def _constant(self, name: str, device, n: int, make) -> torch.Tensor:
        consts = self.__dict__.setdefault("_consts", {})
        t = consts.get((name, str(device)))
        if t is None or t.shape[0] < n:
            t = consts[(name, str(device))] = make(max(n, 4096, 2 * (0 if t is None else t.shape[0])))
        return t[:n]

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

    def slot_scores(self, s):
        return s["pos"].float()


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

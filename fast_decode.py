"""The fast decode path: a static-shape decode step for Llama-architecture models, with each method's per-step work
(scoring the new token, eviction) inside the step, replayed as one CUDA graph.

Why: HF's plain decode loop is bound by Python and kernel launches (25-110 ms a step on an H200 with the 135M default
model, whatever the KV length; README, "Decode speed"), so a compressed cache saves memory but no time. Here each
layer's cache is a fixed number of slots (a budget is naturally of fixed size). A step writes the new token into the
first free slot, attends over all slots with a bias that hides free ones, and the method frees the slots it evicts.
Shapes never change, so a whole step (every layer, greedy sampling, the bookkeeping) is captured once in a CUDA graph
and replayed; `compile=True` compiles each layer's step (`layer_step`) as one torch.compile region, and the step's
start and end (`step_head`, `step_tail`) as one each.

The prefill stays the plain path's (HF forward + the method's compression after each chunk): `StaticDecoder` takes
over the compressed cache for decoding and makes the plain path's decisions, step for step. The method decides how,
through its slot hooks (cache_framework.KVMethod, "the fast decode path"), beside its plain-path scoring:
- the full cache: nothing evicted (slots for the prompt and the new tokens);
- a method under decode="grow": its prompt was compressed, every generated token is kept;
- a method with `slot_scores`: the top layer budget by those scores, protected entries first (`KVMethod.select`'s
  rule, `keep_top`);
- a method with its own `slot_step` (atskv: the predictor and the threshold controller in tensor form), with
  evict_every > 1 only on its schedule (a second captured graph runs the steps that do not evict).
A method whose `fast_path_refusal` gives a reason, kvpress presses, and a model whose layers sit on several devices
are refused with a clear error (use the plain path, with --device_map auto for the latter).
"""
from __future__ import annotations

import math

import torch

from kernels import greedy_kernels, skinny_gemm
from kernels.decode_attention import HIDDEN, decode_attention, kernel_available
from cache_framework import protection, put, rope
from relevance_predictor import HandcraftedFeatureExtractor
from utils import UserError, head_size

# the decoder layers the lean step re-implements: RMSNorm, RoPE (Llama-3's scaling included: the model's own rotary
# embedding computes cos and sin), GQA with optional q/k/v biases (Qwen2) and per-head q/k norms (Qwen3), SwiGLU
FAST_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SLOT_ALIGN = 16   # slot counts are rounded up to a multiple of this
# Free slots are hidden by a per-slot bias added to the scaled logits (decode_attention): 0 for a stored entry,
# HIDDEN (defined beside the kernels, which use it too) for a free (or padding) slot.


def fast_methods() -> list[str]:
    """The methods that have a fast decode path with their default parameters."""
    from cache_framework import METHODS, KVMethod
    return ["full"] + [n for n, cls in METHODS.items()
                       if issubclass(cls, KVMethod) and cls().fast_path_refusal() is None]


def check_fast_method(name: str, params: dict | None = None) -> None:
    """Raise a one-line UserError unless the fast path implements method `name` with these parameters (the method
    says why not: `KVMethod.fast_path_refusal`)."""
    from cache_framework import METHODS, KVMethod
    cls = METHODS.get(name)
    if name == "full":
        return
    if cls is None or not issubclass(cls, KVMethod):
        raise UserError(f"method {name!r} has no fast decode path; accepted: {', '.join(fast_methods())}")
    refuse_if(name, cls(**(params or {})).fast_path_refusal())


def refuse_if(name: str, why: str | None) -> None:
    """The one-line error for a method that gives a reason (`KVMethod.fast_path_refusal`) to stay off the fast path."""
    if why:
        raise UserError(f"method {name!r} has no fast decode path ({why}); accepted: {', '.join(fast_methods())}")


def keeps_generated(method_obj) -> bool:
    """A method under decode="grow": its prompt was compressed, and every generated token is kept (no eviction)."""
    return getattr(method_obj, "decode", None) == "grow"


def method_of(cache) -> str:
    """The method name of a cache built by `KVCacheFactory` ('full' for HF's own caches)."""
    m = getattr(cache, "method", None)
    return "full" if m is None else m.name


def check_fast_model(model) -> None:
    """The lean step re-implements a Llama decoder layer (RMSNorm, RoPE, GQA, SwiGLU): refuse anything else."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    cfg = model.config.get_text_config(decoder=True)
    layer = base.layers[0] if base is not None and hasattr(base, "layers") else None
    ok = type(model).__name__ in FAST_MODELS and layer is not None \
        and getattr(cfg, "hidden_act", "silu") == "silu" and hasattr(base, "rotary_emb")
    if not ok:
        raise UserError(f"the fast decode path supports {', '.join(FAST_MODELS)}; {type(model).__name__} is not "
                        f"one of them: use the plain path")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and \
            any(t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or ["sliding_attention"]):
        raise UserError(f"the fast decode path attends over every stored entry; this {type(model).__name__} uses "
                        f"sliding-window attention ({window} tokens): use the plain path")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise UserError(f"the fast decode path runs on one device; the model sits on {sorted(map(str, devices))}")


class LeanWeights:
    """The decoder's weights in the layout the lean step wants: q/k/v and gate/up fused into one matmul each."""

    def __init__(self, model):
        check_fast_model(model)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        cfg = model.config.get_text_config(decoder=True)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = head_size(cfg)
        self.embed, self.rotary, self.norm, self.lm_head = base.embed_tokens, base.rotary_emb, base.norm, \
            model.get_output_embeddings()
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            qk_norm = (a.q_norm.weight, a.k_norm.weight, a.q_norm.variance_epsilon) if hasattr(a, "q_norm") else None
            self.layers.append({"qk_norm": qk_norm,
                "ln1": layer.input_layernorm.weight, "eps1": layer.input_layernorm.variance_epsilon,
                "ln2": layer.post_attention_layernorm.weight, "eps2": layer.post_attention_layernorm.variance_epsilon,
                "wqkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), "bqkv": bias,
                "wo": a.o_proj.weight, "wgu": torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                "wd": m.down_proj.weight, "scaling": getattr(a, "scaling", self.head_dim ** -0.5)})


def lean_weights(model) -> LeanWeights:
    """One `LeanWeights` per model (the fused copies are made once)."""
    lean = getattr(model, "_atskv_lean", None)
    if lean is None or lean.layers[0]["wqkv"].dtype != model.dtype or lean.layers[0]["wqkv"].device != model.device:
        model._atskv_lean = LeanWeights(model)
    return model._atskv_lean


def rms_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def pre_attention(x, ln, eps, wqkv, bqkv, cos, sin, n_heads: int, n_kv: int, head_dim: int, qk_norm=None):
    """x (B, hidden): RMSNorm, q/k/v (with Qwen3's per-head RMSNorm of q and k: qk_norm = (q weight, k weight,
    eps)), RoPE of k. Returns the normed input h, the query (B, H_kv, G, D) not yet rotated (decode_attention rotates
    it: in the kernel on CUDA), k and v (B, H_kv, D)."""
    B = x.shape[0]
    h = rms_norm(x, ln, eps)
    qkv = skinny_gemm.linear(h, wqkv, bqkv)
    q = qkv[:, : n_heads * head_dim].view(B, n_kv, n_heads // n_kv, head_dim)
    k = qkv[:, n_heads * head_dim: (n_heads + n_kv) * head_dim].view(B, n_kv, head_dim)
    v = qkv[:, (n_heads + n_kv) * head_dim:].view(B, n_kv, head_dim)
    if qk_norm is not None:
        q, k = rms_norm(q, qk_norm[0], qk_norm[2]), rms_norm(k, qk_norm[1], qk_norm[2])
    return h, q, rope(k, cos, sin), v


def first_free_slot(present):
    """(B, H_kv, 1): each row's first free slot, as a min (argmax over ties is not always the first one in compiled
    code)."""
    N = present.shape[-1]
    idx = torch.arange(N, device=present.device)
    return torch.where(present, N, idx).amin(-1, keepdim=True).clamp(max=N - 1)


def free_queue(present, n: int):
    """(B, H_kv, n): each row's first n free slots in ascending order (the last slot where a row has fewer). With
    evict_every = E, an eviction leaves at least E free slots, and the E steps until the next one write to them in
    turn: the same slots that a first-free search every step would pick, without a search over the slots."""
    N = present.shape[-1]
    free = ~present
    rank = torch.cumsum(free.int(), -1) - 1
    dest = torch.where(free & (rank < n), rank, n)           # column n collects the rest and is dropped
    idx = torch.arange(N, device=present.device).expand_as(present)
    q = torch.full(present.shape[:2] + (n + 1,), N - 1, dtype=torch.long, device=present.device)
    return q.scatter(-1, dest.long(), idx)[..., :n]


def write_entry(K, V, bias, present, valid, pos, k, v, slot, cur):
    """The new entry into its slot, in place (and made visible to attention)."""
    B, H = slot.shape[:2]
    put(K, slot, k)
    put(V, slot, v)
    put(bias, slot, torch.zeros((B, H), dtype=bias.dtype, device=K.device))
    put(present, slot, torch.ones((B, H), dtype=torch.bool, device=K.device))
    put(valid, slot, torch.ones((B, H), dtype=torch.bool, device=K.device))
    put(pos, slot, cur[:, None].expand(B, H))


def hide_free(bias, present, valid):
    """Refresh the attention bias after an eviction: freed and padding slots are hidden (in place)."""
    bias.copy_(torch.where(present & valid, 0.0, HIDDEN).to(bias.dtype))


def bare_evict(present, pos, keep, n_sink: int, n: int):
    """No scoring (to measure a method's share of the step): free the oldest non-sink entries down to `keep`, at
    most n of them (n = 1 when evicting every step; evict_every when evicting on its schedule)."""
    n_free = (present[0, 0].sum() - keep).clamp(min=0, max=n)
    old = pos.masked_fill(~present | (pos < n_sink), torch.iinfo(torch.long).max).topk(n, -1, largest=False).indices
    free = torch.arange(n, device=pos.device) < n_free
    present.scatter_(-1, old, present.gather(-1, old) & ~free)


def keep_top(s: dict, scores) -> None:
    """A method's slot scores (B, H, N) -> keep the top layer budget, protected entries first (KVMethod.select's
    rule), when the layer holds more than its budget and the cache as a whole no longer fits."""
    present, la, c = s["present"], s["layer_args"], s["consts"]
    over = (present[0, 0].sum() > la["budget"]) & (s["seen"][0] > c["budget_tokens"])   # compress() and fits()
    prot = protection(present, s["pos"], s["seen"], c["n_sink"], la["n_recent"])
    sc = scores.masked_fill(prot, float("inf")).masked_fill(~s["valid"] | ~present, float("-inf"))
    kept = top_mask(sc, la["budget"]) & present
    present.copy_(torch.where(over, kept, present))


def post_attention(x, attn, wo, ln, eps, wgu, wd):
    """Residual + o_proj, then the SwiGLU MLP block. attn (B, H_q * D)."""
    x = x + skinny_gemm.linear(attn, wo)
    h = rms_norm(x, ln, eps)
    return skinny_gemm.linear(skinny_gemm.swiglu(h, wgu), wd, residual=x)


def layer_step(kind: str, evict: bool, recall: bool, x, cos, sin, cur, seen, tok, counts, lw: dict, K, V, bias,
               pos, present, valid, st: dict, la: dict, c: dict):
    """One decoder layer of a decode step with the method's per-step work: one torch.compile region, so that the
    element-wise work of the norms, RoPE, the slot write, the scoring and the bias refresh fuses into few kernels.
    kind: full (nothing evicted), grow (a compressed prompt; new entries fill free slots, nothing evicted), bare
    (frees the oldest entry: the step without the method's scoring; with evict_every, the oldest entries on its
    schedule) or method (the method's slot hooks, c["method"]); evict: whether this step is one of the method's
    scheduled evictions (evict_every); recall: whether it is one of its scheduled recalls (ATSKV's recall_every)."""
    D = c["head_dim"]
    h, q, k, v = pre_attention(x, lw["ln1"], lw["eps1"], lw["wqkv"], lw["bqkv"], cos, sin, c["n_heads"], c["n_kv"],
                               D, lw["qk_norm"])
    if kind == "full":   # nothing is evicted: slot i holds position i (a search over the slots would cost a kernel)
        slot = cur.clamp(max=K.shape[2] - 1)[:, None, None].expand(k.shape[0], k.shape[1], 1)
    elif "queue" in st:   # evict_every > 1 (atskv and its bare step): the slots listed by the last eviction
        slot = st["queue"].index_select(-1, c["qidx"])
    else:
        slot = first_free_slot(present)
    write_entry(K, V, bias, present, valid, pos, k, v, slot, cur)
    m = c["method"]
    s = {"present": present, "valid": valid, "bias": bias, "pos": pos, "state": st, "layer_args": la, "consts": c,
         "slot": slot, "seen": seen, "cur": cur, "tok": tok, "counts": counts, "h": h, "q": q, "k": k, "v": v,
         "cos": cos, "sin": sin, "keys": K, "values": V, "evict": evict, "recall": recall}
    # the method's work before attention (ATSKV: the new entry's running statistic, which a step that does not
    # evict accumulates inside decode_attention); probs: the step's attention, for methods that score with it
    acc = m.slot_before_attention(s) if kind == "method" else None
    want = kind == "method" and m.slot_wants_probs(evict)
    extra = m.slot_extra_entries(s) if kind == "method" else None
    # extra: entries outside the slots too (ATSKV's recall), attended in further splits of the decode kernels
    attn, probs = decode_attention(q, K, V, bias, lw["scaling"], want, c["kernel"], acc=acc, cos=cos, sin=sin,
                                   extra=extra)
    s["probs"] = probs
    refreshed = False   # whether the method's step refreshed the bias and the queue itself
    if kind == "bare":
        if evict:   # keep = budget - evict_every + 1 (the budget when evicting every step)
            bare_evict(present, pos, la["keep"], c["n_sink"], st["queue"].shape[-1] if "queue" in st else 1)
    elif kind == "method":
        if c["own_step"]:
            refreshed = m.slot_step(s)
        else:
            keep_top(s, m.slot_scores(s))
    if kind != "full" and evict and not refreshed:
        hide_free(bias, present, valid)
        if "queue" in st:
            st["queue"].copy_(free_queue(present, st["queue"].shape[-1]))
    return post_attention(x, attn.reshape(x.shape[0], -1), lw["wo"], lw["ln2"], lw["eps2"], lw["wgu"], lw["wd"])


def top_mask(score: torch.Tensor, k) -> torch.Tensor:
    """(B, H, N) bool: the k highest scores of each row (one sort; ties broken arbitrarily, as by topk)."""
    order = torch.sort(score, dim=-1, descending=True).indices
    rank_ok = torch.arange(score.shape[-1], device=score.device) < k
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, order, rank_ok.expand_as(order))


class SlotLayer:
    """One layer's static cache: slots (B, H_kv, N) with keys, values, the attention bias (0 or HIDDEN), position,
    presence, validity and the method's per-slot state. `budget` is the layer's budget (None: nothing is ever
    evicted)."""

    def __init__(self, keys, values, positions, valid, n_slots: int, budget: int | None):
        B, H, S, D = keys.shape
        dev = keys.device
        self.K = keys.new_zeros((B, H, n_slots, D))
        self.V = values.new_zeros((B, H, n_slots, values.shape[-1]))
        self.K[:, :, :S], self.V[:, :, :S] = keys, values
        self.pos = torch.full((B, H, n_slots), -1, dtype=torch.long, device=dev)
        self.pos[:, :, :S] = positions
        self.present = torch.zeros((B, H, n_slots), dtype=torch.bool, device=dev)
        self.present[:, :, :S] = True
        self.valid = torch.ones((B, H, n_slots), dtype=torch.bool, device=dev)
        self.valid[:, :, :S] = valid
        self.bias = torch.where(self.present & self.valid, 0.0, HIDDEN).to(keys.dtype)
        self.budget = budget
        self.state: dict[str, torch.Tensor] = {}

    def slot_tensor(self, t):
        """Per-entry tensor (B, H, S, ...) of the plain cache -> per-slot (B, H, N, ...), zero in free slots."""
        out = t.new_zeros(t.shape[:2] + (self.K.shape[2],) + t.shape[3:])
        out[:, :, : t.shape[2]] = t
        return out

    def nbytes(self) -> int:
        return self.K.nbytes + self.V.nbytes + self.bias.nbytes


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class StaticDecoder:
    """Greedy decoding over a static slot cache. Build it from the plain path's cache after the prefill
    (`from_cache`, which takes the cache's entries over and empties it), then `generate(first_token, n_steps)`; on
    CUDA the step is captured once and replayed."""

    def __init__(self, model, method: str, slots: list[SlotLayer], start_pos, max_steps: int, method_obj=None,
                 budget_tokens: int | None = None, compile: bool = False, use_graph: bool | None = None,
                 score: bool = True, attn_kernel: bool | None = None):
        self.model, self.method, self.m, self.slots = model, method, method_obj, slots
        self.grow = keeps_generated(method_obj)
        self.w = lean_weights(model)
        self.dev = slots[0].K.device
        B = slots[0].K.shape[0]
        self.B = B
        self.budget_tokens = budget_tokens
        self.score_on = score          # False: the same slots and step without the method's scoring (overhead)
        # the Triton decode-attention kernels (kernels/) where they run (CUDA with Triton); False: SDPA
        self.attn_kernel = attn_kernel is not False and kernel_available(self.dev)
        self.cur = torch.as_tensor(start_pos, device=self.dev).expand(B).clone().long()  # position of the new token
        self.tok = torch.zeros(B, dtype=torch.long, device=self.dev)
        self.out = torch.zeros((B, max_steps + 1), dtype=torch.long, device=self.dev)
        # shape (1,), not 0-dim: torch.compile loses an in-place write into a 0-dim CPU tensor (step_tail)
        self.t = torch.zeros((1,), dtype=torch.long, device=self.dev)
        self.use_graph = (self.dev.type == "cuda") if use_graph is None else use_graph
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}   # one captured step per variant (atskv: evict, keep)
        self.eager_runs: dict[str, int] = {}
        self.pool = None
        self.logits_of: dict[str, torch.Tensor] = {}
        self.every = method_obj.slot_evict_every() if method_obj is not None else 1
        # the method's recall schedule (ATSKV's recall_every), which goes on from the plain path's
        self.recall_every, self.recall_step0 = method_obj.slot_recall_schedule() \
            if method_obj is not None and not self.grow else (1, 0)
        self.counts = None             # token counts kept by the step (a method's slot_shared_state)
        self.decode_step0 = 0          # the plain cache's decode steps since its last prefill chunk (evict_every)
        # the step's start, each layer's step and its end: torch.compile'd with compile=True
        self.head, self.fn, self.tail = compiled_step() if compile else (step_head, layer_step, step_tail)
        self.steps_done = 0
        self.qidx = torch.zeros((1,), dtype=torch.long, device=self.dev)   # evict_every > 1: where in the queue

    def refresh_queues(self) -> None:
        """evict_every > 1: list each layer's next free slots (free_queue) from the current presence."""
        if self.every > 1 and not self.grow:
            for sl in self.slots:
                if sl.budget is not None:
                    sl.state["queue"] = free_queue(sl.present, self.every)
            self.qidx.zero_()

    # -- building from the plain path's cache -------------------------------------------------------------------
    @classmethod
    def from_cache(cls, model, method: str, cache, start_pos: int, max_steps: int, **kw) -> "StaticDecoder":
        from cache_framework import CompressedCache
        m = getattr(cache, "method", None)
        refuse_if(method, None if m is None else m.fast_path_refusal())
        grow = keeps_generated(m)   # the slots then hold the compressed prompt and every generated token
        slots, budget_tokens = [], None
        if hasattr(m, "settle"):   # a method that scores on a schedule scores what is pending first
            m.settle(cache)
        if not isinstance(cache, CompressedCache):   # the full cache (a DynamicCache)
            for layer in cache.layers:
                B, H, S, _ = layer.keys.shape
                pos = torch.arange(S, device=layer.keys.device).expand(B, H, S)
                slots.append(SlotLayer(layer.keys, layer.values, pos, torch.ones_like(pos, dtype=torch.bool),
                                       _round_up(S + max_steps + 1, SLOT_ALIGN), None))
        else:
            budget_tokens = cache.budget_tokens
            for l, layer in enumerate(cache.layers):
                budget = cache.layer_budget(l)
                S = layer.stored_length()
                n = _round_up(max(S, budget or 0) + 1 if budget and not grow else S + max_steps + 1, SLOT_ALIGN)
                sl = SlotLayer(layer.keys, layer.values, layer.positions, layer.valid, n, budget)
                if not grow:   # the method's per-entry state in slots, its per-layer state as it is
                    per_entry, per_layer = m.slot_state(layer, max_steps)
                    sl.state = {k: sl.slot_tensor(t) for k, t in per_entry.items()} | per_layer
                slots.append(sl)
        dec = cls(model, method, slots, start_pos, max_steps, method_obj=m, budget_tokens=budget_tokens, **kw)
        if m is not None and not grow:
            dec.counts = m.slot_shared_state().get("counts")
            dec.decode_step0 = cache.layers[0].decode_steps + 1
            dec.refresh_queues()
        if m is not None:  # the decoder took the entries over: the plain cache (which the method refers to) lets go
            for layer in cache.layers:
                layer.keys = layer.values = layer.positions = layer.valid = None
                layer.extras = {}
        return dec

    def repeated(self, batch: int) -> "StaticDecoder":
        """A copy of this batch-1 decoder with its whole state repeated to `batch` rows (memory tests)."""
        import copy
        rep = lambda t: t.repeat(batch, *([1] * (t.dim() - 1)))  # noqa: E731
        new = copy.copy(self)
        new.slots = []
        for sl in self.slots:
            n = copy.copy(sl)
            n.K, n.V, n.bias, n.pos, n.present, n.valid = map(rep, (sl.K, sl.V, sl.bias, sl.pos, sl.present,
                                                                    sl.valid))
            n.state = self.m.slot_state_repeated(sl.state, batch) if sl.state else {}
            new.slots.append(n)
        new.B, new.t = batch, self.t.clone()
        new.graphs, new.eager_runs, new.pool, new.logits_of = {}, {}, None, {}
        new.cur, new.tok, new.out, new.qidx = rep(self.cur), rep(self.tok), rep(self.out), self.qidx.clone()
        new._c = None
        if self.counts is not None:
            new.counts = rep(self.counts)
        return new

    def kv_bytes(self) -> int:
        return sum(s.nbytes() for s in self.slots)

    def extra_nbytes(self) -> dict:
        """The methods' state outside the slots, over the layers: bytes held on the device and in host memory, and
        the bytes of each a step reads (KVMethod.slot_extra_nbytes)."""
        total = {"device": 0, "host": 0, "device_read": 0, "host_read": 0, "device_tier": 0}
        if self.m is None or self.grow:
            return total
        for sl, la in zip(self.slots, self._layer_args()):
            if sl.budget is not None:
                for k, v in self.m.slot_extra_nbytes(sl.state, la).items():
                    total[k] += v
        return total

    def _layer_args(self):
        """Per-layer constants as device tensors (so that compiled functions are not specialised per layer)."""
        if getattr(self, "_largs", None) is None:
            m, dev = self.m, self.dev
            self._largs = []
            for l, sl in enumerate(self.slots):
                a = {}
                if sl.budget is not None:
                    a["budget"] = torch.tensor(sl.budget, device=dev)
                    a["n_recent"] = torch.tensor(m.recent_tokens(sl.budget) if m is not None else 0, device=dev)
                    a["keep"] = torch.tensor(m.decode_target(sl.budget) if m is not None else sl.budget, device=dev)
                    if not self.grow:
                        a.update(m.slot_layer_args(l, dev))
                self._largs.append(a)
        return self._largs

    def _consts(self) -> dict:
        """The step's constants, the same for every layer (made once: _step runs eagerly off CUDA)."""
        if getattr(self, "_c", None) is not None:
            return self._c
        w, m = self.w, self.m
        c = {"head_dim": w.head_dim, "n_heads": w.n_heads, "n_kv": w.n_kv, "budget_tokens": self.budget_tokens,
             "n_sink": getattr(m, "n_sink", 0), "kernel": self.attn_kernel, "qidx": self.qidx, "method": m,
             "own_step": m is not None and m.has_own_slot_step(), "hidden": HIDDEN}
        if m is not None and not self.grow:
            c.update(m.slot_consts())
        self._c = c
        return c

    def variant(self) -> str:
        """Which step runs next: 'step'; atskv with evict_every > 1: 'evict' on its schedule, else 'keep'. Without
        scoring: 'bare', or with evict_every > 1 'bare_evict' and 'bare_keep' on the same schedule."""
        return self._variant_at(self.steps_done)

    def _variant_at(self, t: int) -> str:
        """The variant of the step after t steps of this decoder; "/hold" marks a step between two of the
        method's scheduled recalls (ATSKV's recall_every > 1)."""
        if self.every == 1:
            v = "step" if self.score_on else "bare"
        else:
            v = "evict" if (self.decode_step0 + t) % self.every == 0 else "keep"
            v = v if self.score_on else "bare_" + v
        if self.score_on and self.recall_every > 1 and (self.recall_step0 + t) % self.recall_every:
            v += "/hold"
        return v

    def _step(self, variant: str) -> None:
        w = self.w
        x, cos, sin, seen = self.head(w.embed.weight, w.rotary, self.tok, self.cur,
                                 self.counts if self.score_on else None)
        c = self._consts()
        base, _, hold = variant.partition("/")
        for lw, sl, la in zip(w.layers, self.slots, self._layer_args()):
            kind = "full" if sl.budget is None else "grow" if self.grow else \
                "bare" if base.startswith("bare") else "method"
            x = self.fn(kind, not base.endswith("keep"), not hold, x, cos, sin, self.cur, seen, self.tok,
                        self.counts, lw, sl.K, sl.V, sl.bias, sl.pos, sl.present, sl.valid, sl.state, la, c)
        queue_step = "evict" if base.endswith("evict") else "keep" if base.endswith("keep") else None
        self.logits_of[variant] = self.tail(x, w.norm.weight, w.norm.variance_epsilon, w.lm_head.weight,
                                            w.lm_head.bias, self.tok, self.t, self.out, self.cur, self.qidx,
                                            queue_step, self.every)
        self.last_variant = variant     # logits: (B, vocab); a captured graph's output buffer when replayed

    @property
    def logits(self) -> torch.Tensor:
        """The last step's logits (B, vocab)."""
        return self.logits_of[self.last_variant]

    # -- running ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, may_capture: bool = True) -> None:
        """One decode step. On CUDA each variant of the step runs eagerly twice (compilation and cuBLAS warm up
        there, on a side stream), is then captured once in a CUDA graph and replayed from then on."""
        v = self.variant()
        if not self.use_graph:
            self._step(v)
        elif v in self.graphs:
            self.graphs[v].replay()
            self.last_variant = v
        elif self.eager_runs.get(v, 0) < 2 or not may_capture:
            s = torch.cuda.Stream(self.dev)
            s.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(s):
                self._step(v)
            torch.cuda.current_stream(self.dev).wait_stream(s)
            self.eager_runs[v] = self.eager_runs.get(v, 0) + 1
        else:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()   # the variants never run at once: one memory pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._step(v)
            self.graphs[v] = g
            g.replay()
        self.steps_done += 1

    @torch.no_grad()
    def run_variant(self, variant: str) -> None:
        """One step of the given variant whatever the schedule (to time each variant alone): its captured graph if
        there is one, else eagerly."""
        if variant in self.graphs:
            self.graphs[variant].replay()
        else:
            self._step(variant)
        self.last_variant = variant

    def variants(self) -> list[str]:
        """The variants the schedule runs (evicting ones first, those between recalls after the others)."""
        period = math.lcm(self.every, self.recall_every)
        return sorted({self._variant_at(t) for t in range(period)},
                      key=lambda v: ("/hold" in v, not v.partition("/")[0].endswith("evict"), v))

    @torch.no_grad()
    def warm_up(self) -> int:
        """Real steps until every variant of the step is captured (on CUDA; one step elsewhere). Returns how many."""
        n = 0
        while n == 0 or self.use_graph and any(v not in self.graphs for v in self.variants()):
            self.step()
            n += 1
        return n

    def set_scoring(self, on: bool) -> None:
        """Switch the method's scoring and eviction on or off (off: the `bare` variants, to measure its share of the
        step)."""
        self.score_on = on

    @torch.no_grad()
    def generate(self, first_token, n_tokens: int) -> torch.Tensor:
        """Tokens (B, n_tokens): `first_token` (B,) (the prefill's argmax), then n_tokens - 1 decode steps."""
        first = torch.as_tensor(first_token, device=self.dev).long().view(-1).expand(self.B)
        self.tok.copy_(first)
        self.out[:, 0] = first
        self.t.zero_()
        if n_tokens > self.out.shape[1]:
            raise ValueError(f"n_tokens {n_tokens} > max_steps + 1 = {self.out.shape[1]}")
        done = self.steps_done
        while self.steps_done - done < n_tokens - 1:
            self.step(may_capture=n_tokens - 1 - (self.steps_done - done) >= 4)  # too few left to pay a capture
        return self.out[:, :n_tokens].clone()


def step_head(embed_w, rotary, tok, cur, counts):
    """A step's start: the new tokens' embeddings, RoPE's cos and sin at their position (B, 1, D), the tokens seen
    with them, and ATSKV's token counts (None: not counted) updated in place."""
    x = torch.nn.functional.embedding(tok, embed_w)
    cos, sin = rotary(x[:, None], cur[:, None])          # (B, 1, D): broadcast over the heads
    if counts is not None:   # as the plain path counts them (ATSKV._token_counts)
        HandcraftedFeatureExtractor.count_tokens(counts, tok[:, None])
    return x, cos, sin, cur + 1


def step_tail(x, norm_w, eps, lm_w, lm_b, tok, t, out, cur, qidx, queue_step, every: int):
    """A step's end: the final norm, the logits (returned), then `greedy_update`."""
    logits = torch.nn.functional.linear(rms_norm(x, norm_w, eps), lm_w, lm_b)
    if greedy_kernels.usable(logits, out):   # the same in two Triton kernels (CUDA)
        greedy_kernels.greedy_step(logits, tok, t, out, cur, qidx, queue_step, every)
    else:
        greedy_update(logits, tok, t, out, cur, qidx, queue_step, every)
    return logits


def greedy_update(logits, tok, t, out, cur, qidx, queue_step, every: int) -> None:
    """The greedy token (into tok and the ring buffer out), the position, and evict_every's place in the free-slot
    queue (queue_step 'evict': back to its start, 'keep': one on), in place."""
    nxt = logits.float().argmax(-1)
    tok.copy_(nxt)
    t += 1
    out.scatter_(1, torch.remainder(t, out.shape[1]).expand(tok.shape[0])[:, None], nxt[:, None])
    cur += 1
    if queue_step == "evict":
        qidx.zero_()
    elif queue_step == "keep":
        qidx.copy_((qidx + 1).clamp(max=every - 1))


_COMPILED: dict = {}


def compiled_step():
    """(`step_head`, `layer_step`, `step_tail`) compiled once per process (torch.compile caches per shape and
    guards): the step's start and end become a few fused kernels instead of about a dozen small ones each (the
    rotary embedding, the final norm, the argmax, the bookkeeping), each layer's step one region."""
    if not _COMPILED:
        from torch import _dynamo
        _dynamo.config.cache_size_limit = max(64, _dynamo.config.cache_size_limit)  # a recompile per slot count
        # dynamic=False: a graph per shape, as a CUDA graph is. Automatic dynamic shapes (after a second slot
        # count in the process) made a step's kernels depend on what ran before it, and Inductor failed on the
        # kernels' written tensors of batch 1 with a dynamic slot count (pytorch/pytorch#181735, torch 2.11)
        _COMPILED["step"] = tuple(torch.compile(f, fullgraph=True, dynamic=False)
                                  for f in (step_head, layer_step, step_tail))
    return _COMPILED["step"]


def memory_floor_ms(weight_bytes: int, kv_bytes: int, bandwidth_gbs: float) -> float:
    """Reading the weights and the KV once per step at the device's bandwidth: no decode step can be faster."""
    return 1000.0 * (weight_bytes + kv_bytes) / (bandwidth_gbs * 1e9)

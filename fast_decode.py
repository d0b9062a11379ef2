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
over the compressed cache for decoding and makes the plain path's decisions, step for step:
- full: nothing evicted (slots for the prompt and the new tokens);
- sliding_window, snapkv, pyramidkv, dynamic_kv, h2o: the top layer budget by the method's score, protected entries
  first (`KVMethod.select`); h2o adds each step's attention to its scores, new snapkv / dynamic_kv entries score 0;
- atskv: every entry is re-scored by the predictor with the step's attention statistics and features, and the
  threshold controller keeps r > beta_l * quantile(r, q_l) within the budget and adapts q_l (`controller_keep`, the
  tensor form of `ThresholdController.select`: same quantile, hard cap and integral update, without host syncs);
  with evict_every > 1 only on its schedule (a second captured graph runs the steps that do not evict).
Not supported, with a clear error: rocket_kv (its decode attention is sparse), atskv with external memory, span > 1
or consensus, kvpress presses, and a model whose layers sit on several devices (use the plain path with
--device_map auto).
"""
from __future__ import annotations

import torch

from kernels import evict_kernels, greedy_kernels, skinny_gemm
from kernels.decode_attention import decode_attention, kernel_available, rope
from relevance_predictor import AttentionStatisticsExtractor, HandcraftedFeatureExtractor
from utils import UserError

FAST_METHODS = ("full", "sliding_window", "snapkv", "pyramidkv", "dynamic_kv", "h2o", "atskv")
SLOT_ALIGN = 16   # slot counts are rounded up to a multiple of this
# Free slots are hidden by a per-slot bias added to the scaled logits (decode_attention): 0 for a stored entry,
# HIDDEN for a free (or padding) slot: exp() of it is 0.
HIDDEN = -30000.0


def check_fast_method(name: str, params: dict | None = None) -> None:
    """Raise a one-line UserError unless the fast path implements method `name` with these parameters."""
    params = params or {}
    if name not in FAST_METHODS or name == "atskv" and (params.get("external_memory") or params.get("span", 1) > 1
                                                        or params.get("consensus")):
        raise UserError(f"method {name!r} has no fast decode path; accepted: {', '.join(FAST_METHODS)} (atskv "
                        f"without external memory or consensus, span 1)")
    if params.get("decode") == "hold":
        raise UserError(f"method {name!r} with decode='hold' has no fast decode path; accepted: decode='grow'")


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
    ok = layer is not None and all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
        and all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) \
        and getattr(cfg, "hidden_act", "silu") == "silu" and hasattr(base, "rotary_emb")
    if not ok:
        raise UserError(f"the fast decode path supports Llama-architecture models (Llama, Mistral, Qwen2, SmolLM); "
                        f"{type(model).__name__} is not one: use the plain path")
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
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed, self.rotary, self.norm, self.lm_head = base.embed_tokens, base.rotary_emb, base.norm, \
            model.get_output_embeddings()
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.layers.append({
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


def pre_attention(x, ln, eps, wqkv, bqkv, cos, sin, n_heads: int, n_kv: int, head_dim: int):
    """x (B, hidden): RMSNorm, q/k/v, RoPE of k. Returns the normed input h, the query (B, H_kv, G, D) not yet
    rotated (decode_attention rotates it: in the kernel on CUDA), k and v (B, H_kv, D)."""
    B = x.shape[0]
    h = rms_norm(x, ln, eps)
    qkv = skinny_gemm.linear(h, wqkv, bqkv)
    q = qkv[:, : n_heads * head_dim].view(B, n_kv, n_heads // n_kv, head_dim)
    k = qkv[:, n_heads * head_dim: (n_heads + n_kv) * head_dim].view(B, n_kv, head_dim)
    v = qkv[:, (n_heads + n_kv) * head_dim:].view(B, n_kv, head_dim)
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


def put(t, slot, value):
    """t[b, h, slot[b, h]] = value[b, h] in place, for every row b and head h. An index_put_, which torch.compile
    keeps in place (a scatter_ into a large buffer could become a copy of the whole buffer)."""
    B, H = slot.shape[:2]
    b = torch.arange(B, device=t.device)[:, None].expand(B, H)
    h = torch.arange(H, device=t.device)[None].expand(B, H)
    t.index_put_((b, h, slot[..., 0]), value)


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


def protection(present, pos, seen, n_sink: int, n_recent):
    """Entries never evicted: the first n_sink positions and the last n_recent seen (KVMethod.protected)."""
    return present & ((pos < n_sink) | (pos >= seen[:, None, None] - n_recent))


def bare_evict(present, pos, keep, n_sink: int, n: int):
    """No scoring (to measure a method's share of the step): free the oldest non-sink entries down to `keep`, at
    most n of them (n = 1 when evicting every step; evict_every when evicting on its schedule)."""
    n_free = (present[0, 0].sum() - keep).clamp(min=0, max=n)
    old = pos.masked_fill(~present | (pos < n_sink), torch.iinfo(torch.long).max).topk(n, -1, largest=False).indices
    free = torch.arange(n, device=pos.device) < n_free
    present.scatter_(-1, old, present.gather(-1, old) & ~free)


def generic_evict(kind: str, present, valid, pos, score, probs, slot, seen, budget, budget_tokens: int, n_sink: int,
                  n_recent):
    """Score-based methods: keep the top budget by score, protected entries first (KVMethod.select)."""
    over = (present[0, 0].sum() > budget) & (seen[0] > budget_tokens)          # compress() and fits()
    prot = protection(present, pos, seen, n_sink, n_recent)
    if kind == "sliding_window":
        sc = pos.float()
    else:
        put(score, slot, torch.zeros(slot.shape[:2], dtype=score.dtype, device=score.device))  # a new entry: 0 ...
        if kind == "h2o":
            score += probs.sum(2)                       # ... and H2O adds the step's attention, summed over the group
        sc = score
    sc = sc.masked_fill(prot, float("inf")).masked_fill(~valid | ~present, float("-inf"))
    kept = top_mask(sc, budget) & present
    present.copy_(torch.where(over, kept, present))


def atskv_evict(present, valid, bias, queue, pos, z0, toks, acc, delta, counts, flags, probs, slot, h, k, v, tok,
                cur, seen, co: dict, keep, budget_tokens: int, beta, gain: float, fixed, n_sink: int, n_recent,
                evict: bool = True):
    """ATSKV on one layer (`ATSKV.observe` + `select`): the new entry's write-time logit every step (its slot's
    running attention statistic is zeroed and the step's attention added by layer_step); when `evict` (evict_every's
    schedule), this step's attention statistics, every entry re-scored and the threshold controller's decision,
    keeping at most `keep` entries. On CUDA the eviction kernels also hide the freed slots in the bias and list the
    next free ones in `queue` (None: evict_every = 1); layer_step does that otherwise. Returns True when the
    eviction kernels have refreshed the bias and the queue themselves."""
    B, H = k.shape[:2]
    new_tok = tok[:, None].expand(B, H)
    hz = step_hidden_logit(co, h)[:, None, None].expand(B, H, 1)
    put(z0, slot, static_logit(co, flags, hz, cur[:, None, None].expand(B, H, 1), k[:, :, None], v[:, :, None],
                               new_tok[..., None], n_sink)[..., 0])
    put(toks, slot, new_tok)
    if not evict:   # decode_attention added the step's attention to acc
        return False
    over = (present[0, 0].sum() > keep) & (seen[0] > budget_tokens)
    prot = protection(present, pos, seen, n_sink, n_recent)
    if evict_kernels.available(present):   # the scoring, the decision, the bias and the queue in three kernels
        r = evict_kernels.relevance(probs, acc, z0, pos, toks, counts, valid, seen, co["dyn"])
        evict_kernels.controller_evict(r, prot, present, valid, bias, queue, keep, beta, delta, gain, fixed, over,
                                       HIDDEN)
        return True
    B, H, G, N = probs.shape   # the one new query's attention, as a window of one query over the group's heads
    mean, mx, spread = AttentionStatisticsExtractor.window_stats(probs.reshape(B, H * G, 1, N), H)
    acc += mean
    freq = counts.gather(1, toks.flatten(1)).view(toks.shape)
    r = torch.sigmoid(z0 + dynamic_logit(co, pos, seen[:, None, None], mean, mx, acc, spread, freq))
    r = r.masked_fill(~valid, -1.0)
    kept, new_delta = controller_keep(r, prot, present, keep, beta, delta, gain, fixed)
    delta.copy_(torch.where(over, new_delta, delta))
    present.copy_(torch.where(over, kept, present))
    return False


def post_attention(x, attn, wo, ln, eps, wgu, wd):
    """Residual + o_proj, then the SwiGLU MLP block. attn (B, H_q * D)."""
    x = x + skinny_gemm.linear(attn, wo)
    h = rms_norm(x, ln, eps)
    return skinny_gemm.linear(skinny_gemm.swiglu(h, wgu), wd, residual=x)


def layer_step(kind: str, evict: bool, x, cos, sin, cur, seen, tok, counts, lw: dict, K, V, bias, pos, present,
               valid, st: dict, la: dict, co, c: dict):
    """One decoder layer of a decode step with the method's per-step work: one torch.compile region, so that the
    element-wise work of the norms, RoPE, the slot write, the scoring and the bias refresh fuses into few kernels.
    kind: full (nothing evicted), grow (a compressed prompt; new entries fill free slots, nothing evicted), bare
    (frees the oldest entry: the step without the method's scoring; with evict_every, the oldest entries on its
    schedule), atskv or a generic method; evict: whether this step is one of atskv's scheduled evictions."""
    D = c["head_dim"]
    h, q, k, v = pre_attention(x, lw["ln1"], lw["eps1"], lw["wqkv"], lw["bqkv"], cos, sin, c["n_heads"], c["n_kv"],
                               D)
    if kind == "full":   # nothing is evicted: slot i holds position i (a search over the slots would cost a kernel)
        slot = cur.clamp(max=K.shape[2] - 1)[:, None, None].expand(k.shape[0], k.shape[1], 1)
    elif "queue" in st:   # evict_every > 1 (atskv and its bare step): the slots listed by the last eviction
        slot = st["queue"].index_select(-1, c["qidx"])
    else:
        slot = first_free_slot(present)
    write_entry(K, V, bias, present, valid, pos, k, v, slot, cur)
    # ATSKV and H2O score with the step's attention probabilities; free slots get 0 through the bias. ATSKV's steps
    # that do not evict only add them to its running statistic (decode_attention's acc)
    acc = None
    if kind == "atskv":
        put(st["acc"], slot, torch.zeros(slot.shape[:2], dtype=st["acc"].dtype, device=K.device))  # a new entry
        acc = None if evict else st["acc"]
    attn, probs = decode_attention(q, K, V, bias, lw["scaling"], kind == "h2o" or kind == "atskv" and evict,
                                   c["kernel"], acc=acc, cos=cos, sin=sin)
    refreshed = False   # whether the eviction kernels refreshed the bias and the queue themselves
    if kind == "bare":
        if evict:   # keep = budget - evict_every + 1 (the budget when evicting every step)
            bare_evict(present, pos, la["keep"], c["n_sink"], st["queue"].shape[-1] if "queue" in st else 1)
    elif kind == "atskv":
        refreshed = atskv_evict(present, valid, bias, st.get("queue"), pos, st["z0"], st["tok"], st["acc"],
                                st["delta"], counts, c["flags"], probs, slot, h, k, v, tok, cur, seen, co, la["keep"],
                                c["budget_tokens"], la["beta"], c["gain"], c["fixed"], c["n_sink"], la["n_recent"],
                                evict)
    elif kind not in ("full", "grow"):   # grow: the prompt was compressed, generated tokens are all kept
        generic_evict(kind, present, valid, pos, st.get("score"), probs, slot, seen, la["budget"],
                      c["budget_tokens"], c["n_sink"], la["n_recent"])
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


def controller_keep(r, protected, present, budget: int, beta: float, delta, gain: float, fixed: float | None):
    """`ThresholdController.select` in tensor form over slots (no host sync, static shapes, one sort).

    r, protected, present: (B, H, N); free slots (present False) are not entries. delta: float64, shape (1,) or ().
    Returns (kept (B, H, N) bool, new delta). Every row keeps the same number k <= budget of entries, as the plain
    path's gather does: its protected entries, then its unprotected ones by r (the kept-by-threshold rank above the
    others and have the higher r, so one ascending sort of r serves both the quantile and the top-k)."""
    B, H, N = r.shape
    S = present[0, 0].sum().double()            # stored entries (the same in every row)
    target = torch.clamp(budget / S, max=1.0)
    r = r.float()
    prot = protected & present
    free = present & ~protected
    # the free first, by r; ties by slot index (a stable sort), as in evict_kernels
    vals, order = torch.sort(r.masked_fill(~free, float("inf")), dim=-1, stable=True)
    n = free.sum(-1, keepdim=True)
    if fixed is not None:
        tau = torch.full_like(r[..., :1], fixed)
    else:  # torch.nanquantile over the free entries: linear interpolation at rank q (n - 1)
        q = torch.clamp(1.0 - target + delta, 0.0, 1.0).float()
        rank = q * (n.float() - 1)
        lo = rank.to(torch.long).clamp(0, N - 1)
        hi = torch.ceil(rank).to(torch.long).clamp(0, N - 1)
        quant = torch.lerp(vals.gather(-1, lo), vals.gather(-1, hi), rank - lo.float())
        tau = beta * torch.where(n > 0, quant, torch.full_like(quant, float("nan")))
    keep = prot | (free & (r > tau))
    n_keep = keep.sum(-1).max()
    k = torch.minimum(torch.clamp(n_keep, min=1), torch.as_tensor(budget, device=r.device))
    m = (k - prot.sum(-1, keepdim=True)).clamp(min=0)       # unprotected entries each row keeps: its m highest r
    posn = torch.arange(N, device=r.device)
    take = (posn >= n - m) & (posn < n)                      # in sorted order: the last m of the n free
    kept = prot | torch.zeros_like(free).scatter(-1, order, take)
    kept_frac = keep.sum(-1).float().mean().double() / S
    new_delta = delta if fixed is not None else torch.clamp(delta + gain * (kept_frac - target), -1.0, 1.0)
    return kept, new_delta


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
        self.every = getattr(method_obj, "evict_every", 1) if method == "atskv" else 1
        self.decode_step0 = 0          # the plain cache's decode steps since its last prefill chunk (evict_every)
        # the step's start, each layer's step and its end: torch.compile'd with compile=True
        self.head, self.fn, self.tail = compiled_step() if compile else (step_head, layer_step, step_tail)
        self.steps_done = 0
        self.qidx = torch.zeros((1,), dtype=torch.long, device=self.dev)   # evict_every > 1: where in the queue

    def refresh_queues(self) -> None:
        """atskv with evict_every > 1: list each layer's next free slots (free_queue) from the current presence."""
        if self.method == "atskv" and self.every > 1:
            for sl in self.slots:
                if sl.budget is not None:
                    sl.state["queue"] = free_queue(sl.present, self.every)
            self.qidx.zero_()

    # -- building from the plain path's cache -------------------------------------------------------------------
    @classmethod
    def from_cache(cls, model, method: str, cache, start_pos: int, max_steps: int, **kw) -> "StaticDecoder":
        from sparse_kv_cache import CompressedCache
        m = getattr(cache, "method", None)
        check_fast_method(method, {} if m is None else {"external_memory": getattr(m, "external_memory", False),
                                                        "span": getattr(m, "span", 1),
                                                        "consensus": getattr(m, "consensus", False),
                                                        "decode": getattr(m, "decode", None)})
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
            coefs = logit_coefs(m.predictor) if method == "atskv" else None
            for l, layer in enumerate(cache.layers):
                budget = cache.layer_budget(l)
                S = layer.stored_length()
                n = _round_up(max(S, budget or 0) + 1 if budget and not grow else S + max_steps + 1, SLOT_ALIGN)
                sl = SlotLayer(layer.keys, layer.values, layer.positions, layer.valid, n, budget)
                if method == "atskv":
                    sl.state["acc"] = sl.slot_tensor(layer.extras["acc"].float())
                    sl.state["tok"] = sl.slot_tensor(layer.extras["tok"].long())
                    sl.state["z0"] = sl.slot_tensor(static_logit(coefs[l], m.predictor.token_flags,
                                                                 hidden_logit(coefs[l], layer.extras["h"]),
                                                                 layer.positions, layer.keys, layer.values,
                                                                 layer.extras["tok"].long(), m.n_sink))
                    # shape (1,), not 0-dim: torch.compile loses an in-place write into a 0-dim CPU tensor
                    sl.state["delta"] = torch.tensor([m.controller.delta[l]], dtype=torch.float64, device=sl.K.device)
                elif method == "h2o":
                    sl.state["score"] = sl.slot_tensor(layer.extras["score"].float())
                elif method in ("snapkv", "pyramidkv", "dynamic_kv"):
                    sl.state["score"] = sl.slot_tensor(m.score(layer).float())
                slots.append(sl)
        dec = cls(model, method, slots, start_pos, max_steps, method_obj=m, budget_tokens=budget_tokens, **kw)
        if method == "atskv":
            dec.counts, dec.coefs = m.counts.clone(), coefs
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
            n.state = {k: v.clone() if k == "delta" else rep(v) for k, v in sl.state.items()}
            new.slots.append(n)
        new.B, new.t = batch, self.t.clone()
        new.graphs, new.eager_runs, new.pool, new.logits_of = {}, {}, None, {}
        new.cur, new.tok, new.out, new.qidx = rep(self.cur), rep(self.tok), rep(self.out), self.qidx.clone()
        new._c = None
        if hasattr(self, "counts"):
            new.counts = rep(self.counts)
        return new

    def kv_bytes(self) -> int:
        return sum(s.nbytes() for s in self.slots)

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
                    a["keep"] = torch.tensor(max(1, sl.budget - self.every + 1), device=dev)  # evict_every's target
                if self.method == "atskv":
                    a["beta"] = torch.tensor(m.controller.beta[l], dtype=torch.float32, device=dev)
                self._largs.append(a)
        return self._largs

    def _consts(self) -> dict:
        """The step's constants, the same for every layer (made once: _step runs eagerly off CUDA)."""
        if getattr(self, "_c", None) is not None:
            return self._c
        w, m = self.w, self.m
        c = {"head_dim": w.head_dim, "n_heads": w.n_heads, "n_kv": w.n_kv, "budget_tokens": self.budget_tokens,
             "n_sink": getattr(m, "n_sink", 0), "kernel": self.attn_kernel, "qidx": self.qidx}
        if self.method == "atskv":
            c.update(flags=m.predictor.token_flags, gain=m.controller.gain, fixed=m.controller.fixed)
        self._c = c
        return c

    def variant(self) -> str:
        """Which step runs next: 'step'; atskv with evict_every > 1: 'evict' on its schedule, else 'keep'. Without
        scoring: 'bare', or with evict_every > 1 'bare_evict' and 'bare_keep' on the same schedule."""
        if self.every == 1:
            return "step" if self.score_on else "bare"
        v = "evict" if (self.decode_step0 + self.steps_done) % self.every == 0 else "keep"
        return v if self.score_on else "bare_" + v

    def _step(self, variant: str) -> None:
        w = self.w
        x, cos, sin, seen = self.head(w.embed.weight, w.rotary, self.tok, self.cur,
                                 self.counts if self.method == "atskv" and self.score_on else None)
        c = self._consts()
        for l, (lw, sl, la) in enumerate(zip(w.layers, self.slots, self._layer_args())):
            kind = "full" if sl.budget is None else "grow" if self.grow else \
                "bare" if variant.startswith("bare") else self.method
            x = self.fn(kind, not variant.endswith("keep"), x, cos, sin, self.cur, seen, self.tok,
                        getattr(self, "counts", None), lw, sl.K, sl.V, sl.bias, sl.pos, sl.present, sl.valid,
                        sl.state, la, self.coefs[l] if kind == "atskv" else None, c)
        queue_step = "evict" if variant.endswith("evict") else "keep" if variant.endswith("keep") else None
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
        if self.every == 1:
            return ["step" if self.score_on else "bare"]
        return ["evict", "keep"] if self.score_on else ["bare_evict", "bare_keep"]

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
        _COMPILED["step"] = tuple(torch.compile(f, fullgraph=True) for f in (step_head, layer_step, step_tail))
    return _COMPILED["step"]


# The predictor's logit z = sum_j w_j (x_j - mu_j) / sd_j * mask_j + b is split into what a slot's entry fixes when
# it is written (h, sink flag, key and value norms, token flags) and what changes every step (position relative to the
# tokens seen, distance to the end, frequency, attention statistics). Feature order: relevance_predictor.N_FEATURES.
_STATIC_F = slice(2, 9)   # within f: sink flag, log |k|, log |v|, 4 token flags (a slice: a list index would copy a
                          # CPU tensor to the device, which a CUDA graph capture refuses)
_DYNAMIC_F = (0, 1, 9)    # pos / seen, log1p(distance to the end) / 10, log1p(frequency)


def logit_coefs(pred) -> list[dict]:
    """Per layer: (coefficient, mean) of each feature group of the split logit, computed once (not in the graph).
    "hw": the hidden state's term folded through its projection, (w, c) with ((h - h_mean) P - mu) . coef =
    h . w + c, so that a step scores its new entry by one dot product instead of a projection matmul."""
    from relevance_predictor import A_DIM, F_DIM, H_DIM
    groups = {"h": list(range(H_DIM)), "a": list(range(H_DIM, H_DIM + A_DIM)),
              "fs": [H_DIM + A_DIM + i for i in range(F_DIM)[_STATIC_F]],
              "fd": [H_DIM + A_DIM + i for i in _DYNAMIC_F]}
    out = []
    for l in range(pred.n_layers):
        c = (pred.w[l] * pred.feature_mask / pred.feat_std[l]).detach()
        co = {g: (c[idx].clone(), pred.feat_mean[l][idx].clone()) for g, idx in groups.items()}
        ch, muh = co["h"]
        w = (pred.h_proj[l].double() @ ch.double())
        co["hw"] = (w.float(), (-(pred.h_mean[l].double() @ w) - (muh.double() * ch.double()).sum()).float())
        co["dyn"] = torch.cat([*co["a"], *co["fd"]]).float()   # evict_kernels.relevance's packing
        out.append(co | {"b": pred.b[l].detach().clone()})
    return out


def hidden_logit(co, hp):
    """The projected hidden state's term of the logit, hp (..., H_DIM) -> (...)."""
    c, mu = co["h"]
    return ((hp.float() - mu) * c).sum(-1)


def step_hidden_logit(co, h):
    """The same term from the unprojected hidden state h (..., hidden_size): one dot product (logit_coefs' "hw")."""
    w, c = co["hw"]
    return (h.float() * w).sum(-1) + c


def static_logit(co, flags, hz, positions, keys, values, tok, n_sink):
    """b + the contribution of the features fixed when an entry is written, (B, H, S); hz: the hidden state's
    term (hidden_logit)."""
    z = hz + co["b"]
    c, mu = co["fs"]
    # summed one by one, not stacked: a stack of reductions cost a step three more kernels
    for i, f in enumerate(HandcraftedFeatureExtractor.entry_features(positions, keys, values, tok, flags, n_sink)):
        z = z + (f - mu[i]) * c[i]
    return z


def dynamic_logit(co, positions, seen, mean, mx, acc, spread, freq):
    """The contribution of the attention statistics and the time-dependent features, (B, H, N). The three
    time-dependent features are HandcraftedFeatureExtractor's (position / seen, distance to the end, frequency),
    computed here without the key and value norms that a slot fixed when it was written. On CUDA
    evict_kernels._score_kernel restates this, window_stats and features in one kernel: a change here must be made
    there too (tests/test_evict_kernels.py holds the two equal)."""
    pos = positions.float()
    a = AttentionStatisticsExtractor.features(mean, mx, acc, spread)
    fd = torch.stack([pos / seen.clamp(min=1), torch.log1p((seen - 1 - pos).clamp(min=0)) / 10.0,
                      torch.log1p(freq.float())], dim=-1)
    (ca, mua), (cf, muf) = co["a"], co["fd"]
    return ((a - mua) * ca).sum(-1) + ((fd - muf) * cf).sum(-1)


def memory_floor_ms(weight_bytes: int, kv_bytes: int, bandwidth_gbs: float) -> float:
    """Reading the weights and the KV once per step at the device's bandwidth: no decode step can be faster."""
    return 1000.0 * (weight_bytes + kv_bytes) / (bandwidth_gbs * 1e9)

"""Baseline compression methods, one small dataclass each (registered into `cache_framework.METHODS`).

All take the same budget (fraction of the context or tokens per layer) and really evict: kept entries are gathered
into new, smaller tensors. Under chunked prefill each method runs after every chunk, with that chunk's last queries
as its observation window.

Decoding is a policy of its own (`decode`, for SnapKV, PyramidKV, DynamicKV and RocketKV):
- "grow" (default; the papers' and their official code's policy): the prompt is compressed, and every generated
  token is kept, so the cache grows by one entry a step;
- "hold": the budget holds while decoding. Each decode step's query is one more query of the method's observation
  window: its pooled attention enters the scores as a moving average over `window` steps, so generated tokens are
  scored by the same rule as the prompt's (and protected while they are among the last `window`). This is ours: the
  papers do not evict while decoding.
H2O evicts while decoding by its own rule (accumulated attention), as in the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cache_framework import KVMethod, put, register_method, repeat_heads, window_attention


def pooled_window_scores(layer, query, scaling, window: int, kernel: int, pool: str = "avg",
                         group_reduce: str = "mean") -> torch.Tensor:
    """SnapKV-style scores (B, H_kv, S): attention of the last `window` queries, averaged over the window, the
    window's own keys zeroed (they are kept anyway), pooled along the sequence, reduced over each GQA group."""
    attn = window_attention(query, layer.keys, layer.valid, layer.n_new, scaling, window)  # (B, Hq, w, S)
    w = attn.shape[2]
    s = attn.mean(dim=2) if group_reduce == "mean" else attn.sum(dim=2)
    s[..., s.shape[-1] - w:] = 0.0
    B, Hq, S = s.shape
    Hkv = layer.keys.shape[1]
    if group_reduce == "sum":  # RocketKV: sum over the GQA group first, then max-pool per KV head
        s = s.view(B, Hkv, Hq // Hkv, S).sum(2)
    if pool == "avg":
        s = F.avg_pool1d(s.reshape(-1, 1, S), kernel, stride=1, padding=kernel // 2).view(*s.shape[:2], S)
    else:
        s = F.max_pool1d(s.reshape(-1, 1, S), kernel, stride=1, padding=kernel // 2).view(*s.shape[:2], S)
    if group_reduce == "mean":
        s = s.view(B, Hkv, Hq // Hkv, S).mean(2)
    return s


DECODE_POLICIES = ("grow", "hold")


class DecodePolicy:
    """`decode` for methods that compress the prompt (see the module's docstring): grow or hold."""
    decode: str
    group_reduce = "mean"

    def check_decode(self):
        if self.decode not in DECODE_POLICIES:
            from utils import UserError
            raise UserError(f"decode {self.decode!r} for method {self.name!r}: accepted are grow, hold")

    def bind(self, cache):
        self.check_decode()
        super().bind(cache)

    def evict_to(self, layer, budget):
        return None if layer.n_new == 1 and self.decode == "grow" else budget

    def fast_path_refusal(self):
        """grow: nothing is evicted while decoding, which the fast path does for any method; hold re-scores."""
        return "decode='hold' re-scores every step; accepted: decode='grow'" if self.decode == "hold" else None

    def rescore_on_decode(self, layer, query, scaling):
        """hold: the step's query joins the observation window (a moving average of scores over `window` steps)."""
        if self.decode != "hold" or "score" not in layer.extras:
            return
        new = pooled_window_scores(layer, query, scaling, 1, self.kernel, self.pool, self.group_reduce)
        old = layer.extras["score"]
        layer.extras["score"] = old + (new - old) / self.window


@register_method
@dataclass
class SnapKV(DecodePolicy, KVMethod):
    """SnapKV (Li et al., arXiv 2404.14469; FasterDecoding/SnapKV): keys are scored by the attention of the last
    `window` queries (the observation window), pooled with `kernel`; the top ones and the window are kept.
    Defaults: the official LongBench reproduction's configuration (experiments/LongBench/scripts/run_longbench.sh:
    `ablation_c4096_w32_k7_maxpool`, window 32, kernel 7, max pooling; KVCache-Factory runs SnapKV the same way).
    Per KV head the scores are averaged over the GQA group, as in kvpress's SnapKVPress (the official code has one KV
    head per query head)."""
    name = "snapkv"
    window: int = 32
    kernel: int = 7
    pool: str = "max"
    decode: str = "grow"

    def recent_tokens(self, budget):
        return self.window

    def observe(self, layer, query, scaling):
        if layer.n_new > 1:
            layer.extras["score"] = pooled_window_scores(layer, query, scaling, self.window, self.kernel, self.pool)
        else:
            self.rescore_on_decode(layer, query, scaling)

    def score(self, layer):
        return layer.extras.get("score", torch.zeros_like(layer.positions, dtype=torch.float))


@register_method
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., arXiv 2406.02069; Zefan-Cai/PyramidKV, `PyramidKVCluster.update_kv`): SnapKV selection
    with per-layer budgets in an arithmetic progression, more in lower layers. With B the budget (the official
    max_capacity_prompt, window included) and S the prompt's length, as the official code computes them in integers:
    min = (B - w) // beta, max = 2 (B - w) - min; if max >= S - w then max = S - w and min = 2 (B - w) - max;
    layer l keeps max - l ((max - min) // (layers - 1)) plus the window. A prompt shorter than 2 (B - w) gives every
    layer B (uniform); one shorter than B is not compressed. Defaults: beta 20 (paper and code), window 8, kernel 7,
    max pooling (KVCache-Factory's run_longbench.py)."""
    name = "pyramidkv"
    window: int = 8
    beta: float = 20.0

    def layer_budget(self, layer_idx, n_layers, budget):
        w, base = self.window, budget - self.window
        S = self.cache.context_length or self.cache.layers[0].cumulative_length
        if base <= 0 or n_layers == 1 or S < 2 * base:
            return budget
        lo = int(base // self.beta)
        hi = 2 * base - lo
        if hi >= S - w:
            hi = S - w
            lo = 2 * base - hi
        return hi - layer_idx * ((hi - lo) // (n_layers - 1)) + w


@register_method
@dataclass
class H2O(KVMethod):
    """H2O (Zhang et al., arXiv 2306.14048; FMInference/H2O): heavy hitters by accumulated attention (summed over
    every query seen and over the GQA group) plus the most recent tokens; half of the budget each (the paper's
    equal heavy/recent split)."""
    name = "h2o"
    recent_ratio: float = 0.5

    def recent_tokens(self, budget):
        return 0 if budget is None else int(budget * self.recent_ratio)

    def observe(self, layer, query, scaling):
        attn = window_attention(query, layer.keys, layer.valid, layer.n_new, scaling, layer.n_new)
        B, Hq, _, S = attn.shape
        acc = attn.sum(2).view(B, layer.keys.shape[1], -1, S).sum(2)
        layer.extras["score"] = layer.extras.get("score", torch.zeros_like(acc)) + acc

    def score(self, layer):
        return layer.extras["score"]

    def slot_state(self, layer, max_steps):
        return {"score": layer.extras["score"].float()}, {}

    def slot_wants_probs(self, evict):
        return True

    def slot_scores(self, s):
        score, slot = s["state"]["score"], s["slot"]
        put(score, slot, torch.zeros(slot.shape[:2], dtype=score.dtype, device=score.device))  # a new entry: 0 ...
        score += s["probs"].sum(2)                 # ... plus the step's attention, summed over the group
        return score


@register_method
@dataclass
class KNorm(DecodePolicy, KVMethod):
    """Knorm (Devoto et al., arXiv 2406.11430; NVIDIA kvpress's KnormPress): the keys with the lowest L2 norm are
    kept (low-norm keys draw the most attention). No attention sinks and no recent window, as the press; the norm is
    taken in float32. A static score: a chunked prefill keeps what one pass keeps."""
    name = "knorm"
    decode: str = "grow"

    def score(self, layer):
        return -layer.keys.float().norm(dim=-1)

    def slot_scores(self, s):
        return -s["keys"].float().norm(dim=-1)

    def fast_path_refusal(self):
        return None   # a static score: both decoding policies run on the slots


@register_method
@dataclass
class DynamicKV(DecodePolicy, KVMethod):
    """DynamicKV (Zhou et al., arXiv 2412.14838; DreamMr/DynamicKV, `dynamic_v11`): task-aware per-layer budgets.

    Per layer, keys are scored by the last w=8 queries' attention, summed over the window and average-pooled
    (kernel 7, avgpool as for Llama); each layer first keeps a temporary budget min(10 x base, L - w) + w
    (base = B - w). Every 4 layers (and at the last), a global top-(base x heads x layers so far) over the stacked
    scores of all layers so far counts hits per layer; the counts, normalised, are rescaled so that the budgets sum to
    base x number of layers, and the earlier layers are truncated to their budgets plus the window. With chunked
    prefill this runs per chunk (the original runs once, over the whole prompt).

    The global top-k ranks each layer's full-prefix scores as its observation computed them, before the layer was cut
    to its temporary budget (`prefix_scores`), and the protected window is always `window` tokens, whatever budget a
    layer is given (as the official code's fixed window_size).

    Deviation, kept on purpose: scores are reduced per KV head by the mean over its GQA group (the official code works
    per query head, with one KV head each): the cache stores entries per KV head, so a query head's own choice cannot
    be kept."""
    name = "dynamic_kv"
    pool = "avg"
    window: int = 8
    kernel: int = 7
    update_every: int = 4
    temp_factor: int = 10
    alloc: dict = field(default_factory=dict, repr=False)
    pending: set = field(default_factory=set, repr=False)   # layers of the chunk in flight, not re-allocated yet
    prefix_scores: dict = field(default_factory=dict, repr=False)   # layer -> its chunk's candidates, uncut
    decode: str = "grow"

    def win(self, budget: int) -> int:
        return min(self.window, max(1, budget // 2))  # a budget below the window keeps half for the window

    def recent_tokens(self, budget):
        """The window, however small the budget a layer is given (its allocation comes on top of the window)."""
        return self.window if budget is None else min(self.window, budget)

    def layer_budget(self, layer_idx, n_layers, budget):
        w = self.win(budget)
        base = max(1, budget - w)
        if layer_idx in self.alloc:
            return self.alloc[layer_idx] + w
        if layer_idx in self.pending:  # temporary budget while the chunk's later layers have not run
            return self.temp_factor * base + w
        return budget

    def observe(self, layer, query, scaling):
        if layer.n_new > 1:
            self.alloc.pop(layer.layer_idx, None)  # a new prefill chunk: temporary budget until re-allocation
            self.pending.add(layer.layer_idx)
            # the window's mean equals its sum up to the same factor in every layer: the global top-k is unchanged
            layer.extras["score"] = pooled_window_scores(layer, query, scaling, self.window, self.kernel)
            # the candidates of the global top-k: every stored entry outside the protected window, before the layer
            # is cut to its temporary budget
            self.prefix_scores[layer.layer_idx] = layer.extras["score"].masked_fill(
                layer.protected() | ~layer.valid, float("-inf")).flatten(1)
        else:
            self.rescore_on_decode(layer, query, scaling)

    def score(self, layer):
        return layer.extras.get("score", torch.zeros_like(layer.positions, dtype=torch.float))

    def on_layer_done(self, cache, layer_idx):
        layer = cache.layers[layer_idx]
        last = layer_idx == cache.num_layers - 1
        # a prompt chunk allocates; so does a one-token update while the layers still hold their temporary budgets
        # (a prompt whose longer chunks fitted the budget and whose last tokens came one at a time)
        if (layer.n_new <= 1 and layer_idx not in self.pending) or \
                not ((layer_idx + 1) % self.update_every == 0 or last) or cache.fits():
            return
        budget = cache.budget_tokens
        base = max(1, budget - self.win(budget))
        layers = cache.layers[:layer_idx + 1]
        H = layer.keys.shape[1]
        # candidate scores stacked over layers, heads and tokens (layers may sit on several devices)
        flat = [self.prefix_scores[i].to(layer.device) for i in range(len(layers))]
        sizes = [f.shape[1] for f in flat]
        stacked = torch.cat(flat, dim=1)  # (B, sum of H x S_l)
        k = min(base * H * len(layers), stacked.shape[1])
        top = stacked.topk(k, dim=1).indices
        bounds = torch.tensor([0] + sizes, device=top.device).cumsum(0)
        hits = torch.stack([((top >= bounds[i]) & (top < bounds[i + 1])).sum() for i in range(len(layers))]).float()
        for i, b in enumerate(largest_remainder(hits.tolist(), base * cache.num_layers)):
            self.alloc[i] = b  # may be 0: the layer keeps only its window
            self.pending.discard(i)
            layers[i].compress(self.layer_budget(i, cache.num_layers, budget))


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integers proportional to `weights` that sum exactly to `total`."""
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    w = sum(weights)
    raw = [x * total / w for x in weights]
    out = [math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[:total - sum(out)]:
        out[i] += 1
    return out


def rocketkv_params(S: int, B: int, max_new: int, head_dim: int) -> dict:
    """RocketKV's budget split (NVlabs/RocketKV, `get_params_for_token_budget`), S the sequence length with the
    generation (prompt + max_new): B = min(B, S), c = S / B, alpha = min(0.2 + 0.06 log2 c, 0.8), capacity
    C = int(S / c^alpha), prompt budget min(S - max_new, C - max_new), top-k min(round(B / 2), C), c2 = C / B,
    chunk g = min(floor c2, ceil sqrt c2), channels r = round(d g / c2) within [1, d]."""
    B = min(S, B)
    c = max(S / B, 1.0)
    alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
    C = int(S / c ** alpha)
    c2 = max(1.0, C / B)
    g = min(math.floor(c2), math.ceil(math.sqrt(c2)))
    r = min(head_dim, max(1, round(head_dim * g / c2)))
    return {"alpha": alpha, "capacity": C, "prompt_budget": min(S - max_new, C - max_new),
            "topk": min(round(B / 2), C), "chunk": g, "channels": r}


def hybrid_select(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, r: int, g: int, k: int,
                  scaling: float, n_tokens: int | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RocketKV stage 2 for one decode query (NVlabs/RocketKV, `rocket_attn`). q (B, Hkv, G, D); kmin/kmax
    (B, Hkv, n_chunks, D), the element-wise min/max of each chunk of g keys (the last chunk may be partial). The top-r
    channels by |q| summed over the GQA group; per chunk the upper bound of q.k over them, taking max where the
    group's summed q is positive and min where it is negative; each token gets its chunk's bound, softmaxed per head
    with SparQ's temperature sqrt(d sum|q_r| / sum|q|), summed over the group. Returns the indices (B, Hkv, k) of the
    top k tokens, exactly k (fewer only when fewer tokens are stored)."""
    D, G, nC = q.shape[-1], q.shape[2], kmin.shape[2]
    n = nC * g if n_tokens is None else n_tokens
    chan = q.abs().sum(2).topk(r, dim=-1).indices  # (B, Hkv, r)
    qr = q.gather(-1, chan[:, :, None, :].expand(-1, -1, G, -1))  # (B, Hkv, G, r)
    idx = chan[:, :, None, :].expand(-1, -1, nC, -1)
    upper = qr.sum(2, keepdim=True) > 0  # (B, Hkv, 1, r): the group's sign per channel
    bound = torch.where(upper, kmax.gather(-1, idx), kmin.gather(-1, idx))  # (B, Hkv, nC, r)
    approx = (qr @ bound.transpose(-1, -2)).repeat_interleave(g, dim=-1)[..., :n]  # (B, Hkv, G, n)
    if valid is not None:
        approx = approx.masked_fill(~valid[:, :, None, :n], float("-inf"))
    temp = torch.sqrt(D * qr.abs().sum(-1, keepdim=True) / q.abs().sum(-1, keepdim=True).clamp(min=1e-9))
    probs = torch.softmax(approx.float() / temp, dim=-1).sum(2)  # (B, Hkv, n)
    return probs.topk(min(k, n), dim=-1).indices.sort(-1).values


@register_method
@dataclass
class RocketKV(DecodePolicy, KVMethod):
    """RocketKV (Behnam et al., arXiv 2502.14051; NVlabs/RocketKV): two stages.

    Stage 1, SnapKV++ (prefill, permanent): the last 32 queries' softmax attention summed over the window and over
    the GQA group (selection per KV head), max-pooled with kernel 63; keep the top prompt-budget - window plus the
    window. Stage 2, hybrid sparse attention at every decode step (`hybrid_select`): element-wise min/max of K per
    chunk of g tokens, top-r channels by the group's |q|, approximate scores, exactly the top-k tokens (k = B/2),
    exact attention over those. C, the prompt budget, k, g and r come from `rocketkv_params` with S = the prompt's
    length + `max_new_tokens` (the harness passes the task's generation length). The cache holds up to C entries
    (more than B) plus the chunk min/max: B is the number of tokens read per decode step, and the reported bytes say
    what is held."""
    name = "rocket_kv"
    pool, group_reduce = "max", "sum"
    window: int = 32
    kernel: int = 63
    max_new_tokens: int = 32
    params: dict = field(default_factory=dict, repr=False)
    aux: dict = field(default_factory=dict, repr=False)   # layer -> (kmin, kmax, tokens covered)
    phase: dict = field(default_factory=dict, repr=False)
    decode: str = "grow"

    def fast_path_refusal(self):
        return "its decode attention is sparse (stage 2), which the slots do not implement"

    def recent_tokens(self, budget):
        return self.window

    def split(self) -> dict:
        if not self.params:
            layer0 = self.cache.layers[0]
            S = (self.cache.context_length or layer0.cumulative_length) + self.max_new_tokens
            self.params = rocketkv_params(S, self.cache.budget_tokens, self.max_new_tokens, layer0.keys.shape[-1])
        return self.params

    def layer_budget(self, layer_idx, n_layers, budget):
        p = self.split()
        if self.phase.get(layer_idx) == "prefill":
            # the official code needs prompt budget > window; tiny budgets get at least the window, never above C
            return min(p["capacity"], max(self.window + 1, p["prompt_budget"]))
        return p["capacity"]

    def observe(self, layer, query, scaling):
        self.phase[layer.layer_idx] = "prefill" if layer.n_new > 1 else "decode"
        if layer.n_new > 1:
            layer.extras["score"] = pooled_window_scores(layer, query, scaling, self.window, self.kernel,
                                                         pool="max", group_reduce="sum")
        else:
            self.rescore_on_decode(layer, query, scaling)

    def score(self, layer):
        return layer.extras.get("score", torch.zeros_like(layer.positions, dtype=torch.float))

    def on_layer_done(self, cache, layer_idx):
        layer = cache.layers[layer_idx]
        if cache.budget_tokens is not None and (layer.n_new > 1 or self.aux.get(layer_idx, (0, 0, -1))[2]
                                                != layer.stored_length()):
            self.build_aux(layer_idx, layer.keys)

    def build_aux(self, layer_idx, keys):
        """The element-wise min and max of every chunk of g stored keys, the last chunk partial (as the official
        cache pads it with +inf / -inf); chunks of one token need nothing beyond the keys."""
        g, n, keys = self.split()["chunk"], keys.shape[2], keys.detach()
        if g == 1:
            self.aux[layer_idx] = (None, None, n)
            return
        pad = -n % g
        lo = F.pad(keys, (0, 0, 0, pad), value=float("inf")).unflatten(2, ((n + pad) // g, g)).amin(3)
        hi = F.pad(keys, (0, 0, 0, pad), value=float("-inf")).unflatten(2, ((n + pad) // g, g)).amax(3)
        self.aux[layer_idx] = (lo, hi, n)

    def extend_aux(self, layer_idx, key):
        """One more key (B, H, 1, D) after the n covered: into the last chunk's min / max, or a chunk of its own."""
        lo, hi, n = self.aux[layer_idx]
        key = key.detach()   # a selection summary: no gradient goes through it
        if lo is not None:
            if n % self.split()["chunk"]:
                torch.minimum(lo[:, :, -1:], key, out=lo[:, :, -1:])
                torch.maximum(hi[:, :, -1:], key, out=hi[:, :, -1:])
            else:
                lo, hi = torch.cat([lo, key], 2), torch.cat([hi, key], 2)
        self.aux[layer_idx] = (lo, hi, n + 1)

    def aux_nbytes(self, layer):
        a = self.aux.get(layer.layer_idx)
        return 0 if a is None or a[0] is None else a[0].nbytes + a[1].nbytes

    def attend(self, layer, module, query, keys, values, mask, scaling):
        if layer.n_new != 1 or layer.cache.fits() or keys.shape[2] <= self.split()["topk"]:
            return super().attend(layer, module, query, keys, values, mask, scaling)
        p = self.split()
        covered = self.aux.get(layer.layer_idx, (0, 0, -1))[2]
        if covered == keys.shape[2] - 1:   # this step's key joins its chunk, as the official cache's update does
            self.extend_aux(layer.layer_idx, keys[:, :, -1:])
        elif covered != keys.shape[2]:
            self.build_aux(layer.layer_idx, keys)
        kmin, kmax, _ = self.aux[layer.layer_idx]
        if kmin is None:
            kmin = kmax = keys
        B, Hq, _, D = query.shape
        Hkv = keys.shape[1]
        q = query.view(B, Hkv, Hq // Hkv, D)
        idx = hybrid_select(q, kmin, kmax, p["channels"], p["chunk"], p["topk"], scaling, keys.shape[2], layer.valid)
        k_sel = keys.gather(2, idx[..., None].expand(-1, -1, -1, D))
        v_sel = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
        ok = layer.valid.gather(2, idx)
        m = repeat_heads(ok, Hq // Hkv)[:, :, None, :]
        return F.scaled_dot_product_attention(query, repeat_heads(k_sel, Hq // Hkv), repeat_heads(v_sel, Hq // Hkv),
                                              attn_mask=m, scale=scaling)

"""ATSKV: trained token relevance, an adaptive threshold controller, and optionally the external memory
(external_memory.py). Its plain-path scoring and its fast-path slot step (`slot_step`) are both here."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache_framework import (METHODS, KVMethod, current_hidden, current_input_ids, gather_entries, protection, put,
                             put_rows, repeat_heads, rope, window_attention)
from external_memory import (PassiveStore, attention_lse, host_mapped, max_pool_positions, merge_attention,
                             quantize_int8, step_recall, step_votes, top_entries)
from relevance_predictor import AttentionStatisticsExtractor, HandcraftedFeatureExtractor
from utils import UserError, head_size


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
        counts = keep.sum(-1).float()
        n_keep, kept_mean = torch.stack([counts.max(), counts.mean()]).tolist()   # one wait for the device, not two
        k = max(1, min(budget, int(n_keep)))
        # protected first, then the kept by r; a row that kept fewer than k is topped up with its most relevant others
        score = torch.where(keep, r.float(), r.float() - 4.0).masked_fill(protected, float("inf"))
        idx = score.topk(k, dim=-1).indices.sort(-1).values
        kept_frac = kept_mean / S
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
    recall_share: float = 0.0         # read-time recall: a forward of several tokens (a prompt chunk, the question)
                                      #   pins this share of the layer budget to the spans its queries attend to
                                      #   most, promoting them from the passive store (`recall_spans`); 0: off
    recall_span: int = 1              #   the votes (read-time and per-step) are max-pooled over this many
                                      #   neighbouring positions, so that a fact's neighbours come back with it
    recall_window: int = 64           #   the forward's last this-many queries vote
    recall_shared: bool = False       #   one choice of spans for all the layer's KV heads (their votes summed)
    recall_tokens: float = 0.5        # per-step recall: tokens recalled per step, a fraction of the active budget,
    recall_every: int = 1             #   every this many decode steps, counted from the first after a forward of
                                      #   several tokens; the steps between attend to what the last one recalled
                                      #   (0: never); without read-time recall the question's forward recalls too
    recall_step_tokens: float | None = None  # a decode step's recall only: this fraction of the budget (None:
                                      #   recall_tokens): a few entries chosen afresh each step instead of a held
                                      #   schedule's big recall (docs/design-recall-fast-path.md)
    recall_dims: int = 0              # a decode step's int8 scoring on this many of the head's dimensions (SparQ's
                                      #   r largest |q| components, `sparq_logits`): D / r times fewer key bytes
                                      #   scanned; 0: all of them
    recall_layers: int = 0            # decode steps recall only in this many layers, those with the strongest
                                      #   induction heads (`decode_recall_layers`); prompt chunks and the question
                                      #   recall in every layer; 0: every layer
    recall_choice: str = "own"        # a forward of several tokens (a prompt chunk, the question): "own": each query
                                      #   of each head attends to its own top recall_tokens x budget passive entries
                                      #   (top-k sparse attention over the store); "shared": the last `window`
                                      #   queries vote for one set (a decode step's one query always votes so)
    recall_scoring: str = "int8"      # "int8": q.k against an int8 copy of the passive keys kept on the device (a
                                      #   quarter of their bf16 bytes), only the chosen entries read from the host;
                                      #   "exact": against every passive key where it lives (host); "pages": Quest
    page_size: int = 16               #   min/max page summaries on the device (measured worse here, see README)
    passive_limit: int | None = None  # entries per layer the passive store may hold (None: unlimited)
    passive_device: bool = False      # the fast path's passive tier in device memory, for users who have the room
                                      #   (False: pinned host memory, read over the bus; the plain path's store
                                      #   is always on the host)
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
        if not 0.0 <= self.recall_share < 1.0:
            raise UserError(f"recall_share {self.recall_share!r}: accepted are fractions in [0, 1)")
        for name in ("recall_span", "recall_window", "recall_every", "recall_dims", "recall_layers"):
            v = getattr(self, name)
            lo = 0 if name in ("recall_every", "recall_dims", "recall_layers") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserError(f"{name} {v!r}: accepted are integers >= {lo}")
        tokens = self.recall_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0:
            raise UserError(f"recall_tokens {tokens!r}: accepted are fractions of the budget > 0")
        step = self.recall_step_tokens
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1):
            raise UserError(f"recall_step_tokens {step!r}: accepted are None and fractions in (0, 1]")
        if self.recall_choice not in ("own", "shared"):
            raise UserError(f"recall_choice {self.recall_choice!r}: accepted are 'own' and 'shared'")
        if not 0.0 < self.retrieval_share < 1.0:
            raise UserError(f"retrieval_share {self.retrieval_share!r}: accepted are fractions in (0, 1)")

    def attach_model(self, model, tokenizer=None):
        from relevance_predictor import load_or_train
        head = head_size(model.config.get_text_config(decoder=True))
        if self.recall_dims > head:
            raise UserError(f"recall_dims {self.recall_dims}: accepted are 0 (all) to {head} (the model's head size)")
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
            self.retrieval = induction_layers(model, self.retrieval_layers)
        if self.recall_layers > pred.n_layers:
            raise UserError(f"recall_layers {self.recall_layers}: accepted are 0 (all) to {pred.n_layers}")
        self.decode_recall = decode_recall_layers(model, self.recall_layers)
        self.controller = ThresholdController(pred.n_layers, fixed_threshold=self.fixed_threshold)
        self.counts = None
        self.passive: dict[int, PassiveStore] = {}
        self.steps = 0
        self.since_forward = -1   # decode steps before the current one since the last forward of several tokens
        self.held: dict = {}      # layer -> the last decode recall (Recalled), attended until the next one
        # bytes copied from the passive store to the device: by forwards of several tokens (read-time recall, or
        # per-step recall at a chunk) and by decode steps; decode_steps counts the one-token forwards
        self.recall_bytes = {"read": 0, "decode": 0, "decode_steps": 0}

    def recent_tokens(self, budget):
        """Protected recent tokens: n_recent, at most half the layer budget, and no more than a decode eviction's
        target leaves beside the sinks, so that what is protected is what an eviction keeps (else the plain path
        would drop protected entries in no particular order and the fast path would keep them beyond its slots)."""
        if budget is None:
            return self.n_recent
        return max(0, min(self.n_recent, budget // 2, self.decode_target(budget) - self.n_sink))

    def evict_to(self, layer, budget):
        """With `consensus`, nothing here: `on_layer_done` evicts every layer after the last one."""
        return None if self.consensus else self.keep_target(layer, budget)

    def keep_target(self, layer, budget):
        """A prefill chunk evicts to the budget. Decode step s (from 0 after the last chunk) evicts when
        s % evict_every == 0, to budget - evict_every + 1: the steps in between add one entry each and stay within
        the budget; a layer over its budget evicts at once (`evicts_now`)."""
        if layer.n_new > 1:
            return budget
        return self.decode_target(budget) if self.evict_every == 1 or self.evicts_now(layer, budget) else None

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

    def _rows_on(self, rows: tuple, device) -> torch.Tensor:
        """The pending windows' query rows as a device tensor, made once per pattern and device: a host-to-device
        copy of a fresh tensor waits for the device, at every evicting step of every layer."""
        cache = self.__dict__.setdefault("_rows_cache", {})
        key = (rows, str(device))
        if key not in cache:
            if len(cache) >= 64:   # prompt chunks of many lengths: keep it small
                cache.clear()
            cache[key] = torch.tensor(rows, device=device)
        return cache[key]

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
                or self.evicts_now(layer))

    def evicts_now(self, layer, budget=None) -> bool:
        """A decode step evicts every evict_every steps, and whenever the layer holds more than its budget (its
        budget is below evict_every, or a scheduled eviction fell while the whole cache still fit)."""
        budget = layer.budget() if budget is None else budget
        return layer.decode_steps % self.evict_every == 0 or budget is not None and layer.stored_length() > budget

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
        # (one index tensor and one attention for all of them: a plain-path decode step is bound by kernel launches)
        rows, offset = [], 0
        for win, _, _, q in pending:
            rows += range(offset + q - win.shape[2], offset + q)
            offset += q
        queries = torch.cat([p[0] for p in pending], 2)
        attn = window_attention(queries, layer.keys, layer.valid, n, scaling=self.scaling,
                                window=queries.shape[2], q_new_idx=self._rows_on(tuple(rows), layer.device))
        # each window's mean is added to the running statistic in turn, as the fast path adds each step's; a decode
        # step's window (one query) needs only its group mean, taken for all of them at once (the same sums)
        group_mean = attn.view(B, Hkv, -1, attn.shape[2], attn.shape[3]).mean(2) if len(pending) > 1 else None
        first = 0
        for j, (win, _, _, _) in enumerate(pending):
            w = win.shape[2]
            if j == len(pending) - 1:   # the last window's statistics are the features, as when it came
                mean, mx, spread = A.window_stats(attn[:, :, first:first + w], Hkv)
            else:
                mean = group_mean[:, :, first] if w == 1 else A.window_stats(attn[:, :, first:first + w], Hkv)[0]
            layer.extras["acc"] = layer.extras["acc"] + mean
            first += w
        a = A.features(mean, mx, layer.extras["acc"], spread)
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
        protected = layer.protected()
        if "pin" in layer.extras:  # the spans the last read-time recall chose stay until the next one
            layer.pad_extras()
            protected = protected | (layer.extras["pin"] > 0)
        return self.controller.select(layer.layer_idx, self.score(layer).masked_fill(~layer.valid, -1.0),
                                      protected, budget)

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
        if self.recall_scoring not in ("exact", "int8", "pages"):
            from utils import UserError
            raise UserError(f"recall_scoring {self.recall_scoring!r}: accepted are 'exact', 'int8' and 'pages'")
        page = self.page_size if self.recall_scoring == "pages" else 1
        if layer.layer_idx not in self.passive:
            self.passive[layer.layer_idx] = PassiveStore(page, self.passive_limit, layer.device.type == "cuda",
                                                         int8_keys=self.recall_scoring == "int8")
        take = lambda t: gather_entries(t, idx)  # noqa: E731
        extras = {n: take(t) for n, t in layer.extras.items() if n in ("tok", "h", "acc")} if self.promote else None
        self.passive[layer.layer_idx].add(take(layer.keys), take(layer.values), take(layer.positions),
                                          take(layer.valid), extras)

    def attend(self, layer, module, query, keys, values, mask, scaling):
        store = self.passive.get(layer.layer_idx) if self.external_memory else None
        if layer.layer_idx == 0:
            self.steps += 1
            self.recall_bytes["decode_steps"] += layer.n_new == 1
            self.since_forward = -1 if layer.n_new > 1 else self.since_forward + 1
        if store is not None and layer.n_new > 1 and self.recall_share > 0:
            keys, values, mask = self.recall_spans(layer, store, query, keys, values, mask, scaling)
            return super().attend(layer, module, query, keys, values, mask, scaling)
        due = layer.n_new > 1 or (self.recall_every > 0 and self.since_forward % self.recall_every == 0
                                  and layer.layer_idx in self.decode_recall)
        held = self.held.pop(layer.layer_idx, None)
        if store is None or (store.size == 0 and store.pend is None) or not due:
            if held is None or layer.n_new > 1:
                return super().attend(layer, module, query, keys, values, mask, scaling)
            self.held[layer.layer_idx] = held   # a decode step between recalls: the last recall's entries again
            return self._attend_with(held, query, keys, values, mask, scaling)
        n_tok = max(store.page_size, int(self.recall_fraction(layer.n_new) * (layer.budget() or keys.shape[2])))
        own = self.recall_choice == "own" and layer.n_new > 1
        rec = store.recall(query if own else query[:, :, -self.window:], n_tok // store.page_size,
                           self.recall_span, per_query=own,
                           dims=self.recall_dims if layer.n_new == 1 else 0)   # the copy starts (side stream)
        B, Hq, q, _ = query.shape
        if layer.n_new > 1:  # a forward of several tokens: one attention over the recalled and the active entries
            rec.wait()
            self.recall_bytes["read"] += rec.k.nbytes + rec.v.nbytes
            active = mask if mask is not None else torch.ones((B, Hq, q, keys.shape[2]), dtype=torch.bool,
                                                              device=keys.device)
            out = super().attend(layer, module, query, torch.cat([rec.k.to(keys.dtype), keys], 2),
                                 torch.cat([rec.v.to(values.dtype), values], 2),
                                 torch.cat([rec.mask(Hq, q), active], -1), scaling)
        else:  # a decode step: the active cache's attention while the copy runs, merged with the recalled part's
            out = self._attend_with(rec, query, keys, values, mask, scaling)
            self.recall_bytes["decode"] += rec.k.nbytes + rec.v.nbytes
            if self.recall_every > 1 and not self.promote:
                self.held[layer.layer_idx] = rec
        self.last_recall = rec.k.shape[2]
        if self.promote and store.k is not None and store.page_size == 1:
            self._promote(layer, store, rec)
        return out

    def recall_fraction(self, n_new: int) -> float:
        """Entries a recall brings per KV head, a fraction of the layer budget: recall_step_tokens at a decode step
        (when set), else recall_tokens."""
        return self.recall_step_tokens if n_new == 1 and self.recall_step_tokens is not None else self.recall_tokens

    @staticmethod
    def _attend_with(rec, query, keys, values, mask, scaling):
        """A decode step's attention over the active entries merged (log-sum-exp) with that over recalled ones."""
        o1, lse1 = attention_lse(query, keys, values, mask, scaling)
        rec.wait()
        o2, lse2 = attention_lse(query, rec.k, rec.v, rec.mask(query.shape[1], query.shape[2]), scaling)
        return merge_attention(o1, lse1, o2, lse2).to(query.dtype)

    def recall_slots(self, layer) -> int:
        """Entries a read-time recall pins: recall_share of the layer budget, leaving room for the sinks, the
        recent window and the decode steps until the next eviction."""
        budget = layer.budget()
        if budget is None:
            return 0
        room = budget - self.n_sink - self.recent_tokens(budget) - self.evict_every
        return max(0, min(int(self.recall_share * budget), room))

    def recall_spans(self, layer, store, query, keys, values, mask, scaling):
        """Read-time recall (issue 22): the last `recall_window` queries of this forward vote over every old
        entry of the layer, active or passive (each query's softmax over all of them, summed over the queries and
        the group's heads, as SnapKV's window votes); the votes are max-pooled over `recall_span` positions so that
        a fact is chosen whole; the top `recall_slots` positions are pinned (the controller keeps them until the
        next forward of several tokens), and those in the passive store are promoted into the active cache before
        this forward attends. Returns the keys, values and mask this forward attends over."""
        dev, q = keys.device, layer.n_new
        B, Hq, _, D = query.shape
        Hkv, S_old = keys.shape[1], keys.shape[2] - q
        layer.pad_extras()
        layer.extras["pin"] = torch.zeros(layer.positions.shape, device=dev)
        store.settle()
        R = self.recall_slots(layer)
        if R == 0 or store.k is None or S_old == 0:
            return keys, values, mask
        w = min(q, self.recall_window)
        qg = query[:, :, -w:].reshape(B, Hkv, Hq // Hkv, w, D).float()
        act = torch.einsum("bhgqd,bhnd->bhgqn", qg, keys[:, :, :S_old].float()) * scaling
        act = act.masked_fill(~layer.valid[:, :, None, None, :S_old], float("-inf"))
        pas = torch.einsum("bhgqd,bhnd->bhgqn", qg.to(store.k.device), store.k.float()) * scaling
        pas = pas.masked_fill(~store.valid[:, :, None, None], float("-inf")).to(dev)
        votes = torch.softmax(torch.cat([act, pas], -1), -1).nan_to_num(0.0).sum((2, 3))
        T = layer.cumulative_length
        pos = torch.cat([layer.positions[:, :, :S_old], store.pos.to(dev)], 2)
        dense = torch.zeros((B, Hkv, T), device=dev).scatter_add_(2, pos, votes)
        if self.recall_shared:
            dense = dense.sum(1, keepdim=True).expand(B, Hkv, T)
        if self.recall_span > 1:
            dense = max_pool_positions(dense, self.recall_span)
        dense = dense.clone()
        dense[..., :self.n_sink] = -1.0                                   # protected anyway
        dense[..., max(0, T - max(q, self.recent_tokens(layer.budget()))):] = -1.0
        top = dense.topk(min(R, T), dim=-1)
        chosen = torch.zeros((B, Hkv, T), dtype=torch.bool, device=dev).scatter_(2, top.indices, top.values > 0)
        layer.extras["pin"] = chosen.gather(2, layer.positions).float()
        take = chosen.gather(2, store.pos.to(dev)) & store.valid.to(dev)
        K = int(take.sum(-1).max())
        if K == 0:
            return keys, values, mask
        idx = take.float().topk(K, dim=-1).indices.sort(-1).values
        ok = take.gather(2, idx)
        idx_h, ok_h = idx.to(store.k.device), ok.to(store.k.device)
        k_new, v_new = (gather_entries(t, idx_h).to(dev, keys.dtype) for t in (store.k, store.v))
        store.valid.scatter_(2, idx_h, store.valid.gather(2, idx_h) & ~ok_h)  # the active copy is the live one
        self.recall_bytes["read"] += k_new.nbytes + v_new.nbytes
        layer.keys, layer.values = torch.cat([k_new, layer.keys], 2), torch.cat([v_new, layer.values], 2)
        layer.positions = torch.cat([gather_entries(store.pos, idx_h).to(dev), layer.positions], 2)
        layer.valid = torch.cat([ok, layer.valid], 2)
        for name, t in layer.extras.items():
            front = ok.to(t.dtype) if name == "pin" else t.new_zeros(t.shape[:2] + (K,) + t.shape[3:])
            layer.extras[name] = torch.cat([front, t], 2)
        if mask is not None:
            front = repeat_heads(ok, Hq // Hkv)[:, :, None, :].expand(B, Hq, q, K)
            mask = torch.cat([front, mask], -1)
        return layer.keys, layer.values, mask

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

    # -- the fast path's slot step (fast_decode.StaticDecoder; cache_framework.KVMethod's slot hooks) ------------
    def fast_path_refusal(self):
        if self.span > 1 or self.consensus:
            return "consensus and span > 1 are plain-path only: atskv without consensus, span 1"
        if self.external_memory and (self.recall_scoring != "int8" or self.promote or self.recall_every < 1
                                     or self.recall_share > 0 or self.passive_limit is not None):
            return ("its external memory has a fast path with int8 scoring and recall at decode steps only (no "
                    "promotion, read-time pinning or passive limit)")
        return None

    def slot_state(self, layer, max_steps):
        """The running attention statistic, the token ids, the write-time logit z0 of every entry (its static
        features and hidden state, `static_logit`) and the controller's delta; with external memory, the passive
        tier (`passive_tier`) of each layer that recalls at decode steps."""
        l, pred = layer.layer_idx, self.predictor
        co = self.slot_coefs()[l]
        z0 = static_logit(co, pred.token_flags, hidden_logit(co, layer.extras["h"]), layer.positions, layer.keys,
                          layer.values, layer.extras["tok"].long(), self.n_sink)
        # delta of shape (1,), not 0-dim: torch.compile loses an in-place write into a 0-dim CPU tensor
        per_layer = {"delta": torch.tensor([self.controller.delta[l]], dtype=torch.float64, device=layer.device)}
        if self.external_memory and self.recall_n(l):
            per_layer |= self.passive_tier(layer, max_steps + 1)
            if self.recall_every > 1:
                per_layer |= self.held_buffers(layer)
        elif self.external_memory:   # no recall here at decode steps (recall_layers): what it evicts is dropped
            self.passive.pop(l, None)
        return {"acc": layer.extras["acc"].float(), "tok": layer.extras["tok"].long(), "z0": z0}, per_layer

    def passive_tier(self, layer, room: int) -> dict:
        """The layer's passive tier for the fast path, indexed by position, with room for `room` positions after
        the last one read and a last position that is never valid (writes that move nothing go there). The keys
        and values "pk", "pv" (B, H, cap, D) of every position read so far, written through as each token arrives
        so that an eviction only marks its entries: in pinned host memory that the step reads over the bus
        (`host_mapped`), or on the device with passive_device (and off CUDA). On the device: their int8 copies "pq"
        (B, H, D, cap: dimension by dimension, so that a scan of a few dimensions reads a few rows) and scales "ps",
        and "pok" (B, H, cap) uint8 (the recall kernels' form: a bool would be converted in every recalling layer
        and step): the position is in the passive store. The plain path's store is taken over (and let go)."""
        store = self.passive.pop(layer.layer_idx, None)
        B, H, _, D = layer.keys.shape
        dev, dt = layer.device, layer.keys.dtype
        parts = [(layer.keys, layer.values, layer.positions, layer.valid, None, None, False)]   # active, stored
        if store is not None:
            store.settle()
            if store.size_settled():
                parts.append((store.k, store.v, store.pos, store.valid, store.kq, store.kscale, True))
        cap = max(int(p[2].max()) for p in parts) + 1 + room + 1
        shapes = ((B, H, cap, D), (B, H, cap, layer.values.shape[-1]))
        if self.tier_on_device(dev):
            pk, pv = (torch.zeros(shape, dtype=dt, device=dev) for shape in shapes)
        else:
            pk, pv = (host_mapped(shape, dt, dev) for shape in shapes)
        t = {"pk": pk, "pv": pv, "pq": torch.zeros((B, H, D, cap), dtype=torch.int8, device=dev),
             "ps": torch.zeros((B, H, cap), device=dev), "pok": torch.zeros((B, H, cap), dtype=torch.uint8, device=dev),
             "pcount": torch.zeros((B, H), dtype=torch.int32, device=dev)}   # the recall kernels' scratch
        for k, v, pos, valid, kq, scale, stored in parts:   # the active entries quantised as an eviction would
            valid = valid.to(dev)
            where = torch.where(valid, pos.to(dev), cap - 1)
            tier_put(t, where, k, v, kq, scale)
            if stored:
                put_rows(t["pok"], where, valid.to(torch.uint8))
        t["pok"][..., -1] = 0
        return t

    def held_buffers(self, layer) -> dict:
        """recall_every > 1: the entries the last decode recall brought, attended until the next one: "rk", "rv"
        (B, H, R, D) and "rok" (B, H, R) uint8 on the device, R = recall_n; filled from the plain path's last recall.
        uint8 is the decode kernels' form: a bool would be converted at every step between recalls (a kernel a
        layer)."""
        B, H, _, D = layer.keys.shape
        R = self.recall_n(layer.layer_idx)
        dev, dt = layer.device, layer.keys.dtype
        t = {"rk": torch.zeros((B, H, R, D), dtype=dt, device=dev),
             "rv": torch.zeros((B, H, R, layer.values.shape[-1]), dtype=dt, device=dev),
             "rok": torch.zeros((B, H, R), dtype=torch.uint8, device=dev)}
        rec = self.held.pop(layer.layer_idx, None)
        if rec is not None:
            rec.wait()
            n = min(R, rec.k.shape[2])
            t["rk"][:, :, :n], t["rv"][:, :, :n], t["rok"][:, :, :n] = rec.k[:, :, :n], rec.v[:, :, :n], \
                rec.valid[:, :, :n].to(dev)
        return t

    def recall_n(self, layer_idx: int) -> int:
        """Entries a decode step recalls per KV head on the fast path: `recall_fraction` of the layer's budget (0 in
        a layer that does not recall at decode steps, `recall_layers`)."""
        if layer_idx not in self.decode_recall:
            return 0
        return max(1, int(self.recall_fraction(1) * self.cache.layer_budget(layer_idx)))

    def slot_evict_every(self) -> int:
        return self.evict_every

    def slot_recall_schedule(self):
        """recall_every, counted on from the plain path's decode steps since its last forward of several tokens."""
        return (self.recall_every, self.since_forward + 1) if self.external_memory else (1, 0)

    def tier_on_device(self, device) -> bool:
        return self.passive_device or torch.device(device).type != "cuda"

    def slot_coefs(self) -> list[dict]:
        if getattr(self, "_slot_coefs", None) is None:
            self._slot_coefs = logit_coefs(self.predictor)
        return self._slot_coefs

    def slot_shared_state(self):
        return {"counts": self.counts.clone()}

    def slot_layer_args(self, layer_idx, device):
        args = {"beta": torch.tensor(self.controller.beta[layer_idx], dtype=torch.float32, device=device),
                "co": self.slot_coefs()[layer_idx]}
        if self.external_memory:   # entries recalled a step, as `attend` recalls them (an int: a fixed shape)
            args["recall_n"] = self.recall_n(layer_idx)
        return args

    def slot_extra_entries(self, s):
        """Per-step recall (`attend` at a decode step): the query's group votes over the passive tier (a softmax
        over the entries per query head against their int8 keys, summed over the group) and the top recall_n
        entries of each KV head are attended beside the slots. With recall_every > 1 they are kept ("rk", "rv",
        "rok") and attended again on the steps until the next recall (s["recall"] False)."""
        if not self.external_memory or s["layer_args"]["recall_n"] == 0:
            return None
        st = s["state"]
        if "rk" in st and not s["recall"]:   # recall_every > 1, a step between recalls: the last recall's entries
            return st["rk"], st["rv"], st["rok"]
        n = min(s["layer_args"]["recall_n"], st["pok"].shape[-1])
        if self.recall_span > 1:   # the tier is indexed by position: the plain store's pooling is a max-pool
            q = rope(s["q"], s["cos"][:, :, None], s["sin"][:, :, None])[:, :, :, None]   # (B, H, G, 1, D)
            vote = step_votes(q, st["pq"], st["ps"], st["pok"], self.recall_dims)   # -1 where no entry
            idx = top_entries(max_pool_positions(vote, self.recall_span).masked_fill(st["pok"] == 0, -1.0), n)
            got = gather_entries(st["pk"], idx), gather_entries(st["pv"], idx), st["pok"].gather(2, idx)
        else:   # the query rotated as the kernels read it
            got = step_recall(s["q"][:, :, :, None], st["pq"], st["ps"], st["pok"], self.recall_dims, n, st["pk"],
                              st["pv"], st["pcount"], s["cos"], s["sin"])[1:]
        if "rk" not in st:
            return got
        for name, x in zip(("rk", "rv", "rok"), got):
            st[name].copy_(x)   # (the validity as 0 / 1)
        return st["rk"], st["rv"], st["rok"]

    def slot_extra_nbytes(self, state, layer_args):
        """Per step on average: a recall (every recall_every steps) reads the int8 keys and gathers the chosen
        entries from the tier; with recall_every > 1 every step reads the kept entries."""
        if "pk" not in state:   # no tier (no external memory, or no recall in this layer at decode steps)
            return super().slot_extra_nbytes(state, layer_args)
        B, H = state["pk"].shape[:2]
        k = self.recall_every
        r, D = self.recall_dims, state["pq"].shape[2]
        summaries = sum(state[n].nbytes for n in ("pq", "ps", "pok"))
        # a recall reads the int8 keys' scanned dimensions, the scales and the validity
        scanned = summaries - state["pq"].nbytes * (D - (r if 0 < r < D else D)) // D
        tier = state["pk"].nbytes + state["pv"].nbytes
        per_entry = (state["pk"].shape[-1] + state["pv"].shape[-1]) * state["pk"].element_size()
        recalled = B * H * layer_args["recall_n"] * per_entry
        held = sum(state[n].nbytes for n in ("rk", "rv", "rok") if n in state)
        on_device = self.tier_on_device(state["pk"].device)
        return {"device": summaries + held + (tier if on_device else 0), "host": 0 if on_device else tier,
                "device_read": (scanned + (recalled if on_device else 0)) // k + held,
                "host_read": 0 if on_device else recalled // k, "device_tier": tier if on_device else 0}

    def slot_state_repeated(self, state, batch):
        host = {k: state[k] for k in ("pk", "pv") if k in state and not self.tier_on_device(state[k].device)}
        out = super().slot_state_repeated({k: v for k, v in state.items() if k not in host}, batch)
        for k, t in host.items():   # a new host tier, filled on the device (the rows repeated)
            out[k] = host_mapped((batch,) + t.shape[1:], t.dtype, t.device)
            out[k].copy_(t.expand((batch,) + t.shape[1:]))
        return out

    def slot_write_through(self, s):
        """The new token's key and value into the passive tier at its position (and its int8 key), so that its
        eviction later only marks it. Called before anything in the step reads the tier: torch.compile keeps an
        index_put_ into a graph input in place only when nothing reads the input before it, and otherwise copies
        the whole tier twice (in pinned host memory, over the bus) every step that recalls."""
        B, H = s["k"].shape[:2]
        tier_put(s["state"], s["cur"][:, None, None].expand(B, H, 1), s["k"][:, :, None], s["v"][:, :, None])

    def slot_write_back(self, s):
        """evict_every > 1, at an evicting step: the entries written since the last eviction (the slots its free
        queue listed, this step's among them) into the passive tier at their positions, before this step's
        eviction can free them; the steps between write nothing there. Called, as slot_write_through, before
        anything in the step reads the tier."""
        st = s["state"]
        slots = st["queue"]                                      # (B, H, evict_every)
        ok = s["present"].gather(2, slots) & s["valid"].gather(2, slots)   # a slot no step has filled yet: skipped
        where = torch.where(ok, s["pos"].gather(2, slots), st["pk"].shape[2] - 1)
        tier_put(st, where, gather_entries(s["keys"], slots), gather_entries(s["values"], slots))

    def slot_offload(self, s, before):
        """The entries this step's eviction freed (present before, not now) join the passive tier: their positions
        are marked (their keys and values are there already: `slot_write_through`)."""
        st = s["state"]
        freed = before & ~s["present"] & s["valid"]
        put_rows(st["pok"], torch.where(freed, s["pos"], st["pok"].shape[-1] - 1), freed.to(torch.uint8))
        st["pok"][..., -1] = 0   # the last position took what was not marked

    def slot_consts(self):
        return {"flags": self.predictor.token_flags, "gain": self.controller.gain, "fixed": self.controller.fixed}

    def slot_wants_probs(self, evict):
        return evict

    def slot_before_attention(self, s):
        """A new entry's running statistic starts at 0; a step that does not evict only adds its attention to it
        (inside decode_attention)."""
        acc, slot = s["state"]["acc"], s["slot"]
        put(acc, slot, torch.zeros(slot.shape[:2], dtype=acc.dtype, device=acc.device))
        if "pk" in s["state"]:   # the passive tier, before the recall reads it: see slot_write_through
            if "queue" not in s["state"]:
                self.slot_write_through(s)
            elif s["evict"]:
                self.slot_write_back(s)
        return None if s["evict"] else acc

    def slot_step(self, s):
        """`observe` + `select` on one layer's slots: the new entry's write-time logit every step; when s["evict"]
        (evict_every's schedule), this step's attention statistics, every entry re-scored and the threshold
        controller's decision (`controller_keep`), keeping at most layer_args["keep"] entries. On CUDA the eviction
        kernels also hide the freed slots in the bias and list the next free ones in the queue; returns True then."""
        from kernels import evict_kernels   # here, not at import: Triton loads only for the fast path
        st, la, c, slot = s["state"], s["layer_args"], s["consts"], s["slot"]
        present, valid, pos, seen, co = s["present"], s["valid"], s["pos"], s["seen"], la["co"]
        B, H = s["k"].shape[:2]
        new_tok = s["tok"][:, None].expand(B, H)
        hz = step_hidden_logit(co, s["h"])[:, None, None].expand(B, H, 1)
        z0 = static_logit(co, c["flags"], hz, s["cur"][:, None, None].expand(B, H, 1), s["k"][:, :, None],
                          s["v"][:, :, None], new_tok[..., None], c["n_sink"])
        put(st["z0"], slot, z0[..., 0])
        put(st["tok"], slot, new_tok)
        if not s["evict"]:   # decode_attention added the step's attention to acc
            return False
        over = (present[0, 0].sum() > la["keep"]) & (seen[0] > c["budget_tokens"])
        prot = protection(present, pos, seen, c["n_sink"], la["n_recent"])
        probs, acc, counts = s["probs"], st["acc"], s["counts"]
        before = present.clone() if "pk" in st else None   # the freed entries go to the passive tier
        if evict_kernels.available(present):   # the scoring, the decision, the bias and the queue in three kernels
            r = evict_kernels.relevance(probs, acc, st["z0"], pos, st["tok"], counts, valid, seen, co["dyn"])
            evict_kernels.controller_evict(r, prot, present, valid, s["bias"], st.get("queue"), la["keep"], la["beta"],
                                           st["delta"], c["gain"], c["fixed"], over, c["hidden"])
            if before is not None:
                self.slot_offload(s, before)
            return True
        _, _, G, N = probs.shape   # the one new query's attention, as a window of one query over the group's heads
        mean, mx, spread = AttentionStatisticsExtractor.window_stats(probs.reshape(B, H * G, 1, N), H)
        acc += mean
        freq = counts.gather(1, st["tok"].flatten(1)).view(st["tok"].shape)
        r = torch.sigmoid(st["z0"] + dynamic_logit(co, pos, seen[:, None, None], mean, mx, acc, spread, freq))
        r = r.masked_fill(~valid, -1.0)
        kept, new_delta = controller_keep(r, prot, present, la["keep"], la["beta"], st["delta"], c["gain"], c["fixed"])
        st["delta"].copy_(torch.where(over, new_delta, st["delta"]))
        present.copy_(torch.where(over, kept, present))
        if before is not None:
            self.slot_offload(s, before)
        return False

    def aux_nbytes(self, layer):
        store = self.passive.get(layer.layer_idx) if self.external_memory else None
        return 0 if store is None else store.device_nbytes()


METHODS["atskv"] = ATSKV


def induction_layers(model, k: int) -> set[int]:
    """The k layers with the strongest induction heads, a layer's score its KV heads' mean
    (`relevance_predictor.induction_scores`, measured once per model)."""
    from relevance_predictor import induction_scores
    return set(induction_scores(model).mean(1).topk(k).indices.tolist())


def decode_recall_layers(model, k: int) -> set[int]:
    """The layers whose decode steps recall (`recall_layers`): the k `induction_layers`, as `retrieval_layers` picks
    them; every layer when k is 0. Retrieval from context is the work of a few such heads (RazorAttention, Tang et
    al. 2024; DuoAttention, Xiao et al. 2024), so recalling only there would save most of the recall's cost (on
    the default model it loses answers: results/recall-step-cheap-cpu)."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return set(range(n)) if k == 0 or k >= n else induction_layers(model, k)


# -- the fast path's tensor forms ------------------------------------------------------------------------------------

def tier_put(st: dict, where, k, v, kq=None, scale=None) -> None:
    """Keys and values k, v (B, H, n, D) into the passive tier's "pk", "pv" at positions where (B, H, n), and their
    int8 copies (quantize_int8's, made here unless given) into "pq", "ps" (ATSKV.passive_tier)."""
    if kq is None:
        kq, scale = quantize_int8(k)
    for name, x in (("pk", k), ("pv", v), ("ps", scale[..., 0])):
        put_rows(st[name], where, x.to(st[name].device, st[name].dtype))   # (a no-op within a step)
    pq = st["pq"]   # (B, H, D, cap): dimension by dimension, so that a scan of r dimensions reads r rows
    B, H, D, _ = pq.shape
    ar = lambda n, dim: torch.arange(n, device=pq.device).view([-1 if i == dim else 1 for i in range(4)])  # noqa: E731
    pq.index_put_((ar(B, 0), ar(H, 1), ar(D, 2), where.to(pq.device)[:, :, None]),
                  kq.to(pq.device).transpose(2, 3))


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

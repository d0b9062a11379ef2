"""ATSKV's external memory: a passive store per layer in host memory for what the active cache evicts, and recall of
the entries the current queries need into attention (merged with the active cache's attention by log-sum-exp)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cache_framework import gather_entries, repeat_heads, rope


class PassiveStore:
    """One layer's evicted KV (CPU memory, pinned when CUDA is present). Recall copies the entries the current
    queries need to the device for the current attention call; each query votes with a softmax over the candidates,
    summed over the queries and the group's heads, and the top candidates are taken per KV head.

    page_size 1 ("exact" scoring): candidates are single entries scored by q.k against the passive keys where they
    live (host memory: no device summaries). page_size 1 with int8_keys ("int8" scoring): the same candidates
    scored on the device against an int8 copy of every passive key (one scale per entry and head: a quarter of the
    keys' bf16 bytes), so that only the chosen entries are read from the host. page_size > 1 ("pages", Quest):
    candidates are pages of `page_size` evicted entries, scored by the upper bound of q.k from the element-wise
    min/max of their keys, kept on the device.

    On CUDA both directions are asynchronous on a side stream (`stream`): an eviction's device-to-host copy into
    pinned memory runs while the model computes on (the host side waits for it only when it next reads the store),
    and a recall's host-to-device copy runs while the attention over the active cache is computed (`Recalled.wait`
    makes the compute stream wait for it just before the recalled entries are used)."""

    def __init__(self, page_size: int = 16, limit: int | None = None, use_stream: bool = False,
                 int8_keys: bool = False):
        self.page_size, self.limit, self.use_stream, self.int8_keys = page_size, limit, use_stream, int8_keys
        self.kq = self.kscale = self.kvalid = None       # int8 keys, their scales and validity (device, int8_keys)
        self.k = self.v = self.pos = self.valid = None   # (B, H, N, D) / (B, H, N) on the host
        self.extras: dict[str, torch.Tensor] = {}        # per-entry method state kept with the entry (promotion)
        self.kmin = self.kmax = None                     # (B, H, N_pages, D) on the device
        self.pend = None                                 # entries not yet forming a whole page (device)
        self.pend_extras: dict[str, torch.Tensor] = {}
        self.chunks: list[tuple] = []                    # offloads in flight: (host tensors, extras, done event)
        self._buf: dict[str, torch.Tensor] = {}          # host buffers with spare capacity; k, v, ... are views
        self.size = 0                                    # entries held, tombstones included
        self.dead = 0                                    # tombstones per row: entries promoted out (remove_recalled)

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
        cat = lambda a, b: b if a is None else torch.cat([a, b], 2)  # noqa: E731
        if P > 1:
            pages = k.unflatten(2, (-1, P))
            self.kmin, self.kmax = cat(self.kmin, pages.amin(3)), cat(self.kmax, pages.amax(3))
        if self.int8_keys:
            kq, scale = quantize_int8(k)
            self.kq, self.kscale, self.kvalid = cat(self.kq, kq), cat(self.kscale, scale), cat(self.kvalid, valid)
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
            self._keep(lambda t: t[:, :, drop:])
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

    def _keep(self, take):
        """Apply `take` (per-entry tensor -> the entries kept) to every per-entry field, the int8 keys included."""
        self.k, self.v, self.pos, self.valid = (take(t) for t in (self.k, self.v, self.pos, self.valid))
        if self.kq is not None:
            self.kq, self.kscale, self.kvalid = (take(t) for t in (self.kq, self.kscale, self.kvalid))
        self.extras = {n: take(t) for n, t in self.extras.items()}
        self._buf = {}  # compacted: the next settle starts new buffers

    def recall(self, query: torch.Tensor, n_pages: int, span: int = 1, per_query: bool = False,
               dims: int = 0) -> "Recalled":
        """query (B, H_q, q, D) -> the recalled entries (B, H_kv, n, D), on their way to the device
        (`Recalled.wait()` before use).

        Shared choice (per_query False): the queries vote (each a softmax over the candidates, summed over the
        queries and the group's heads) and the top n_pages pages (P entries each) of each KV head come back; span > 1
        (exact scoring) max-pools each entry's vote over `span` neighbouring positions, so that the neighbours of a
        strongly voted entry come back with it.
        Own choice (per_query True, exact and int8 scoring): every query of every query head takes its own top
        n_pages entries by q.k, the union comes back, and each query attends only to its own choice
        (`Recalled.qmask`): top-k sparse attention over the store, for a forward of many tokens (a prompt chunk)
        whose queries look for different things.
        dims (int8 scoring, shared choice): score on that many of the D dimensions (`sparq_logits`); 0: all."""
        self.settle()
        dev = query.device
        if self.k is None:
            self.last_positions = self.pend[2].cpu()
            return Recalled(self.pend[0], self.pend[1], self.pend[3], None, None)
        B, Hq, q, D = query.shape
        Hkv = self.k.shape[1]
        if self.kq is not None and 0 < dims < D and not per_query:   # on a few of the dimensions (SparQ)
            ub = sparq_logits(query.view(B, Hkv, Hq // Hkv, q, D), self.kq, self.kscale[..., 0], self.kvalid, dims)
        elif self.kq is not None:  # q.k against the int8 keys on the device
            ub = int8_logits(query.view(B, Hkv, Hq // Hkv, q, D), self.kq, self.kscale[..., 0], self.kvalid)
        elif self.page_size == 1:  # exact q.k where the keys live
            qg = query.view(B, Hkv, Hq // Hkv, q, D).to(self.k.device, torch.float32)
            ub = torch.einsum("bhgqd,bhnd->bhgqn", qg, self.k.float())
            ub = ub.masked_fill(~self.valid[:, :, None, None, :], float("-inf"))
        else:
            qg = query.view(B, Hkv, Hq // Hkv, q, D).float()
            # upper bound of q.k over a page: per channel, q times the page's max (q > 0) or min (q < 0)
            ub = torch.maximum(qg[..., None, :] * self.kmin[:, :, None, None].float(),
                               qg[..., None, :] * self.kmax[:, :, None, None].float()).sum(-1)  # (B,Hkv,G,q,pages)
        if per_query and self.page_size == 1:
            idx, qmask = own_choices(ub, n_pages)
            return self._fetch(idx.cpu(), dev, qmask.reshape(B, Hq, q, -1).to(dev))
        page_score = group_votes(ub, D)
        if span > 1 and self.page_size == 1:
            invalid = ~self.valid.to(page_score.device)
            page_score = pooled_by_position(page_score, self.pos, span).masked_fill(invalid, -1.0)
        n_pages = min(n_pages, page_score.shape[-1])
        if span > 1 and self.page_size == 1:
            pages = top_entries(page_score, n_pages, self.pos).sort(-1).values.cpu()
        else:
            pages = page_score.topk(n_pages, dim=-1).indices.sort(-1).values.cpu()
        P = self.page_size
        return self._fetch((pages[..., None] * P + torch.arange(P)).flatten(-2), dev)  # (B, Hkv, n_pages x P)

    def _fetch(self, idx: torch.Tensor, dev, qmask=None) -> "Recalled":
        """Entries idx (B, H_kv, n) (host) of the store, on their way to the device."""
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
        return Recalled(k, v, valid, self.pend, done, qmask)

    def remove_recalled(self) -> None:
        """Take the entries of the last recall out of the store (they were promoted into the active cache): they
        become tombstones, invalid from now on, so that a promoting step costs O(recalled), not a copy of the whole
        store; once tombstones make up half of the store it is compacted (amortised O(1) an entry)."""
        idx = self.last_idx
        self.valid.scatter_(2, idx, False)
        if self.kvalid is not None:
            self.kvalid.scatter_(2, idx.to(self.kvalid.device), False)
        self.dead += idx.shape[2]   # distinct entries, as many in every row
        if 2 * self.dead > self.size:
            self.compact()

    def compact(self) -> None:
        """Drop the tombstones (and entries that were never valid), keeping the stored order; a row with fewer
        valid entries than another keeps some invalid ones, so that every row holds as many."""
        valid = self.valid
        n = max(1, int(valid.sum(-1).max()))
        keep = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., :n].sort(-1).values   # valid first, in order
        self._keep(lambda t: gather_entries(t, keep.to(t.device)))
        self.size, self.dead = n, 0

    def nbytes(self) -> int:
        held = [(self.k, self.v)] + [(h[0], h[1]) for h, _, _ in self.chunks]
        return sum(k.nbytes + v.nbytes for k, v in held if k is not None)

    def device_nbytes(self) -> int:
        pend = 0 if self.pend is None else self.pend[0].nbytes + self.pend[1].nbytes
        int8 = 0 if self.kq is None else self.kq.nbytes + self.kscale.nbytes + self.kvalid.nbytes
        return pend + int8 + (0 if self.kmin is None else self.kmin.nbytes + self.kmax.nbytes)


def int8_logits(q: torch.Tensor, kq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """q (B, H_kv, G, q, D) against int8 keys kq (B, H_kv, N, D) with their scales (B, H_kv, N) -> q.k
    (B, H_kv, G, q, N) float32, -inf where an entry is not valid. The scales multiply the N scores, not the keys.
    A few queries a KV head on CUDA go to a Triton kernel (kernels/recall_kernels.py), for which this is the
    tensor form."""
    from kernels import recall_kernels   # here, not at import: Triton loads only where it is used
    if recall_kernels.usable(q, kq):
        return recall_kernels.int8_logits(q, kq, scale, valid)
    ub = torch.einsum("bhgqd,bhnd->bhgqn", q.float(), kq.float()) * scale[:, :, None, None, :]
    return ub.masked_fill(~valid[:, :, None, None, :], float("-inf"))


def sparq_logits(q: torch.Tensor, kq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
                 r: int) -> torch.Tensor:
    """`int8_logits` from r of the D dimensions: SparQ's first step (Ribar et al., "SparQ Attention: Bandwidth-
    Efficient LLM Inference", ICML 2024): the r components of largest |q| (here summed over the KV head's group of
    queries, which share the keys: our adaptation to GQA), and the scores scaled by sqrt(|q|_1 / |q_r|_1), SparQ's
    softmax temperature correction (so that `group_votes`' D^-0.5 gives its 1 / sqrt(D |q_r|_1 / |q|_1)).
    Reading r of D int8 key components cuts the scan's bytes by D / r where the keys lie dimension by dimension:
    kq may be any (B, H_kv, N, D) view, e.g. the transpose of the fast path's (B, H_kv, D, N) tier."""
    B, H, G, Q, D = q.shape
    # (B, H, r); a stable sort: of equal sums the lower dimension, as the fast path's kernel picks them
    dims = q.float().abs().sum(dim=(2, 3)).sort(dim=-1, descending=True, stable=True).indices[..., :r]
    qr = q.gather(-1, dims[:, :, None, None, :].expand(B, H, G, Q, r))
    kr = kq.transpose(2, 3).gather(2, dims[..., None].expand(B, H, r, kq.shape[2])).transpose(2, 3)
    l1 = lambda x: x.float().abs().sum(-1, keepdim=True)  # noqa: E731
    correction = (l1(q) / l1(qr).clamp_min(1e-30)).sqrt()
    return int8_logits(qr, kr, scale, valid) * correction


def step_votes(q: torch.Tensor, pq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor, r: int) -> torch.Tensor:
    """A decode step's `group_votes` over the fast path's passive tier, -1 where an entry is not valid (so that a
    top-k never chooses it): q (B, H_kv, G, 1, D) against the dimension-major int8 keys pq (B, H_kv, D, N), valid
    (B, H_kv, N) bool or uint8, scored on r dimensions (`sparq_logits`; 0 or D: all, `int8_logits`). On CUDA two
    Triton kernels compute it (kernels/recall_kernels.py: each block's softmax statistics, then the votes); this
    tensor form is their reference."""
    from kernels import recall_kernels   # here, not at import: Triton loads only where it is used
    if recall_kernels.votes_usable(q, pq):
        return recall_kernels.step_votes(q, pq, scale, valid, r)
    kq, valid = pq.transpose(2, 3), valid.bool()   # (the fast path's tier keeps it as uint8, the kernels' form)
    logits = sparq_logits(q, kq, scale, valid, r) if 0 < r < q.shape[-1] else int8_logits(q, kq, scale, valid)
    return group_votes(logits, q.shape[-1]).masked_fill(~valid, -1.0)


def step_recall(q: torch.Tensor, pq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor, r: int, n: int,
                k: torch.Tensor, v: torch.Tensor, count: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> tuple:
    """The n entries a decode step recalls from the fast path's tier (keys and values k, v (B, H_kv, N, D) beside
    their int8 copies pq): those of the n largest `step_votes` -> (indices (B, H_kv, n), best first; keys and values
    (B, H_kv, n, D); validity (B, H_kv, n), bool or uint8). On CUDA two Triton kernels (kernels/recall_kernels.py:
    the votes, each block's best kept as sortable keys, then the best of those, gathered; of equal votes the lower
    index), in place of torch.topk's radix select over the whole tier and three gathers. count (B, H_kv) int32
    zeros: the kernels' scratch (left at zeros), kept by the caller so that a step need not clear one. cos, sin
    (B, 1, D): q is not rotated yet; it is, in float32 (the kernels as they read it)."""
    from kernels import recall_kernels   # here, not at import: Triton loads only where it is used
    if recall_kernels.votes_usable(q, pq) and recall_kernels.candidates_fit(pq.shape[-1], n):
        return recall_kernels.step_recall(q, pq, scale, valid, r, n, k, v, count, cos, sin)
    if cos is not None:
        q = rope(q.float(), cos.float()[:, :, None, None], sin.float()[:, :, None, None])
    idx = step_votes(q, pq, scale, valid, r).topk(n, dim=-1).indices
    return idx, gather_entries(k, idx), gather_entries(v, idx), valid.gather(2, idx)


def group_votes(ub: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q.k (B, H_kv, G, q, N) -> each candidate's votes (B, H_kv, N): every query's softmax over the candidates
    (as SnapKV's window votes over tokens), summed over the queries and the group's heads. A few queries with large
    scores everywhere (sink-like heads) then cannot drown the query that looks for one entry."""
    return torch.softmax(ub * head_dim ** -0.5, dim=-1).nan_to_num(0.0).sum(dim=(2, 3))


def own_choices(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, H_kv, G, q, N) of every query head's queries over N entries (-inf: not an entry) -> the union of
    their top-n choices per KV head, idx (B, H_kv, U) in stored order, and qmask (B, H_kv, G, q, U): which of them
    each query chose. U is the largest union over the rows; a row with fewer pads with entries nobody chose."""
    B, H, G, q, N = scores.shape
    nth = scores.topk(min(n, N), dim=-1).values[..., -1:]
    own = (scores >= nth) & (scores > float("-inf"))   # ties with the n-th may add a few
    chosen = own.any(dim=(2, 3))
    U = max(1, int(chosen.sum(-1).max()))
    idx = chosen.to(torch.int8).topk(U, dim=-1).indices.sort(-1).values
    return idx, own.gather(-1, idx[:, :, None, None, :].expand(B, H, G, q, U))


def host_mapped(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed tensor in pinned host memory, seen as a tensor of the CUDA `device` through unified addressing:
    kernels read and write it over the bus, so that a captured decode step gathers from it with no copy and no
    host sync. The view holds its host memory alive."""
    host = torch.zeros(shape, dtype=dtype, pin_memory=True)
    raw = host.view(-1).view(torch.uint8)

    class Pinned:   # torch.as_tensor reads __cuda_array_interface__ and keeps this object while the view lives
        __cuda_array_interface__ = {"shape": (raw.numel(),), "typestr": "|u1", "data": (raw.data_ptr(), False),
                                    "version": 2}
        owner = host
    with torch.cuda.device(device):
        view = torch.as_tensor(Pinned(), device=device)
    return view.view(dtype).view(shape)


def quantize_int8(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k (..., D) -> (int8 (..., D), float32 scale (..., 1)): symmetric, one scale per entry and head, k ~ q * scale."""
    scale = k.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(k.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def pooled_by_position(score: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
    """score (B, H, N) of entries at positions pos (B, H, N), in any order -> each entry's maximum over the entries
    within span // 2 positions of it (a max-pool in position space, where positions with no entry count 0)."""
    B, H, _ = score.shape
    T = int(pos.max()) + 1
    # amax: a position held twice (a promoted entry's tombstone, voting 0, and the entry evicted again) keeps its vote
    dense = torch.zeros((B, H, T), dtype=score.dtype, device=score.device).scatter_reduce_(
        2, pos.to(score.device), score, reduce="amax")
    return max_pool_positions(dense, span).gather(2, pos.to(score.device))


def top_entries(score: torch.Tensor, k: int, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k highest scores per row of (B, H, N), ties to the lower position (pos (B, H, N): the entries'
    positions; None: the entries are in position order). Max-pooled votes tie on purpose (a peak's neighbours share
    its value): this rule makes the plain store and the fast path's position-indexed tier choose the same ones."""
    order = None if pos is None else pos.to(score.device).argsort(-1)
    s = score if order is None else score.gather(-1, order)
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return idx if order is None else order.gather(-1, idx)


def max_pool_positions(dense: torch.Tensor, span: int) -> torch.Tensor:
    """(B, H, T) over positions -> each position's maximum within span // 2 positions of it."""
    B, H, T = dense.shape
    return F.max_pool1d(dense.reshape(B * H, 1, T), span, 1, span // 2)[..., :T].reshape(B, H, T)


_SIDE_STREAMS: dict = {}


def side_stream(device) -> "torch.cuda.Stream":
    """One side stream per CUDA device for the passive stores' copies (kept out of the caches so they deep-copy)."""
    key = torch.device(device)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(key)
    return _SIDE_STREAMS[key]


class Recalled:
    """Recalled entries on their way to the device, plus the store's pending (device) buffer. qmask
    (B, H_q, q, n): which recalled entries each query attends to (None: all of them; the pending ones: all)."""

    def __init__(self, k, v, valid, pend, done, qmask=None):
        self.k, self.v, self.valid, self.pend, self.done, self.qmask = k, v, valid, pend, done, qmask

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
            if self.qmask is not None:
                n = self.pend[0].shape[2]
                self.qmask = torch.cat([self.qmask, self.qmask.new_ones(self.qmask.shape[:3] + (n,))], -1)
            self.pend = None
        return self

    def mask(self, n_q_heads: int, n_queries: int) -> torch.Tensor:
        """(B, H_q, q, n): the recalled entries each query attends to (valid ones, of its own choice)."""
        B = self.valid.shape[0]
        m = repeat_heads(self.valid, n_q_heads // self.valid.shape[1])[:, :, None, :].expand(B, n_q_heads,
                                                                                             n_queries, -1)
        return m if self.qmask is None else m & self.qmask


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

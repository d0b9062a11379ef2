"""ATSKV's eviction over the fast path's slots as three Triton kernels a layer (CUDA): every slot's relevance from
the step's attention and the time-dependent features (`_score_kernel`), the threshold controller's decision
(`atskv.controller_keep`), the attention bias that hides the freed slots (`hide_free`) and the next free slots
(`free_queue`).

Why: in tensor form that work was about 20 small kernels a layer (a segmented sort, gathers, scatters, a cumsum,
reductions), so that ATSKV's evicting step took 2.5 times as long as the step that does not evict (4.10 against
1.64 ms at 64 x 8192, 10%, on an H200). Here one program holds one (batch row, KV head)'s slots in registers:
- `_rank_kernel` sorts the free entries by r (their float bits made to order as integers, packed above the slot
  index into one int64 key: ties go by index), takes the quantile at rank q (n - 1) with torch.lerp's formula,
  and counts what the threshold keeps;
- torch reduces the counts over the rows (the largest row sets how many every row keeps; the mean drives q);
- `_apply_kernel` keeps each row's protected entries and its m highest r, and rewrites the bias and the queue.
The decisions are `controller_keep`'s, which stays the path off CUDA and the tests' reference. `_score_kernel`
(before them) replaced about six Inductor kernels a layer that computed r: the evicting step took 2.71 against
3.00 ms (CHANGELOG.md, c5bdf84).
"""
from __future__ import annotations

import torch

import kernels
from kernels import tl, triton

MAX_SLOTS = 4096   # rows of at most this many slots are handled here (one program a row), longer ones by torch


if triton is not None:
    @triton.jit
    def _sorted_keys(x, j):
        """Ascending sort of the float32 row x: (values, slot indices), ties by index."""
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)    # negative floats: reverse the magnitude's order
        s = tl.sort((key.to(tl.int64) << 32) | j.to(tl.int64))
        kb = (s >> 32).to(tl.int32)
        return tl.where(kb < 0, kb ^ 0x7FFFFFFF, kb).to(tl.float32, bitcast=True), (s & 0xFFFFFFFF).to(tl.int32)

    @triton.jit
    def _rank_kernel(r_ptr, prot_ptr, pres_ptr, qlev_ptr, beta_ptr, order_ptr, cnt_ptr, N, fixed,
                     FIXED: tl.constexpr, NP: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, NP)
        ok = j < N
        r = tl.load(r_ptr + row * N + j, mask=ok, other=0.0)
        pres = tl.load(pres_ptr + row * N + j, mask=ok, other=0) != 0
        prot = (tl.load(prot_ptr + row * N + j, mask=ok, other=0) != 0) & pres
        free = pres & ~prot
        vals, order = _sorted_keys(tl.where(free, r, float("inf")), j)   # the free first, by r
        tl.store(order_ptr + row * N + j, order, mask=ok)
        n = tl.sum(free.to(tl.int32), 0)
        if FIXED:
            tau = fixed
        else:   # torch.nanquantile over the free entries: linear interpolation at rank q (n - 1)
            rank = tl.load(qlev_ptr) * (n.to(tl.float32) - 1)
            lo = tl.minimum(tl.maximum(rank.to(tl.int32), 0), N - 1)
            hi = tl.minimum(tl.maximum(tl.ceil(rank).to(tl.int32), 0), N - 1)
            v_lo = tl.sum(tl.where(j == lo, vals, 0.0), 0)
            v_hi = tl.sum(tl.where(j == hi, vals, 0.0), 0)
            w = rank - lo.to(tl.float32)
            quant = tl.where(w < 0.5, v_lo + w * (v_hi - v_lo), v_hi - (v_hi - v_lo) * (1 - w))   # torch.lerp
            tau = tl.load(beta_ptr) * quant
        keep = prot | (free & (r > tau))            # n = 0: nothing free, the threshold does not matter
        tl.store(cnt_ptr + row * 3, tl.sum(keep.to(tl.int32), 0))
        tl.store(cnt_ptr + row * 3 + 1, n)
        tl.store(cnt_ptr + row * 3 + 2, tl.sum(prot.to(tl.int32), 0))

    @triton.jit
    def _apply_kernel(order_ptr, cnt_ptr, k_ptr, over_ptr, prot_ptr, pres_ptr, valid_ptr, bias_ptr, queue_ptr,
                      N, E, stride_q, hidden, NP: tl.constexpr, EP: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, NP)
        ok = j < N
        if tl.load(over_ptr) != 0:
            n = tl.load(cnt_ptr + row * 3 + 1)
            m = tl.maximum(tl.load(k_ptr).to(tl.int32) - tl.load(cnt_ptr + row * 3 + 2), 0)
            pres = tl.load(pres_ptr + row * N + j, mask=ok, other=0) != 0
            prot = (tl.load(prot_ptr + row * N + j, mask=ok, other=0) != 0) & pres
            order = tl.load(order_ptr + row * N + j, mask=ok, other=0)
            tl.debug_barrier()   # every thread has read the old presence before any writes the new one
            tl.store(pres_ptr + row * N + j, prot, mask=ok)
            tl.debug_barrier()
            take = ok & (j >= n - m) & (j < n)      # in sorted order: the last m of the n free
            tl.store(pres_ptr + row * N + order, take, mask=take)
            tl.debug_barrier()
        pres = tl.load(pres_ptr + row * N + j, mask=ok, other=0) != 0
        valid = tl.load(valid_ptr + row * N + j, mask=ok, other=0) != 0
        tl.store(bias_ptr + row * N + j, tl.where(pres & valid, 0.0, hidden).to(bias_ptr.dtype.element_ty), mask=ok)
        if E > 0:   # the first E free slots, ascending; the last slot where a row has fewer
            free = ok & ~pres
            rank = tl.cumsum(free.to(tl.int32), 0) - 1
            tl.store(queue_ptr + row * stride_q + rank, j.to(tl.int64), mask=free & (rank < E))
            e = tl.arange(0, EP)
            nf = tl.sum(free.to(tl.int32), 0)
            tl.store(queue_ptr + row * stride_q + e, tl.full([EP], 0, tl.int64) + (N - 1), mask=(e >= nf) & (e < E))

    @triton.jit
    def _score_kernel(p_ptr, acc_ptr, z0_ptr, pos_ptr, tok_ptr, cnt_ptr, valid_ptr, seen_ptr, co_ptr, r_ptr,
                      N, H, V, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """ATSKV's relevance of every slot at an evicting step (ATSKV.slot_step's tensor form): the step's
        attention statistics over the group's G query heads (AttentionStatisticsExtractor.window_stats with a
        window of one query), the running statistic acc += mean (in place), the time-dependent features and the
        sigmoid of the logit; -1 for padding slots. co: the (coefficient, mean) pairs of the 4 attention features
        and the 3 time-dependent ones, as [ca (4), mua (4), cf (3), muf (3)]."""
        bh = tl.program_id(0)
        b = bh // H
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        n_ok = n < N
        g = tl.arange(0, G_PAD)
        g_ok = g < G
        p = tl.load(p_ptr + bh * G * N + g[:, None] * N + n[None, :], mask=g_ok[:, None] & n_ok[None, :], other=0.0)
        mean = tl.sum(p, 0) / G
        mx = tl.max(p, 0)
        dev = tl.where(g_ok[:, None], p - mean[None, :], 0.0)
        spread = tl.sqrt(tl.sum(dev * dev, 0) / G) / (mean + 1e-6)
        acc = tl.load(acc_ptr + bh * N + n, mask=n_ok, other=0.0) + mean
        tl.store(acc_ptr + bh * N + n, acc, mask=n_ok)
        z = tl.load(z0_ptr + bh * N + n, mask=n_ok, other=0.0)
        z += (tl.log(mean + 1e-6) - tl.load(co_ptr + 4)) * tl.load(co_ptr)
        z += (tl.log(mx + 1e-6) - tl.load(co_ptr + 5)) * tl.load(co_ptr + 1)
        z += (tl.log(acc + 1e-6) - tl.load(co_ptr + 6)) * tl.load(co_ptr + 2)
        z += (tl.minimum(spread, 10.0) - tl.load(co_ptr + 7)) * tl.load(co_ptr + 3)
        pos = tl.load(pos_ptr + bh * N + n, mask=n_ok, other=0).to(tl.float32)
        seen = tl.load(seen_ptr + b).to(tl.float32)
        tok = tl.minimum(tl.maximum(tl.load(tok_ptr + bh * N + n, mask=n_ok, other=0), 0), V - 1)   # as counted
        freq = tl.load(cnt_ptr + b * V + tok, mask=n_ok, other=0.0).to(tl.float32)
        z += (pos / tl.maximum(seen, 1.0) - tl.load(co_ptr + 11)) * tl.load(co_ptr + 8)
        z += (tl.log(1.0 + tl.maximum(seen - 1.0 - pos, 0.0)) / 10.0 - tl.load(co_ptr + 12)) * tl.load(co_ptr + 9)
        z += (tl.log(1.0 + freq) - tl.load(co_ptr + 13)) * tl.load(co_ptr + 10)
        valid = tl.load(valid_ptr + bh * N + n, mask=n_ok, other=0) != 0
        tl.store(r_ptr + bh * N + n, tl.where(valid, tl.sigmoid(z), -1.0), mask=n_ok)

    from torch.library import triton_op, wrap_triton

    @triton_op("atskv::relevance", mutates_args={"acc"})
    def _score_op(probs: torch.Tensor, acc: torch.Tensor, z0: torch.Tensor, pos: torch.Tensor, toks: torch.Tensor,
                  counts: torch.Tensor, valid: torch.Tensor, seen: torch.Tensor, co: torch.Tensor) -> torch.Tensor:
        B, H, G, N = probs.shape
        for t in (acc, z0, pos, toks, valid):
            assert t.is_contiguous(), "per-slot tensors must be contiguous"
        r = torch.empty((B, H, N), dtype=torch.float32, device=probs.device)
        BLOCK = 256
        wrap_triton(_score_kernel)[(B * H, triton.cdiv(N, BLOCK))](
            probs.contiguous(), acc, z0, pos, toks, counts.contiguous(), valid, seen.contiguous(), co,
            r, N, H, counts.shape[-1], G=G, G_PAD=triton.next_power_of_2(G), BLOCK=BLOCK, num_warps=4)
        return r

    @triton_op("atskv::controller_rank", mutates_args=())
    def _rank_op(r: torch.Tensor, prot: torch.Tensor, present: torch.Tensor, qlev: torch.Tensor, beta: torch.Tensor,
                 fixed: float, use_fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        R, N = r.numel() // r.shape[-1], r.shape[-1]
        order = torch.empty(r.shape, dtype=torch.int32, device=r.device)
        cnt = torch.empty((R, 3), dtype=torch.int32, device=r.device)
        NP = triton.next_power_of_2(N)
        wrap_triton(_rank_kernel)[(R,)](r.contiguous(), prot.contiguous(), present, qlev, beta, order, cnt, N, fixed,
                                        FIXED=use_fixed, NP=NP, num_warps=_warps(NP))
        return order, cnt

    @triton_op("atskv::controller_apply", mutates_args={"present", "bias", "queue"})
    def _apply_op(order: torch.Tensor, cnt: torch.Tensor, k: torch.Tensor, over: torch.Tensor, prot: torch.Tensor,
                  present: torch.Tensor, valid: torch.Tensor, bias: torch.Tensor, queue: torch.Tensor,
                  hidden: float) -> None:
        N = present.shape[-1]
        E = queue.shape[-1] if queue.dim() == present.dim() else 0
        if E:   # (batch, head) rows flattened into one index; a row may be padded (free_queue's is a slice)
            assert queue.stride(-1) == 1 and queue.stride(0) == queue.shape[1] * queue.stride(1)
        NP = triton.next_power_of_2(N)
        wrap_triton(_apply_kernel)[(present.numel() // N,)](
            order, cnt, k, over, prot.contiguous(), present, valid.contiguous(), bias, queue, N, E,
            queue.stride(-2) if E else 0, hidden, NP=NP,
            EP=triton.next_power_of_2(max(E, 1)), num_warps=_warps(NP))


def _warps(n_pad: int) -> int:
    return 8 if n_pad <= 1024 else 16


def available(x: torch.Tensor) -> bool:
    """Whether the kernels take rows like x (..., N): CUDA, Triton, N <= MAX_SLOTS."""
    return kernels.enabled("evict") and x.is_cuda and x.shape[-1] <= MAX_SLOTS


def controller_evict(r, protected, present, valid, bias, queue, budget, beta, delta, gain: float, fixed, over,
                     hidden: float) -> None:
    """`controller_keep` and what follows it, in place: where `over`, the kept entries stay present and delta takes
    its new value; then the bias hides every free slot and `queue` (B, H, E) lists each row's first E free slots
    (queue None: evict_every = 1). r, protected, present, valid: (B, H, N); budget, beta: tensors; delta float64
    (1,); over: bool tensor. Returns nothing."""
    S = present[0, 0].sum().double()
    target = torch.clamp(budget / S, max=1.0)
    qlev = torch.clamp(1.0 - target + delta, 0.0, 1.0).float().reshape(1)
    use_fixed = fixed is not None
    order, cnt = _rank_op(r.float(), protected, present, qlev, beta.float().reshape(1),
                          float(fixed) if use_fixed else 0.0, use_fixed)
    n_keep = cnt[:, 0].max()
    k = torch.minimum(torch.clamp(n_keep, min=1), torch.as_tensor(budget, device=r.device)).reshape(1)
    kept_frac = cnt[:, 0].float().mean().double() / S
    if not use_fixed:
        delta.copy_(torch.where(over, torch.clamp(delta + gain * (kept_frac - target), -1.0, 1.0), delta))
    _apply_op(order, cnt, k, over.reshape(1), protected, present, valid, bias,
              queue if queue is not None else present.new_zeros((1,), dtype=torch.long), hidden)


def relevance(probs, acc, z0, pos, toks, counts, valid, seen, co):
    """r (B, H, N) float32 of every slot at an evicting step, and acc += the step's mean attention, in one kernel:
    what ATSKV.slot_step computes in tensor form off CUDA. probs (B, H, G, N) float32; counts (B, vocab);
    seen (B,); co: atskv.logit_coefs' "dyn"."""
    return _score_op(probs, acc, z0, pos, toks, counts, valid, seen, co)

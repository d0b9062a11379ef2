"""Recall's selection from the int8 copies of the passive keys, as one Triton kernel (CUDA): a few queries of a
KV head's group against every int8 key of that head, the keys' scales applied to the scores, invalid entries -inf.

Why: in tensor form, `einsum(q.float(), kq.float())` first widens every int8 key to float32 (4x the int8 bytes
written, then read again), so that selecting from the int8 summaries cost more memory traffic than attending to
the bf16 keys they summarise. Here each program reads a block of int8 keys once, widens them in registers and
writes only the few queries' scores. A decode step (a few queries per KV head) takes it; a prompt chunk (many
queries) is a real GEMM and stays with torch. Under torch.compile, Inductor generates the fused reduction itself.
`external_memory.int8_logits` is its tensor form and the reference.

A decode step's recall on the fast path (`step_recall`, `step_votes`) takes four steps a layer: a row's scanned
dimensions and query components; each block's softmax statistics; the votes (the block's logits computed again)
and each block's best; the row's best of those, gathered from the tier. In the fused form (`scan_form`: small
grids) they run in two kernels (the first step inside the second's programs, the last by each row's last block of
the third). Their loads never wait on a reduction, so that a block's R int8 rows stream in together: a first
version that chose each next dimension inside the scan's loop was bound by that wait
(docs/design-recall-fast-path.md). `external_memory.step_votes` and
`step_recall`'s topk are their tensor form.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

import kernels
from kernels import rotary, tl, triton

MAX_QUERIES = 16     # queries of one KV head's group (query heads x tokens) a program holds; more: torch's einsum
MAX_CANDIDATES = 8192   # the blocks' best that one program sorts to pick a row's n (int64 keys held in registers)
TILE = 16384         # q x key products a program holds in registers: BLOCK_N keys = TILE / (queries x head size)
TOPK = triton is not None and hasattr(tl, "topk")   # a partial bitonic sort (newer Tritons); else a full sort
# The votes' pruning (`_step_votes_kernel`): sub-blocks a block of the statistics' kernel keeps the maxima of; 0: no
# pruning. Off until timed on a GPU with the real model's attention (bench/prune_probe.py: on the CPU the bound let
# about half of the blocks go unscanned; random weights would not show it).
PRUNE_SUBBLOCKS = 0
# A decode step's recall scan, as (entries a program scores then votes on, warps a program, fused), in one of two
# forms chosen by its grid (`scan_form`), each the fastest of its kind as timed on the H100
# (results/recall-step-kernels-h100-random/fifth). A grid of one wave (no more programs than the GPU has
# multiprocessors: batch 1 at 8K) is a chain of short launches: two kernels a layer pay there, the row's preparation
# done inside each program of the statistics' kernel and the pick by each row's last program of the votes' kernel.
# A larger grid is bound by its scan: every program preparing its row again costs more than the launches saved.
ONE_WAVE = (256, 8, True)
MANY_WAVES = (512, 4, False)
FORM = None   # one form for every grid (bench/recall_kernel_tune.py, tests); None: by the grid


if triton is not None:
    @triton.jit
    def _int8_logits_kernel(q_ptr, k_ptr, s_ptr, ok_ptr, out_ptr, N, M, k_row, k_n, k_d, D: tl.constexpr,
                            MP: tl.constexpr, BN: tl.constexpr):
        """out[row, m, n] = (q[row, m] . k[row, n]) * s[row, n] where ok[row, n], else -inf; q float32 (R, M, D),
        k int8 (R, N, D) at strides k_row, k_n, k_d (entry-major, or dimension-major as the fast path's tier),
        s float32 (R, N), ok bool (R, N), out float32 (R, M, N); one program per BN keys of a row."""
        row = tl.program_id(1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        m = tl.arange(0, MP)
        d = tl.arange(0, D)
        n_ok, m_ok = n < N, m < M
        q = tl.load(q_ptr + row * M * D + m[:, None] * D + d[None, :], mask=m_ok[:, None], other=0.0)
        k = tl.load(k_ptr + row * k_row + n[:, None] * k_n + d[None, :] * k_d, mask=n_ok[:, None], other=0)
        k = k.to(tl.float32)
        dot = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                    # (MP, BN)
        s = tl.load(s_ptr + row * N + n, mask=n_ok, other=0.0)
        ok = tl.load(ok_ptr + row * N + n, mask=n_ok, other=0) != 0
        out = tl.where(ok[None, :], dot * s[None, :], float("-inf"))
        tl.store(out_ptr + row * M * N + m[:, None] * N + n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _step_prep_kernel(q_ptr, cos_ptr, sin_ptr, qs_ptr, f_ptr, dims_ptr, temp, H, c_row, q_b, G: tl.constexpr,
                          GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, SPARQ: tl.constexpr,
                          ROPE: tl.constexpr):
        """`_prep_row` once per row, before the scan (the unfused form)."""
        _prep_row(q_ptr, cos_ptr, sin_ptr, qs_ptr, f_ptr, dims_ptr, tl.program_id(0), temp, H, c_row, q_b, G, GP, D,
                  R, RP, SPARQ, ROPE)

    @triton.jit
    def _query_at(q_ptr, cos_ptr, sin_ptr, row, H, c_row, q_b, g, d, g_ok, G: tl.constexpr, D: tl.constexpr,
                  ROPE: tl.constexpr):
        """The group's query components q[g, d] (float32; the sequence b = row // H at q_ptr + b * q_b: a view of
        the step's fused q/k/v projection needs no copy), rotated here with ROPE (HF's rotary embedding: q cos +
        rotate_half(q) sin, cos and sin at cos_ptr + b * c_row), so that no kernel of its own rotates them first."""
        base = q_ptr + (row // H) * q_b + ((row % H) * G + g) * D
        x = tl.load(base + d, mask=g_ok, other=0.0)
        if ROPE:
            partner = tl.load(base + (d + D // 2) % D, mask=g_ok, other=0.0)
            b = row // H
            x = rotary(x, partner, tl.load(cos_ptr + b * c_row + d), tl.load(sin_ptr + b * c_row + d), d < D // 2)
        return x.to(tl.float32)

    @triton.jit
    def _prep_row(q_ptr, cos_ptr, sin_ptr, qs_ptr, f_ptr, dims_ptr, row, temp, H, c_row, q_b, G: tl.constexpr,
                  GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, SPARQ: tl.constexpr,
                  ROPE: tl.constexpr):
        """A row's (b, h) part of a decode step's scoring, before its scan: the R dimensions it reads, in order
        (dims (RP,)), the group's query components on them (qs (RP, GP)) and each head's factor f = c * temp. With
        SPARQ the R dimensions of largest |q| summed over the group (of equal sums the lower dimension: SparQ's
        first step) and c = sqrt(|q|_1 / |q_R|_1), SparQ's correction; else all D in order and c = 1."""
        g, d, j = tl.arange(0, GP), tl.arange(0, D), tl.arange(0, RP)
        g_ok, j_ok = g < G, j < R
        q = _query_at(q_ptr, cos_ptr, sin_ptr, row, H, c_row, q_b, g[:, None], d[None, :], g_ok[:, None], G, D, ROPE)
        if SPARQ:   # a dimension's rank: how many beat it (a larger sum, or an equal one at a lower index)
            a = tl.sum(tl.abs(q), 0)
            beats = (a[None, :] > a[:, None]) | ((a[None, :] == a[:, None]) & (d[None, :] < d[:, None]))
            rank = tl.sum(beats.to(tl.int32), 1)
            dims = tl.sum(tl.where(rank[None, :] == j[:, None], d[None, :], 0), 1)              # (RP,)
            qr = tl.where(rank[None, :] < R, q, 0.0)
            c = tl.sqrt(tl.sum(tl.abs(q), 1) / tl.maximum(tl.sum(tl.abs(qr), 1), 1e-30))
        else:
            dims = j
            c = tl.full((GP,), 1.0, tl.float32)
        dims = tl.where(j_ok, dims, 0)
        qs = _query_at(q_ptr, cos_ptr, sin_ptr, row, H, c_row, q_b, g[None, :], dims[:, None], g_ok[None, :], G, D,
                       ROPE)
        tl.store(qs_ptr + (row * RP + j[:, None]) * GP + g[None, :], qs)
        tl.store(dims_ptr + row * RP + j, dims)
        tl.store(f_ptr + row * GP + g, c * temp)

    @triton.jit
    def _block_logits(qs_ptr, f_ptr, dims_ptr, k_ptr, s_ptr, ok_ptr, row, blk, N, k_row, k_d, k_n, G: tl.constexpr,
                      GP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr):
        """A decode step's scaled logits l (GP, BN) = q[g] . k[n] * s[n] * f[g] over one block of BN entries (-inf
        where not ok, or a padded head), on the R dimensions `_step_prep_kernel` chose, in its order. k int8 at
        strides k_row, k_d, k_n (the fast path's tier: (B, H, D, N)): one dimension of BN entries is one contiguous
        load, and no load waits on another (the dimensions come from memory, not from a reduction)."""
        g = tl.arange(0, GP)
        n = (blk * BN + tl.arange(0, BN))[None, :]   # (1, BN): loaded in the layout the (GP, BN) logits take
        n_ok = n < N
        keys = k_ptr + row.to(tl.int64) * k_row + n * k_n
        acc = tl.zeros((GP, BN), dtype=tl.float32)
        for j in tl.static_range(R):
            dim = tl.load(dims_ptr + row * RP + j)
            qc = tl.load(qs_ptr + (row * RP + j) * GP + g)                                 # (GP,)
            kd = tl.load(keys + dim * k_d, mask=n_ok, other=0).to(tl.float32)               # (1, BN)
            acc += qc[:, None] * kd
        s = tl.load(s_ptr + row * N + n, mask=n_ok, other=0.0)
        ok = (tl.load(ok_ptr + row * N + n, mask=n_ok, other=0) != 0) & n_ok
        f = tl.load(f_ptr + row * GP + g)
        l = tl.where(ok & (g < G)[:, None], acc * s * f[:, None], float("-inf"))
        return l, tl.reshape(ok, (BN,)), tl.reshape(n, (BN,)), tl.reshape(n_ok, (BN,))

    @triton.jit
    def _step_stats_kernel(q_ptr, cos_ptr, sin_ptr, temp, H, c_row, q_b, qs_ptr, f_ptr, dims_ptr, k_ptr, s_ptr, ok_ptr,
                           m_ptr, z_ptr, t_ptr, N, NB, k_row, k_d, k_n, G: tl.constexpr, GP: tl.constexpr,
                           D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
                           PREP: tl.constexpr, SPARQ: tl.constexpr, ROPE: tl.constexpr):
        """One block's softmax statistics per query head: the maximum m of its logits and its sum of exp(l - m) z;
        NS > 0: also the maxima of its NS sub-blocks per head (t (B, H, NB, GP, NS), for the votes' pruning).
        PREP: each program first does its row's `_prep_row` (every block of a row writes the same values; the votes'
        kernel reads them), in place of a kernel of its own: at batch 1 a decode step is a chain of launches."""
        blk, row = tl.program_id(0), tl.program_id(1)
        if PREP:
            _prep_row(q_ptr, cos_ptr, sin_ptr, qs_ptr, f_ptr, dims_ptr, row, temp, H, c_row, q_b, G, GP, D, R, RP,
                      SPARQ, ROPE)
            tl.debug_barrier()   # read back below by other threads of this program
        l, _, _, _ = _block_logits(qs_ptr, f_ptr, dims_ptr, k_ptr, s_ptr, ok_ptr, row, blk, N, k_row, k_d, k_n, G,
                                   GP, R, RP, BN)   # (unpacked as Triton 3.6 takes a call's several results)
        g = tl.arange(0, GP)
        m = tl.max(l, 1)
        z = tl.sum(tl.where(l > float("-inf"), tl.exp(l - tl.where(m > float("-inf"), m, 0.0)[:, None]), 0.0), 1)
        tl.store(m_ptr + (row * NB + blk) * GP + g, m)
        tl.store(z_ptr + (row * NB + blk) * GP + g, z)
        if NS > 0:
            sub = tl.max(tl.reshape(l, (GP, NS, BN // NS)), 2)                             # (GP, NS)
            i = tl.arange(0, NS)
            tl.store(t_ptr + ((row * NB + blk) * GP + g[:, None]) * NS + i[None, :], sub)

    @triton.jit
    def _step_votes_kernel(qs_ptr, f_ptr, dims_ptr, k_ptr, s_ptr, ok_ptr, m_ptr, z_ptr, t_ptr, out_ptr, N, NB,
                           n_top, k_row, k_d, k_n, count_ptr, idx_ptr, tk_ptr, tv_ptr, rk_ptr, rv_ptr, rok_ptr,
                           tk_row, tk_n, tv_row, tv_n, G: tl.constexpr, GP: tl.constexpr, R: tl.constexpr,
                           RP: tl.constexpr, NBP: tl.constexpr, BN: tl.constexpr, NC: tl.constexpr,
                           TOPK: tl.constexpr, NS: tl.constexpr, TOP: tl.constexpr, CP: tl.constexpr,
                           NT: tl.constexpr, DV: tl.constexpr):
        """The group's votes over one block of entries, its logits computed again (reading the int8 keys twice
        moves fewer bytes than writing and reading float logits): each query head's softmax over all N entries
        (from the blocks' statistics), summed over the heads; -1 where an entry is not ok. NC = 0: the votes into
        out (B, H, N); NC > 0: the block's NC best as sortable keys (`_vote_keys`) into out (B, H, NB, NC), best
        first (tl.topk where this Triton has it, else a sort of the block).
        NS > 0 (pruning, with NC > 0): a block that cannot hold any of the row's n_top best is not scanned again
        (its candidates are left out). No vote in block b exceeds U_b = the sum over heads of exp(m_b - M) / Z (each
        head's block maximum m_b; the row's M and Z); the entry at each sub-block's maximum of one head g of block b
        has a vote of at least exp(t - M_g) / Z_g, so the n_top-th largest of those (distinct entries: disjoint
        sub-blocks) is at most the row's n_top-th best vote. A block whose U_b is below it (with a margin for
        rounding) holds none of the n_top best: the same entries are chosen as without pruning.
        TOP (with NC > 0): the row's last block to finish (a counter per row, count_ptr, taken atomically and left
        at 0 for the next step) also does `_top_rows` over all the blocks' candidates, in place of a kernel of its
        own (tk, tv: the tier's keys and values, at strides tk_row, tk_n, tv_row, tv_n)."""
        blk, row = tl.program_id(0), tl.program_id(1)
        g, b = tl.arange(0, GP), tl.arange(0, NBP)
        mb = tl.load(m_ptr + (row * NB + b[:, None]) * GP + g[None, :], mask=b[:, None] < NB, other=float("-inf"))
        zb = tl.load(z_ptr + (row * NB + b[:, None]) * GP + g[None, :], mask=b[:, None] < NB, other=0.0)
        m = tl.max(mb, 0)                                                            # (GP,)
        m0 = tl.where(m > float("-inf"), m, 0.0)
        z = tl.sum(tl.where(mb > float("-inf"), zb * tl.exp(mb - m0[None, :]), 0.0), 0)
        scan = True
        if NS > 0 and NC > 0:
            w = tl.where(mb > float("-inf"), tl.exp(mb - m0[None, :]) / tl.maximum(z, 1e-30)[None, :], 0.0)
            upper = tl.sum(w, 1)                                                     # (NBP,)
            head = tl.argmax(w, 1)                                                   # each block's head g
            pick = g[None, :] == head[:, None]
            mh = tl.sum(tl.where(pick, m0[None, :], 0.0), 1)
            zh = tl.sum(tl.where(pick, z[None, :], 0.0), 1)
            i = tl.arange(0, NS)
            t = tl.load(t_ptr + ((row * NB + b[:, None]) * GP + head[:, None]) * NS + i[None, :],
                        mask=b[:, None] < NB, other=float("-inf"))                   # (NBP, NS)
            low = tl.where(t > float("-inf"), tl.exp(t - mh[:, None]) / tl.maximum(zh, 1e-30)[:, None], 0.0)
            ranked = tl.sort(tl.reshape(low, (NBP * NS,)), descending=True)
            nth = tl.sum(tl.where(tl.arange(0, NBP * NS) == n_top - 1, ranked, 0.0))
            scan = tl.sum(tl.where(b == blk, upper, 0.0)) * 1.001 >= nth * 0.999
        if scan:
            l, ok, n, n_ok = _block_logits(qs_ptr, f_ptr, dims_ptr, k_ptr, s_ptr, ok_ptr, row, blk, N, k_row, k_d,
                                           k_n, G, GP, R, RP, BN)
            p = tl.where(l > float("-inf"), tl.exp(l - m0[:, None]) / tl.maximum(z, 1e-30)[:, None], 0.0)
            vote = tl.where(ok, tl.sum(p, 0), -1.0)
            if NC == 0:
                tl.store(out_ptr + row * N + n, vote, mask=n_ok)
            else:
                keys = _vote_keys(vote, n, n_ok)
                if TOPK:
                    i = tl.arange(0, NC)
                    tl.store(out_ptr + (row * NB + blk) * NC + i, tl.topk(keys, NC))
                else:
                    i = tl.arange(0, BN)
                    tl.store(out_ptr + (row * NB + blk) * NC + i, tl.sort(keys, descending=True), mask=i < NC)
        elif NC > 0:   # (compiled even where `scan` is the constant True)
            i = tl.arange(0, NC)
            tl.store(out_ptr + (row * NB + blk) * NC + i, tl.full((NC,), -9223372036854775807, tl.int64))
        if TOP:
            tl.debug_barrier()   # every thread's candidates stored before the counter says so (released with it)
            done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
            if done == NB - 1:
                tl.store(count_ptr + row, 0)
                tl.debug_barrier()
                _top_rows(out_ptr, idx_ptr, tk_ptr, tv_ptr, ok_ptr, rk_ptr, rv_ptr, rok_ptr, row, NB * NC, n_top, N,
                          tk_row, tk_n, tv_row, tv_n, CP, NT, DV, 32, TOPK)

    @triton.jit
    def _vote_keys(vote, n, n_ok):
        """Votes and their entries' indices as int64 keys that order as (vote, then the lower index): the float's
        bits made monotonic as a signed integer, above 2^32 - 1 - index; entries beyond N order last."""
        bits = vote.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
        packed = key * 4294967296 + (4294967296 - 1 - n.to(tl.int64))
        return tl.where(n_ok, packed, -9223372036854775807)

    @triton.jit
    def _top_keys_kernel(c_ptr, idx_ptr, k_ptr, v_ptr, ok_ptr, rk_ptr, rv_ptr, rok_ptr, NCAND, n_top, N, k_row,
                         k_n, v_row, v_n, CP: tl.constexpr, NT: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
                         TOPK: tl.constexpr):
        """`_top_rows` for one row a program (the unfused form)."""
        _top_rows(c_ptr, idx_ptr, k_ptr, v_ptr, ok_ptr, rk_ptr, rv_ptr, rok_ptr, tl.program_id(0), NCAND, n_top, N,
                  k_row, k_n, v_row, v_n, CP, NT, D, NP, TOPK)

    @triton.jit
    def _top_rows(c_ptr, idx_ptr, k_ptr, v_ptr, ok_ptr, rk_ptr, rv_ptr, rok_ptr, row, NCAND, n_top, N, k_row, k_n,
                  v_row, v_n, CP: tl.constexpr, NT: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
                  TOPK: tl.constexpr):
        """A row's n_top best of its blocks' candidate keys -> their entries' indices (B, H, n_top), best first,
        and those entries: keys and values (B, H, n_top, D) gathered from k, v (B, H, N, D) at strides k_row, k_n
        (the tier, in device or pinned host memory) and their validity (uint8), NP entries at a time. NT: the next
        power of two >= n_top (tl.topk's k), else CP (a sort of all candidates). The candidates are read past the
        L1 cache (.cg): other programs wrote them."""
        c = tl.load(c_ptr + row * NCAND + tl.arange(0, CP), mask=tl.arange(0, CP) < NCAND,
                    other=-9223372036854775807, cache_modifier=".cg")
        if TOPK:
            best = tl.topk(c, NT)
        else:
            best = tl.sort(c, descending=True)
        i = tl.arange(0, NT)
        low = best - (best >> 32) * 4294967296                                     # the index's part
        tl.store(idx_ptr + row * n_top + i, 4294967296 - 1 - low, mask=i < n_top)
        tl.debug_barrier()   # the indices are read back below by other threads of this program
        d = tl.arange(0, D)
        r64 = row.to(tl.int64)
        for c0 in range(0, n_top, NP):
            j = c0 + tl.arange(0, NP)
            j_ok = j < n_top
            e = tl.load(idx_ptr + row * n_top + j, mask=j_ok, other=0)
            out = (row * n_top + j[:, None]) * D + d[None, :]
            kv = tl.load(k_ptr + r64 * k_row + e[:, None] * k_n + d[None, :], mask=j_ok[:, None], other=0.0)
            tl.store(rk_ptr + out, kv, mask=j_ok[:, None])
            kv = tl.load(v_ptr + r64 * v_row + e[:, None] * v_n + d[None, :], mask=j_ok[:, None], other=0.0)
            tl.store(rv_ptr + out, kv, mask=j_ok[:, None])
            tl.store(rok_ptr + row * n_top + j, tl.load(ok_ptr + row * N + e, mask=j_ok, other=0), mask=j_ok)

    from torch.library import triton_op, wrap_triton

    def _launch(q, kq, scale, valid, wrap=lambda k: k):
        """q (B, H, G, Q, D) against kq (B, H, N, D) int8, scale (B, H, N), valid (B, H, N) -> (B, H, G, Q, N)."""
        B, H, G, Q, D = q.shape
        N, M = kq.shape[2], G * Q
        MP = max(2, triton.next_power_of_2(M))
        BN = max(16, min(64, TILE // (MP * D)))
        out = torch.empty((B, H, G, Q, N), dtype=torch.float32, device=q.device)
        if kq.stride(0) != H * kq.stride(1) or kq.stride(1) != N * D:   # rows (b, h) not evenly spaced: a copy
            kq = kq.contiguous()
        wrap(_int8_logits_kernel)[(triton.cdiv(N, BN), B * H)](
            q.float().contiguous(), kq, scale.float().contiguous(), valid.contiguous(), out, N, M,
            kq.stride(1), kq.stride(2), kq.stride(3), D=D, MP=MP, BN=BN, num_warps=4)
        return out

    @triton_op("atskv::int8_logits", mutates_args=())
    def _int8_logits_op(q: torch.Tensor, kq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return _launch(q, kq, scale, valid, wrap_triton)


    def _launch_step(q, pq, scale, valid, r: int, n_top: int, wrap=lambda k: k, k=None, v=None, count=None,
                     cos=None, sin=None, debug=None):
        """q (B, H, G, 1, D) against the dimension-major int8 tier pq (B, H, D, N), scale (B, H, N) float32, valid
        (B, H, N) uint8 -> n_top = 0: the votes (B, H, N) float32, -1 where not valid; n_top > 0: the indices
        (B, H, n_top) of the n_top best, best first (of equal votes the lower index: each block's next power of
        two >= n_top best, then the best of those), and those entries of the tier's keys and values k, v (B, H, N,
        D) with their validity (uint8). The fused form (`scan_form`): two kernels (each block's softmax
        statistics, the row's dimensions and query components chosen by each of its programs; the votes, and with
        n_top the row's best of its blocks' best, by the row's last block, counted in count (B, H) int32, zeros,
        left at zeros: a scratch the caller keeps, so that no step clears it); else four. cos, sin (B or 1, 1, D):
        q is not rotated yet (HF's rotary embedding, applied in float32 as the row's query is read). `debug` (a
        dict) gets the blocks' candidates."""
        B, H, G, _, D = q.shape
        N = pq.shape[3]
        sparq = 0 < r < D
        R = r if sparq else D
        BN, warps, fused = scan_form(B * H, N, _multiprocessors(q.device))
        GP, RP = max(2, triton.next_power_of_2(G)), max(2, triton.next_power_of_2(R))
        NB = triton.cdiv(N, BN)
        f32 = dict(dtype=torch.float32, device=q.device)
        qs, f = torch.empty((B, H, RP, GP), **f32), torch.empty((B, H, GP), **f32)
        dims = torch.empty((B, H, RP), dtype=torch.int32, device=q.device)
        if q.stride(4) != 1 or q.stride(2) != D or q.stride(1) != G * D:   # only the batch rows may be strided
            q = q.contiguous()
        if cos is None:
            rows = (q, q, D ** -0.5, H, 0, q.stride(0))
        else:
            cos, sin = (x.reshape(x.shape[0], D).expand(B, D) for x in (cos, sin))
            assert cos.stride(1) == 1 and sin.stride() == cos.stride(), "cos and sin of one layout"
            rows = (cos, sin, D ** -0.5, H, cos.stride(0), q.stride(0))
        if not fused:
            wrap(_step_prep_kernel)[(B * H,)](q, *rows[:2], qs, f, dims, *rows[2:], G=G, GP=GP, D=D, R=R, RP=RP,
                                              SPARQ=sparq, ROPE=cos is not None, num_warps=4)
        m, z = torch.empty((B, H, NB, GP), **f32), torch.empty((B, H, NB, GP), **f32)
        if pq.stride(0) != H * pq.stride(1):   # rows (b, h) not evenly spaced: a copy
            pq = pq.contiguous()
        scale, valid = scale.float().contiguous(), valid.contiguous()
        scan = (qs, f, dims, pq, scale, valid)
        strides = (pq.stride(1), pq.stride(2), pq.stride(3))
        NC = min(BN, triton.next_power_of_2(n_top)) if n_top else 0
        NS = PRUNE_SUBBLOCKS if NC else 0
        t = torch.empty((B, H, NB, GP, NS) if NS else (1,), **f32)
        wrap(_step_stats_kernel)[(NB, B * H)](q, *rows, *scan, m, z, t, N, NB, *strides, G=G, GP=GP, D=D, R=R,
                                              RP=RP, BN=BN, NS=NS, PREP=fused, SPARQ=sparq, ROPE=cos is not None,
                                              num_warps=warps)
        out = torch.empty((B, H, NB, NC) if NC else (B, H, N), dtype=torch.int64 if NC else torch.float32,
                          device=q.device)
        if NC:
            idx = torch.empty((B, H, n_top), dtype=torch.int64, device=q.device)
            rk = torch.empty((B, H, n_top, k.shape[-1]), dtype=k.dtype, device=q.device)
            rv = torch.empty((B, H, n_top, v.shape[-1]), dtype=v.dtype, device=q.device)
            rok = torch.empty((B, H, n_top), dtype=torch.uint8, device=q.device)
            for x in (k, v):
                assert x.stride(-1) == 1 and x.stride(0) == H * x.stride(1), "the tier's rows evenly spaced"
            assert k.shape[-1] == v.shape[-1], "keys and values of one head size"
            CP = max(2, triton.next_power_of_2(NB * NC))
            NT = min(CP, max(2, triton.next_power_of_2(n_top))) if TOPK else CP
            if fused and count is None:
                count = torch.zeros((B, H), dtype=torch.int32, device=q.device)
            top = (idx, k, v, rk, rv, rok, k.stride(1), k.stride(2), v.stride(1), v.stride(2))
        else:
            CP = NT = 2
            top = (out,) * 6 + (0,) * 4
        fuse_top = bool(fused and NC)
        wrap(_step_votes_kernel)[(NB, B * H)](*scan, m, z, t, out, N, NB, n_top, *strides,
                                              count if fuse_top else out, *top, G=G, GP=GP, R=R, RP=RP,
                                              NBP=max(2, triton.next_power_of_2(NB)), BN=BN, NC=NC, TOPK=TOPK,
                                              NS=NS, TOP=fuse_top, CP=CP, NT=NT, DV=k.shape[-1] if NC else 2,
                                              num_warps=warps)
        if debug is not None:
            debug["candidates"] = out
        if not NC:
            return out
        if not fused:
            wrap(_top_keys_kernel)[(B * H,)](out, idx, k, v, valid, rk, rv, rok, NB * NC, n_top, N, k.stride(1),
                                             k.stride(2), v.stride(1), v.stride(2), CP=CP, NT=NT, D=k.shape[-1],
                                             NP=32, TOPK=TOPK, num_warps=4)
        return idx, rk, rv, rok

    @triton_op("atskv::step_votes", mutates_args=())
    def _step_votes_op(q: torch.Tensor, pq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
                       r: int) -> torch.Tensor:
        return _launch_step(q, pq, scale, valid, r, 0, wrap_triton)

    @triton_op("atskv::step_recall", mutates_args=("count",))
    def _step_recall_op(q: torch.Tensor, pq: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor, r: int,
                        n_top: int, k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, cos: Optional[torch.Tensor],
                        sin: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_step(q, pq, scale, valid, r, n_top, wrap_triton, k, v, count, cos, sin)


def scan_form(rows: int, n_entries: int, multiprocessors: int) -> tuple[int, int, bool]:
    """(entries a block, warps a program, fused) of a decode step's recall over `rows` rows (batch x KV heads) of
    n_entries: FORM where set, else ONE_WAVE where its grid fits one wave of the GPU's multiprocessors, else
    MANY_WAVES."""
    if FORM is not None:
        return FORM
    return ONE_WAVE if -(-n_entries // ONE_WAVE[0]) * rows <= multiprocessors else MANY_WAVES


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def usable(q: torch.Tensor, kq: torch.Tensor) -> bool:
    """Whether the kernel takes these scores: CUDA, Triton, at most MAX_QUERIES queries a KV head, a head size that
    is a power of two (one tile of it)."""
    G, Q, D = q.shape[2:]
    return kernels.enabled("recall") and q.is_cuda and kq.dtype == torch.int8 and G * Q <= MAX_QUERIES \
        and D & (D - 1) == 0 and D >= 16


def int8_logits(q, kq, scale, valid):
    if torch.compiler.is_compiling():
        # Inside torch.compile the same sum is left to Inductor, which fuses the widening into its own reduction
        # kernel (each int8 key read once). The triton_op failed both compiled CUDA tests on the H100 (cause not
        # seen, CHANGELOG.md), and in eager mode this form would write a (B, H, G, Q, N, D) float tensor.
        ub = (q.float()[..., None, :] * kq[:, :, None, None].float()).sum(-1) * scale[:, :, None, None, :]
        return ub.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    return _int8_logits_op(q, kq, scale, valid)


def votes_usable(q: torch.Tensor, pq: torch.Tensor) -> bool:
    """Whether the step's kernels take this: `usable`'s conditions, with one query per query head (a decode step)."""
    return q.shape[3] == 1 and usable(q, pq)


def as_uint8(valid: torch.Tensor) -> torch.Tensor:
    """The kernels' validity: eagerly a bool tensor's bytes read as uint8 (a view: no conversion kernel a layer).
    Under torch.compile a conversion, as the decode attention's ops take theirs: a dtype view of a bool tensor
    would be Inductor's bitcast, not yet tried on a GPU."""
    if valid.dtype == torch.bool and not torch.compiler.is_compiling():
        return valid.view(torch.uint8)
    return valid.to(torch.uint8)


def step_votes(q, pq, scale, valid, r: int):
    return _step_votes_op(q, pq, scale, as_uint8(valid), r)


def candidates_fit(n_entries: int, n: int) -> bool:
    """Whether the blocks' best (each block's next power of two >= n) fit one program's sort (MAX_CANDIDATES): at
    8K entries and n = 16, 29 x 16 in blocks of 256; longer tiers or larger n go to the tensor form."""
    block = min(f[0] for f in (ONE_WAVE, MANY_WAVES, FORM) if f)   # the most blocks either form may take
    per_block = min(block, 1 << max(0, n - 1).bit_length())
    return -(-n_entries // block) * per_block <= MAX_CANDIDATES


def step_recall(q, pq, scale, valid, r: int, n: int, k, v, count=None, cos=None, sin=None):
    if count is None:
        count = torch.zeros(pq.shape[:2], dtype=torch.int32, device=pq.device)
    return _step_recall_op(q, pq, scale, as_uint8(valid), r, n, k, v, count, cos, sin)

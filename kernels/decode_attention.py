"""Decode attention over a slot cache: one query token, grouped-query attention, a Triton kernel on CUDA.

Why a kernel of our own: PyTorch's SDPA kernels are built for prefill. For a decode step of this model they run a
128-row query tile for the 3 query heads that share a KV head, and cuBLAS needs three launches (scores, softmax,
values) when the method wants the attention probabilities (ATSKV, H2O). This kernel is flash-decoding (Dao et al.,
"Flash-Decoding for long-context inference", 2023; the split-KV decode kernels of vLLM and SGLang follow the same
plan): every program reads one KV head's slots once for all the query heads of its group (padded to the 16 rows that
`tl.dot` needs), keeps an online softmax, and the slots are split over several programs when batch x KV heads would
leave the GPU's SMs idle; a second small kernel merges the splits by log-sum-exp. When asked, it also writes the
scaled logits and their log-sum-exp, from which the caller gets the probabilities without a second pass over K.

The slot layout is `fast_decode`'s: K and V are (B, H_kv, N, D), and a bias (B, H_kv, N) in their dtype is added to
the scaled logits: 0 for a stored entry, HIDDEN for a free slot (exp() of it is 0). The rows must stay 128-byte
aligned: an earlier layout that carried the bias as an extra key channel (rows of D + 8) halved the kernel's
bandwidth (203 against 100 us at batch 64 x 8208 slots on an H200).
`decode_attention_reference` is the same computation in PyTorch (SDPA with the bias as its mask, or matmul and
softmax when the probabilities are wanted): the path on the CPU and on CUDA without Triton, and what the tests hold
the kernels to.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels
from cache_framework import rope
from kernels import rotary, tl, triton

# Launch configuration, from a sweep on an H200 (block, warps, pipeline stages, programs; README "Decode speed"):
# tensor cores (tl.dot over the group's query rows padded to 16) win by far at batch 64 (100 us against 840 us at
# 8208 slots), CUDA cores at batch 1 (27 against 65 us: 3 programs, where the 16-row tile is mostly waste).
CONFIGS = {"dot": {"block_n": 128, "num_warps": 4, "num_stages": 3},
           "dot_short": {"block_n": 64, "num_warps": 4, "num_stages": 3},
           "cuda": {"block_n": 32, "num_warps": 4, "num_stages": 3}}
# Up to this many slots the tensor-core kernel reads blocks of 64 slots: in ATSKV's step at 64 x 8192 with 10%
# (1024 slots, two splits of 512) the step that does not evict took 4.364 against 4.427 ms (eager layers in a CUDA
# graph, random weights, two rounds; .gpu sweep of block, warps, stages and splits; CHANGELOG.md, 707ed9d).
SHORT_SLOTS = 2048
HIDDEN = -30000.0       # the bias of a free (or padding) slot and of an invalid extra entry: exp() of it is 0, and
                        # unlike -inf a row or split with nothing valid gives no NaN
DOT_MIN_PROGRAMS = 32   # batch x KV heads from which the tensor-core kernel is used (measured at 3 and 192 only)
TARGET_PROGRAMS = 264   # split the slots until there are about this many programs (two per SM of an H200) ...
MIN_SPLIT = 128         # ... each with at least this many slots
ACC_CHUNK = 256         # the running statistic's slots per program of the merge kernel


def kernel_config(n_programs: int, n_slots: int | None = None) -> dict:
    """The launch configuration for batch x KV heads = n_programs over n_slots slots (None: more than
    SHORT_SLOTS)."""
    dot = n_programs >= DOT_MIN_PROGRAMS
    short = n_slots is not None and n_slots <= SHORT_SLOTS
    return {"dot": dot, **CONFIGS[("dot_short" if short else "dot") if dot else "cuda"]}


def decode_attention_reference(q, K, V, bias, scaling: float, want_probs: bool = False):
    """q (B, H_kv, G, D); K, V (B, H_kv, N, D); bias (B, H_kv, N). Returns the output (B, H_kv, G, D) in q's dtype
    and, if want_probs, the softmax probabilities (B, H_kv, G, N) in float32 (else None)."""
    mask = bias[:, :, None, :]
    if not want_probs:
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask.to(q.dtype), scale=scaling), None
    probs = torch.softmax(torch.matmul(q, K.transpose(-1, -2)).float() * scaling + mask.float(), dim=-1)
    return torch.matmul(probs.to(V.dtype), V), probs


def split_plan(n_programs: int, n_slots: int, block_n: int) -> tuple[int, int]:
    """(splits, slots per split): enough programs to fill the GPU, each split at least MIN_SPLIT slots (a multiple
    of block_n), and no split empty."""
    want = max(1, min(math.ceil(TARGET_PROGRAMS / n_programs), n_slots // max(MIN_SPLIT, block_n)))
    chunk = math.ceil(math.ceil(n_slots / want) / block_n) * block_n
    return math.ceil(n_slots / chunk), chunk


if triton is not None:
    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, b_ptr, o_ptr, s_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr, cos_ptr, sin_ptr,
                       N, scaling, chunk, n_splits, H, stride_qb, stride_cb,
                       stride_kb, stride_kn, stride_vb, stride_vn, stride_bb, stride_bn,
                       k2_ptr, v2_ptr, b2_ptr, N2, chunk2, n_splits1,
                       stride_k2b, stride_k2n, stride_v2b, stride_v2n, stride_b2b, stride_b2n,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                       SPLIT: tl.constexpr, WANT_S: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr,
                       ROPE: tl.constexpr, EXTRA: tl.constexpr, HID: tl.constexpr):
        bh = tl.program_id(0)            # (batch row, KV head), flattened
        sp = tl.program_id(1)            # which split of the slots (EXTRA: splits n_splits1 on are the extra entries)
        rows = tl.arange(0, G_PAD)
        dims = tl.arange(0, D)
        row_ok = rows < G
        qb = q_ptr + (bh // H) * stride_qb + ((bh % H) * G + rows[:, None]) * D   # q's batch rows may be strided
        q = tl.load(qb + dims[None, :], mask=row_ok[:, None], other=0.0)
        if ROPE:   # q * cos + rotate_half(q) * sin, in float32 (HF's apply_rotary_pos_emb)
            partner = tl.load(qb + ((dims + D // 2) % D)[None, :], mask=row_ok[:, None], other=0.0)
            cos = tl.load(cos_ptr + (bh // H) * stride_cb + dims)
            sin = tl.load(sin_ptr + (bh // H) * stride_cb + dims)
            q = rotary(q, partner, cos[None, :], sin[None, :], (dims < D // 2)[None, :]).to(q.dtype)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        start = sp * chunk
        kb = k_ptr + bh * stride_kb
        vb = v_ptr + bh * stride_vb
        bb = b_ptr + bh * stride_bb
        okb = b2_ptr + bh * stride_b2b   # EXTRA: the extra entries' validity (uint8), made a bias here
        n_end, length, skn, svn = N, chunk, stride_kn, stride_vn
        slots = True                     # a split of the slots (else of the extra entries: no logits stored)
        if EXTRA:
            if sp >= n_splits1:
                start = (sp - n_splits1) * chunk2
                kb = k2_ptr + bh * stride_k2b
                vb = v2_ptr + bh * stride_v2b
                n_end, length, skn, svn = N2, chunk2, stride_k2n, stride_v2n
                slots = False
        for i in range(0, length, BLOCK):
            n = start + i + tl.arange(0, BLOCK)
            n_ok = n < n_end
            if DOT:
                k = tl.load(kb + n[:, None] * skn + dims[None, :], mask=n_ok[:, None], other=0.0)
            else:   # (1, BLOCK, D): loaded in the layout of the product with the (G_PAD, 1, D) query, unconverted
                k = tl.load(kb + n[None, :, None] * skn + dims[None, None, :], mask=n_ok[None, :, None], other=0.0)
            if slots:
                bias = tl.load(bb + n * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
            else:
                ok = tl.load(okb + n * stride_b2n, mask=n_ok, other=0)
                bias = tl.where(ok != 0, 0.0, HID).to(tl.float32)
            if not DOT:    # CUDA cores, G_PAD = G rounded up to a power of two
                s = tl.sum(q[:, None, :].to(tl.float32) * k.to(tl.float32), 2)
            elif IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = (s * scaling + bias[None, :]).to(tl.float32)   # under Inductor a float argument is float64
            s = tl.where(n_ok[None, :], s, float("-inf"))
            if WANT_S:
                tl.store(s_ptr + bh * G * N + rows[:, None] * N + n[None, :], s,
                         mask=row_ok[:, None] & n_ok[None, :] & slots)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if not DOT:   # (1, BLOCK, D), as k
                v = tl.load(vb + n[None, :, None] * svn + dims[None, None, :], mask=n_ok[None, :, None], other=0.0)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), 1)
            else:
                v = tl.load(vb + n[:, None] * svn + dims[None, :], mask=n_ok[:, None], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLIT:   # partial results, merged by _merge_kernel
            base = bh * n_splits + sp   # the output's partial for the group's G real rows only
            tl.store(po_ptr + (base * G + rows[:, None]) * D + dims[None, :], acc, mask=row_ok[:, None])
            tl.store(pm_ptr + base * G_PAD + rows, m_i)
            tl.store(pl_ptr + base * G_PAD + rows, l_i)
        else:
            out = acc / l_i[:, None]
            tl.store(o_ptr + bh * G * D + rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
            if WANT_S:
                tl.store(lse_ptr + bh * G + rows, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _merge_kernel(o_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr, s_ptr, acc_ptr, n_splits, N, n_splits1,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                      SPLIT: tl.constexpr, WANT_S: tl.constexpr, ACC: tl.constexpr, ACC_BLOCK: tl.constexpr,
                      R: tl.constexpr, EXTRA: tl.constexpr):
        """Program (bh, c). SPLIT: merges the splits' partial outputs by log-sum-exp (program c = 0 writes the
        output and the log-sum-exp). ACC: adds the group's mean probability exp(s - lse) over slots
        [c * ACC_BLOCK, (c + 1) * ACC_BLOCK) to the running statistic acc (B * H_kv, N), in place. R: the G rows
        padded to a power of two only (the decode kernel's G_PAD rows pad to 16 for tl.dot; the rows beyond R would
        be masked work: an (R, ACC_BLOCK) tile is a quarter of a (16, ACC_BLOCK) one). EXTRA: the splits from
        n_splits1 on attended extra entries; the output merges every split, the log-sum-exp (and with it acc) only
        the slots' splits."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        rows = tl.arange(0, R)
        row_ok = rows < G
        if SPLIT:
            sps = tl.arange(0, S_PAD)
            dims = tl.arange(0, D)
            sp_ok = sps < n_splits
            base = bh * n_splits + sps
            m = tl.load(pm_ptr + base[:, None] * G_PAD + rows[None, :], mask=sp_ok[:, None], other=float("-inf"))
            l = tl.load(pl_ptr + base[:, None] * G_PAD + rows[None, :], mask=sp_ok[:, None], other=0.0)
            m_all = tl.max(m, 0)                                       # (R,)
            w = tl.where(sp_ok[:, None], tl.exp(m - m_all[None, :]), 0.0)   # (S_PAD, R)
            l_all = tl.sum(w * l, 0)
            lse = m_all + tl.log(l_all)
            if EXTRA:   # the slots' own log-sum-exp
                own = sps < n_splits1
                m1 = tl.max(tl.where(own[:, None], m, float("-inf")), 0)
                lse = m1 + tl.log(tl.sum(tl.where(own[:, None], tl.exp(m - m1[None, :]) * l, 0.0), 0))
            if c == 0:
                po = tl.load(po_ptr + (base[:, None, None] * G + rows[None, :, None]) * D + dims[None, None, :],
                             mask=sp_ok[:, None, None] & row_ok[None, :, None], other=0.0)   # (S_PAD, R, D)
                out = tl.sum(po * w[:, :, None], 0) / l_all[:, None]
                tl.store(o_ptr + bh * G * D + rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty),
                         mask=row_ok[:, None])
                if WANT_S:
                    tl.store(lse_ptr + bh * G + rows, lse, mask=row_ok)
        else:   # the decode kernel wrote the log-sum-exp
            lse = tl.load(lse_ptr + bh * G + rows, mask=row_ok, other=0.0)
        if ACC:
            n = c * ACC_BLOCK + tl.arange(0, ACC_BLOCK)
            n_ok = n < N
            s = tl.load(s_ptr + (bh * G + rows[:, None]) * N + n[None, :], mask=row_ok[:, None] & n_ok[None, :],
                        other=float("-inf"))
            p = tl.sum(tl.exp(s - lse[:, None]), 0) / G            # padding rows: exp(-inf) = 0
            a = tl.load(acc_ptr + bh * N + n, mask=n_ok, other=0.0)
            tl.store(acc_ptr + bh * N + n, a + p, mask=n_ok)


def launch(q, K, V, bias, scaling: float, want_lse: bool, wrap=lambda k: k, cfg: dict | None = None, cos=None,
           sin=None, acc=None, extra=None):
    """Run the Triton kernels (`wrap`: torch's wrap_triton inside a triton_op; cfg: kernel_config's by default).
    Returns the output (B, H_kv, G, D), the scaled logits (B, H_kv, G, N) and their log-sum-exp (B, H_kv, G) in
    float32; without want_lse (and acc) the last two are unused placeholders of shape (1,). cos, sin (B, D): q is
    rotated (RoPE) as it is loaded; its batch rows may be strided (a view of the fused q/k/v projection). acc
    (B, H_kv, N) float32: the group's mean probability is added to it in place, in the kernel that merges the
    splits (a kernel of its own, when there is one split). extra (K2, V2, valid2) (B, H_kv, N2, D) and
    (B, H_kv, N2) uint8 (0 / 1; `decode_attention` converts a bool validity before the op): further entries
    attended beside the slots in further splits of the same kernel (ATSKV's recalled entries); the output is the
    attention over both, the logits, the log-sum-exp and acc those of the slots alone."""
    B, H, G, D = q.shape
    N = K.shape[2]
    K2, V2, ok2 = extra if extra is not None else (K, V, bias)   # (unused placeholders without extra entries)
    assert extra is None or ok2.dtype == torch.uint8, "the extra entries' validity is uint8"
    for t in (K, V, bias, K2, V2, ok2) + (() if acc is None else (acc,)):   # (batch, head) rows into one index
        assert t.stride(-1) == 1 and t.stride(0) == H * t.stride(1), "slots must be contiguous in the last dim"
    if q.stride(3) != 1 or q.stride(2) != D or q.stride(1) != G * D:
        q = q.contiguous()
    want_lse = want_lse or acc is not None
    out = torch.empty((B, H, G, D), dtype=q.dtype, device=q.device)
    rotate = cos is not None
    if rotate:
        cos, sin = cos.reshape(B, D).contiguous(), sin.reshape(B, D).contiguous()
    s = torch.empty((B, H, G, N) if want_lse else (1,), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, H, G) if want_lse else (1,), dtype=torch.float32, device=q.device)
    cfg = cfg or kernel_config(B * H, N)
    splits1, chunk = split_plan(B * H, N, cfg["block_n"])
    splits2, chunk2 = split_plan(B * H, K2.shape[2], cfg["block_n"]) if extra is not None else (0, 0)
    splits = splits1 + splits2
    G_PAD = max(16 if cfg["dot"] else 1, triton.next_power_of_2(G))   # tl.dot needs 16 rows
    po = torch.empty((B * H * splits, G, D) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    pm = torch.empty((B * H * splits, G_PAD) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    ieee = q.dtype == torch.float32
    wrap(_decode_kernel)[(B * H, splits)](q, K, V, bias, out, s, lse, po, pm, pl, cos if rotate else q,
                                          sin if rotate else q, N, scaling, chunk, splits, H, q.stride(0),
                                          D, K.stride(1), K.stride(2), V.stride(1), V.stride(2), bias.stride(1),
                                          bias.stride(2), K2, V2, ok2, K2.shape[2], chunk2, splits1, K2.stride(1),
                                          K2.stride(2), V2.stride(1), V2.stride(2), ok2.stride(1), ok2.stride(2),
                                          G=G, G_PAD=G_PAD, D=D, BLOCK=cfg["block_n"], SPLIT=splits > 1,
                                          WANT_S=want_lse, IEEE=ieee, DOT=cfg["dot"], ROPE=rotate,
                                          EXTRA=extra is not None, HID=HIDDEN,
                                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1 or acc is not None:
        acc_block = min(ACC_CHUNK, triton.next_power_of_2(N))
        wrap(_merge_kernel)[(B * H, triton.cdiv(N, acc_block) if acc is not None else 1)](
            out, lse, po, pm, pl, s, s if acc is None else acc, splits, N, splits1, G=G, G_PAD=G_PAD, D=D,
            S_PAD=triton.next_power_of_2(splits), SPLIT=splits > 1, WANT_S=want_lse, ACC=acc is not None,
            ACC_BLOCK=acc_block, R=triton.next_power_of_2(G), EXTRA=extra is not None)
    return out, s, lse


if triton is not None:
    from torch.library import triton_op, wrap_triton

    # The kernels as one torch operator, so that torch.compile traces through them and a CUDA graph captures them
    # like any other kernel. Registered at import: Dynamo refuses to trace the registration itself.
    @triton_op("atskv::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, bias: torch.Tensor, scaling: float,
                             want_lse: bool, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                             K2: torch.Tensor | None = None, V2: torch.Tensor | None = None,
                             ok2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch(q, K, V, bias, scaling, want_lse, wrap_triton, cos=cos, sin=sin,
                      extra=None if K2 is None else (K2, V2, ok2))

    @triton_op("atskv::decode_attention_acc", mutates_args=("acc",))
    def _decode_attention_acc_op(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, bias: torch.Tensor,
                                 scaling: float, acc: torch.Tensor, cos: torch.Tensor | None = None,
                                 sin: torch.Tensor | None = None, K2: torch.Tensor | None = None,
                                 V2: torch.Tensor | None = None, ok2: torch.Tensor | None = None) -> torch.Tensor:
        """The same with the group's mean probability added to the running statistic acc in place (the merge
        kernel does it: no probabilities leave the kernels)."""
        return launch(q, K, V, bias, scaling, False, wrap_triton, cos=cos, sin=sin, acc=acc,
                      extra=None if K2 is None else (K2, V2, ok2))[0]




def kernel_available(device) -> bool:
    return kernels.enabled("attention") and torch.device(device).type == "cuda"


def decode_attention(q, K, V, bias, scaling: float, want_probs: bool = False, use_kernel: bool = True, acc=None,
                     cos=None, sin=None, extra=None):
    """Decode attention over the slots: the Triton kernels on CUDA when Triton is there (and use_kernel), else the
    reference. Returns (out (B, H_kv, G, D), probabilities (B, H_kv, G, N) float32 or None).
    acc (B, H_kv, N) float32: the probabilities' mean over each KV group's query heads is added to it in place
    (ATSKV's running attention statistic). On the kernel path the merge kernel adds it from the stored logits (a
    program per 256 slots); without want_probs no probabilities are returned. Measured on the H200 (ATSKV's step at
    64 x 8192, 10%; CHANGELOG.md): 7.54 against 7.87 ms with PyTorch adding it (eager layers); summing it
    in the attention kernel itself (one split, a second pass over the logits) was slower, 1.70 against 1.64 ms.
    cos, sin (B, 1, D): q is not rotated yet; the kernel rotates it as it loads it (which spares the step a
    kernel), the reference first. extra (K2, V2, valid2) (B, H_kv, R, D) and (B, H_kv, R) bool or uint8 (0 / 1; the
    kernels take uint8, and a bool costs a conversion): further entries attended beside the slots (ATSKV's recalled
    ones), in further splits of the same kernels; the probabilities (and acc) stay the slots' alone, normalised
    over the slots."""
    want = want_probs or acc is not None
    x = () if extra is None else tuple(extra)
    if not (use_kernel and kernel_available(q.device)):
        if cos is not None:
            q = rope(q, cos[:, :, None], sin[:, :, None])
        out, probs = decode_attention_reference(q, K, V, bias, scaling, want) if extra is None else \
            _reference_with_extra(q, K, V, bias, scaling, *x[:2], x[2].bool())
    else:
        if x and x[2].dtype == torch.bool:   # the ops take the validity as uint8: Inductor refuses an op that views
            x = x[:2] + (x[2].to(torch.uint8),)   # its own input as another dtype
        if acc is not None and not want_probs:   # the statistic summed in the merge kernel
            return _decode_attention_acc_op(q, K, V, bias, float(scaling), acc, cos, sin, *x), None
        out, s, lse = _decode_attention_op(q, K, V, bias, float(scaling), want, cos, sin, *x)
        probs = torch.exp(s - lse[..., None]) if want else None
    if acc is not None:
        acc += probs.mean(2)
    return out, probs if want_probs else None


def _reference_with_extra(q, K, V, bias, scaling, K2, V2, ok2):
    """q rotated: the slots' attention and the valid extra entries' merged by their log-sum-exps, as the plain path
    merges its recall (`external_memory.attention_lse`, `merge_attention`: on the CPU the fast path then decides as
    the plain path does in fp32), and the slots' own probabilities."""
    from cache_framework import repeat_heads
    from external_memory import attention_lse, merge_attention
    B, H, G, D = q.shape
    logits = torch.matmul(q, K.transpose(-1, -2)).float() * scaling + bias[:, :, None, :].float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    out = torch.matmul(probs.to(V.dtype), V)
    mask = repeat_heads(ok2, G)[:, :, None, :]                      # (B, H_kv * G, 1, R)
    out2, lse2 = attention_lse(q.reshape(B, H * G, 1, D), K2, V2, mask, scaling)
    merged = merge_attention(out.float().reshape(B, H * G, 1, D), lse.reshape(B, H * G, 1, 1), out2, lse2)
    return merged.reshape(B, H, G, D).to(out.dtype), probs

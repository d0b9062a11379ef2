"""Recall's selection from the int8 copies of the passive keys, as one Triton kernel (CUDA): a few queries of a
KV head's group against every int8 key of that head, the keys' scales applied to the scores, invalid entries -inf.

Why: in tensor form, `einsum(q.float(), kq.float())` first widens every int8 key to float32 (4x the int8 bytes
written, then read again), so that selecting from the int8 summaries cost more memory traffic than attending to
the bf16 keys they summarise. Here each program reads a block of int8 keys once, widens them in registers and
writes only the few queries' scores. A decode step (a few queries per KV head) takes it; a prompt chunk (many
queries) is a real GEMM and stays with torch. Under torch.compile, Inductor generates the fused reduction itself.
`external_memory.int8_logits` is its tensor form and the reference.
"""
from __future__ import annotations

import torch

import kernels
from kernels import tl, triton

MAX_QUERIES = 16     # queries of one KV head's group (query heads x tokens) a program holds; more: torch's einsum
TILE = 16384         # q x key products a program holds in registers: BLOCK_N keys = TILE / (queries x head size)


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

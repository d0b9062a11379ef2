"""Matmuls of a decode step (a few rows against a weight matrix) as Triton kernels, the SwiGLU fused into one.

Why: at batch 64 the decoder's matmuls read a few MB of weights each, and cuBLAS took 3-4.4 us for each of them on an
H200, plus a separate kernel for SiLU(gate) x up. One program per BLOCK_N output columns, all rows in one tile
(`tl.dot` over K in BLOCK_K steps), measured in CUDA graphs at batch 64 (.gpu microbenchmark, CHANGELOG.md,
a78f122): q/k/v 2.75 against 2.99 us, o_proj 2.70 against 3.09, gate/up with the SwiGLU 3.47 against 3.33 + a
pointwise kernel, down 4.10 against 4.42. Used by the fast path for bf16 / fp16 weights on CUDA without a bias;
float32 and everything else stay with F.linear (so float32 answers are unchanged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from kernels import tl, triton

MAX_ROWS = 64                                      # more rows than this: F.linear (a real GEMM tile does better)
# In-step sweep on the H200 (ATSKV's step at 64 x 8192, 10%, eager layers in a CUDA graph, random weights, two
# rounds; CHANGELOG.md, 707ed9d): block_k 128 for q/k/v, o_proj and gate/up took the step that does not evict from
# 4.40 to 4.36 ms; rows split over programs (block_m 32 or 16), 3 stages or 2 warps were slower, down_proj with
# block_k 64 too. block_m: rows a program takes (None: all of them, one row block).
CONFIG = {"block_n": 16, "block_k": 128, "num_warps": 4, "num_stages": 4, "block_m": None}
CONFIG_LONG_K = {"block_n": 16, "block_k": 128, "num_warps": 4, "num_stages": 4, "block_m": None}   # K > 1024


if triton is not None:
    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, r_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       SWIGLU: tl.constexpr, RES: tl.constexpr):
        """y = x @ w.T for x (M, K), w (N, K); RES: + r (M, N) (a residual); SWIGLU: w (2N, K) = [gate; up],
        y = silu(x @ gate.T) * (x @ up.T). Rounded to y's dtype where the eager ops round."""
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BM, BN), tl.float32)
        acc_up = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            if SWIGLU:
                u = tl.load(w_ptr + (rn + N)[:, None] * K + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0.0)
                acc_up = tl.dot(x, tl.trans(u), acc_up)
        dt = y_ptr.dtype.element_ty
        if SWIGLU:
            g = acc.to(dt).to(tl.float32)
            acc = (g * tl.sigmoid(g)).to(dt).to(tl.float32) * acc_up.to(dt).to(tl.float32)
        if RES:
            r = tl.load(r_ptr + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            acc = acc.to(dt).to(tl.float32) + r.to(tl.float32)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(dt), mask=m_ok[:, None] & n_ok[None, :])

    from torch.library import triton_op, wrap_triton

    def _launch(x, w, swiglu: bool, residual=None, wrap=lambda k: k):
        M, K = x.shape
        N = w.shape[0] // 2 if swiglu else w.shape[0]
        x = x.contiguous()
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        cfg = CONFIG_LONG_K if K > 1024 else CONFIG
        BM = max(16, triton.next_power_of_2(min(M, cfg.get("block_m") or M)))   # rows a program (all: None)
        wrap(_skinny_kernel)[(triton.cdiv(N, cfg["block_n"]), triton.cdiv(M, BM))](
            x, w, y if residual is None else residual.contiguous(), y, M, N, K, BM=BM, BN=cfg["block_n"],
            BK=cfg["block_k"], SWIGLU=swiglu, RES=residual is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return y

    @triton_op("atskv::skinny_linear", mutates_args=())
    def _skinny_linear_op(x: torch.Tensor, w: torch.Tensor, swiglu: bool,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
        return _launch(x, w, swiglu, residual, wrap_triton)


def usable(x: torch.Tensor, w: torch.Tensor, bias=None) -> bool:
    """Whether the Triton kernel takes this matmul: CUDA, Triton, half precision, at most MAX_ROWS rows, no bias."""
    return kernels.enabled("gemm") and x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS and bias is None \
        and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and w.is_contiguous()


def linear(x, w, bias=None, residual=None):
    """F.linear(x, w, bias) for x (M, K), + residual (M, N) if given (in the kernel's epilogue: a decode step's
    last add, which would otherwise be a kernel of its own at the compiled layer's boundary)."""
    if usable(x, w, bias) and (residual is None or residual.dtype == x.dtype):
        return _skinny_linear_op(x, w, False, residual)
    y = F.linear(x, w, bias)
    return y if residual is None else residual + y


def swiglu(x, w_gate_up):
    """silu(x @ gate.T) * (x @ up.T) for w_gate_up = cat([gate, up]) (2I, K)."""
    if usable(x, w_gate_up):
        return _skinny_linear_op(x, w_gate_up, True)
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.silu(g) * u

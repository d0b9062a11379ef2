"""The decode step's end on CUDA: the greedy token and the step's bookkeeping in two Triton kernels.

Why: compiled, `fast_decode.step_tail`'s argmax over the vocabulary was one reduction kernel with a program per
batch row (10.1 us at 64 x 49152 on an H200), and its bookkeeping (the token, the ring buffer of generated tokens,
the step counter, the positions, evict_every's place in the free-slot queue) six more kernels of about 1 us each:
Inductor writes each mutated input of its own shape back in a kernel of its own. Here:
- `_argmax_part_kernel`: a program per (row, block of BLOCK logits) keeps the block's maximum and its first index;
- `_greedy_finish_kernel`: one program takes each row's first block with the row's maximum (so ties go to the
  lowest index, as torch.argmax's do) and does all of the bookkeeping.
`step_tail`'s tensor form stays the path off CUDA (and with --kernels_off greedy); tests/test_greedy_kernels.py
holds the two equal in Triton's interpreter, tests/test_gpu.py on CUDA. Not matched: a row with NaN logits
(torch.argmax returns a NaN's index; these kernels do not promise to).
"""
from __future__ import annotations

import torch

import kernels
from kernels import tl, triton

BLOCK = 2048          # logits per program of the first kernel (24 blocks a row at this model's 49152 tokens)
ROWS = 64             # batch rows per pass of the finishing kernel's loop
QUEUE_MODES = {None: 0, "evict": 1, "keep": 2}   # step_tail's queue_step


if triton is not None:
    @triton.jit
    def _argmax_part_kernel(logits_ptr, pv_ptr, pi_ptr, V, stride, n_blocks, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        j = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride + j, mask=j < V, other=float("-inf")).to(tl.float32)
        v, i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(pv_ptr + row * n_blocks + blk, v)
        tl.store(pi_ptr + row * n_blocks + blk, blk * BLOCK + i)

    @triton.jit
    def _greedy_finish_kernel(pv_ptr, pi_ptr, tok_ptr, t_ptr, out_ptr, cur_ptr, qidx_ptr, B, n_blocks, L, every,
                              MODE: tl.constexpr, ROWS: tl.constexpr, S_PAD: tl.constexpr):
        """tok = the argmax; t += 1; out[:, t % L] = tok; cur += 1; MODE 1: qidx = 0, 2: min(qidx + 1, every - 1)."""
        t = tl.load(t_ptr) + 1
        col = t % L
        s = tl.arange(0, S_PAD)
        for r0 in range(0, B, ROWS):
            r = r0 + tl.arange(0, ROWS)
            ok = r < B
            m = ok[:, None] & (s < n_blocks)[None, :]
            pv = tl.load(pv_ptr + r[:, None] * n_blocks + s[None, :], mask=m, other=float("-inf"))
            pi = tl.load(pi_ptr + r[:, None] * n_blocks + s[None, :], mask=m, other=0)
            best = tl.argmax(pv, 1, tie_break_left=True)            # the first block holding the row's maximum
            nxt = tl.sum(tl.where(s[None, :] == best[:, None], pi, 0), 1)
            tl.store(tok_ptr + r, nxt, mask=ok)
            tl.store(out_ptr + r * L + col, nxt, mask=ok)
            tl.store(cur_ptr + r, tl.load(cur_ptr + r, mask=ok) + 1, mask=ok)
        tl.store(t_ptr, t)
        if MODE == 1:
            tl.store(qidx_ptr, tl.zeros_like(tl.load(qidx_ptr)))
        elif MODE == 2:
            tl.store(qidx_ptr, tl.minimum(tl.load(qidx_ptr) + 1, every - 1))

    from torch.library import triton_op, wrap_triton

    def launch(logits, tok, t, out, cur, qidx, mode: int, every: int, wrap=lambda k: k) -> None:
        B, V = logits.shape
        n_blocks = triton.cdiv(V, BLOCK)
        pv = torch.empty((B, n_blocks), dtype=torch.float32, device=logits.device)
        pi = torch.empty((B, n_blocks), dtype=torch.int32, device=logits.device)
        wrap(_argmax_part_kernel)[(B, n_blocks)](logits, pv, pi, V, logits.stride(0), n_blocks, BLOCK=BLOCK)
        wrap(_greedy_finish_kernel)[(1,)](pv, pi, tok, t, out, cur, qidx, B, n_blocks, out.shape[1], every,
                                          MODE=mode, ROWS=ROWS, S_PAD=triton.next_power_of_2(n_blocks))

    @triton_op("atskv::greedy_step", mutates_args={"tok", "t", "out", "cur", "qidx"})
    def _greedy_step_op(logits: torch.Tensor, tok: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
                        cur: torch.Tensor, qidx: torch.Tensor, mode: int, every: int) -> None:
        launch(logits, tok, t, out, cur, qidx, mode, every, wrap_triton)


def usable(logits: torch.Tensor, out: torch.Tensor) -> bool:
    return kernels.enabled("greedy") and logits.is_cuda and logits.stride(-1) == 1 and out.is_contiguous()


def greedy_step(logits, tok, t, out, cur, qidx, queue_step, every: int) -> None:
    """step_tail's bookkeeping from the logits (B, V), in place: tok = argmax (ties: the lowest index); t += 1;
    out[:, t % out.shape[1]] = tok; cur += 1; queue_step 'evict': qidx = 0, 'keep': min(qidx + 1, every - 1)."""
    _greedy_step_op(logits, tok, t, out, cur, qidx, QUEUE_MODES[queue_step], every)

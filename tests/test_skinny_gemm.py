"""The decode step's matmul kernels (skinny_gemm): held to F.linear and the eager SwiGLU, on a CPU machine through
Triton's interpreter when Triton is installed, on CUDA in tests/test_gpu.py."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import skinny_gemm


def test_linear_and_swiglu_fall_back_to_torch_off_cuda():
    g = torch.Generator().manual_seed(0)
    x, w, wgu = torch.randn(5, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(96, 64, generator=g)
    assert not skinny_gemm.usable(x, w)
    assert torch.equal(skinny_gemm.linear(x, w), F.linear(x, w))
    r = torch.randn(5, 48, generator=g)
    assert torch.equal(skinny_gemm.linear(x, w, residual=r), r + F.linear(x, w))
    gate, up = F.linear(x, wgu).chunk(2, dim=-1)
    assert torch.equal(skinny_gemm.swiglu(x, wgu), F.silu(gate) * up)


INTERPRETED = r"""
import sys, torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
import skinny_gemm as sg
g = torch.Generator().manual_seed(0)
for M, K, N in ((64, 576, 960), (3, 100, 40), (17, 1536, 48)):   # full tiles; K, N and rows not multiples
    x, w = torch.randn(M, K, generator=g), torch.randn(2 * N, K, generator=g) / 24
    assert (sg._launch(x, w[:N].contiguous(), False) - F.linear(x, w[:N])).abs().max() < 1e-4, (M, K, N)
    r = torch.randn(M, N, generator=g)
    assert (sg._launch(x, w[:N].contiguous(), False, r) - (r + F.linear(x, w[:N]))).abs().max() < 1e-4, (M, K, N)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    assert (sg._launch(x, w, True) - F.silu(gate) * up).abs().max() < 1e-4, (M, K, N)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs Triton (it ships with CUDA builds of torch, not with the CPU build)")
def test_skinny_kernel_matches_torch_in_the_triton_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", INTERPRETED.format(root=root)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=root)
    if "only 0-dimensional arrays can be converted" in r.stderr:
        pytest.skip("Triton's interpreter fails on this NumPy (it needs numpy < 2.3)")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]

"""The decode step's matmul kernels (skinny_gemm): held to F.linear and the eager SwiGLU, on a CPU machine through
Triton's interpreter when Triton is installed, on CUDA in tests/test_gpu.py."""
import torch
import torch.nn.functional as F

from kernels import skinny_gemm
from tests.triton_interpreter import needs_triton, register, run_interpreted


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
from kernels import skinny_gemm as sg
g = torch.Generator().manual_seed(0)
for M, K, N in ((64, 576, 960), (3, 100, 40), (17, 1536, 48)):   # full tiles; K, N and rows not multiples
    x, w = torch.randn(M, K, generator=g), torch.randn(2 * N, K, generator=g) / 24
    assert (sg._launch(x, w[:N].contiguous(), False) - F.linear(x, w[:N])).abs().max() < 1e-4, (M, K, N)
    r = torch.randn(M, N, generator=g)
    assert (sg._launch(x, w[:N].contiguous(), False, r) - (r + F.linear(x, w[:N]))).abs().max() < 1e-4, (M, K, N)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    assert (sg._launch(x, w, True) - F.silu(gate) * up).abs().max() < 1e-4, (M, K, N)
config, sg.CONFIG = sg.CONFIG, dict(sg.CONFIG, block_m=16)      # the rows in blocks of 16 over several programs
try:
    for M in (64, 17):
        x, w = torch.randn(M, 96, generator=g), torch.randn(48, 96, generator=g) / 10
        assert (sg._launch(x, w, False) - F.linear(x, w)).abs().max() < 1e-4, M
finally:
    sg.CONFIG = config                                           # the scripts share a process
print("ok")
"""
register(INTERPRETED)


@needs_triton
def test_skinny_kernel_matches_torch_in_the_triton_interpreter():
    run_interpreted(INTERPRETED)

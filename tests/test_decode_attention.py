"""Decode attention over the slot cache: the reference (CPU) and the Triton kernels (held to the reference; on a CPU
machine through Triton's interpreter when Triton is installed, on CUDA in tests/test_gpu.py)."""
import pytest
import torch

from kernels import decode_attention as da
from fast_decode import HIDDEN
from tests.triton_interpreter import needs_triton, register, run_interpreted


def slots(B=2, H=3, G=3, N=300, D=64, hidden_share=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, K, V = (torch.randn(B, H, n, D, generator=g) for n in (G, N, N))
    bias = torch.where(torch.rand(B, H, N, generator=g) < hidden_share, HIDDEN, 0.0)
    return q, K, V, bias


def test_reference_gives_hidden_slots_no_probability_and_attends_over_the_rest():
    q, K, V, bias = slots()
    out, probs = da.decode_attention_reference(q, K, V, bias, 0.125, want_probs=True)
    hidden = (bias == HIDDEN)[:, :, None].expand_as(probs)
    assert probs[hidden].max() == 0
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]))
    # the same as a softmax over the visible slots only, per batch row and KV head
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            vis = bias[b, h] == 0
            p = torch.softmax(q[b, h] @ K[b, h, vis].T * 0.125, -1)
            assert torch.allclose(out[b, h], p @ V[b, h, vis], atol=1e-5)
    sdpa_out, _ = da.decode_attention_reference(q, K, V, bias, 0.125, want_probs=False)
    assert torch.allclose(sdpa_out, out, atol=1e-5)


def test_decode_attention_adds_the_groups_mean_probability_to_a_running_statistic():
    q, K, V, bias = slots()
    out, probs = da.decode_attention_reference(q, K, V, bias, 0.125, want_probs=True)
    acc = torch.rand(bias.shape)
    before = acc.clone()
    got, none = da.decode_attention(q, K, V, bias, 0.125, acc=acc)
    assert none is None and torch.equal(got, out)
    assert torch.allclose(acc, before + probs.mean(2))
    assert torch.equal(acc[bias == HIDDEN], before[bias == HIDDEN])   # a free slot gets nothing


@pytest.mark.parametrize("n_programs,n_slots,block_n", [(192, 8208, 128), (192, 832, 128), (3, 8208, 32),
                                                        (3, 100, 32), (1, 129, 128)])
def test_split_plan_covers_every_slot_with_no_empty_split(n_programs, n_slots, block_n):
    splits, chunk = da.split_plan(n_programs, n_slots, block_n)
    assert chunk % block_n == 0
    assert splits * chunk >= n_slots > (splits - 1) * chunk   # every slot in one split, the last split not empty
    assert splits == 1 or chunk >= da.MIN_SPLIT


INTERPRETED = r"""
import sys, torch
sys.path.insert(0, {root!r})
from kernels import decode_attention as da
from tests.test_decode_attention import slots
for cfg in (da.kernel_config(1), da.kernel_config(64), da.kernel_config(64, 700)):   # CUDA cores, tensor cores x2
    for B, N in ((2, 100), (1, 700)):                             # one split, several splits
        q, K, V, bias = slots(B=B, N=N)
        for want in (False, True):
            o, s, lse = da.launch(q, K, V, bias, 0.125, want, cfg=cfg)
            ro, rp = da.decode_attention_reference(q, K, V, bias, 0.125, want)
            assert (o - ro).abs().max() < 1e-5, (cfg, B, N, want)
            if want:
                assert (torch.exp(s - lse[..., None]) - rp).abs().max() < 1e-6, (cfg, B, N)
        qkv = torch.randn(B, 15 * 64)                             # q rotated in the kernel, read from a strided view
        qv, cos, sin = qkv[:, :9 * 64].view(B, 3, 3, 64), torch.randn(B, 1, 64), torch.randn(B, 1, 64)
        o, _, _ = da.launch(qv, K, V, bias, 0.125, False, cfg=cfg, cos=cos, sin=sin)
        ro, _ = da.decode_attention_reference(da.rope(qv, cos[:, :, None], sin[:, :, None]), K, V, bias, 0.125)
        assert (o - ro).abs().max() < 1e-5, (cfg, B, N)
        acc = torch.rand(B, 3, N)                                 # the running statistic, in the merge kernel
        want = acc + rp.mean(2)
        o, _, lse = da.launch(q, K, V, bias, 0.125, False, cfg=cfg, acc=acc)
        assert (o - da.decode_attention_reference(q, K, V, bias, 0.125)[0]).abs().max() < 1e-5, (cfg, B, N)
        assert (acc - want).abs().max() < 1e-6, (cfg, B, N)
        ref_lse = torch.logsumexp(torch.matmul(q, K.transpose(-1, -2)) * 0.125 + bias[:, :, None], -1)
        assert (lse - ref_lse).abs().max() < 1e-4, (cfg, B, N)   # merged with a recall's attention by it
        # extra entries (ATSKV's recalled ones) in further splits: the output over both, the probabilities and acc
        # the slots' own; one KV head with no valid extra entry
        K2, V2 = torch.randn(B, 3, N // 3, 64), torch.randn(B, 3, N // 3, 64)
        ok2 = torch.rand(B, 3, N // 3) < 0.7
        ok2[0, 1] = False
        ro, rp = da._reference_with_extra(q, K, V, bias, 0.125, K2, V2, ok2)
        o, s, lse = da.launch(q, K, V, bias, 0.125, True, cfg=cfg, extra=(K2, V2, ok2.to(torch.uint8)))
        assert (o - ro).abs().max() < 1e-5, (cfg, B, N)
        assert (torch.exp(s - lse[..., None]) - rp).abs().max() < 1e-6, (cfg, B, N)
        acc = torch.rand(B, 3, N)
        want = acc + rp.mean(2)
        o, _, _ = da.launch(q, K, V, bias, 0.125, False, cfg=cfg, acc=acc, extra=(K2, V2, ok2.to(torch.uint8)))
        assert (o - ro).abs().max() < 1e-5 and (acc - want).abs().max() < 1e-6, (cfg, B, N)
print("ok")
"""
register(INTERPRETED)


@needs_triton
def test_triton_kernels_match_the_reference_in_the_triton_interpreter():
    run_interpreted(INTERPRETED)


def compile_for_hopper(fn, constexprs: dict, ones=(), types=None, div=(), warps: int = 4, stages: int = 3):
    """Compile a Triton kernel for an sm_90 target on this machine (no GPU needed: Triton's ptxas ships with it);
    `ones`: integer arguments the launcher would specialise to the constant 1; `types`: argument types by name
    (else bf16 or float32 pointers, i32 integers); `div`: integer arguments the launcher would mark as multiples
    of 16, which with it marks every pointer so (as the launcher does: bench/kernel_ptx_counts.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in ones:
            sig[p.name], cx[(i,)] = "constexpr", constexprs.get(p.name, 1)
            continue
        if types and p.name in types:
            sig[p.name] = types[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*u8" if p.name == "b2_ptr" else "*bf16" if p.name in (
                "q_ptr", "k_ptr", "v_ptr", "b_ptr", "k2_ptr", "v2_ptr", "o_ptr", "cos_ptr", "sin_ptr") else "*fp32"
        else:
            sig[p.name] = "fp32" if p.name == "scaling" else "i32"
        if div and (p.name.endswith("_ptr") or p.name in div):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature=sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


@needs_triton
@pytest.mark.parametrize("extra,ones", [(False, ()), (True, ()), (True, ("N2", "chunk2"))],
                         ids=["slots", "extra_entries", "one_extra_entry"])
def test_the_kernels_compile_for_a_hopper_gpu(extra, ones):
    """The interpreter runs no compiler: a kernel whose branches yield mismatched types (a size the launcher
    specialises to 1 in one branch only) fails on a GPU alone. Compiled here for sm_90, as the launcher would."""
    for dot, g_pad, block in ((True, 16, 64), (False, 4, 32)):   # tensor cores; CUDA cores (batch 1)
        compile_for_hopper(da._decode_kernel, dict(G=3, G_PAD=g_pad, D=64, BLOCK=block, SPLIT=True, WANT_S=True,
                                                   IEEE=False, DOT=dot, ROPE=True, EXTRA=extra, HID=da.HIDDEN), ones)
    compile_for_hopper(da._merge_kernel, dict(G=3, G_PAD=16, D=64, S_PAD=4, SPLIT=True, WANT_S=True, ACC=True,
                                              ACC_BLOCK=256, R=4, EXTRA=extra))

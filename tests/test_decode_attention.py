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
print("ok")
"""
register(INTERPRETED)


@needs_triton
def test_triton_kernels_match_the_reference_in_the_triton_interpreter():
    run_interpreted(INTERPRETED)

"""ATSKV's eviction kernels (evict_kernels) make controller_keep's decisions and refresh the bias and the free-slot
queue as hide_free and free_queue do: on a CPU machine through Triton's interpreter when Triton is installed, on
CUDA in tests/test_gpu.py."""
import torch

from kernels import evict_kernels
from tests.triton_interpreter import needs_triton, register, run_interpreted


def test_kernels_are_not_used_off_cuda():
    assert not evict_kernels.available(torch.rand(2, 3, 100))


# shared with tests/test_gpu.py: random slots and both paths
CASES = r"""
import torch
from kernels import evict_kernels as ek
import fast_decode as fd
import atskv


def case(seed, B=2, H=2, N=100, E=8, ties=False):
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(B, H, N, generator=g) < 0.8
    present[..., :] = present[:1, :1]                    # every row stores as many entries (the slot layout's rule)
    valid = torch.rand(B, H, N, generator=g) < 0.95
    r = torch.rand(B, H, N, generator=g)
    if ties:
        r = (r * 8).round() / 8
    r = r.masked_fill(~valid, -1.0)
    prot = present & (torch.rand(B, H, N, generator=g) < 0.1)
    queue = torch.zeros((B, H, E), dtype=torch.long) if E else None
    return r, prot, present, valid, queue


def both(r, prot, present, valid, queue, keep, fixed, over, device):
    out = []
    for fused in (False, True):
        pres, bias = present.clone().to(device), torch.zeros(present.shape, device=device)
        q = None                  # rows padded to E + 1 (free_queue's queue is a slice of a wider tensor)
        if queue is not None:
            q = torch.zeros(queue.shape[:2] + (queue.shape[2] + 1,), dtype=queue.dtype, device=device)[..., :-1]
            q.copy_(queue)
        delta = torch.tensor([0.05], dtype=torch.float64, device=device)
        args = [t.to(device) for t in (r, prot)]
        beta, k, ov = (torch.tensor(v, device=device) for v in (0.9, keep, over))
        if fused:
            ek.controller_evict(args[0], args[1], pres, valid.to(device), bias, q, k, beta, delta, 0.5, fixed, ov,
                                fd.HIDDEN)
        else:
            kept, new_delta = atskv.controller_keep(args[0], args[1], pres, k, beta, delta, 0.5, fixed)
            delta.copy_(torch.where(ov, new_delta, delta))
            pres.copy_(torch.where(ov, kept, pres))
            fd.hide_free(bias, pres, valid.to(device))
            if q is not None:
                q.copy_(fd.free_queue(pres, q.shape[-1]))
        out.append((pres.cpu(), bias.cpu(), None if q is None else q.cpu(), delta.cpu()))
    return out


def check(device, N=100):
    for seed, share, fixed, over, E, ties in ((0, 0.4, None, True, 8, False), (1, 0.2, None, True, 0, True),
                                              (2, 0.4, 0.5, True, 8, False), (3, 0.4, None, False, 8, False),
                                              (4, 0.9, None, True, 16, False)):
        r, prot, present, valid, queue = case(seed, N=N, E=E, ties=ties)
        keep = int(share * N)
        (p0, b0, q0, d0), (p1, b1, q1, d1) = both(r, prot, present, valid, queue, keep, fixed, over, device)
        if over and keep < present[0, 0].sum():
            assert p0[0, 0].sum() <= keep, seed                  # entries were freed, down to the budget
        elif not over:
            assert torch.equal(p0, present), seed                # nothing changes unless the layer is over
        assert torch.equal(p0, p1), seed
        assert torch.equal(b0, b1) and torch.equal(d0, d1), seed
        assert q0 is None and q1 is None or torch.equal(q0, q1), seed


def check_relevance(device, B=2, H=3, G=3, N=300, V=50):
    # the scoring kernel against atskv_evict's tensor form: the group's attention statistics, acc += mean, the
    # time-dependent features, the sigmoid; -1 in padding slots
    from relevance_predictor import AttentionStatisticsExtractor
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(B, H, G, N, generator=g) * 3, -1)
    probs[..., N - 20:] = 0.0                                           # free slots (hidden by the bias)
    acc, z0 = torch.rand(B, H, N, generator=g), torch.randn(B, H, N, generator=g)
    pos = torch.randint(0, 900, (B, H, N), generator=g)
    toks = torch.randint(0, V, (B, H, N), generator=g)
    counts = torch.randint(0, 5, (B, V), generator=g).float()
    valid = torch.rand(B, H, N, generator=g) < 0.9
    seen = torch.tensor([1000, 901])
    co = {"a": (torch.randn(4, generator=g), torch.randn(4, generator=g)),
          "fd": (torch.randn(3, generator=g), torch.randn(3, generator=g))}
    mean, mx, spread = AttentionStatisticsExtractor.window_stats(probs.reshape(B, H * G, 1, N), H)
    want_acc = acc + mean
    freq = counts.gather(1, toks.flatten(1)).view(toks.shape)
    want = torch.sigmoid(z0 + atskv.dynamic_logit(co, pos, seen[:, None, None], mean, mx, want_acc, spread, freq))
    want = want.masked_fill(~valid, -1.0)
    dev = [t.to(device) for t in (probs, acc, z0, pos, toks, counts, valid, seen)]
    r = ek.relevance(*dev, torch.cat([*co["a"], *co["fd"]]).to(device))
    assert (dev[1].cpu() - want_acc).abs().max() < 1e-6             # the running statistic, in place
    assert (r.cpu() - want).abs().max() < 1e-5
"""


INTERPRETED = r"""
import sys, torch
sys.path.insert(0, {root!r})
from kernels import evict_kernels as ek
available, ek.available = ek.available, lambda x: True    # the scripts share a process: put it back afterwards
try:
    exec({cases!r})
    check("cpu")
    check_relevance("cpu")
finally:
    ek.available = available
print("ok")
"""
INTERPRETED = register(INTERPRETED.replace("{cases!r}", repr(CASES)))


@needs_triton
def test_eviction_kernels_score_and_decide_as_the_tensor_form_in_the_triton_interpreter():
    run_interpreted(INTERPRETED)

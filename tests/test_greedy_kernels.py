"""The greedy step's kernels (greedy_kernels): held to fast_decode.greedy_update, on a CPU machine through Triton's
interpreter when Triton is installed, on CUDA in tests/test_gpu.py."""
import torch

from fast_decode import greedy_update
from tests.triton_interpreter import needs_triton, register, run_interpreted


def test_greedy_update_breaks_ties_by_the_lowest_index_and_wraps_the_ring_buffer():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    tok, t, out, cur, qidx = torch.zeros(2).long(), torch.tensor([3]), torch.zeros(2, 4).long(), \
        torch.tensor([7, 7]), torch.tensor([2])
    greedy_update(logits, tok, t, out, cur, qidx, "keep", 3)
    assert tok.tolist() == [1, 0] and t.tolist() == [4] and cur.tolist() == [8, 8] and qidx.tolist() == [2]
    assert out[:, 0].tolist() == [1, 0] and out[:, 1:].abs().sum() == 0     # column 4 % 4


INTERPRETED = r"""
import sys, torch
sys.path.insert(0, {root!r})
from kernels import greedy_kernels as gk
from fast_decode import greedy_update
g = torch.Generator().manual_seed(0)
for B, V, mode, every in ((3, 5000, None, 1), (70, 4100, "evict", 8), (5, 2048, "keep", 4), (2, 100, "keep", 2)):
    logits = torch.randn(B, V, generator=g).half()
    logits[0, 7] = logits[0, V - 1] = 9.0                            # a tie across blocks: the lower index wins
    logits[1 % B, 3] = logits[1 % B, 5] = 9.5                        # a tie within a block
    state = (torch.randint(0, V, (B,), generator=g), torch.tensor([5]), torch.randint(0, V, (B, 6), generator=g),
             torch.randint(0, 9000, (B,), generator=g), torch.tensor([1]))
    want = [x.clone() for x in state]
    got = [x.clone() for x in state]
    greedy_update(logits, *want, mode, every)
    gk.launch(logits, *got, gk.QUEUE_MODES[mode], every)
    for w, x in zip(want, got):
        assert torch.equal(w, x), (B, V, mode, w, x)
    assert got[0][0] == 7
print("ok")
"""
register(INTERPRETED)


@needs_triton
def test_greedy_kernels_match_greedy_update_in_the_triton_interpreter():
    run_interpreted(INTERPRETED)

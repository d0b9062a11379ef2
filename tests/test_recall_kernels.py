"""Recall's int8 scoring kernel (recall_kernels): held to its tensor form (external_memory.int8_logits), on a CPU
machine through Triton's interpreter when Triton is installed, on CUDA in tests/test_gpu.py."""
import pytest
import torch

from external_memory import group_votes, int8_logits, quantize_int8, sparq_logits, step_votes
from kernels import recall_kernels
from tests.triton_interpreter import needs_triton, register, run_interpreted


def test_int8_scores_use_the_tensor_form_off_cuda():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 3, 1, 64, generator=g), torch.randn(2, 3, 50, 64, generator=g)
    kq, scale = quantize_int8(k)
    valid = torch.rand(2, 3, 50, generator=g) > 0.2
    assert not recall_kernels.usable(q, kq)
    want = torch.einsum("bhgqd,bhnd->bhgqn", q, kq.float() * scale).masked_fill(~valid[:, :, None, None], -torch.inf)
    assert torch.allclose(int8_logits(q, kq, scale[..., 0], valid), want, atol=1e-4)


def test_int8_scores_under_torch_compile_are_inductors_fused_sum_of_the_same_values(monkeypatch):
    """Where the kernel would be used, a compiled caller gets the sum in a form Inductor fuses (no triton_op)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 3, 1, 64, generator=g).bfloat16(), torch.randn(2, 3, 300, 64, generator=g)
    kq, scale = quantize_int8(k)
    valid = torch.rand(2, 3, 300, generator=g) > 0.1
    want = int8_logits(q, kq, scale[..., 0], valid)
    monkeypatch.setattr(recall_kernels, "usable", lambda q, kq: True)
    got = torch.compile(int8_logits, fullgraph=True)(q, kq, scale[..., 0], valid)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)) and (got[fin] - want[fin]).abs().max() < 1e-4


def test_sparq_scores_use_the_groups_largest_query_components_with_the_temperature_correction():
    """r = 2 of 8 dimensions: the two with the largest |q| summed over the group's heads (dims 3 and 6 here, though
    one head alone would pick dim 0), q.k over those, times sqrt(|q|_1 / |q_r|_1) per query head."""
    g = torch.Generator().manual_seed(2)
    q = torch.full((1, 1, 2, 1, 8), 0.1)
    q[..., 3], q[..., 6] = 1.0, -0.8
    q[0, 0, 0, 0, 0] = 1.4           # head 0's own largest, but 1.4 + 0.1 < 2 x 1.0 and < 2 x 0.8
    kq, scale = quantize_int8(torch.randn(1, 1, 20, 8, generator=g))
    valid = torch.rand(1, 1, 20, generator=g) > 0.2
    qr = q[..., [3, 6]]
    temp = (q.abs().sum(-1, keepdim=True) / qr.abs().sum(-1, keepdim=True)).sqrt()
    want = int8_logits(qr, kq[..., [3, 6]], scale[..., 0], valid) * temp
    got = sparq_logits(q, kq, scale[..., 0], valid, 2)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)) and torch.allclose(got[fin], want[fin], atol=1e-5)


def test_sparq_scores_read_a_dimension_major_tier_as_an_entry_major_store():
    """The fast path keeps its int8 keys (B, H, D, N); their (B, H, N, D) view scores as the plain store's keys."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 3, 1, 64, generator=g), torch.randn(2, 3, 90, 64, generator=g)
    kq, scale = quantize_int8(k)
    valid = torch.rand(2, 3, 90, generator=g) > 0.2
    by_dim = kq.transpose(2, 3).contiguous().transpose(2, 3)
    want = sparq_logits(q, kq, scale[..., 0], valid, 16)
    assert torch.equal(sparq_logits(q, by_dim, scale[..., 0], valid, 16), want)


INTERPRETED = r"""
import sys, torch
sys.path.insert(0, {root!r})
from external_memory import int8_logits, quantize_int8
from kernels import recall_kernels as rk
g = torch.Generator().manual_seed(0)
# a decode step of the default model's group (3 query heads, 1 token), keys not a multiple of a block; 8 queries of
# head size 128 (an 8B model's group); 16 queries (the most a program takes)
for B, H, G, Q, N, D in ((2, 3, 3, 1, 150, 64), (1, 2, 4, 2, 70, 128), (1, 1, 4, 4, 33, 64)):
    q, k = torch.randn(B, H, G, Q, D, generator=g), torch.randn(B, H, N, D, generator=g)
    kq, scale = quantize_int8(k)
    valid = torch.rand(B, H, N, generator=g) > 0.25
    got = rk._launch(q.bfloat16(), kq, scale[..., 0], valid)
    want = int8_logits(q.bfloat16(), kq, scale[..., 0], valid)
    assert got.shape == want.shape and got.dtype == torch.float32, (got.shape, want.shape)
    assert torch.equal(torch.isinf(got), ~valid[:, :, None, None].expand_as(got)), (B, H, G, Q, N, D)
    fin = torch.isfinite(want)
    assert (got[fin] - want[fin]).abs().max() < 1e-3, (B, H, G, Q, N, D, (got[fin] - want[fin]).abs().max())
    # the keys dimension by dimension (the fast path's tier, (B, H, D, N)), given as their (B, H, N, D) view
    by_dim = kq.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(rk._launch(q.bfloat16(), by_dim, scale[..., 0], valid), got), (B, H, G, Q, N, D)
print("ok")
"""
register(INTERPRETED)


@needs_triton
def test_int8_scores_kernel_matches_its_tensor_form_in_the_triton_interpreter():
    run_interpreted(INTERPRETED)


VOTES_INTERPRETED = r"""
import sys, torch
sys.path.insert(0, {root!r})
from cache_framework import rope
from external_memory import quantize_int8, step_recall, step_votes
from kernels import recall_kernels as rk
g = torch.Generator().manual_seed(1)
rk.FORM = (128, 4, True)   # fused; the interpreter sorts slowly: blocks of 128 entries here
# the default model's group on 16 of 64 dimensions and on all of them, over several blocks and a partial one; an
# 8B model's head size; more entries to recall than a block holds; a row with no valid entry (its votes all -1)
for B, H, G, N, D, r, n in ((1, 3, 3, 300, 64, 16, 16), (1, 2, 3, 150, 64, 0, 5), (1, 2, 4, 160, 128, 32, 40),
                            (1, 2, 3, 260, 64, 8, 130)):
    q, k = torch.randn(B, H, G, 1, D, generator=g), torch.randn(B, H, N, D, generator=g)
    kq, scale = quantize_int8(k)
    pq = kq.transpose(2, 3).contiguous()                      # the fast path's dimension-major tier
    valid = torch.rand(B, H, N, generator=g) > 0.25
    valid[0, 1] = False
    want = step_votes(q.bfloat16(), pq, scale[..., 0], valid, r)     # the tensor form (no CUDA here)
    if r in (16, 0):   # the votes alone (n = 0; the interpreter is slow: on two of the cases)
        got = rk._launch_step(q.bfloat16(), pq, scale[..., 0], valid.to(torch.uint8), r, 0)
        assert got.shape == want.shape and got.dtype == torch.float32, (got.shape, want.shape)
        assert torch.equal(got == -1, ~valid) and torch.equal(want == -1, ~valid), (B, H, G, N, D, r)
        assert (got - want).abs().max() < 1e-5, (B, H, G, N, D, r, (got - want).abs().max())
        assert torch.allclose(got[valid].sum(), torch.tensor(float(G * valid.any(-1).sum())), atol=1e-3)
    else:
        got = want
    # the n best: the votes sorted (best first, of equal votes the lower index: the invalid row's -1s) and those
    # entries of the tier, gathered
    kt, vt = k.bfloat16(), torch.randn(B, H, N, D, generator=g).bfloat16()
    idx, rk_, rv_, rok = rk._launch_step(q.bfloat16(), pq, scale[..., 0], valid.to(torch.uint8), r, n, k=kt, v=vt)
    assert idx.shape == (B, H, n) and idx.dtype == torch.int64, idx.shape
    assert torch.equal(idx, got.sort(dim=-1, descending=True, stable=True).indices[..., :n]), (B, H, G, N, D, r, n)
    e = idx[..., None].expand(B, H, n, D)
    assert torch.equal(rk_, kt.gather(2, e)) and torch.equal(rv_, vt.gather(2, e))
    assert rok.dtype == torch.uint8 and torch.equal(rok.bool(), valid.gather(2, idx))
    tensor_form = step_recall(q.bfloat16(), pq, scale[..., 0], valid, r, n, kt, vt)
    assert torch.allclose(want.gather(-1, tensor_form[0]).sort(-1).values, want.gather(-1, idx).sort(-1).values,
                          atol=1e-5)
    if r == 8:   # a Triton without tl.topk sorts whole blocks and candidates: the same picks
        topk, rk.TOPK = rk.TOPK, False
        try:
            again = rk._launch_step(q.bfloat16(), pq, scale[..., 0], valid.to(torch.uint8), r, n, k=kt, v=vt)
        finally:
            rk.TOPK = topk
        assert all(torch.equal(a, b) for a, b in zip(again, (idx, rk_, rv_, rok))), (B, H, G, N, D, r, n)
    if r != 16:   # (the interpreter is slow: the rest on the first case alone)
        continue
    # the four kernels unfused (a kernel each for the row's preparation and the pick): the same picks
    rk.FORM = (128, 4, False)
    try:
        four = rk._launch_step(q.bfloat16(), pq, scale[..., 0], valid.to(torch.uint8), r, n, k=kt, v=vt)
    finally:
        rk.FORM = (128, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(four, (idx, rk_, rv_, rok))), (B, H, G, N, D, r, n)
    # the query not rotated yet, two sequences whose rows lie apart in a wider tensor (as the step's fused q/k/v
    # projection leaves them): the kernels read it in place and rotate it (float32) as they read it, as the tensor
    # form does before it scores; the bool validity read as bytes; the rows' counter, kept by the caller, left at 0
    two = [x.repeat(2, *[1] * (x.dim() - 1)) for x in (pq, scale[..., 0], valid, kt, vt)]
    pos = torch.randint(0, 5000, (2, 1, 1), generator=g).float()
    freq = pos * 10000 ** (-torch.arange(0, D, 2) / D)
    cos, sin = torch.cat((freq, freq), -1).cos(), torch.cat((freq, freq), -1).sin()           # (2, 1, D)
    raw = torch.randn(2, H * G * D + 3 * D, generator=g)[:, :H * G * D].view(2, H, G, 1, D)
    count = torch.zeros((2, H), dtype=torch.int32)
    got = rk._launch_step(raw, two[0], two[1], rk.as_uint8(two[2]), r, n, k=two[3], v=two[4], count=count, cos=cos,
                          sin=sin)
    votes = step_votes(rope(raw, cos[:, :, None, None], sin[:, :, None, None]), *two[:3], r)
    assert (votes.gather(-1, got[0]) - votes.topk(n, dim=-1).values).abs().max() < 1e-5, (B, H, G, N, D, r, n)
    assert not count.any(), count
# the votes' pruning on attention as peaked as a trained model's (a few keys aligned with the group's query, the
# rest not): blocks that cannot hold any of the n best go unscanned, and the same entries are chosen
B, H, G, N, D, n = 1, 1, 3, 1024, 64, 4
q, k = torch.randn(B, H, G, 1, D, generator=g), torch.randn(B, H, N, D, generator=g) * 0.3
k[:, :, [40, 41, 300, 777, 1000]] = q.mean(2)[:, :, 0, None] * 3
kq, scale = quantize_int8(k)
pq, valid = kq.transpose(2, 3).contiguous(), torch.rand(B, H, N, generator=g) > 0.1
valid[:, :, [40, 41, 300, 777, 1000]] = True
kt, vt = k.bfloat16(), torch.randn(B, H, N, D, generator=g).bfloat16()
plain = rk._launch_step(q.bfloat16(), pq, scale[..., 0], valid.to(torch.uint8), 16, n, k=kt, v=vt)
rk.PRUNE_SUBBLOCKS, seen = 8, {}
try:
    pruned = rk._launch_step(q.bfloat16(), pq, scale[..., 0], valid.to(torch.uint8), 16, n, k=kt, v=vt, debug=seen)
finally:
    rk.PRUNE_SUBBLOCKS = 0
skipped = (seen["candidates"] == -9223372036854775807).all(-1)            # (B, H, blocks): not scanned
assert int(skipped.sum()) >= skipped.numel() // 2, skipped
assert all(torch.equal(a, b) for a, b in zip(pruned, plain))
votes = step_votes(q.bfloat16(), pq, scale[..., 0], valid, 16)
assert torch.equal(plain[0], votes.sort(dim=-1, descending=True, stable=True).indices[..., :n]), plain[0]
print("ok")
"""
register(VOTES_INTERPRETED)


@needs_triton
def test_step_recall_kernels_match_their_tensor_form_in_the_triton_interpreter():
    """The decode step's votes (scores on SparQ's dimensions or all, each head's softmax, the group's sum) from the
    kernels as from `external_memory.step_votes`' tensor form (each valid row's votes sum to G), and the n entries
    recalled: the n best votes."""
    run_interpreted(VOTES_INTERPRETED)


def test_step_votes_are_the_group_votes_of_the_sparq_scores_with_invalid_entries_at_minus_one():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 3, 1, 64, generator=g), torch.randn(2, 3, 90, 64, generator=g)
    kq, scale = quantize_int8(k)
    valid = torch.rand(2, 3, 90, generator=g) > 0.2
    pq = kq.transpose(2, 3).contiguous()
    s = scale[..., 0]
    for r, logits in ((16, sparq_logits(q, kq, s, valid, 16)), (0, int8_logits(q, kq, s, valid))):
        want = group_votes(logits, 64).masked_fill(~valid, -1.0)
        got = step_votes(q, pq, s, valid, r)
        assert torch.equal(got == -1, ~valid) and torch.allclose(got, want, atol=1e-6)


def test_the_kernels_pick_from_at_most_max_candidates_and_longer_tiers_take_the_tensor_form():
    """Each block (of 256 entries in the one-wave form) offers its next power of two >= n best; one program sorts
    them all."""
    assert recall_kernels.candidates_fit(8256, 16)                 # 33 blocks x 16: the default model at 8K
    assert recall_kernels.candidates_fit(131072, 16)               # 512 x 16 = 8192
    assert not recall_kernels.candidates_fit(131072, 64)           # 512 x 64 = 32768
    assert not recall_kernels.candidates_fit(1 << 20, 16)


def test_a_grid_of_one_wave_takes_the_fused_form_and_a_larger_grid_the_four_kernels(monkeypatch):
    """At 8K (7373 passive entries a KV head) on 132 multiprocessors: batch 1 (3 rows, 29 blocks of 256 each) fits
    one wave; batch 64 does not. A form set in FORM holds for every grid."""
    rk = recall_kernels
    assert rk.ONE_WAVE[2] and not rk.MANY_WAVES[2]
    assert rk.scan_form(3, 7373, 132) == rk.ONE_WAVE
    assert rk.scan_form(5, 7373, 132) == rk.MANY_WAVES            # 145 programs
    assert rk.scan_form(192, 7373, 132) == rk.MANY_WAVES
    monkeypatch.setattr(rk, "FORM", (128, 4, True))
    assert rk.scan_form(192, 7373, 132) == (128, 4, True)


def test_kernels_call_other_jit_functions_by_their_bare_names():
    """Inductor compiles a user's Triton kernel in a worker process that resolves the jit functions it calls by
    their names in the kernel's module: `kernels.rotary(...)` there failed ("kernels is not defined") and took
    every compiled fast-path cell with it. So no kernel calls through a module imported by `import`, tl aside."""
    import ast
    from pathlib import Path
    bad = []
    for path in sorted(Path(recall_kernels.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names} - {"tl", "triton"}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                bad += [f"{path.name}:{c.lineno} {ast.unparse(c.func)}" for c in ast.walk(fn)
                        if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                        and isinstance(c.func.value, ast.Name) and c.func.value.id in modules]
    assert not bad, bad


@needs_triton
def test_the_step_recall_kernels_compile_for_a_hopper_gpu():
    """The interpreter runs no compiler: the decode step's kernels compiled for sm_90 at the default model's
    shape (16 of 64 dimensions, 16 entries), fused (two) and not (four), with tl.topk where this Triton has it
    (else the full sort)."""
    from tests.test_decode_attention import compile_for_hopper
    topk = recall_kernels.TOPK
    f32, i32 = "*fp32", "*i32"
    scan = dict(qs_ptr=f32, f_ptr=f32, dims_ptr=i32, k_ptr="*i8", s_ptr=f32, ok_ptr="*u8", m_ptr=f32, z_ptr=f32)
    tier = dict(idx_ptr="*i64", tk_ptr="*bf16", tv_ptr="*bf16", rk_ptr="*bf16", rv_ptr="*bf16", rok_ptr="*u8")
    shape = dict(G=3, GP=4, D=64, R=16, RP=16, BN=512)
    pick = dict(CP=512, NT=16 if topk else 512, DV=64)
    compile_for_hopper(recall_kernels._step_prep_kernel, dict(shape, SPARQ=True, ROPE=True),
                       types=dict(q_ptr="*bf16", cos_ptr=f32, sin_ptr=f32, temp="fp32", **scan))
    for ns, fused in ((0, True), (0, False), (16, True)):   # without and with the votes' pruning
        compile_for_hopper(recall_kernels._step_stats_kernel, dict(shape, NS=ns, PREP=fused, SPARQ=True, ROPE=fused),
                           types=dict(scan, q_ptr="*bf16", cos_ptr=f32, sin_ptr=f32, temp="fp32", t_ptr=f32))
        compile_for_hopper(recall_kernels._step_votes_kernel, dict(shape, NBP=16, NC=16, TOPK=topk, NS=ns, TOP=fused,
                                                                   **pick),
                           types=dict(scan, t_ptr=f32, out_ptr="*i64", count_ptr=i32, **tier))
    compile_for_hopper(recall_kernels._step_votes_kernel, dict(shape, NBP=16, NC=0, TOPK=topk, NS=0, TOP=False,
                                                               CP=2, NT=2, DV=2),
                       types=dict(scan, t_ptr=f32, out_ptr=f32, count_ptr=f32, **dict.fromkeys(tier, f32)))
    compile_for_hopper(recall_kernels._top_keys_kernel, dict(CP=256, NT=16 if topk else 256, D=64, NP=32, TOPK=topk),
                       types=dict(c_ptr="*i64", idx_ptr="*i64", k_ptr="*bf16", v_ptr="*bf16", ok_ptr="*u8",
                                  rk_ptr="*bf16", rv_ptr="*bf16", rok_ptr="*u8"))


def _compiled_step_recall_graph(valid_dtype, cos=None):
    """The graph torch.compile (fullgraph, through aot_autograd) makes of the fused form's step_recall at 2 x 3
    heads x 1300 entries, traced on the CPU machine and not run: Inductor's input, kernels included."""
    from torch._dynamo.backends.common import aot_autograd
    g = torch.Generator().manual_seed(5)
    B, H, G, N, D = 2, 3, 3, 1300, 64
    kq, scale = quantize_int8(torch.randn(B, H, N, D, generator=g))
    k, v = torch.randn(B, H, N, D, generator=g).bfloat16(), torch.randn(B, H, N, D, generator=g).bfloat16()
    q, count = torch.randn(B, H, G, 1, D, generator=g).bfloat16(), torch.zeros((B, H), dtype=torch.int32)
    rope = () if cos is None else (cos, (1 - cos ** 2).sqrt())
    graphs = []

    class Traced(Exception):
        pass

    def traced_only(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced
        return run
    torch._dynamo.reset()
    f = torch.compile(recall_kernels.step_recall, backend=aot_autograd(fw_compiler=traced_only), fullgraph=True)
    with pytest.raises(Traced):
        f(q, kq.transpose(2, 3).contiguous(), scale[..., 0], torch.ones(B, H, N, dtype=valid_dtype), 16, 16, k, v,
          count, *rope)
    return graphs[0].graph


@needs_triton
def test_a_compiled_step_recall_traces_into_two_kernel_launches_that_update_the_callers_counter(monkeypatch):
    """Under torch.compile (fullgraph; traced here, not run: no GPU) the step's recall in the fused form is the
    statistics' kernel and the votes' kernel, no others (the rotation and the pick inside them), and the counter the
    caller keeps is the graph's input, not a tensor of its own (no clearing kernel a step); the query goes in as
    bf16."""
    monkeypatch.setattr(recall_kernels, "FORM", recall_kernels.ONE_WAVE)
    cos = torch.rand(2, 1, 64, generator=torch.Generator().manual_seed(5))
    graph = _compiled_step_recall_graph(torch.bool, cos=cos)
    launches = [n for n in graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert [n.kwargs["kwargs"].get("TOP") for n in launches] == [None, True]     # the statistics', the votes'
    assert launches[1].kwargs["kwargs"]["count_ptr"].op == "placeholder"
    assert launches[0].kwargs["kwargs"]["q_ptr"].meta["val"].dtype == torch.bfloat16


@needs_triton
def test_a_compiled_step_recall_over_a_uint8_validity_converts_nothing(monkeypatch):
    """The fast path's tier keeps its validity as uint8, the kernels' form: traced under torch.compile (not run),
    the graph has no conversion (a bool validity costs an `aten._to_copy`, a kernel a layer and step)."""
    monkeypatch.setattr(recall_kernels, "FORM", recall_kernels.ONE_WAVE)
    ops = [str(n.target) for n in _compiled_step_recall_graph(torch.uint8).nodes if n.op == "call_function"]
    assert sum("triton_kernel_wrapper" in op for op in ops) == 2
    assert not [op for op in ops if "_to_copy" in op or "convert_element_type" in op]

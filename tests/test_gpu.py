"""On a CUDA device: the fast path inside a CUDA graph (and compiled) makes the plain path's decisions, and
compression works when the model's layers sit on different devices (--device_map)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import decode_attention as da
import evaluation as ev
from fast_decode import HIDDEN, StaticDecoder
from sparse_kv_cache import KVCacheFactory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
N_STEPS = 12


@pytest.fixture(scope="module")
def cuda_model():
    from utils import load_model_and_tokenizer
    return load_model_and_tokenizer("smollm2-135m", device="cuda")  # fp32


@pytest.fixture(scope="module")
def prompt(cuda_model):
    tok = cuda_model[1]
    s = ev.synthetic_samples(tok, "needle", 600, 1, seed=3)[0]
    c, q = ev.encode_prompt(tok, s.context, s.question, s.answer_prefix)
    return torch.tensor([c + q], device="cuda").expand(2, -1)


@pytest.mark.parametrize("method,compile,params,kernel", [
    ("full", False, {}, True), ("sliding_window", False, {}, True), ("h2o", False, {}, True),
    ("atskv", False, {}, True),
    ("full", True, {}, True), ("atskv", True, {}, True), ("atskv", False, {"evict_every": 4}, True),
    ("atskv", True, {"evict_every": 4}, True), ("full", True, {}, False), ("atskv", True, {}, False),
    ("atskv", False, {"external_memory": True}, True), ("atskv", True, {"external_memory": True}, True),
    ("atskv", False, {"external_memory": True, "passive_device": True}, True),
    ("atskv", True, {"external_memory": True, "recall_every": 4}, True)])
def test_cuda_graph_fast_path_generates_the_same_tokens_and_keeps_the_same_entries(
        cuda_model, prompt, method, compile, params, kernel, plain_decode):
    """kernel: the Triton decode attention where Triton is there (False: the SDPA / matmul reference)."""
    model, tok = cuda_model
    plain = KVCacheFactory.create(method, model, budget=128, tokenizer=tok, **params)
    want = plain_decode(model, plain, prompt, N_STEPS, chunk=256)
    cache = KVCacheFactory.create(method, model, budget=128, tokenizer=tok, **params)
    logits = ev.forward_chunked(model, cache, prompt, chunk=256)
    dec = StaticDecoder.from_cache(model, method, cache, prompt.shape[1], N_STEPS, compile=compile,
                                   attn_kernel=kernel)
    got = dec.generate(logits.argmax(-1), N_STEPS + 1)
    assert dec.graphs  # the steps after the warm-up were replays of a captured graph
    assert torch.equal(got, want)
    if method == "full":
        return
    same = total = 0
    for layer, sl in zip(plain.layers, dec.slots):
        for pb, mb, want_b in zip(sl.pos, sl.present, layer.positions):
            for p, m, w in zip(pb, mb, want_b):
                fast, plain_kept = set(p[m].tolist()), set(w.tolist())
                assert len(fast) == len(plain_kept)       # the same budget held
                same, total = same + len(fast & plain_kept), total + len(plain_kept)
    # On CPU the decisions are identical (tests/test_fast_decode.py). On CUDA ATSKV's relevance is a float computed
    # by differently shaped kernels in the two paths (summation order), so near-ties of r may break differently.
    assert same / total >= (0.97 if method == "atskv" else 1.0), same / total


def test_a_host_mapped_tensor_lives_in_pinned_host_memory_and_cuda_kernels_read_and_write_it():
    from external_memory import host_mapped
    before = torch.cuda.memory_allocated()
    t = host_mapped((2, 3, 1000, 64), torch.bfloat16, torch.device("cuda"))
    assert t.device.type == "cuda" and torch.cuda.memory_allocated() == before   # no device memory taken
    src = torch.randn(2, 3, 5, 64, device="cuda").bfloat16()
    idx = torch.tensor([0, 7, 999, 500, 3], device="cuda")
    t[:, :, idx] = src                                                          # written by a CUDA kernel
    assert torch.equal(t[:, :, idx], src) and torch.equal(t.cpu()[:, :, idx.cpu()], src.cpu())
    assert int(torch.count_nonzero(t)) == int(torch.count_nonzero(src))          # zeroed elsewhere


@pytest.mark.parametrize("passive_device", [False, True])
def test_a_compiled_recall_step_writes_the_passive_tier_in_place(cuda_model, prompt, passive_device):
    """The step writes its token into the tier and reads the tier to recall. torch.compile keeps the write in place
    only when nothing reads the tier before it; otherwise each recall step copies the whole tier (out of place,
    then back) through a device buffer of its size."""
    model, tok = cuda_model
    cache = KVCacheFactory.create("atskv", model, budget=128, tokenizer=tok, external_memory=True,
                                  passive_device=passive_device)
    logits = ev.forward_chunked(model, cache, prompt, chunk=256)
    dec = StaticDecoder.from_cache(model, "atskv", cache, prompt.shape[1], 20000, compile=True, use_graph=False)
    dec.tok.copy_(logits.argmax(-1))
    for v in dec.variants():                     # each variant of the step compiled (evicting or not)
        dec.run_variant(v)
    layer_tier = dec.slots[0].state["pk"].nbytes  # room for 20000 more positions: ~30 MB a layer
    for v in dec.variants():                     # each recalls
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        dec.run_variant(v)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < layer_tier / 2, v


@pytest.mark.parametrize("method", ["full", "atskv"])
def test_compiled_step_matches_the_uncompiled_step_to_float_tolerance(cuda_model, prompt, method):
    """torch.compile fuses the element-wise work, which changes float summation order (so a greedy near-tie may
    flip a later token): one step's logits must agree closely, and its decisions exactly."""
    model, tok = cuda_model
    out = []
    for compile in (False, True):
        cache = KVCacheFactory.create(method, model, budget=128, tokenizer=tok)
        logits = ev.forward_chunked(model, cache, prompt, chunk=256)
        dec = StaticDecoder.from_cache(model, method, cache, prompt.shape[1], 4, compile=compile, use_graph=False)
        dec.tok.copy_(logits.argmax(-1))
        dec.step()
        # what is kept: the positions present per row (which slot holds an entry does not matter)
        out.append((dec.logits.float(), [[sorted(p[m].tolist()) for p, m in zip(sl.pos[b], sl.present[b])]
                                         for sl in dec.slots for b in range(sl.pos.shape[0])]))
    (a, pa), (b, pb) = out
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    assert pa == pb


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,n_slots", [(64, 2064), (2, 700), (1, 4100)])
def test_triton_decode_attention_matches_the_reference(dtype, batch, n_slots):
    """Split or not (64 x 3 KV heads fill the GPU; batch 1 splits 4100 slots), tensor cores (batch 64) or CUDA cores
    (batch 1 and 2), with and without probabilities, free slots hidden by the bias."""
    torch.manual_seed(0)
    H, G, D = 3, 3, 64
    q = torch.randn(batch, H, G, D, device="cuda").to(dtype)
    K = torch.randn(batch, H, n_slots, D, device="cuda").to(dtype)
    V = torch.randn(batch, H, n_slots, D, device="cuda").to(dtype)
    bias = torch.where(torch.rand(batch, H, n_slots, device="cuda") < 0.2, HIDDEN, 0.0).to(dtype)
    # bf16: the reference rounds its logits to bf16 (a bf16 matmul), the kernel keeps them in float32
    tol, ptol = (2e-2, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
    for want_probs in (False, True):
        ro, rp = da.decode_attention_reference(q, K, V, bias, 0.125, want_probs)
        o, p = da.decode_attention(q, K, V, bias, 0.125, want_probs)
        assert (o.float() - ro.float()).abs().max() < tol
        if want_probs:
            assert (p - rp).abs().max() < ptol
            assert p[bias[:, :, None].expand_as(p) == HIDDEN].max() == 0
    # q rotated (RoPE) by the kernel as it loads it from a strided view of the q/k/v projection
    qkv = torch.randn(batch, (H * G + 2 * H) * D, device="cuda").to(dtype)
    qv = qkv[:, : H * G * D].view(batch, H, G, D)
    cos, sin = torch.rand(batch, 1, D, device="cuda").to(dtype), torch.rand(batch, 1, D, device="cuda").to(dtype)
    o, _ = da.decode_attention(qv, K, V, bias, 0.125, cos=cos, sin=sin)
    ref, _ = da.decode_attention_reference(da.rope(qv, cos[:, :, None], sin[:, :, None]), K, V, bias, 0.125)
    assert (o.float() - ref.float()).abs().max() < tol
    # the running statistic: the group's mean probability added in place
    acc = torch.rand(batch, H, n_slots, device="cuda")
    want = acc + rp.mean(2)
    o, p = da.decode_attention(q, K, V, bias, 0.125, False, acc=acc)
    assert p is None and (o.float() - ro.float()).abs().max() < tol
    assert (acc - want).abs().max() < ptol


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,n_slots,n_extra", [(64, 832, 96), (1, 4100, 512)])
def test_triton_decode_attention_with_extra_entries_matches_the_reference(dtype, batch, n_slots, n_extra):
    """ATSKV's recalled entries attended as further splits of the same kernels: the output over slots and valid
    extra entries, the probabilities and the running statistic the slots' alone (eager and compiled, as the
    fast path's step calls it); one KV head of one row with no valid extra entry."""
    torch.manual_seed(0)
    H, G, D = 3, 3, 64
    q = torch.randn(batch, H, G, D, device="cuda").to(dtype)
    K, V = (torch.randn(batch, H, n_slots, D, device="cuda").to(dtype) for _ in range(2))
    K2, V2 = (torch.randn(batch, H, n_extra, D, device="cuda").to(dtype) for _ in range(2))
    ok2 = torch.rand(batch, H, n_extra, device="cuda") < 0.7
    ok2[0, 1] = False
    bias = torch.where(torch.rand(batch, H, n_slots, device="cuda") < 0.2, HIDDEN, 0.0).to(dtype)
    tol, ptol = (2e-2, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
    ro, rp = da._reference_with_extra(q, K, V, bias, 0.125, K2, V2, ok2)
    for fn in (da.decode_attention, torch.compile(da.decode_attention, fullgraph=True)):
        o, p = fn(q, K, V, bias, 0.125, True, extra=(K2, V2, ok2))
        assert (o.float() - ro.float()).abs().max() < tol and (p - rp).abs().max() < ptol
        acc = torch.rand(batch, H, n_slots, device="cuda")
        want = acc + rp.mean(2)
        o, p = fn(q, K, V, bias, 0.125, False, acc=acc, extra=(K2, V2, ok2))
        assert p is None and (o.float() - ro.float()).abs().max() < tol
        assert (acc - want).abs().max() < ptol


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("rows", [64, 1])
def test_skinny_gemm_kernels_match_torch_in_bf16(rows):
    from kernels import skinny_gemm
    torch.manual_seed(0)
    for K, N in ((576, 960), (576, 576), (1536, 576)):
        x = torch.randn(rows, K, device="cuda").bfloat16()
        w = (torch.randn(2 * N, K, device="cuda") / 24).bfloat16()
        assert skinny_gemm.usable(x, w)
        want = F.linear(x.float(), w[:N].float())
        assert (skinny_gemm.linear(x, w[:N].contiguous()).float() - want).abs().max() < 2e-2 * want.abs().max()
        r = torch.randn(rows, N, device="cuda").bfloat16()
        got = skinny_gemm.linear(x, w[:N].contiguous(), residual=r).float()
        assert (got - (want + r.float())).abs().max() < 2e-2 * want.abs().max()
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        want = (F.silu(gate) * up).float()
        assert (skinny_gemm.swiglu(x, w).float() - want).abs().max() < 2e-2 * want.abs().max()


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("compile", [False, True])
def test_int8_recall_scores_kernel_matches_the_tensor_form(compile):
    """The default model's decode step at 64 x 8192, 10% (7373 passive entries a KV head): the Triton kernel
    eagerly, Inductor's fused sum under torch.compile."""
    import kernels
    from external_memory import int8_logits, quantize_int8
    from kernels import recall_kernels
    torch.manual_seed(0)
    q, k = torch.randn(64, 3, 3, 1, 64, device="cuda").bfloat16(), torch.randn(64, 3, 7373, 64, device="cuda")
    kq, scale = quantize_int8(k)
    valid = torch.rand(64, 3, 7373, device="cuda") > 0.1
    assert recall_kernels.usable(q, kq)
    fn = torch.compile(int8_logits, fullgraph=True) if compile else int8_logits
    got = fn(q, kq, scale[..., 0], valid)
    kernels.switch_off(["recall"])
    try:
        want = int8_logits(q, kq, scale[..., 0], valid)
    finally:
        kernels.switch_off([])
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert (got[fin] - want[fin]).abs().max() < 1e-3


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("r", [16, 0])
def test_step_recall_kernels_match_the_tensor_form(compile, r):
    """The default model's decode step at 64 x 8192, 10% (7373 passive entries a KV head), on SparQ's 16 dimensions
    and on all 64: the kernels, eagerly and as ops inside a compiled graph, against the tensor form."""
    import kernels
    from external_memory import quantize_int8, step_recall, step_votes
    from kernels import recall_kernels
    from cache_framework import rope
    torch.manual_seed(0)
    q, k = torch.randn(64, 3, 3, 1, 64, device="cuda").bfloat16(), torch.randn(64, 3, 7373, 64, device="cuda")
    kq, scale = quantize_int8(k)
    pq = kq.transpose(2, 3).contiguous()
    valid = torch.rand(64, 3, 7373, device="cuda") > 0.1
    assert recall_kernels.votes_usable(q, pq)
    fn = torch.compile(step_votes, fullgraph=True) if compile else step_votes
    got = fn(q, pq, scale[..., 0], valid, r)
    kernels.switch_off(["recall"])
    try:
        want = step_votes(q, pq, scale[..., 0], valid, r)
    finally:
        kernels.switch_off([])
    assert torch.equal(got == -1, ~valid)
    assert (got - want).abs().max() < 1e-4
    # the 16 recalled: the kernels' three (top-16 of each block of votes, then of those) choose the tensor form's
    # topk up to float rounding (their votes the same), and gather those entries from the tier
    pick = torch.compile(step_recall, fullgraph=True) if compile else step_recall
    kt, vt = k.bfloat16(), torch.randn(64, 3, 7373, 64, device="cuda").bfloat16()
    idx, rk, rv, rok = pick(q, pq, scale[..., 0], valid, r, 16, kt, vt)
    top = want.topk(16, dim=-1)
    assert idx.shape == top.indices.shape
    assert (want.gather(-1, idx) - top.values).abs().max() < 1e-4
    e = idx[..., None].expand(-1, -1, -1, 64)
    assert torch.equal(rk, kt.gather(2, e)) and torch.equal(rv, vt.gather(2, e))
    assert torch.equal(rok.bool(), valid.gather(2, idx))
    # the fused form (the pick by each row's last program, atomics across programs; a grid this large takes the
    # four kernels unless told), on the same blocks (so the same sums): the same entries; the rows' counter, kept
    # by the caller, is left at zeros
    block, warps, fused = recall_kernels.scan_form(64 * 3, 7373, 132)
    assert not fused
    count = torch.zeros((64, 3), dtype=torch.int32, device="cuda")
    recall_kernels.FORM = (block, warps, True)
    try:
        if compile:   # the form is read when the op is traced: trace it again
            torch._dynamo.reset()
            pick = torch.compile(step_recall, fullgraph=True)
        for _ in range(3):
            again = pick(q, pq, scale[..., 0], valid, r, 16, kt, vt, count)
            assert all(torch.equal(a, b) for a, b in zip(again, (idx, rk, rv, rok))) and not count.any()
    finally:
        recall_kernels.FORM = None
        torch._dynamo.reset()
    pick = torch.compile(step_recall, fullgraph=True) if compile else step_recall
    # a query not rotated yet, its rows apart in a wider tensor (the fast path's: a view of the fused q/k/v
    # projection): the kernels read it in place and rotate it in float32 as they read it, as the tensor form does
    # before it scores
    freq = torch.randint(0, 8192, (64, 1, 1), device="cuda") * 10000 ** (-torch.arange(0, 64, 2, device="cuda") / 64)
    cos, sin = torch.cat((freq, freq), -1).cos(), torch.cat((freq, freq), -1).sin()
    wide = torch.cat((q.flatten(1), torch.zeros_like(q.flatten(1))), 1)[:, :q[0].numel()].view(q.shape)
    got = pick(wide, pq, scale[..., 0], valid, r, 16, kt, vt, count, cos, sin)[0]
    kernels.switch_off(["recall"])
    try:
        want_idx = step_recall(q, pq, scale[..., 0], valid, r, 16, kt, vt, None, cos, sin)[0]
        rotated = rope(q.float(), cos[:, :, None, None], sin[:, :, None, None])
        votes = step_votes(rotated, pq, scale[..., 0], valid, r)
    finally:
        kernels.switch_off([])
    assert (votes.gather(-1, got) - votes.gather(-1, want_idx)).abs().max() < 1e-4


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("mode", [None, "evict", "keep"])
def test_greedy_kernels_pick_and_record_the_tokens_as_the_tensor_form(mode):
    from kernels import greedy_kernels
    from fast_decode import greedy_update
    torch.manual_seed(0)
    logits = torch.randn(64, 49152, device="cuda").bfloat16()
    logits[0, 5], logits[0, 40000] = 20.0, 20.0                    # a tie: the lower index, as torch.argmax
    state = (torch.zeros(64, dtype=torch.long, device="cuda"), torch.tensor([9], device="cuda"),
             torch.zeros((64, 17), dtype=torch.long, device="cuda"), torch.arange(64, device="cuda"),
             torch.tensor([3], device="cuda"))
    want, got = [x.clone() for x in state], [x.clone() for x in state]
    greedy_update(logits, *want, mode, 8)
    assert greedy_kernels.usable(logits, got[2])
    greedy_kernels.greedy_step(logits, *got, mode, 8)
    assert all(torch.equal(w, g) for w, g in zip(want, got)) and got[0][0] == 5


@pytest.mark.skipif(da.triton is None, reason="needs Triton (it ships with CUDA builds of torch)")
@pytest.mark.parametrize("n", [100, 832, 2064])
def test_eviction_kernels_score_and_decide_as_the_tensor_form(n):
    from tests.test_evict_kernels import CASES
    scope = {}
    exec(CASES, scope)
    scope["check"]("cuda", N=n)
    scope["check_relevance"]("cuda", N=n)


def split_between_gpu_and_cpu(model):
    """Upper half of the decoder layers executes on the CPU, the rest on the GPU (accelerate's hooks move the
    hidden states between them). accelerate's device_map="cpu" would only offload weights and still execute on
    the GPU, so the hooks are set here: two execution devices on a one-GPU machine."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    n = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        dev = torch.device("cuda:0" if i < n // 2 else "cpu")
        layer.to(dev)
        add_hook_to_module(layer, AlignDevicesHook(execution_device=dev, io_same_device=True))
    return model


@pytest.mark.parametrize("method", ["full", "snapkv", "dynamic_kv", "atskv"])
def test_compression_works_with_layers_split_between_the_gpu_and_the_cpu(cuda_model, method):
    from utils import load_model_and_tokenizer
    model, tok = cuda_model
    split = split_between_gpu_and_cpu(load_model_and_tokenizer("smollm2-135m", device="cuda")[0])
    s = ev.synthetic_samples(tok, "needle", 1024, 1, seed=5)[0]
    c, q = ev.encode_prompt(tok, s.context, s.question, s.answer_prefix)
    preds = []
    for m in (model, split):
        cache, _ = ev.make_cache(method, m, 0.25, len(c), tokenizer=tok)
        preds.append(ev.run_generation(m, tok, cache, c, q, 10)["prediction"])
        if method != "full" and m is split:
            devices = {str(layer.keys.device) for layer in cache.layers}
            assert devices == {"cuda:0", "cpu"}
            # decode='grow' (snapkv's and dynamic_kv's default, as their papers) keeps the question and the answer
            grown = len(q) + 10 if getattr(cache.method, "decode", None) == "grow" else 0
            assert all(layer.stored_length() <= cache.layer_budget(i) + grown for i, layer in enumerate(cache.layers))
    assert preds[0] == preds[1]

"""Time a decode step's recall kernels (kernels/recall_kernels.py) alone, for each block size and warp count, on
the default model's shape at 10% of 8192 tokens (7373 passive entries a KV head, 3 KV heads of 3 query heads, 16 of
64 dimensions, 16 entries recalled), then optionally run the speed benchmark in this process with the fastest.

    python bench/recall_kernel_tune.py --batches 64,1 --out tune.json [-- <run_experiment.py speed arguments>]

Each configuration is checked against the first (the same entries chosen) and timed as a replayed CUDA graph
(`triton.testing.do_bench_cudagraph`, median): one layer's recall (n = 16: two kernels fused, four not) and the
votes alone (n = 0). With arguments after `--`, each speed run sets the fastest configuration of its batch
(the first of --batches that the run's --batch_sizes names) before it runs; the JSON says which configuration that
was, since the records name only the commit."""
import argparse
import itertools
import json
import sys

import torch


def inputs(B, H=3, G=3, D=64, N=7373, seed=0):
    from external_memory import quantize_int8
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, G, 1, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, H, N, D, device="cuda", generator=g)
    kq, scale = quantize_int8(k)
    valid = (torch.rand(B, H, N, device="cuda", generator=g) > 0.1).to(torch.uint8)
    v = torch.randn(B, H, N, D, device="cuda", generator=g).bfloat16()
    return q, kq.transpose(2, 3).contiguous(), scale[..., 0].contiguous(), valid, k.bfloat16(), v


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    speed = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="64,1")
    p.add_argument("--blocks", default="256,512,1024")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--topk", default="1", help="1: tl.topk where Triton has it, 0: the full sort; e.g. 1,0")
    p.add_argument("--prune", default="0", help="PRUNE_SUBBLOCKS values, e.g. 0,16 (random inputs skip few blocks:"
                   " this times the pruning's cost, not its gain)")
    p.add_argument("--fused", default="1,0", help="1: the fused form (two kernels a layer), 0: four; e.g. 1,0")
    p.add_argument("--dims", type=int, default=16)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--out", default="recall_kernel_tune.json")
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    import triton.testing
    from kernels import recall_kernels as rk
    rows, best, has_topk = [], {}, rk.TOPK
    for B in map(int, a.batches.split(",")):
        q, pq, s, ok, k, v = inputs(B)
        count = torch.zeros(q.shape[:2], dtype=torch.int32, device="cuda")   # kept, as the fast path keeps it
        cos = torch.rand(B, 1, q.shape[-1], device="cuda")   # the query rotated in the kernels, as the fast path's
        sin = (1 - cos ** 2).sqrt()
        ref = None
        for block, warps, topk, prune, fused in itertools.product(
                *(map(int, x.split(",")) for x in (a.blocks, a.warps, a.topk, a.prune, a.fused))):
            if topk and not has_topk:
                continue
            rk.FORM, rk.TOPK, rk.PRUNE_SUBBLOCKS = (block, warps, bool(fused)), bool(topk), prune
            idx = rk._launch_step(q, pq, s, ok, a.dims, a.n, k=k, v=v, count=count, cos=cos, sin=sin)[0]
            ref = idx if ref is None else ref
            same = bool(torch.equal(idx, ref))
            pick = triton.testing.do_bench_cudagraph(
                lambda: rk._launch_step(q, pq, s, ok, a.dims, a.n, k=k, v=v, count=count, cos=cos, sin=sin), rep=200,
                return_mode="median")
            votes = triton.testing.do_bench_cudagraph(
                lambda: rk._launch_step(q, pq, s, ok, a.dims, 0), rep=200, return_mode="median")
            row = dict(batch=B, block=block, warps=warps, prune=prune, fused=fused, us_pick=round(pick * 1e3, 2),
                       us_votes=round(votes * 1e3, 2), same_entries=same, topk=rk.TOPK)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if same and (B not in best or row["us_pick"] < best[B]["us_pick"]):
                best[B] = row
    result = {"device": torch.cuda.get_device_name(), "triton_topk": has_topk, "rows": rows,
              "best": {str(b): r for b, r in best.items()}, "speed": []}
    with open(a.out, "w") as f:   # kept should the speed run below be cut short
        json.dump(result, f, indent=1)
    if speed:
        import run_experiment
        sizes = speed[speed.index("--batch_sizes") + 1] if "--batch_sizes" in speed else ""
        chosen = next((best[b] for b in best if str(b) in sizes.split(",")), next(iter(best.values())))
        rk.FORM, rk.TOPK = (chosen["block"], chosen["warps"], bool(chosen["fused"])), chosen["topk"]
        rk.PRUNE_SUBBLOCKS = chosen["prune"]
        print(f"speed run with block {chosen['block']}, {chosen['warps']} warps, topk {chosen['topk']}, "
              f"prune {chosen['prune']}, fused {chosen['fused']}: "
              f"{' '.join(speed)}", flush=True)
        result["speed"].append({"args": speed, **{k: chosen[k] for k in ("block", "warps", "topk", "prune", "fused")},
                                "exit": run_experiment.main(speed)})
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

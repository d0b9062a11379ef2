"""Time the decode attention kernel (kernels/decode_attention.py) alone at small batches, for each split plan and
launch configuration, on the default model's shape (3 KV heads of 3 query heads, head size 64, bf16).

Why: at batch 1 on the H100 the attention took 25 us a layer over ATSKV's 836 slots and 27 us over the full
cache's 8192 (results/recall-step-kernels-h100-random/fifth, profile). Both plans give each program 4-5 blocks of
32 slots in a row: MIN_SPLIT (128) caps ATSKV's 836 slots at 6 splits, while TARGET_PROGRAMS caps the full cache
at 64. A lower MIN_SPLIT changes only small grids (at batch 64 the 192 programs already meet TARGET_PROGRAMS).

    python bench/attention_split_tune.py --batches 1,4 --slots 836,8192 --out attention_split.json

Each row runs `launch` as ATSKV's step calls it (the running statistic `acc`, 16 recalled entries beside the
slots: `--extra 16`; 0: the full cache's call, no statistic), checks its output against the reference, and times
it as a replayed CUDA graph (`triton.testing.do_bench_cudagraph`, median). The JSON names the fastest plan per
(batch, slots); nothing is changed in the project: set MIN_SPLIT, TARGET_PROGRAMS or CONFIGS from it."""
import argparse
import itertools
import json
import sys

import torch


def inputs(B, N, n_extra, H=3, G=3, D=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, G, D, device="cuda", generator=g).bfloat16()
    K = torch.randn(B, H, N, D, device="cuda", generator=g).bfloat16()
    V = torch.randn(B, H, N, D, device="cuda", generator=g).bfloat16()
    bias = torch.zeros(B, H, N, device="cuda").bfloat16()
    bias[..., -N // 20:] = -30000.0                             # a few free slots, as a slot cache has
    extra = None
    if n_extra:
        extra = (torch.randn(B, H, n_extra, D, device="cuda", generator=g).bfloat16(),
                 torch.randn(B, H, n_extra, D, device="cuda", generator=g).bfloat16(),
                 torch.ones(B, H, n_extra, dtype=torch.uint8, device="cuda"))
    return q, K, V, bias, extra


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,4")
    p.add_argument("--slots", default="836,8192")
    p.add_argument("--extra", type=int, default=16, help="recalled entries beside the slots (0: none, no acc)")
    p.add_argument("--min_split", default="32,64,128")
    p.add_argument("--target", default="132,264,528", help="TARGET_PROGRAMS values")
    p.add_argument("--blocks", default="16,32,64", help="block_n of the CUDA-core form")
    p.add_argument("--warps", default="2,4")
    p.add_argument("--out", default="attention_split.json")
    a = p.parse_args(argv)
    import triton.testing
    from kernels import decode_attention as da
    rows, best = [], {}
    for B, N in itertools.product(map(int, a.batches.split(",")), map(int, a.slots.split(","))):
        q, K, V, bias, extra = inputs(B, N, a.extra)
        ref, _ = (da._reference_with_extra(q.float(), K.float(), V.float(), bias.float(), 0.125,
                                           *(x.float() for x in extra[:2]), extra[2].bool())
                  if extra else da.decode_attention_reference(q.float(), K.float(), V.float(), bias.float(), 0.125))
        for min_split, target, block, warps in itertools.product(
                *(map(int, x.split(",")) for x in (a.min_split, a.target, a.blocks, a.warps))):
            da.MIN_SPLIT, da.TARGET_PROGRAMS = min_split, target
            cfg = dict(da.kernel_config(B * 3, N), block_n=block, num_warps=warps)
            acc = torch.zeros(B, 3, N, device="cuda") if extra else None

            def run():
                return da.launch(q, K, V, bias, 0.125, False, cfg=cfg, acc=acc, extra=extra)[0]
            err = float((run().float() - ref).abs().max())
            us = triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median") * 1e3
            splits = da.split_plan(B * 3, N, block)
            row = dict(batch=B, slots=N, extra=a.extra, min_split=min_split, target=target, block=block,
                       warps=warps, dot=cfg["dot"], splits=splits[0], chunk=splits[1], us=round(us, 2),
                       max_err=err, ok=err < 2e-2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            key = f"{B}x{N}"
            if row["ok"] and (key not in best or us < best[key]["us"]):
                best[key] = row
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "best": best}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

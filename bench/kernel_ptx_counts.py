"""Static counts of the decode step's Triton kernels compiled for an H100 (sm_90) on a machine without a GPU: PTX
instructions, barriers (`bar.*`), shared-memory loads and stores, and the shared memory a program takes. A layout
conversion between a load and its use goes through shared memory behind a barrier; these counts show where a
kernel does that in its inner loop. They are not timings: the GPU decides what the counts cost.

    python bench/kernel_ptx_counts.py [--block 512] [--warps 4] [--json OUT.json]

Each kernel is compiled as the launcher would at the default model's shape (3 KV heads of 3 query heads, head size
64, 16 recall dimensions, 16 recalled entries): integer arguments that equal 1 in the fast path become constants,
pointers and the strides and sizes that are multiples of 16 there are marked so (Triton's specialisation)."""
import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_decode_attention import compile_for_hopper   # noqa: E402  (the sm_90 compile the tests use)


def counts(compiled) -> dict:
    ops = collections.Counter(line.split()[0].rstrip(";") for line in compiled.asm["ptx"].splitlines()
                              if re.match(r"^\s*[a-z@]", line) for line in [line.strip()])
    return {"ptx": sum(ops.values()), "barriers": sum(v for k, v in ops.items() if k.startswith("bar")),
            "shared_ops": sum(v for k, v in ops.items() if "shared" in k), "shared_bytes": compiled.metadata.shared,
            "layout_conversions": compiled.asm["ttgir"].count("convert_layout")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=512, help="the recall scan's block (MANY_WAVES: 512)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from kernels import decode_attention as da
    from kernels import recall_kernels as rk
    f32, i32 = "*fp32", "*i32"
    scan = dict(qs_ptr=f32, f_ptr=f32, dims_ptr=i32, k_ptr="*i8", s_ptr=f32, ok_ptr="*u8", m_ptr=f32, z_ptr=f32,
                q_ptr="*bf16", cos_ptr=f32, sin_ptr=f32, t_ptr=f32, temp="fp32")
    tier = dict(out_ptr="*i64", count_ptr=i32, idx_ptr="*i64", rok_ptr="*u8", tk_ptr="*bf16", tv_ptr="*bf16",
                rk_ptr="*bf16", rv_ptr="*bf16")
    shape = dict(G=3, GP=4, D=64, R=16, RP=16, BN=a.block)
    div = ("k_row", "k_d", "N", "tk_row", "tv_row")
    rows = {}
    for fused in (False, True):
        name = "fused" if fused else "four kernels"
        rows[f"recall statistics ({name})"] = counts(compile_for_hopper(
            rk._step_stats_kernel, dict(shape, NS=0, PREP=fused, SPARQ=True, ROPE=fused), ones=("k_n",), types=scan,
            div=div, warps=a.warps))
        rows[f"recall votes ({name})"] = counts(compile_for_hopper(
            rk._step_votes_kernel, dict(shape, NBP=32, NC=16, TOPK=rk.TOPK, NS=0, TOP=fused, CP=512, NT=16, DV=64),
            ones=("k_n",), types=dict(scan, **tier), div=div, warps=a.warps))
    strides = ("stride_qb", "stride_cb", "stride_kb", "stride_kn", "stride_vb", "stride_vn", "stride_bb",
               "stride_k2b", "stride_k2n", "stride_v2b", "stride_v2n", "stride_b2b", "N", "chunk", "chunk2")
    out_f32 = dict(cos_ptr=f32, sin_ptr=f32, s_ptr=f32, lse_ptr=f32, po_ptr=f32, pm_ptr=f32, pl_ptr=f32)
    for dot, g_pad, cfg in ((False, 4, da.CONFIGS["cuda"]), (True, 16, da.CONFIGS["dot"])):
        for extra in (False, True):
            shape_d = dict(G=3, G_PAD=g_pad, D=64, BLOCK=cfg["block_n"], SPLIT=True, WANT_S=True, IEEE=False, DOT=dot,
                           ROPE=True, EXTRA=extra, HID=da.HIDDEN)
            rows[f"decode attention ({'tensor' if dot else 'CUDA'} cores{', extra entries' if extra else ''})"] = \
                counts(compile_for_hopper(da._decode_kernel, shape_d, ones=("stride_bn", "stride_b2n"), types=out_f32,
                                          div=strides, warps=cfg["num_warps"], stages=cfg["num_stages"]))
    import triton
    print(f"Triton {triton.__version__}, sm_90, recall block {a.block}, {a.warps} warps")
    print("| kernel | PTX instructions | barriers | shared loads/stores | shared bytes | layout conversions |")
    print("|---|---|---|---|---|---|")
    for name, c in rows.items():
        print(f"| {name} | {c['ptx']} | {c['barriers']} | {c['shared_ops']} | {c['shared_bytes']} | "
              f"{c['layout_conversions']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"triton": triton.__version__, "block": a.block, "warps": a.warps,
                                            "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

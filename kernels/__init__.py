"""The fast decode path's Triton kernels, one module each, behind one availability switch.

- `decode_attention`: attention over a layer's slots (split over slot blocks, then merged, with ATSKV's running
  statistic added in the merge);
- `skinny_gemm`: the decode step's matmuls for few rows;
- `evict_kernels`: ATSKV's scoring of every slot and its threshold controller, in the evicting step;
- `greedy_kernels`: the greedy token and the step's bookkeeping;
- `recall_kernels`: recall's scores against the int8 copies of the passive keys.

Each has a tensor form that it falls back to, and `enabled(name)` says whether the kernel runs: Triton present (CUDA
builds of torch ship it; CPU builds do not) and the kernel not switched off (`run_experiment.py --kernels_off`, to
compare a kernel with its tensor form)."""
try:
    import triton
    import triton.language as tl
except ImportError:   # CPU builds of torch come without Triton; every kernel has its tensor form
    triton = tl = None

if triton is not None:
    # Kernels import it by name (`from kernels import rotary`) and call it so: Inductor compiles user kernels in a
    # worker process that resolves the jit functions a kernel calls by their bare names, not module attributes
    # (`kernels.rotary(...)` failed there: tests/test_recall_kernels.py checks every kernel module).
    @triton.jit
    def rotary(x, partner, cos, sin, first_half):
        """HF's rotary embedding (apply_rotary_pos_emb) in float32, inside a kernel: x cos + rotate_half(x) sin,
        partner being x at (d + D/2) % D and first_half where d < D/2 (there rotate_half negates the partner)."""
        p = partner.to(tl.float32)
        return x.to(tl.float32) * cos.to(tl.float32) + tl.where(first_half, -p, p) * sin.to(tl.float32)
else:
    rotary = None


NAMES = ("attention", "gemm", "evict", "greedy", "recall")
_switched_off: set[str] = set()


def switch_off(names) -> None:
    """Kernels named here are not used in this process from now on (the others are)."""
    from utils import UserError
    names = set(names)
    if names - set(NAMES):
        raise UserError(f"--kernels_off: unknown kernel(s) {', '.join(sorted(names - set(NAMES)))}; accepted: "
                        f"{', '.join(NAMES)}")
    _switched_off.clear()
    _switched_off.update(names)


def enabled(name: str) -> bool:
    return triton is not None and name not in _switched_off

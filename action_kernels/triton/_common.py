"""What the Triton kernels share: interpreter handling, row preparation, dot precision, and the one launch path.

Every kernel is launched through `launch(Launch(...))`. Normally that runs `kernel[grid](...)`; inside `capture()`
it records the launch instead, which is how the kernel report (a developer tool under tools/, outside the
package; docs/kernel-report.md) compiles exactly what the launchers would run (same kernel, arguments,
constexprs, warps and stages) without a GPU: the report calls the real launchers on meta tensors, and derives
what its estimate needs (loop trips, DRAM bytes, branch rates) from the recorded launch itself.

Specialisation is explicit: every integer argument is `do_not_specialize` (so the JIT never turns a size into a
constant or a divisibility hint on its own), every pointer the launchers pass is 16-byte aligned (`aligned()`
copies a view that is not; fresh torch allocations always are), and everything else the compiled code depends on
is a constexpr chosen by the launcher. The JIT's own specialisation is then exactly "all pointers aligned", which
the report reproduces.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# the smallest feature tile: below 64 the tensor-core K-steps and the 128-bit loads lose more than padding costs
MIN_BLOCK_D = 64
MAX_INT32 = 2**31 - 1


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter the tests use)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def target_arch(device: torch.device) -> int:
    """Compute capability as 80, 90, ... for the device the kernels will run on: the captured architecture inside
    capture(arch), 80 under the interpreter (its tiles come from INTERPRETER_BLOCKS anyway)."""
    if _captured is not None and _capture_arch is not None:
        return _capture_arch
    if interpreting() or device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs on tensor cores at about fp32 accuracy (three tf32 passes: big x big +
    big x small + small x big); 16-bit inputs ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    # Triton's interpreter computes bf16 tl.dot wrongly (garbage, not rounding): there, and only there, bf16 inputs
    # are read as fp32. On a GPU the bf16 tensor-core path runs and is checked by the CUDA tests.
    if interpreting() and x.dtype == torch.bfloat16:
        return torch.float32
    return x.dtype


def block_d(D: int) -> int:
    """Feature tile: D rounded up to a power of two, at least MIN_BLOCK_D."""
    return max(MIN_BLOCK_D, triton.next_power_of_2(D))


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself when its data pointer is 16-byte aligned (every fresh allocation), else an aligned copy."""
    if x.device.type == "meta" or x.data_ptr() % 16 == 0:
        return x
    return x.clone()


def padded_rows(x: torch.Tensor, dtype: torch.dtype, width: int, row_multiple: int = 1) -> torch.Tensor:
    """x: (..., D) rows in any layout -> (R, width) contiguous, aligned, zero-padded to `width` columns (and with
    zero rows to a multiple of `row_multiple` rows), in dtype.

    The kernels read rows only as dense (R, BLOCK_D) tiles: one layout and one compiled variant per BLOCK_D, int32
    offsets and 128-bit loads. Channel-first maps and ragged D pay one copy of O(R * width), about 0.1% of the
    kernel time at the target sizes (an estimate: two passes over 32 MiB at 4 TB/s against milliseconds).
    """
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    R = -(-rows.shape[0] // row_multiple) * row_multiple
    if D == width and R == rows.shape[0] and rows.dtype == dtype and rows.is_contiguous():
        return aligned(rows)
    out = rows.new_zeros((R, width), dtype=dtype)
    out[:rows.shape[0], :D] = rows
    return out


def check_int32(what: str, value: int) -> None:
    """The kernels index tiles with int32 offsets (64-bit only for each program's base): sizes must fit."""
    if value > MAX_INT32:
        raise NotImplementedError(f"triton kernels index {what} with int32 offsets: {what} = {value:,} exceeds "
                                  f"2^31 - 1; split the call (fewer rows or keys) or use backend='chunked'")


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher decided it: exactly what `launch()` runs."""
    op: str                      # "soft_contrastive" | "hard_negative_topk"
    name: str                    # the kernel's role: "forward", "row_grad", "key_grad", "topk"
    kernel: object               # the @triton.jit function
    grid: tuple
    args: dict                   # every non-constexpr argument by name (tensors, ints, floats)
    constexprs: dict             # every constexpr argument by name
    num_warps: int
    num_stages: int
    dot: bool = True             # the kernel computes dot products (so it must issue tensor-core instructions)


_captured: list | None = None
_capture_arch: int | None = None


@contextlib.contextmanager
def capture(arch: int | None = None):
    """Within the block, launches are recorded (and not run), with the launchers deciding for compute capability
    `arch` (e.g. 90); yields the list they are appended to. The kernel report calls the launchers on meta tensors
    inside it."""
    global _captured, _capture_arch
    saved = _captured, _capture_arch
    _captured, _capture_arch = [], arch
    try:
        yield _captured
    finally:
        _captured, _capture_arch = saved


def launch(plan: Launch) -> None:
    if _captured is not None:
        _captured.append(plan)
        return
    plan.kernel[plan.grid](**plan.args, **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)

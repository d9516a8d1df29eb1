"""What the report covers: every op x dtype x feature size x mode at the target sizes, and how each entry calls
the real launcher (on meta tensors, inside the launch capture)."""
from __future__ import annotations

import dataclasses

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIMS = (64, 128, 256, 512)
# sizes of the static estimates: the issue targets (N = K = 65,536) and the anatomical reference setting (4 classes
# x 256 queries, 512 negatives among K = 16,384 pixels)
N_TARGET = K_TARGET = 65536
ANATOMICAL = dict(N=1024, K=16384, k=512)
TAU_S, TAU_T = 0.1, 0.01
# GEMM-equivalents (2 N K D flops each) of each mode: the floor the estimate is compared with
GEMMS = {"forward": 2, "forward_grad": 5, "key_grad": 4, "topk": 1}


@dataclasses.dataclass(frozen=True)
class Entry:
    op: str        # "soft_contrastive" | "hard_negative_topk" | "anatomical"
    mode: str      # "forward" | "forward_grad" | "key_grad" | "topk"
    dtype: str
    D: int
    N: int
    K: int
    k: int = 0

    @property
    def label(self) -> str:
        extra = f" k={self.k}" if self.k else ""
        return f"{self.op} {self.mode}{extra} {self.dtype} D={self.D}"

    @property
    def gemms(self) -> int:
        return GEMMS[self.mode]


def entries(dtypes=tuple(DTYPES), dims=DIMS, ops=("soft_contrastive", "hard_negative_topk", "anatomical")):
    out = []
    for dt in dtypes:
        for D in dims:
            if "soft_contrastive" in ops:
                out += [Entry("soft_contrastive", m, dt, D, N_TARGET, K_TARGET)
                        for m in ("forward", "forward_grad", "key_grad")]
            if "hard_negative_topk" in ops:
                out += [Entry("hard_negative_topk", "topk", dt, D, N_TARGET, K_TARGET, k) for k in (64, 512)]
            if "anatomical" in ops:
                out.append(Entry("anatomical", "topk", dt, D, ANATOMICAL["N"], ANATOMICAL["K"], ANATOMICAL["k"]))
    return out


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def call_launcher(e: Entry) -> None:
    """Runs the Triton launcher that the op would call for this entry (its launches are captured by the caller)."""
    dt = DTYPES[e.dtype]
    f32 = torch.float32
    if e.op == "soft_contrastive":
        from action_kernels.triton import soft_contrastive as tsc
        s, t, k = _meta((1, e.N, e.D), dt), _meta((1, e.N, e.D), dt), _meta((e.K, e.D), dt)
        rs, rt, rk = _meta((e.N,), f32), _meta((e.N,), f32), _meta((e.K,), f32)
        if e.mode in ("forward", "forward_grad"):
            tsc.soft_contrastive_forward(s, t, k, rs, rt, rk, 1 / TAU_S, 1 / TAU_T, e.mode == "forward_grad")
        else:
            rows = _meta((e.N,), f32)
            tsc.soft_contrastive_key_grad(s, t, k, rs, rt, rk, 1 / TAU_S, 1 / TAU_T, rows, rows, rows,
                                          _meta((e.N,), torch.int32), rows, rows)
        return
    from action_kernels.triton import hard_negative_topk as ttk
    a, keys = _meta((1, e.N, e.D), dt), _meta((e.K, e.D), dt)
    ttk.hard_negative_topk(a, _meta((1, e.N), torch.int64), keys, _meta((e.K,), torch.int64), _meta((e.N,), f32),
                           _meta((e.K,), f32), e.k, -1)

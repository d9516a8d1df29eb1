"""How the CUDA launchers hand tensors to csrc/: row and key views as the extension's Rows, the kernels' dtype names,
cp.async-streamable copies, and the feature limit of the compiled buckets."""
from __future__ import annotations

import torch

from action_kernels._extension import Buffer, check_buffers, rows_arg

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MAX_FEATURES = 512  # the largest feature bucket the kernels are instantiated for (csrc/tc_tiles.cuh feature_bucket)


def keys_arg(mod, k: torch.Tensor):
    """(K, D) keys -> Rows of one batch (P = K rows at stride k.stride(0), strides in elements)."""
    return mod.Rows(k.data_ptr(), max(k.shape[0], 1), 0, k.stride(0), k.stride(1))


def dtype_name(*xs: torch.Tensor) -> str:
    """The kernels' name of the one dtype all of `xs` share ('bf16', 'fp16', 'fp32')."""
    dtypes = {x.dtype for x in xs}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise TypeError(f"the CUDA kernels need rows and keys of one dtype among {tuple(_DTYPES)}, got "
                        f"{sorted(str(d) for d in dtypes)}; cast them to one dtype first")
    return _DTYPES[next(iter(dtypes))]


def streamable(mod, x: torch.Tensor, dtype: str, keys: bool = False) -> torch.Tensor:
    """x, or a copy in its own dtype that the kernels can stream with cp.async (rows of D padded to 16 bytes).

    x: (B, P, D) rows, or (K, D) keys when `keys`. The kernels stream one operand per main-loop iteration and need it
    uniform (csrc/tc_tiles.cuh stream_tile); the copy costs O(rows x D), nothing next to the O(N K D) kernels.
    """
    arg = keys_arg(mod, x) if keys else rows_arg(mod, x)
    n = x.shape[0] if keys else x.shape[0] * x.shape[1]
    if n == 0 or mod.uniform_rows(arg, n, dtype):
        return x
    d = x.shape[-1]
    per = 4 if dtype == "fp32" else 8  # elements per 16 bytes
    padded = torch.zeros((n, (d + per - 1) // per * per), dtype=x.dtype, device=x.device)
    padded[:, :d] = x.reshape(n, d)
    view = padded[:, :d]
    return view if keys else view.unsqueeze(0)


def check_feature_size(op: str, d: int) -> None:
    """Raises NotImplementedError for D above the largest compiled feature bucket."""
    if d > MAX_FEATURES:
        raise NotImplementedError(
            f"{op}: the CUDA kernels hold whole rows in shared memory and are built for D <= {MAX_FEATURES} "
            f"features, got D = {d}; use backend='triton' or backend='chunked'")


def check_soft_buffers(entry: str, s, t, k, f32: dict) -> None:
    """check_buffers for a soft-contrastive launch: s, t (B, P, D) views (each its own B, P: a streamable copy is
    (1, N, D)) of N rows and k (K, D), strided in one dtype, and the dense fp32 buffers named in f32
    {name: (tensor, shape)}."""
    n, D = s.shape[0] * s.shape[1], s.shape[2]
    if t.dim() != 3 or t.shape[0] * t.shape[1] != n:
        raise ValueError(f"{entry}: buffer 't' must hold the {n} rows of 's', got shape {tuple(t.shape)}")
    check_buffers(entry, s.device, s=Buffer(s, tuple(s.shape), s.dtype, "strided"),
                  t=Buffer(t, (t.shape[0], t.shape[1], D), s.dtype, "strided"),
                  k=Buffer(k, (k.shape[0], D), s.dtype, "strided"),
                  **{name: Buffer(x, shape, torch.float32) for name, (x, shape) in f32.items()})

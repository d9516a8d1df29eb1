"""The compiled kernels of csrc/, loaded once, with the reason when a build is absent.

Two builds of the same .cu sources: `action_kernels._C` (nvcc: real kernels on CUDA tensors) and
`action_kernels._C_cpu` (host compiler under csrc/emulation.h: the same kernel logic on CPU threads, for CPU
tensors; slow, meant for tests). The "cuda" backend uses whichever matches the tensors' device.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

import torch

REBUILD_HINT = ("reinstall with `pip install --no-build-isolation .` where nvcc is on PATH or CUDA_HOME is set "
                "(ACTION_KERNELS_BUILD=cuda makes a missing nvcc an error)")
_MODULE = {"cuda": "action_kernels._C", "cpu": "action_kernels._C_cpu"}


@functools.lru_cache(maxsize=None)
def _load(device_type: str):
    name = _MODULE.get(device_type)
    if name is None:
        return None, f"no kernel build exists for {device_type} tensors"
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        hint = REBUILD_HINT if device_type == "cuda" else "reinstall with a C++ compiler present"
        return None, f"{name} is not built or failed to import ({exc}); {hint}"


def extension(device: torch.device):
    """The built module for tensors on `device` (raises if absent: check device_supported first)."""
    mod, why = _load(device.type)
    if mod is None:
        raise RuntimeError(why)
    return mod


def host_module():
    """The host build `_C_cpu` (emulated CUDA kernels + native CPU kernels), or None when it is not built."""
    return _load("cpu")[0]


def flavours() -> dict[str, str]:
    """{device type: flavour name or 'not built: <reason>'}."""
    out = {}
    for dev in _MODULE:
        mod, why = _load(dev)
        out[dev] = mod.flavour() if mod is not None else f"not built: {why}"
    return out


def device_supported(device: torch.device) -> tuple[bool, str]:
    """Whether a build for this device exists, and why not."""
    mod, why = _load(device.type)
    if mod is not None and device.type == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return mod is not None, why


def launch_context(device: torch.device):
    """(module, stream handle, context manager selecting the device) for a launch on `device`."""
    mod = extension(device)
    if device.type == "cuda":
        return mod, torch.cuda.current_stream(device).cuda_stream, torch.cuda.device(device)
    return mod, 0, contextlib.nullcontext()


def rows_arg(mod, x: torch.Tensor):
    """A (B, P, D) view -> the extension's Rows(ptr, P, sb, sp, sd) (strides in elements)."""
    return mod.Rows(x.data_ptr(), x.shape[1], x.stride(0), x.stride(1), x.stride(2))


def keys_arg(mod, k: torch.Tensor):
    """(K, D) keys -> Rows of one batch (P = K rows at stride k.stride(0))."""
    return mod.Rows(k.data_ptr(), max(k.shape[0], 1), 0, k.stride(0), k.stride(1))


_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MAX_FEATURES = 512  # the largest feature bucket the kernels are instantiated for (csrc/tc_tiles.cuh)


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
    if d > MAX_FEATURES:
        raise NotImplementedError(
            f"{op}: the CUDA kernels hold whole rows in shared memory and are built for D <= {MAX_FEATURES} "
            f"features, got D = {d}; use backend='triton' or backend='chunked'")

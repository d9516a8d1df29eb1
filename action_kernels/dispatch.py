"""The one place that chooses a backend, and says why the others were rejected.

Order: the explicit `backend=` argument, then the ACTION_KERNELS_BACKEND environment variable, then automatic by
device: on CUDA tensors Triton, then the CUDA extension, then the chunked torch path (AUTO_ORDER_REASON says why
Triton comes first); on CPU the chunked torch path.
A forced backend that cannot run raises with every reason; an automatic choice that skips the device's first
preference warns once per (op, device type, reason).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from action_kernels import cuda as _cuda

BACKENDS = ("torch", "chunked", "triton", "cuda")
ENV_VAR = "ACTION_KERNELS_BACKEND"
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_AUTO_ORDER = {"cuda": ("triton", "cuda", "chunked"), "cpu": ("chunked",)}
AUTO_ORDER_REASON = {
    "cuda": ("triton before cuda: the CUDA extension's kernels are fp32 SIMT, with no tensor-core instructions "
             "(python -m action_kernels.kernel_report shows them), while the Triton kernels run on tensor cores"),
}
_warned: set = set()


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str, bool]:
    """(importable, reason if not, interpreter mode)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401  (a broken install fails here, not at first kernel launch)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`", interpret
    return True, "", interpret


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'' when `backend` can run on tensors of this device and dtype, else why not."""
    if backend == "torch":
        return ""
    if backend == "chunked":
        return "" if dtype in FUSED_DTYPES + (torch.float64,) else f"dtype {dtype} is not supported"
    if dtype not in FUSED_DTYPES:
        return f"{backend} supports float32, float16 and bfloat16, got {dtype}; use backend='torch' or 'chunked'"
    if backend == "triton":
        ok, why, interpret = triton_status()
        if not ok:
            return why
        if device.type == "cuda" or (device.type == "cpu" and interpret):
            return ""
        return (f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for CPU "
                f"tensors), got {device.type} tensors")
    if backend == "cuda":
        ok, why = _cuda.device_supported(device)
        return "" if ok else why
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def select(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Returns the backend that will run `op` for tensors of this device and dtype."""
    requested, source = backend, "backend="
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR].strip().lower(), f"{ENV_VAR}="
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"{source}{requested!r} is not a backend; expected one of {BACKENDS} or 'auto'")
        why = unavailable_reason(requested, device, dtype)
        if why:
            raise RuntimeError(f"{op}: {source}{requested!r} cannot run here: {why}")
        return requested
    order = _AUTO_ORDER.get(device.type, ("chunked",))
    rejected = []
    for name in order:
        why = unavailable_reason(name, device, dtype)
        if not why:
            if rejected:
                _warn_once(op, device.type, name, rejected)
            return name
        rejected.append(f"{name}: {why}")
    return "torch"


def _warn_once(op: str, device_type: str, chosen: str, rejected: list[str]) -> None:
    key = (op, device_type, chosen, tuple(rejected))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"{op} on {device_type}: using backend {chosen!r} because " + "; ".join(rejected), stacklevel=3)


def report(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """{backend: '' if available else the reason} for tensors of this device and dtype."""
    return {name: unavailable_reason(name, device, dtype) for name in BACKENDS}

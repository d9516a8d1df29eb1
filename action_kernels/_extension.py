"""The extension loader: the compiled kernels of csrc/, loaded once, with the reason when a build is absent.

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
    """A (B, P, D) fp32 view -> the extension's Rows(ptr, P, sb, sp, sd)."""
    return mod.Rows(x.data_ptr(), x.shape[1], x.stride(0), x.stride(1), x.stride(2))

"""The extension loader: the compiled kernels of csrc/, loaded once, with the reason when a build is absent; and the
one check every launcher makes before a tensor's pointer goes to native code (check_buffers).

Two builds of the same .cu sources: `action_kernels._C` (nvcc: real kernels on CUDA tensors) and
`action_kernels._C_cpu` (host compiler under csrc/emulation.h: the same kernel logic on CPU threads, for CPU
tensors; slow, meant for tests). The "cuda" backend uses whichever matches the tensors' device.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import os
import sys
import warnings
from dataclasses import dataclass

import torch

REBUILD_HINT = ("reinstall with `pip install --no-build-isolation .` where nvcc is on PATH or CUDA_HOME is set "
                "(ACTION_KERNELS_BUILD=cuda makes a missing nvcc an error)")
_MODULE = {"cuda": "action_kernels._C", "cpu": "action_kernels._C_cpu"}
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _built_in(package_dir: str, module: str) -> bool:
    """Whether package_dir holds a compiled `module` (e.g. _C_cpu.cpython-311-x86_64-linux-gnu.so)."""
    return any(os.path.isfile(os.path.join(package_dir, module + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def shadowed_install(module: str, package_dir: str = PACKAGE_DIR, search_path: list[str] | None = None) -> str | None:
    """The folder of another copy of action_kernels on sys.path that has the compiled `module` while the imported
    copy (package_dir) lacks it, or None. That is the source tree shadowing a non-editable install: Python puts the
    current directory first on sys.path, so `python -m ...` from the repository root imports ./action_kernels."""
    if _built_in(package_dir, module):
        return None
    here = os.path.realpath(package_dir)
    for entry in search_path if search_path is not None else sys.path:
        candidate = os.path.join(entry or os.getcwd(), "action_kernels")
        if os.path.realpath(candidate) != here and _built_in(candidate, module):
            return candidate
    return None


def _shadow_message(name: str, installed: str) -> str:
    return (f"{name} cannot be imported because action_kernels is imported from {PACKAGE_DIR}, a source tree "
            f"without compiled modules, which shadows the installed package at {installed} (it has them): the "
            f"kernels report 'not built' and the CPU path runs without its native code (about 10x slower). Fix: "
            f"run from another directory (e.g. `cd /tmp`), or install in editable mode from this tree "
            f"(`pip install --no-build-isolation -e .`, which builds the modules into it)")


@functools.lru_cache(maxsize=None)
def _load(device_type: str):
    name = _MODULE.get(device_type)
    if name is None:
        return None, f"no kernel build exists for {device_type} tensors"
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        installed = shadowed_install(name.rsplit(".", 1)[1])
        if installed is not None:
            why = _shadow_message(name, installed)
            warnings.warn(why, RuntimeWarning, stacklevel=2)
            return None, why
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


# -- the buffer check of every native entry point ------------------------------------------------------------------
@dataclass(frozen=True)
class Buffer:
    """What a native entry point reads or writes through one pointer: a tensor of exactly `shape` and `dtype`;
    "contiguous" (dense row-major: the kernel indexes it as such) or "strided" (the kernel is given its strides:
    any non-negative strides whose every element lies inside the tensor's storage)."""

    tensor: object
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"


def _span_fits(x: torch.Tensor) -> bool:
    n = x.numel()
    if n == 0:
        return True
    if x.is_contiguous():
        return (x.storage_offset() + n) * x.element_size() <= x.untyped_storage().nbytes()
    if any(s < 0 for s in x.stride()):
        return False
    last = x.storage_offset() + sum((n - 1) * s for n, s in zip(x.shape, x.stride()))
    return (last + 1) * x.element_size() <= x.untyped_storage().nbytes()


def check_buffers(entry: str, device: torch.device, **buffers: Buffer) -> None:
    """Raises ValueError naming the entry point and the buffer unless every buffer is a tensor on `device` with
    exactly its expected shape and dtype, laid out as declared, before any pointer goes to native code.

    Native kernels take raw pointers and sizes: a buffer that is too small, of another dtype (a bf16 similarity
    block read as fp32) or not laid out as indexed is read or written out of bounds, silently. Every launcher (the
    chunked CPU path's csrc/cpu calls, the CUDA launchers, the Triton launches) calls this first.
    """
    for name, b in buffers.items():
        x = b.tensor
        if (isinstance(x, torch.Tensor) and x.device == device and x.dtype == b.dtype and x.shape == b.shape
                and b.layout in ("contiguous", "strided") and (b.layout == "strided" or x.is_contiguous())
                and _span_fits(x)):
            continue  # the common case, without building the messages below
        where = f"{entry}: buffer {name!r}"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"{where} must be on {device}, got {x.device}")
        if x.dtype != b.dtype:
            raise ValueError(f"{where} must be {b.dtype} (the kernel reads it as such), got {x.dtype}; this is a "
                             f"bug in the caller: convert it with .to({b.dtype})")
        if tuple(x.shape) != tuple(b.shape):
            raise ValueError(f"{where} must have shape {tuple(b.shape)}, got {tuple(x.shape)}")
        if b.layout == "contiguous" and not x.is_contiguous():
            raise ValueError(f"{where} must be contiguous (the kernel indexes it densely), got strides "
                             f"{tuple(x.stride())}; pass .contiguous()")
        if b.layout not in ("contiguous", "strided"):
            raise ValueError(f"{where}: unknown layout {b.layout!r}")
        if not _span_fits(x):  # e.g. a view whose storage was resized or freed
            raise ValueError(f"{where} (shape {tuple(x.shape)}, strides {tuple(x.stride())}, offset "
                             f"{x.storage_offset()}) reaches outside its storage of {x.untyped_storage().nbytes()} "
                             f"bytes")

"""`python -m action_kernels.env_report`: versions, the extension's build flavour, and every backend's availability."""
from __future__ import annotations

import platform
import sys

import torch

from action_kernels import __version__, _extension, dispatch


def lines() -> list[str]:
    out = [f"action_kernels {__version__}", f"python {sys.version.split()[0]} ({platform.machine()})",
           f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
           f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})"]
    ok, why, interpret = dispatch.triton_status()
    if ok:
        import triton
        out.append(f"triton {triton.__version__} (TRITON_INTERPRET={'1' if interpret else '0'})")
    else:
        out.append(f"triton: not available: {why}")
    for dev, flavour in _extension.flavours().items():
        out.append(f"kernel build for {dev} tensors: {flavour}")
    for dev, order in dispatch.AUTO_ORDER.items():
        out.append(f"automatic order on {dev} tensors: {' > '.join(order)} ({dispatch.AUTO_ORDER_REASON[dev]})")
    for (dev, op, dtype), pref in dispatch.PREFERENCES.items():
        k = f" and k <= {pref.max_k}" if pref.max_k is not None else ""
        out.append(f"  except {op} on {dispatch.dtype_names((dtype,))} {dev} tensors with D <= {pref.max_D}{k}: "
                   f"{' > '.join(pref.order)} ({pref.why})")
    for name, backend in dispatch.REGISTRY.items():
        for op, limits in backend.limits.items():
            out.append(f"limits of {name} for {op}: " + ", ".join(
                f"{arg} <= {limit.top} ({limit.why})" for arg, limit in limits.items()))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        out.append(f"backends for {dev.type} tensors (auto picks "
                   f"{dispatch.select(None, 'auto', dev, torch.float32)!r}):")
        for name, why in dispatch.report(dev).items():
            out.append(f"  {name:8s} {'available' if not why else 'unavailable: ' + why}")
    return out


if __name__ == "__main__":
    print("\n".join(lines()))

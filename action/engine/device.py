"""Which device a run uses."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu; "cpu", "cuda", "cuda:N" as given (a CUDA device that torch
    does not see is an error that names the fix)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a device torch knows ({str(exc).splitlines()[0]}); use auto, cpu, "
                         f"cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device; use --device cpu")
    return device

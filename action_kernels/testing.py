"""Tolerances and error measures shared by the tests and the benchmark's correctness gate (one place).

Errors are measured against a float64 reference computed from the same (already rounded) inputs, relative to
the reference's largest magnitude. The allowance grows as 0.1 / τ for temperatures below 0.1: logits scale
with 1/τ, and the loss is a difference of terms of that size.
"""
from __future__ import annotations

import torch

# relative error allowed at τ >= 0.1, by input dtype
BASE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tolerance(dtype: torch.dtype, tau_min: float = 0.1) -> float:
    return BASE_TOLERANCE[dtype] * max(1.0, 0.1 / tau_min)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (0 for two empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    diff = (x.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30)


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tau_min: float = 0.1) -> None:
    """Raises AssertionError with the measured and allowed error (diff printed before asserting)."""
    if x.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(x).all():
        raise AssertionError(f"{name}: non-finite values where the reference has none")
    err, tol = rel_error(x, ref), tolerance(dtype, tau_min)
    if err > tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > allowed {tol:.1e} ({dtype}, tau_min={tau_min})")

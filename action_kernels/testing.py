"""Tolerances and error measures shared by the tests and the benchmark's correctness gate (one place): tolerance()
for a backend against the float64 reference, ALLOWANCES for every other comparison the tests make.

Errors are measured against a float64 reference computed from the same (already rounded) inputs, relative to
the reference's largest magnitude. The allowance grows as 0.1 / τ for temperatures below 0.1: logits scale
with 1/τ, and the loss is a difference of terms of that size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# relative error allowed at τ >= 0.1, by input dtype
BASE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tolerance(dtype: torch.dtype, tau_min: float = 0.1) -> float:
    return BASE_TOLERANCE[dtype] * max(1.0, 0.1 / tau_min)


def logit_tolerance(dtype: torch.dtype, max_logit: float) -> float:
    """The relative error allowed for a backend against the float64 reference when the logits reach |x| <=
    max_logit (1/τ for cosine logits, max ||x|| ||k|| / τ without normalisation): the input dtype's rounding plus
    four fp32 roundings of the largest logit. Tighter than tolerance() for 16-bit inputs at small τ: their inputs
    are exact in the reference, so only the fp32 arithmetic's rounding grows with the logits."""
    return BASE_TOLERANCE[dtype] + 4 * 2.0 ** -24 * max_logit


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


@dataclass(frozen=True)
class Allowance:
    rtol: float
    atol: float
    why: str


# Comparisons that tolerance() above does not cover (not "a backend against the float64 reference in its input
# dtype"), by name, with why each has its size. Checked as |x - ref| <= atol + rtol |ref|, elementwise.
ALLOWANCES = {
    "prototypes_fp32": Allowance(0.0, 1e-6, "fp32 class means in one index_add pass against the reference's "
                                            "per-class sums: the summation order differs"),
    "anatomical_fp32": Allowance(0.0, 1e-5, "the anatomical loss and its gradients in fp32 against the float64 "
                                            "formula on the same negatives: logits up to 1/tau = 2, a log-sum-exp "
                                            "over up to 33 terms"),
    "topk_values_fp32": Allowance(0.0, 2e-6, "fp32 cosines of D <= 130 products against float64 (each product "
                                             "rounded at 6e-8); index differences within it count as ties"),
    "topk_grad_fp32": Allowance(0.0, 1e-5, "gradients of the selected cosines (gathers of unit vectors, through "
                                           "the normalisation) in fp32 against float64 autograd"),
    "same_kernels_loss": Allowance(1e-6, 1e-8, "one fp32 kernel reached by two routes (autograd Function, "
                                               "functional): only the reduction around it differs"),
    "same_kernels_grad": Allowance(1e-5, 1e-7, "the gradients of that kernel by the two routes: the upstream "
                                               "gradient of a mean is 1/N in one, a weighted 1/N in the other"),
    "saacl_fp32": Allowance(1e-5, 1e-6, "SAACL in fp32, chunked, against its float64 per-query formula"),
    "ranks_losses": Allowance(1e-4, 1e-6, "losses of 2 gloo ranks against one process computing the same shards, "
                                          "after up to 4 steps: the all-reduce sums gradients in another order"),
    "ranks_weights": Allowance(1e-4, 1e-5, "weights and banks of those runs after 4 SGD steps (the same cause)"),
    "fp64_identity": Allowance(1e-10, 1e-12, "float64 identities of the reference (a KL of equal distributions, "
                                             "two formulations of one KL): a few rounding steps of 1e-16"),
    "blur_mean": Allowance(0.0, 2e-3, "a normalised Gaussian blur keeps an image's mean up to what replicate "
                                      "padding adds at the borders of a 40 x 40 image"),
}


def assert_allowed(label: str, x, ref, name: str) -> None:
    """Raises AssertionError unless x is within ALLOWANCES[name] of ref (tensors or numbers); the message gives
    the measured and the allowed difference."""
    a = ALLOWANCES[name]
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    if x.shape != ref.shape:
        raise AssertionError(f"{label}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return
    excess = (x - ref).abs() - (a.atol + a.rtol * ref.abs())
    if not bool((excess <= 0).all()):
        worst = int(excess.reshape(-1).argmax())
        raise AssertionError(f"{label}: |x - ref| = {float((x - ref).abs().reshape(-1)[worst]):.3e} at element {worst} "
                             f"> allowed {a.atol:.1e} + {a.rtol:.1e} |ref| ({name}: {a.why})")

"""The L2 normalisation every op folds into its kernels, and its gradient.

Backends never read normalised copies: they take raw rows x and inverse norms r = 1 / max(||x||, eps), so that
x̂ = r x (all ones when the op does not normalise). Gradients arrive with respect to x̂ and are mapped back to x
here, once for every op and backend.
"""
from __future__ import annotations

import torch

from action_kernels._rows import work_dtype

NORM_EPS = 1e-12  # as F.normalize


def inverse_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """x: (..., D) -> (...) 1 / max(||x||, eps) in fp32 (fp64 for fp64), or ones when not normalising."""
    if not normalize:
        return torch.ones(x.shape[:-1], dtype=work_dtype(x), device=x.device)
    return torch.linalg.vector_norm(x, dim=-1, dtype=work_dtype(x)).clamp_min(NORM_EPS).reciprocal()


def through_normalization(x: torch.Tensor, r: torch.Tensor, g_hat: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. raw x (..., D) from the gradient w.r.t. x̂ = r x: r (g - x̂ (x̂·g)), as F.normalize's backward.

    Where the norm was clamped to eps, x̂ = x / eps is linear in x and the projection term vanishes.
    """
    x_hat = x.to(g_hat.dtype) * r[..., None]
    unclamped = torch.linalg.vector_norm(x, dim=-1, dtype=g_hat.dtype) > NORM_EPS
    proj = (x_hat * g_hat).sum(-1, keepdim=True) * unclamped[..., None]
    return (g_hat - x_hat * proj) * r[..., None]


def row_and_key_scales(rows: torch.Tensor, keys: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: a (B, P, D) view, keys: (K, D) -> (r_rows (N,), r_keys (K,)): the inverse norms the backends take."""
    return inverse_norms(rows, normalize).reshape(-1), inverse_norms(keys, normalize)


def unit_rows(rows: torch.Tensor, keys: torch.Tensor, r_rows: torch.Tensor, r_keys: torch.Tensor):
    """(x̂ (N, D), k̂ (K, D)) in the work dtype: the scaled rows and keys that the gathers of ops/ read."""
    B, P, D = rows.shape
    return rows.reshape(B * P, D).to(r_rows.dtype) * r_rows[:, None], keys.to(r_keys.dtype) * r_keys[:, None]

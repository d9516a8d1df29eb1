"""Plain-torch references: materialising, differentiable by autograd, the ground truth of every test.

They hold N x K matrices in memory on purpose; use the fused ops for real sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D); (B, D, *spatial) -> (B * prod(spatial), D) in (b, *spatial) row order (a copy)."""
    if x.dim() == 2:
        return x
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


def reduce_rows(loss: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """loss: (N,) per-row, weight: (N,) or None -> () for "mean"/"sum", (N,) for "none".

    "mean" is the weighted mean sum(w l) / sum(w); with N = 0 or all weights zero it is 0 with zero gradients.
    """
    if weight is not None:
        weighted = loss * weight.to(loss.dtype)
    else:
        weighted = loss
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = weight.sum().to(loss.dtype) if weight is not None else loss.new_tensor(float(loss.numel()))
    return total / denom.clamp_min(torch.finfo(loss.dtype).tiny)


def soft_contrastive_rows_ref(
    student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor, tau_student: float, tau_teacher: float,
    normalize: bool = True,
) -> torch.Tensor:
    """student, teacher: (N, D) or (B, D, *spatial); keys: (K, D) -> (N,) per-row KL(p_t || p_s), computed in fp32+.

    p_t = softmax(n(t) n(K)^T / tau_teacher), p_s = softmax(n(s) n(K)^T / tau_student).
    """
    work = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t, k = to_rows(student).to(work), to_rows(teacher).to(work), keys.to(work)
    if normalize:
        s, t, k = F.normalize(s, dim=1), F.normalize(t, dim=1), F.normalize(k, dim=1)
    log_q = torch.log_softmax(s @ k.T / tau_student, dim=1)
    log_p = torch.log_softmax(t @ k.T / tau_teacher, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def soft_contrastive_loss_ref(
    student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor, tau_student: float = 0.1,
    tau_teacher: float = 0.01, weight: torch.Tensor | None = None, reduction: str = "mean", normalize: bool = True,
) -> torch.Tensor:
    """The soft-label contrastive distillation loss, materialised. Shapes as `soft_contrastive_loss`."""
    loss = soft_contrastive_rows_ref(student, teacher, keys, tau_student, tau_teacher, normalize)
    w = None if weight is None else weight.reshape(-1)
    return reduce_rows(loss, w, reduction)

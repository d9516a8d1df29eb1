"""nn.Module forms of the ops (hold the hyper-parameters; forward takes the tensors)."""
from __future__ import annotations

import torch
from torch import nn

from action_kernels.ops.soft_contrastive import soft_contrastive_loss


class SoftContrastiveLoss(nn.Module):
    """Module form of `soft_contrastive_loss`: forward(student, teacher, keys, weight=None) -> loss.

    Example:
        >>> loss_fn = SoftContrastiveLoss(tau_student=0.1, tau_teacher=0.01)
        >>> loss = loss_fn(student_map, teacher_map.detach(), bank)
    """

    def __init__(self, tau_student: float = 0.1, tau_teacher: float = 0.01, reduction: str = "mean",
                 normalize: bool = True, backend: str | None = None):
        super().__init__()
        self.tau_student, self.tau_teacher = tau_student, tau_teacher
        self.reduction, self.normalize, self.backend = reduction, normalize, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        return soft_contrastive_loss(student, teacher, keys, self.tau_student, self.tau_teacher, weight,
                                     self.reduction, self.normalize, self.backend)

    def extra_repr(self) -> str:
        return (f"tau_student={self.tau_student}, tau_teacher={self.tau_teacher}, reduction={self.reduction!r}, "
                f"normalize={self.normalize}, backend={self.backend!r}")

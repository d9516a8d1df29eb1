"""nn.Module forms of the ops (hold the hyper-parameters; forward takes the tensors)."""
from __future__ import annotations

import torch
from torch import nn

from action_kernels.ops.anatomical import anatomical_contrast_loss
from action_kernels.ops.hard_negative_topk import hard_negative_topk
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
        return soft_contrastive_loss(student, teacher, keys, tau_student=self.tau_student, tau_teacher=self.tau_teacher,
                                     weight=weight, reduction=self.reduction, normalize=self.normalize,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        return (f"tau_student={self.tau_student}, tau_teacher={self.tau_teacher}, reduction={self.reduction!r}, "
                f"normalize={self.normalize}, backend={self.backend!r}")


class HardNegativeMiner(nn.Module):
    """Module form of `hard_negative_topk`: forward(anchors, anchor_labels, keys, key_labels) -> (values, indices)."""

    def __init__(self, k: int = 512, ignore_label: int = -1, normalize: bool = True, backend: str | None = None):
        super().__init__()
        self.k, self.ignore_label, self.normalize, self.backend = k, ignore_label, normalize, backend

    def forward(self, anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor,
                key_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hard_negative_topk(anchors, anchor_labels, keys, key_labels, k=self.k, ignore_label=self.ignore_label,
                                  normalize=self.normalize, backend=self.backend)

    def extra_repr(self) -> str:
        return f"k={self.k}, ignore_label={self.ignore_label}, normalize={self.normalize}, backend={self.backend!r}"


class AnatomicalContrastLoss(nn.Module):
    """Module form of `anatomical_contrast_loss`:
    forward(queries, query_labels, prototypes, keys, key_labels, generator=None, weight=None) -> loss."""

    def __init__(self, tau: float = 0.5, negatives="topk", num_negatives: int = 512, reduction: str = "mean",
                 ignore_label: int = -1, backend: str | None = None):
        super().__init__()
        self.tau, self.negatives, self.num_negatives = tau, negatives, num_negatives
        self.reduction, self.ignore_label, self.backend = reduction, ignore_label, backend

    def forward(self, queries: torch.Tensor, query_labels: torch.Tensor, prototypes: torch.Tensor, keys: torch.Tensor,
                key_labels: torch.Tensor, generator: torch.Generator | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        return anatomical_contrast_loss(queries, query_labels, prototypes, keys, key_labels, tau=self.tau,
                                        negatives=self.negatives, num_negatives=self.num_negatives,
                                        generator=generator, backend=self.backend, reduction=self.reduction,
                                        ignore_label=self.ignore_label, weight=weight)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, negatives={self.negatives!r}, num_negatives={self.num_negatives}, "
                f"reduction={self.reduction!r}, ignore_label={self.ignore_label}, backend={self.backend!r}")

"""action-kernels: fused kernels for ACTION (anatomical-aware contrastive distillation) and ACTION++.

Public API:
    soft_contrastive_loss(student, teacher, keys, ...)   the pixel-wise soft-label contrastive distillation loss
    SoftContrastiveLoss                                  its nn.Module form
    SoftContrastiveLossFunction                          its autograd Function over normalised row views
    soft_contrastive_loss_ref                            the materialising plain-torch reference
"""
from action_kernels.nn import SoftContrastiveLoss
from action_kernels.ops.soft_contrastive import SoftContrastiveLossFunction, soft_contrastive_loss
from action_kernels.reference import soft_contrastive_loss_ref

__version__ = "0.1.0"
__all__ = ["SoftContrastiveLoss", "SoftContrastiveLossFunction", "soft_contrastive_loss", "soft_contrastive_loss_ref",
           "__version__"]

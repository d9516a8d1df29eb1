"""action-kernels: fused kernels for ACTION (anatomical-aware contrastive distillation) and ACTION++.

Public API:
    soft_contrastive_loss(student, teacher, keys, ...)      the pixel-wise soft-label contrastive distillation loss
    hard_negative_topk(anchors, labels, keys, key_labels, k) the k most similar other-class keys per anchor
    anatomical_contrast_loss(queries, labels, prototypes, keys, key_labels, ...)   ACTION's anatomical InfoNCE
    class_prototypes, class_graph_negatives, indexed_cosine  the helpers of that loss
    MemoryBank(size, dim, num_classes=None)                  a ring buffer of keys (and labels) for the ops
    SoftContrastiveLoss, HardNegativeMiner, AnatomicalContrastLoss   nn.Module forms
    SoftContrastiveLossFunction, HardNegativeTopkFunction, IndexedCosineFunction, AnatomicalContrastLossFunction
                                                             the ops as drop-in autograd Functions
    *_ref                                                    materialising plain-torch references
    set_value_checks(enabled)                                value checks on or off (host syncs: docs/kernels.md)
"""
from action_kernels._validation import set_value_checks
from action_kernels._version import __version__
from action_kernels.bank import MemoryBank
from action_kernels.nn import AnatomicalContrastLoss, HardNegativeMiner, SoftContrastiveLoss
from action_kernels.ops.anatomical import (
    AnatomicalContrastLossFunction,
    anatomical_contrast_loss,
    class_graph_negatives,
    class_prototypes,
)
from action_kernels.ops.hard_negative_topk import (
    HardNegativeTopkFunction,
    IndexedCosineFunction,
    hard_negative_topk,
    indexed_cosine,
)
from action_kernels.ops.soft_contrastive import SoftContrastiveLossFunction, soft_contrastive_loss
from action_kernels.reference import (
    anatomical_contrast_loss_ref,
    class_prototypes_ref,
    hard_negative_topk_ref,
    soft_contrastive_loss_ref,
)

__all__ = ["AnatomicalContrastLoss", "AnatomicalContrastLossFunction", "HardNegativeMiner", "HardNegativeTopkFunction",
           "IndexedCosineFunction", "MemoryBank", "SoftContrastiveLoss", "SoftContrastiveLossFunction",
           "anatomical_contrast_loss", "anatomical_contrast_loss_ref", "class_graph_negatives", "class_prototypes",
           "class_prototypes_ref", "hard_negative_topk", "hard_negative_topk_ref", "indexed_cosine",
           "set_value_checks", "soft_contrastive_loss", "soft_contrastive_loss_ref", "__version__"]

"""The supervised loss of every ACTION stage (docs/method.md section 1).

L_sup = 0.5 * (CE(logits, y) + Dice(softmax(logits), y)); Dice is the V-Net form averaged over all C classes,
background included: 1 - (2 sum p y + eps) / (sum p^2 + sum y^2 + eps), eps = 1e-5, sums over batch and pixels.
Pixels labelled ignore_index (IGNORE_INDEX, 255: cutout boxes) count in neither term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from action.data.labels import IGNORE_INDEX


def dice_loss(probs: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1e-5,
              per_class: bool = False) -> torch.Tensor:
    """probs (B, C, *S) softmax output, target (B, *S) int64 -> scalar: mean over the C classes of 1 - Dice
    (per_class: the (C,) terms before the mean)."""
    C = probs.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(target.clamp(0, C - 1) * (target != ignore_index), C).movedim(-1, 1).to(probs.dtype)
    dims = [0] + list(range(2, probs.dim()))
    p, y = probs * valid, onehot * valid
    inter = (p * y).sum(dims)
    denom = (p * p).sum(dims) + (y * y).sum(dims)
    terms = 1.0 - (2.0 * inter + eps) / (denom + eps)
    return terms if per_class else terms.mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """logits (B, C, *S), target (B, *S) int64 -> {"ce", "dice", "sup" = 0.5 (ce + dice)} (float32)."""
    logits = logits.float()
    if (target != ignore_index).any():
        ce = F.cross_entropy(logits, target, ignore_index=ignore_index)
    else:  # every pixel ignored: a zero that keeps the graph
        ce = logits.sum() * 0.0
    dice = dice_loss(logits.softmax(1), target, ignore_index)
    return {"ce": ce, "dice": dice, "sup": 0.5 * (ce + dice)}

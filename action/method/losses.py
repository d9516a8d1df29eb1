"""ACTION's stage losses built on the fused ops (docs/method.md sections 2-5): FIFO anchor banks, the pseudo-label loss,
hard-query sampling and the anatomical contrast term on a representation map. Everything runs on the training
device, vectorised, randomness from one torch generator (docs/method.md section 9, items 4 and 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import action_kernels as ak


class FifoBank(nn.Module):
    """A FIFO memory bank of K x D embeddings (buffers: saved in checkpoints, moved with .to()).
    push(x (n, D)) overwrites the oldest rows; keys() -> the filled rows (k, D), k <= K."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        K = self.bank.shape[0]
        x = x.detach().to(self.bank.dtype)[-K:]
        n = x.shape[0]
        pos = (int(self.ptr) + torch.arange(n, device=x.device)) % K
        self.bank[pos] = x
        self.ptr.fill_((int(self.ptr) + n) % K)
        self.filled.fill_(min(K, int(self.filled) + n))

    def keys(self) -> torch.Tensor:
        return self.bank[:int(self.filled)]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, bank: FifoBank, tau_student: float,
                      tau_teacher: float) -> torch.Tensor:
    """soft_contrastive_loss of student rows/maps against the bank's anchors; a graph-keeping zero while the bank
    is empty (the first iteration)."""
    keys = bank.keys()
    if keys.shape[0] == 0:
        return student.sum() * 0.0
    return ak.soft_contrastive_loss(student, teacher.detach(), keys.to(student.dtype), tau_student, tau_teacher)


def pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, threshold: float,
                      ignore_index: int = 255, mask: str = "image") -> torch.Tensor:
    """logits (B, C, *S), pseudo (B, *S) int64, confidence (B, *S). Pixels marked ignore_index (cutout, padding)
    count nowhere; none left -> a graph-keeping 0.
    mask "image" (docs/method.md section 5): w_b = fraction of image b's pixels with confidence >= threshold;
        L = sum_i w_b CE_i over the pixels with positive loss, divided by their number.
    mask "pixel": L = mean of CE_i over the pixels with confidence >= threshold (unconfident pixels, mostly the
        borders of small structures a weak teacher calls background, push nothing)."""
    valid = pseudo != ignore_index
    ce = F.cross_entropy(logits.float(), pseudo.masked_fill(~valid, 0), reduction="none") * valid
    confident = (confidence >= threshold) & valid
    if mask == "pixel":
        return (ce * confident).sum() / confident.sum().clamp_min(1)
    if mask != "image":
        raise ValueError(f"pseudo_label_loss: mask must be 'image' or 'pixel', got {mask!r}")
    w = confident.flatten(1).float().sum(1) / valid.flatten(1).float().sum(1).clamp_min(1)
    weighted = ce * w.view(-1, *[1] * (ce.dim() - 1))
    positive = (ce > 0).sum()
    return weighted.sum() / positive.clamp_min(1)


def sample_hard_queries(labels: torch.Tensor, probs: torch.Tensor, num_classes: int, per_class: int,
                        threshold: float, generator: torch.Generator) -> torch.Tensor:
    """labels (N,) in [0, C) or -1 (invalid), probs (N, C) -> indices of hard queries: for each class c, per_class
    draws (with replacement, uniform) among the valid pixels of class c whose probability of c is < threshold.
    Classes without hard pixels contribute none. Vectorised: one sort, one rand."""
    valid = labels >= 0
    p_own = probs.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    hard = valid & (p_own < threshold)
    cls = torch.where(hard, labels, num_classes)
    order = torch.argsort(cls, stable=True)
    counts = torch.bincount(cls, minlength=num_classes + 1)[:num_classes]
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(num_classes, per_class, generator=generator, device=generator.device).to(labels.device)
    pick = starts[:, None] + (u * counts[:, None]).long().clamp_max((counts - 1).clamp_min(0)[:, None])
    pick = pick[counts > 0].reshape(-1)
    return order[pick]


def anatomical_term(rep: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, num_classes: int, *,
                    per_class: int, strong_threshold: float, tau: float, negatives: str, num_negatives: int,
                    generator: torch.Generator) -> torch.Tensor:
    """docs/method.md section 4 on a representation map: rep (B, D, *S) with grad (S: h, w or d, h, w), labels (B, *S)
    (-1: not valid), probs (B, C, *S) the student's (detached) class probabilities. Prototypes and keys are the detached
    embeddings of valid pixels; queries are hard pixels; negatives "topk" (fused) or "class_graph". Fewer than two
    classes present or no hard query -> a graph-keeping zero."""
    D = rep.shape[1]
    rows = rep.movedim(1, -1).reshape(-1, D)
    y = labels.reshape(-1)
    p = probs.movedim(1, -1).reshape(-1, num_classes)
    q_idx = sample_hard_queries(y, p, num_classes, per_class, strong_threshold, generator)
    valid = y >= 0
    if q_idx.numel() == 0 or torch.unique(y[valid]).numel() < 2:
        return rows.sum() * 0.0
    keys = rows.detach()
    protos, _ = ak.class_prototypes(keys, y, num_classes, ignore_label=-1)
    return ak.anatomical_contrast_loss(rows[q_idx], y[q_idx], protos, keys, y, tau, negatives, num_negatives,
                                       generator=generator, ignore_label=-1)

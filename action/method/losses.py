"""ACTION's stage losses built on the fused ops (docs/method.md sections 2-5): FIFO anchor banks (ak.MemoryBank), the
pseudo-label loss,
hard-query sampling and the anatomical contrast term on a representation map. Everything runs on the training
device, vectorised, randomness from one torch generator (docs/method.md section 9, items 4 and 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import action_kernels as ak
from action.data.labels import IGNORE_INDEX
from action.engine.losses import dice_loss


def teacher_bank(size: int, dim: int) -> ak.MemoryBank:
    """The FIFO of teacher embeddings of stages i and ii: an unlabelled ak.MemoryBank of size x dim rows (fp32, the
    state_dict names of the former FifoBank, so older checkpoints load). gather=False: the Trainer all-gathers the
    deferred rows of every rank itself, in shard order, before pushing (action.engine.distributed.gather_in_order)."""
    return ak.MemoryBank(size, dim, gather=False)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, bank: ak.MemoryBank, tau_student: float,
                      tau_teacher: float) -> torch.Tensor:
    """soft_contrastive_loss of student rows/maps against the bank's anchors; a graph-keeping zero while the bank
    is empty (the first iteration)."""
    keys = bank.keys()
    if keys.shape[0] == 0:
        return student.sum() * 0.0
    return ak.soft_contrastive_loss(student, teacher.detach(), keys.to(student.dtype), tau_student, tau_teacher)


def pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, threshold: float,
                      ignore_index: int = IGNORE_INDEX, mask: str = "image", loss: str = "ce") -> torch.Tensor:
    """The pseudo-label loss alone: pseudo_label_terms(...)["loss"]."""
    return pseudo_label_terms(logits, pseudo, confidence, threshold, ignore_index, mask, loss)["loss"]


def pseudo_label_terms(logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, threshold: float,
                       ignore_index: int = IGNORE_INDEX, mask: str = "image",
                       loss: str = "ce") -> dict[str, torch.Tensor]:
    """logits (B, C, *S), pseudo (B, *S) int64, confidence (B, *S) -> {"loss", "foreground"} () float32: the loss
    and the part of it that comes from pixels pseudo-labelled foreground (class > 0). Pixels marked ignore_index
    (cutout, padding) count nowhere; a pixel is confident when its confidence >= threshold.
    loss "ce", mask "image" (docs/method.md section 5): w_b = fraction of image b's pixels that are confident;
        L = sum_i w_b CE_i over the pixels with positive loss, divided by their number.
    loss "ce", mask "pixel": L = mean of CE_i over the confident pixels.
    loss "dice": the V-Net Dice loss over all C classes (action.engine.losses.dice_loss) on the confident pixels
        (the others ignored; the UniMatch / SSL4MIS form); its foreground part is the classes c > 0's share.
    loss "ce+dice": 0.5 (CE + Dice), the form of the supervised loss. No confident pixel -> a graph-keeping 0
    (the Dice terms of classes absent from prediction and target are 1 - eps / eps = 0)."""
    if loss not in ("ce", "dice", "ce+dice"):
        raise ValueError(f"pseudo_label_loss: loss must be 'ce', 'dice' or 'ce+dice', got {loss!r}")
    if mask not in ("image", "pixel"):
        raise ValueError(f"pseudo_label_loss: mask must be 'image' or 'pixel', got {mask!r}")
    logits = logits.float()
    valid = pseudo != ignore_index
    confident = (confidence >= threshold) & valid
    fg = (pseudo > 0) & valid
    terms = []
    if loss in ("ce", "ce+dice"):
        ce = F.cross_entropy(logits, pseudo.masked_fill(~valid, 0), reduction="none") * valid
        if mask == "pixel":
            weighted, count = ce * confident, confident.sum()
        else:
            w = confident.flatten(1).float().sum(1) / valid.flatten(1).float().sum(1).clamp_min(1)
            weighted, count = ce * w.view(-1, *[1] * (ce.dim() - 1)), (ce > 0).sum()
        count = count.clamp_min(1)
        terms.append((weighted.sum() / count, (weighted * fg).sum() / count))
    if loss in ("dice", "ce+dice"):
        per_class = dice_loss(logits.softmax(1), pseudo.masked_fill(~confident, ignore_index), ignore_index,
                              per_class=True)
        terms.append((per_class.mean(), per_class[1:].sum() / per_class.numel()))
    scale = 1.0 / len(terms)
    return {"loss": scale * sum(t[0] for t in terms), "foreground": scale * sum(t[1] for t in terms)}


@torch.no_grad()
def pseudo_label_diagnostics(pseudo: torch.Tensor, confidence: torch.Tensor, threshold: float, num_classes: int,
                             ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """What the pseudo-label loss of a batch can learn from: pseudo (B, *S) int64, confidence (B, *S) ->
    {"pl_confident": fraction of the valid pixels that are confident (confidence >= threshold),
     "pl_confident_c<k>": the same among the pixels pseudo-labelled k (0 when there are none),
     "pl_weight": mean over images of the per-image weight w_b (its confident fraction, docs/method.md 5)},
    () float32 tensors on the input's device (no host synchronisation)."""
    valid = pseudo != ignore_index
    confident = (confidence >= threshold) & valid
    out = {"pl_confident": confident.sum().float() / valid.sum().clamp_min(1)}
    for k in range(num_classes):
        of_k = valid & (pseudo == k)
        out[f"pl_confident_c{k}"] = (confident & of_k).sum().float() / of_k.sum().clamp_min(1)
    w = confident.flatten(1).float().sum(1) / valid.flatten(1).float().sum(1).clamp_min(1)
    out["pl_weight"] = w.mean()
    return out


@torch.no_grad()
def pseudo_label_audit(pseudo: torch.Tensor, confidence: torch.Tensor, truth: torch.Tensor, threshold: float,
                       num_classes: int) -> dict[str, float]:
    """Research use (--audit-pseudo-labels): the teacher's pseudo-labels pseudo (B, *S) against the unlabelled
    images' ground truth (B, *S) -> {"audit_dice_c<k>": Dice of class k > 0 over the batch (1 when both are
    empty), "audit_confident_accuracy": accuracy among confident pixels, "audit_confident_recall_c<k>": fraction of
    the true class-k pixels that get a confident correct label}. Only logged: nothing here reaches a loss."""
    confident = confidence >= threshold
    out = {}
    for k in range(1, num_classes):
        p, t = pseudo == k, truth == k
        total = int(p.sum()) + int(t.sum())
        out[f"audit_dice_c{k}"] = 2.0 * int((p & t).sum()) / total if total else 1.0
    out["audit_confident_accuracy"] = int((confident & (pseudo == truth)).sum()) / max(1, int(confident.sum()))
    for k in range(1, num_classes):
        t = truth == k
        out[f"audit_confident_recall_c{k}"] = int((t & confident & (pseudo == k)).sum()) / max(1, int(t.sum()))
    return out


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

"""Plain-torch references: materialising, differentiable by autograd, the ground truth of every test.

They hold N x K matrices in memory on purpose; use the fused ops for real sizes. This file imports nothing from
the rest of the package and keeps its own few helpers, so the ground truth shares no code with the paths it
checks. (The torch backend runs these functions: dispatch.reference.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of every path: fp64 inputs stay fp64, everything else (fp32/fp16/bf16) runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D); (B, D, *spatial) -> (B * prod(spatial), D) in (b, *spatial) row order (a copy)."""
    if x.dim() == 2:
        return x
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


def _reduce_rows(loss: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
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


class _NanGrad(torch.autograd.Function):
    """Identity whose gradient is NaN in the rows of `mask` (..., ) of x (..., D): the NaN policy for gradients
    (a row that is non-finite or fed a NaN output gets a NaN gradient, whatever autograd would otherwise give)."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return torch.where(mask[..., None], torch.full_like(g, float("nan")), g), None


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(dim=-1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, dim=-1) (x / max(||x||, 1e-12)) without overflow for any finite row: each row is divided by a
    power of two c within a factor 2 below max |x| first (exact), then x̂ = x' / max(||x'||, 1e-12 / c)."""
    m = x.detach().abs().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    c = torch.ldexp(torch.ones_like(m), torch.frexp(m).exponent - 1)
    xs = x / c
    return xs / torch.maximum(torch.linalg.vector_norm(xs, dim=-1, keepdim=True), 1e-12 / c)


def soft_contrastive_rows_ref(
    student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor, tau_student: float, tau_teacher: float,
    normalize: bool = True,
) -> torch.Tensor:
    """student, teacher: (N, D) or (B, D, *spatial); keys: (K, D) -> (N,) per-row KL(p_t || p_s), computed in fp32+.

    p_t = softmax(n(t) n(K)^T / tau_teacher), p_s = softmax(n(s) n(K)^T / tau_student).
    NaN policy: a row with a non-finite value in s or t, or any non-finite key, gives NaN (and a NaN student
    gradient row; the key gradient is NaN when any row is).
    """
    work = _work_dtype(student)
    s, t, k = _to_rows(student).to(work), _to_rows(teacher).to(work), keys.to(work)
    bad = _nonfinite_rows(s) | _nonfinite_rows(t) | _nonfinite_rows(k).any()
    s, k = _NanGrad.apply(s, bad), _NanGrad.apply(k, bad.any().expand(k.shape[0]))
    if normalize:
        s, t, k = _unit(s), _unit(t), _unit(k)
    log_q = torch.log_softmax(s @ k.T / tau_student, dim=1)
    log_p = torch.log_softmax(t @ k.T / tau_teacher, dim=1)
    loss = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return torch.where(bad, torch.full_like(loss, float("nan")), loss)


def soft_contrastive_loss_ref(
    student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor, tau_student: float = 0.1,
    tau_teacher: float = 0.01, weight: torch.Tensor | None = None, reduction: str = "mean", normalize: bool = True,
) -> torch.Tensor:
    """The soft-label contrastive distillation loss, materialised. Shapes as `soft_contrastive_loss`."""
    loss = soft_contrastive_rows_ref(student, teacher, keys, tau_student, tau_teacher, normalize)
    w = None if weight is None else weight.reshape(-1)
    return _reduce_rows(loss, w, reduction)


def hard_negative_topk_ref(
    anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, k: int,
    ignore_label: int = -1, normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """anchors: (N, D) or (B, D, *spatial); keys: (K, D) -> values (N, k) fp32 descending, indices (N, k) int64.

    The k keys most similar (cosine) to each anchor among keys whose label differs from the anchor's and is not
    ignore_label; ties go to the lower index; rows with fewer candidates are padded with (-inf, -1). Materialises
    the N x K similarity matrix; values are differentiable.
    NaN policy: a row whose anchor or any candidate key is non-finite gives values NaN and indices -1; its anchor
    gradient is NaN, and so is the gradient of a non-finite key.
    """
    a, kk = _to_rows(anchors).to(_work_dtype(anchors)), keys.to(_work_dtype(anchors))
    ya, yk = anchor_labels.reshape(-1, 1), key_labels.reshape(1, -1)
    allowed = (ya != yk) & (yk != ignore_label)
    bad_a, bad_k = _nonfinite_rows(a), _nonfinite_rows(kk)
    poisoned = bad_a | (allowed & bad_k[None, :]).any(dim=1)
    a, kk = _NanGrad.apply(a, poisoned), _NanGrad.apply(kk, bad_k)
    a, kk = torch.where(bad_a[:, None], 0.0, a), torch.where(bad_k[:, None], 0.0, kk)
    if normalize:
        a, kk = _unit(a), _unit(kk)
    sim = a @ kk.T
    sim = sim.masked_fill(~allowed, float("-inf"))
    order = torch.sort(sim.detach(), dim=1, descending=True, stable=True).indices[:, :k]  # stable: lower index first
    values = sim.gather(1, order)
    pad = k - values.shape[1]
    if pad > 0:
        values = F.pad(values, (0, pad), value=float("-inf"))
        order = F.pad(order, (0, pad), value=-1)
    order = order.masked_fill(torch.isinf(values), -1)
    values = torch.where(poisoned[:, None], torch.full_like(values, float("nan")), values)
    return values, order.masked_fill(poisoned[:, None], -1)


def class_prototypes_ref(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         weight: torch.Tensor | None = None, ignore_label: int = -1):
    """features: (N, D) or (B, D, *spatial); labels: (N,) or (B, *spatial) -> (C, D) weighted means, (C,) present.
    NaN policy: prototype c is NaN when a row labelled c (not ignore_label) is non-finite."""
    rows = _to_rows(features)
    y = labels.reshape(-1)
    w = torch.ones(y.shape, dtype=rows.dtype, device=rows.device) if weight is None else \
        weight.reshape(-1).to(rows.dtype)
    w = w * (y != ignore_label)
    bad = _nonfinite_rows(rows)
    protos, present = [], []
    for c in range(num_classes):
        member = y == c
        m = member.to(rows.dtype) * w
        total = m.sum()
        mean = (rows[member & ~bad] * m[member & ~bad, None]).sum(0) / total.clamp_min(torch.finfo(rows.dtype).tiny)
        protos.append(torch.where((member & bad).any(), torch.full_like(mean, float("nan")), mean))
        present.append(total > 0)
    return torch.stack(protos), torch.stack(present)


def anatomical_contrast_loss_ref(
    queries: torch.Tensor, query_labels: torch.Tensor, prototypes: torch.Tensor, keys: torch.Tensor,
    key_labels: torch.Tensor, tau: float = 0.5, negatives="topk", num_negatives: int = 512, generator=None,
    backend=None, reduction: str = "mean", ignore_label: int = -1, weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference code's formula, with the arguments of anatomical_contrast_loss: queries (Q, D) or (B, D, *S),
    query_labels of Q elements, prototypes (C, D), keys (K, D), key_labels (K,), weight None or of Q elements;
    negatives "topk" (the brute-force hard_negative_topk_ref) or a (Q, n) int64 index tensor with -1 padding ->
    per query CE(cos(q, [μ_y | keys[idx]]) / tau, target 0). Queries labelled ignore_label or whose prototype is
    all zeros are dropped. "mean": per-class weighted mean over the classes with positive weight, summed, divided by
    their number (0 with one class or none); "sum": the weighted sum; "none": (Q,) weighted, 0 where dropped.

    Gathers the [Q, 1 + n, D] key tensor like the reference code (materialising; the ground truth). "class_graph"
    is random: draw its indices with class_graph_negatives and pass them as `negatives`. generator and backend
    are accepted for the functional's signature and unused.
    """
    if isinstance(negatives, str) and negatives == "class_graph":
        raise NotImplementedError("anatomical_contrast_loss_ref cannot reproduce the sampler's random draws; sample "
                                  "the indices with class_graph_negatives(..., generator=...) and pass them as "
                                  "negatives=")
    if isinstance(negatives, str) and negatives != "topk":
        raise ValueError(f"negatives must be 'topk' or a (Q, n) int64 index tensor, got {negatives!r}")
    queries = _to_rows(queries)
    y = query_labels.reshape(-1)
    if isinstance(negatives, str):
        negatives = hard_negative_topk_ref(queries.detach(), y, keys.detach(), key_labels.reshape(-1), num_negatives,
                                           ignore_label)[1]
    work = _work_dtype(queries)
    ys = torch.where(y == ignore_label, 0, y)
    keep = (y != ignore_label) & (prototypes.detach() != 0).any(1)[ys]
    q = queries.to(work)
    pos = prototypes.to(work)[ys].unsqueeze(1)
    idx = negatives.clamp_min(0)
    neg = keys.to(work)[idx]  # (Q, n, D)
    cand = torch.cat([pos, neg], dim=1)
    logits = F.cosine_similarity(q.unsqueeze(1), cand, dim=2) / tau
    pad = torch.cat([torch.zeros_like(y[:, None], dtype=torch.bool), negatives < 0], dim=1)
    logits = logits.masked_fill(pad, float("-inf"))
    per_query = torch.where(keep, torch.logsumexp(logits, dim=1) - logits[:, 0], 0.0)
    w = keep.to(work) if weight is None else torch.where(keep, weight.reshape(-1).to(work), 0.0)
    weighted = per_query if weight is None else per_query * w
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    classes = [c for c in torch.unique(ys[keep]).tolist() if w[ys == c].sum() > 0]
    if len(classes) <= 1:
        return weighted.sum() * 0.0
    return torch.stack([weighted[ys == c].sum() / w[ys == c].sum() for c in classes]).sum() / len(classes)

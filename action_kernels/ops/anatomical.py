"""The anatomical contrast loss of ACTION's fine-tuning stage, and its sampling helpers.

    loss_q = lse(z⁺, z_1..z_n) - z⁺,   z⁺ = cos(q, μ_{y_q}) / τ,   z_j = cos(q, neg_j) / τ

Queries: (Q, D) rows or a channel-first map (B, D, *S) (one query per location, read in place by the negatives'
ops), labels (Q,), (B, *S) or (B, 1, *S), optional weights of the same shapes (a bool mask is a weight).
Dropped queries (docs/conventions.md): a query labelled ignore_label, or whose class has an all-zero prototype
(class_prototypes' absent class: no direction, so no cosine), is left out of the loss: weight 0, its "none" entry 0,
no gradient; it never meets a zero prototype.
Reductions, over the kept queries with weights w_q (1 without a weight):
    "mean": per-class weighted mean Σ w l / Σ w, summed over the classes with Σ w > 0, divided by their number;
            0 (graph kept) when at most one class is present. (The reference code divides by the classes present
            among all valid pixels, hard or not: docs/method.md section 4.)
    "sum":  Σ_q w_q loss_q.     "none": (Q,) w_q loss_q, 0 for dropped queries, in the queries' row order.
Padding negatives (index -1) are left out; a query with none has loss lse(z⁺) - z⁺ = 0.

Negatives: "topk" (hard_negative_topk: the logits are the selected similarities themselves, no key gather),
"class_graph" (the reference code's sampling, class_graph_negatives, then indexed_cosine), or an explicit (Q, n)
index tensor.
"""
from __future__ import annotations

import torch

from action_kernels._rows import as_row_view, to_rows, work_dtype
from action_kernels._validation import (
    ValueChecks,
    check_anatomical_contrast,
    check_class_graph_negatives,
    check_class_prototypes,
    check_ignore_label,
    check_indexed_cosine,
    check_k,
    common_dtype,
)
from action_kernels.ops._autograd import no_autocast, once_differentiable
from action_kernels.ops._normalization import inverse_norms, nonfinite_rows, row_abs_max
from action_kernels.ops.hard_negative_topk import _indexed_cosine_op, _topk


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight: torch.Tensor | None = None, ignore_label: int = -1):
    """Weighted class means. features: (N, D) or (B, D, *spatial); labels: (N,), or (B, *spatial) / (B, 1,
    *spatial) for maps, in [0, num_classes) or ignore_label (those rows count nowhere); weight: optional
    non-negative, finite per-row weights of the labels' shapes (a bool mask is a weight) -> prototypes (C, D) (zeros
    for absent classes: anatomical_contrast_loss drops their queries), present (C,) bool. Nothing is resized: a
    label map off the feature grid is an error naming both shapes. Differentiable with respect to features (detach
    them for the reference setting).

    NaN policy: prototype c is NaN when a row labelled c (not ignore_label, whatever its weight) is non-finite;
    other classes are unaffected. Counts and sums run in fp32 (fp64 for fp64 features: a bf16 count saturates at
    256, an fp16 one at 2,048), on each class's counted rows divided by a power of two near that class's largest
    |value| (exact), so means of values near the dtype's limit do not overflow; rows that do not count (ignored,
    weight 0) take no part, not even in the scale. Returned in the features' dtype."""
    _, y, weight = check_class_prototypes(features, labels, num_classes, weight, ignore_label)
    with no_autocast(features.device):
        rows = to_rows(features)
        work = work_dtype(rows)
        x = rows.to(work)
        w = torch.ones(y.shape, dtype=work, device=x.device) if weight is None else weight.to(work)
        keep = y != ignore_label
        zero = torch.zeros((), dtype=work, device=x.device)
        bad = nonfinite_rows(x)
        w = torch.where(keep, w, zero)
        cls = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
        counted = keep & (w > 0) & ~bad
        clean = torch.where(counted[:, None], x, zero)  # rows that do not count are an exact 0, however large
        row_max = row_abs_max(clean, work)
        class_max = torch.zeros(num_classes, dtype=work, device=x.device).scatter_reduce(0, cls, row_max, "amax")
        # per class, a power of two within a factor 2 below its max |x|: an exact division, sums of N rows then
        # need N < 2^126, and one class's magnitude does not push another's values below the range
        scale = torch.ldexp(torch.ones_like(class_max), torch.frexp(class_max).exponent - 1)
        sums = x.new_zeros(num_classes, x.shape[1]).index_add(0, cls, (clean / scale[cls, None]) * w[:, None])
        totals = x.new_zeros(num_classes).index_add(0, cls, w)  # a non-finite row counts here: its class is NaN
        bad_class = torch.zeros(num_classes, dtype=work, device=x.device).index_add(
            0, cls, (bad & keep).to(work)) > 0
        present = totals > 0
        protos = sums / totals.clamp_min(torch.finfo(work).tiny)[:, None] * scale[:, None]
        protos = torch.where(bad_class[:, None], torch.tensor(float("nan"), dtype=work, device=x.device), protos)
        return protos.to(rows.dtype), present


def class_graph_negatives(prototypes: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor,
                          num_negatives: int, tau: float, generator: torch.Generator | None = None,
                          ignore_label: int = -1) -> torch.Tensor:
    """The reference code's negative sampling, vectorised on the device: for each query of class c, each negative's
    class v is drawn from softmax_v(cos(μ_c, μ_v) / tau) over the other classes present among the keys, and the key
    uniformly within class v. prototypes: (C, D), finite (an integer index has no NaN: a non-finite prototype is an
    error); query_labels: (Q,); key_labels: (K,), both in [0, C) or ignore_label -> indices (Q, n) int64, -1 where
    a query's class has no other class to draw from and for queries labelled ignore_label (their draws are still
    taken, so a query's draws do not depend on which others are ignored). Reproducible from `generator`."""
    prototypes, yq, yk, tau = check_class_graph_negatives(prototypes, query_labels, key_labels, num_negatives, tau,
                                                          ignore_label)
    with no_autocast(prototypes.device):
        return _class_graph_draws(prototypes, yq, yk, num_negatives, tau, generator, ignore_label)


def _class_graph_draws(prototypes, yq, yk, num_negatives, tau, generator, ignore_label):
    C = prototypes.shape[0]
    device = prototypes.device
    valid_keys = yk != ignore_label
    counts = torch.zeros(C, dtype=torch.int64, device=device).index_add_(
        0, torch.where(valid_keys, yk, 0), valid_keys.to(torch.int64))
    protos = prototypes.detach().to(work_dtype(prototypes))
    mu = protos * inverse_norms(protos, True)[:, None]
    logits = mu @ mu.T / tau
    allowed = (counts > 0)[None, :] & ~torch.eye(C, dtype=torch.bool, device=device)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1).nan_to_num_(0.0)
    labelled = yq != ignore_label
    q_probs = probs[torch.where(labelled, yq, 0)]  # (Q, C)
    has_any = (q_probs.sum(1) > 0) & labelled
    safe = torch.where(has_any[:, None], q_probs, torch.ones_like(q_probs))
    Q = yq.numel()
    if Q == 0:
        return torch.empty((0, num_negatives), dtype=torch.int64, device=device)
    cls = torch.multinomial(safe, num_negatives, replacement=True, generator=generator)  # (Q, n)
    order = torch.argsort(torch.where(valid_keys, yk, C), stable=True)  # valid keys grouped by class
    starts = torch.cumsum(counts, 0) - counts
    # without a generator, no generator argument: torch.rand(..., generator=None) has no symbolic-shape form, which
    # broke torch.compile(dynamic=True, fullgraph=True) (a user generator cannot enter a compiled graph at all)
    u = torch.rand(cls.shape, device=device) if generator is None else \
        torch.rand(cls.shape, generator=generator, device=device)
    within = (u * counts[cls]).long().clamp_max_(counts[cls].clamp_min(1) - 1)
    idx = order[(starts[cls] + within).clamp_max(max(order.numel() - 1, 0))]
    return torch.where(has_any[:, None], idx, -1)


def _reduce_per_class(weighted: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
    """weighted (Q,) = w_q loss_q, y (Q,) in [0, C), weights (Q,) w_q (0 for dropped queries) -> the per-class
    weighted mean summed over the classes with Σ w > 0, divided by their number."""
    counts = torch.zeros(num_classes, dtype=weighted.dtype, device=y.device).index_add(0, y, weights)
    sums = torch.zeros(num_classes, dtype=weighted.dtype, device=y.device).index_add(0, y, weighted)
    present = counts > 0
    n_present = present.sum()
    means = torch.where(present, sums / counts.clamp_min(torch.finfo(counts.dtype).tiny), torch.zeros_like(sums))
    loss = means.sum() / n_present.clamp_min(1)
    # one or zero classes present: a zero that keeps the graph (gradients exist and are zero), no host sync
    return torch.where(n_present > 1, loss, loss * 0.0)


def anatomical_contrast_loss(
    queries: torch.Tensor, query_labels: torch.Tensor, prototypes: torch.Tensor, keys: torch.Tensor,
    key_labels: torch.Tensor, tau: float = 0.5, negatives="topk", num_negatives: int = 512,
    generator: torch.Generator | None = None, backend: str | None = None, reduction: str = "mean",
    ignore_label: int = -1, weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """ACTION's anatomical contrast (InfoNCE with the class prototype as positive and selected negatives).

    Shapes: queries (Q, D) rows or a channel-first map (B, D, *S) (Q = B prod(S), read in place); query_labels
    (Q,), or (B, *S) / (B, 1, *S) for a map, in [0, C) or ignore_label; prototypes (C, D) (class_prototypes'; an
    all-zero row marks an absent class); keys (K, D); key_labels (K,) (keys labelled ignore_label are never
    negatives); weight: None or non-negative per-query weights of the labels' shapes (a bool mask is a weight).
    Nothing is resized: labels or weights off the queries' grid are an error naming both shapes.
    negatives: "topk" (the num_negatives most similar keys of other classes, fused), "class_graph" (the reference
    code's sampling from `generator`), or an int64 (Q, n) index tensor with -1 padding.
    Queries labelled ignore_label or of a class with an all-zero prototype are dropped (module docstring).
    Returns () for reduction "mean" (per-class weighted mean over the classes present) and "sum", (Q,) for "none"
    (w_q loss_q, 0 for dropped queries). Gradients flow to queries, and to prototypes and keys when they require
    grad. backend picks the top-k kernel.

    Example:
        >>> loss = anatomical_contrast_loss(emb_map, label_map, protos.detach(), bank.keys(), bank.labels())
    """
    checks = ValueChecks()  # every value check of the call read in one host sync (the top-k op's, with "topk")
    layout, yq, yk, tau, reduction, w = check_anatomical_contrast(queries, query_labels, prototypes, keys, key_labels,
                                                                  tau, negatives, reduction, ignore_label, weight,
                                                                  checks)
    C = prototypes.shape[0]
    dtype = common_dtype(queries, prototypes, keys)
    with no_autocast(queries.device):
        queries, prototypes, keys = queries.to(dtype), prototypes.to(dtype), keys.to(dtype)
        if isinstance(negatives, torch.Tensor):
            _, idx, _ = check_indexed_cosine(queries, keys, negatives, checks)
            checks.verify()
            neg = _indexed_cosine_op(as_row_view(queries, layout), keys, idx, True)
        elif negatives == "topk":
            neg = _topk(queries, layout, yq, keys, yk, check_k(num_negatives), check_ignore_label(ignore_label), True,
                        backend, dtype, checks)[0]
        else:  # "class_graph"
            protos, _, _, _ = check_class_graph_negatives(prototypes, yq, yk, num_negatives, tau, ignore_label, checks)
            checks.verify()
            with no_autocast(protos.device):
                idx = _class_graph_draws(protos, yq, yk, num_negatives, tau, generator, ignore_label)
            neg = _indexed_cosine_op(as_row_view(queries, layout), keys, idx, True)
        work = neg.dtype
        # dropped: ignored, or a class without a prototype (all zeros: no direction, z+ would be a silent 0)
        labelled = yq != ignore_label
        ys = torch.where(labelled, yq, 0)
        keep = labelled & (prototypes.detach() != 0).any(1)[ys]
        # cos(q, μ_y) on unit rows whose norms cannot overflow (F.cosine_similarity gives 0 at |x| ~ 1e30)
        q, mu = to_rows(queries).to(work), prototypes.to(work)[ys]
        pos = ((q * inverse_norms(q, True)[:, None]) * (mu * inverse_norms(mu, True)[:, None])).sum(1)
        logits = torch.cat([pos[:, None], neg], dim=1) / tau
        zero = torch.zeros((), dtype=work, device=q.device)
        per_query = torch.where(keep, torch.logsumexp(logits, dim=1) - logits[:, 0], zero)
        weights = keep.to(work) if w is None else torch.where(keep, w.to(work), zero)
        weighted = per_query if w is None else per_query * weights
        if reduction == "none":
            return weighted
        if reduction == "sum":
            return weighted.sum()
        return _reduce_per_class(weighted, ys, weights, C)


class AnatomicalContrastLossFunction(torch.autograd.Function):
    """anatomical_contrast_loss as a drop-in autograd Function, on the functional's own route: forward runs the
    functional (validation included) on detached inputs with their requires_grad kept, and keeps that graph;
    backward differentiates it (the top-k / indexed-cosine ops' registered backward, then the log-softmax), so
    values and gradients are those of the functional. Once differentiable (the functional itself is
    differentiable to any order).

    Args: the functional's, positionally: queries, query_labels, prototypes, keys, key_labels, tau, negatives,
    num_negatives, generator, backend, reduction, ignore_label, weight. Returns () or (Q,) as the functional.
    """

    @staticmethod
    def forward(ctx, queries, query_labels, prototypes, keys, key_labels, tau=0.5, negatives="topk",
                num_negatives=512, generator=None, backend=None, reduction="mean", ignore_label=-1, weight=None):
        leaves = [x.detach().requires_grad_(ctx.needs_input_grad[i]) for i, x in ((0, queries), (2, prototypes),
                                                                                  (3, keys))]
        with torch.enable_grad():
            loss = anatomical_contrast_loss(leaves[0], query_labels, leaves[1], leaves[2], key_labels, tau, negatives,
                                            num_negatives, generator, backend, reduction, ignore_label, weight)
        ctx.graph = (loss, leaves)
        ctx.inputs = (queries, prototypes, keys)  # only to reach the once-differentiable guard from them
        return loss.detach()

    @staticmethod
    def backward(ctx, g):
        loss, leaves = ctx.graph
        del ctx.graph
        wanted = [x for x in leaves if x.requires_grad]
        found = iter(torch.autograd.grad(loss, wanted, g, allow_unused=True))
        dq, dp, dk = (next(found) if x.requires_grad else None for x in leaves)
        # its graph starts at detached copies of the inputs: a second derivative would silently miss every path
        dq, dp, dk = once_differentiable("AnatomicalContrastLossFunction", "its backward differentiates a graph "
                                         "built from detached copies of the inputs", "Use anatomical_contrast_loss "
                                         "(the functional, differentiable to any order)", (dq, dp, dk),
                                         ctx.inputs)
        return dq, None, dp, dk, None, None, None, None, None, None, None, None, None

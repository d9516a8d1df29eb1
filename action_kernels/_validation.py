"""Input checks of every public op: the one place that decides what is valid.

One check function per op (check_soft_contrastive, check_hard_negative_topk, check_indexed_cosine,
check_class_prototypes, check_class_graph_negatives, check_anatomical_contrast), built from the shared checks
above them. Every error names the argument, what was expected, what came, and how to fix it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class RowLayout:
    """How an (N, D) row matrix is laid out inside a rows or channel-first map tensor.

    Row n is (b, p) = (n // P, n % P); a map (B, D, *spatial) has P = prod(spatial), a row matrix (N, D) has B = 1.
    """

    batch: int  # B
    positions: int  # P
    features: int  # D
    spatial: tuple[int, ...]  # () for row inputs

    @property
    def rows(self) -> int:
        return self.batch * self.positions


def check_tensor(name: str, x, ndims: tuple[int, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(x).__name__}")
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {what}, got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}; convert it with {name}.float()"
        )


def check_tau(name: str, tau) -> float:
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"{name} must be a positive scalar, got a tensor of shape {tuple(tau.shape)}")
        tau = float(tau)
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise TypeError(f"{name} must be a positive float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{name} must be a finite temperature > 0 (e.g. 0.1), got {tau}")
    return float(tau)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}; "
                         f"move it with .to({ref_name}.device)")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}; "
                        f"cast it with .to({ref_name}.dtype)")


def row_layout(name: str, x: torch.Tensor) -> RowLayout:
    """Layout of rows (N, D) or a channel-first map (B, D, *spatial) with 1 to 3 spatial dims."""
    check_tensor(name, x, (2, 3, 4, 5), "(N, D) or (B, D, *spatial)")
    if x.dim() == 2:
        return RowLayout(1, x.shape[0], x.shape[1], ())
    spatial = tuple(x.shape[2:])
    return RowLayout(x.shape[0], math.prod(spatial), x.shape[1], spatial)


def check_weight(weight, layout: RowLayout, ref: torch.Tensor, check_values: bool = True,
                 ref_name: str = "student") -> torch.Tensor | None:
    """weight: (N,) for rows, (B, *spatial) or (N,) for maps of `ref_name`; non-negative (one host sync, skipped
    with check_values=False and under torch.compile). Returns it flattened to (N,), bool as float32."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    allowed = [(layout.rows,)]
    if layout.spatial:
        allowed.append((layout.batch, *layout.spatial))
    if tuple(weight.shape) not in allowed:
        raise ValueError(
            f"weight must have shape {' or '.join(str(a) for a in allowed)} (one weight per row of {ref_name}), "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != ref.device:
        raise ValueError(f"weight must be on {ref.device} like {ref_name}, got {weight.device}")
    if weight.dtype == torch.bool:
        weight = weight.to(torch.float32)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating point or bool tensor (a mask is a weight), got {weight.dtype}")
    # One host sync: a negative weight would silently turn the loss into a reward, so it is worth it in eager mode.
    # Under torch.compile the check would be a data-dependent graph break, so it is skipped there.
    if check_values and not torch.compiler.is_compiling() and weight.numel() and bool((weight < 0).any()):
        raise ValueError(f"weight must be non-negative, got a minimum of {float(weight.min())}")
    return weight.reshape(layout.rows)


def check_soft_contrastive(student, teacher, keys, tau_student, tau_teacher, weight, reduction):
    """Validates soft_contrastive_loss arguments; returns (layout, tau_s, tau_t, flat weight or None, reduction)."""
    layout = row_layout("student", student)
    check_tensor("teacher", teacher, (student.dim(),), f"{tuple(student.shape)} like student")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the shape of student {tuple(student.shape)}, got {tuple(teacher.shape)}")
    check_same("teacher", teacher, "student", student)
    check_tensor("keys", keys, (2,), f"(K, D={layout.features})")
    check_same("keys", keys, "student", student)
    if keys.shape[1] != layout.features:
        raise ValueError(f"keys must have the same feature size as student (D={layout.features}), got keys of "
                         f"shape {tuple(keys.shape)}")
    if keys.shape[0] == 0:
        raise ValueError(f"keys must hold at least one key (K >= 1), got an empty bank of shape {tuple(keys.shape)}")
    if layout.features == 0:
        raise ValueError(f"student must have a feature size D >= 1, got shape {tuple(student.shape)}")
    if teacher.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher must not require grad: the teacher's distribution is the target of the distillation; "
            "pass teacher.detach() (the teacher is an EMA copy updated without gradients)"
        )
    tau_s = check_tau("tau_student", tau_student)
    tau_t = check_tau("tau_teacher", tau_teacher)
    w = check_weight(weight, layout, student)
    return layout, tau_s, tau_t, w, check_reduction(reduction)


def check_labels(name: str, labels, count: int, ref: torch.Tensor, num_classes: int | None = None,
                 ignore_label: int | None = None) -> torch.Tensor:
    """Integer labels with `count` elements (any shape) on ref's device -> flat contiguous int64.

    With num_classes, every label must be in [0, num_classes) or equal ignore_label (one host sync).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {labels.dtype}; convert with {name}.long()")
    if labels.numel() != count:
        raise ValueError(f"{name} must have {count} elements (one per row), got shape {tuple(labels.shape)}")
    if labels.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {labels.device}")
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    if num_classes is not None and flat.numel() and not torch.compiler.is_compiling():
        bad = (flat < 0) | (flat >= num_classes)
        if ignore_label is not None:
            bad &= flat != ignore_label
        if bool(bad.any()):
            value = int(flat[bad][0])
            raise ValueError(f"{name} must be in [0, {num_classes}) (num_classes = {num_classes})"
                             + (f" or ignore_label={ignore_label}" if ignore_label is not None else "")
                             + f", got {value}")
    return flat


def check_hard_negative_topk(anchors, anchor_labels, keys, key_labels, k, ignore_label):
    """Validates hard_negative_topk arguments; returns (layout, flat anchor labels, flat key labels, k,
    ignore_label as int)."""
    layout = row_layout("anchors", anchors)
    check_tensor("keys", keys, (2,), f"(K, D={layout.features})")
    check_same("keys", keys, "anchors", anchors)
    if keys.shape[1] != layout.features:
        raise ValueError(f"keys must have the feature size of anchors (D={layout.features}), got {tuple(keys.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int >= 1, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (the number of negatives per anchor), got {k}")
    ya = check_labels("anchor_labels", anchor_labels, layout.rows, anchors)
    yk = check_labels("key_labels", key_labels, keys.shape[0], anchors)
    return layout, ya, yk, k, int(ignore_label)


def check_indexed_cosine(anchors, keys, indices) -> RowLayout:
    """Validates indexed_cosine arguments (indices: (N, n) int64, each < K or -1; one host sync); returns the
    anchors' layout."""
    layout = row_layout("anchors", anchors)
    check_same("keys", keys, "anchors", anchors)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != layout.rows:
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must have shape ({layout.rows}, n), one row per anchor, got {got}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.numel() and not torch.compiler.is_compiling() and bool((indices >= keys.shape[0]).any()):
        raise ValueError(f"indices must be < K={keys.shape[0]} (or -1 for padding), got {int(indices.max())}")
    return layout


def check_class_prototypes(features, labels, num_classes, weight, ignore_label):
    """Validates class_prototypes arguments; returns (layout, flat labels, flat weight or None)."""
    layout = row_layout("features", features)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    y = check_labels("labels", labels, layout.rows, features, num_classes, ignore_label)
    w = check_weight(weight, layout, features, ref_name="features")
    return layout, y, w


def check_class_graph_negatives(prototypes, query_labels, key_labels, num_negatives, tau, ignore_label):
    """Validates class_graph_negatives arguments; returns (flat query labels, flat key labels, tau as float)."""
    check_tensor("prototypes", prototypes, (2,), "(C, D)")
    C = prototypes.shape[0]
    yq = check_labels("query_labels", query_labels, query_labels.numel(), prototypes, C)
    yk = check_labels("key_labels", key_labels, key_labels.numel(), prototypes, C, ignore_label)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    return yq, yk, check_tau("tau", tau)


NEGATIVE_MODES = ("topk", "class_graph")


def check_anatomical_contrast(queries, query_labels, prototypes, keys, key_labels, tau, negatives, reduction,
                              ignore_label):
    """Validates anatomical_contrast_loss arguments (an index tensor of negatives is checked by indexed_cosine);
    returns (flat query labels, flat key labels, tau as float)."""
    check_tensor("queries", queries, (2,), "(Q, D)")
    check_tensor("prototypes", prototypes, (2,), "(C, D)")
    check_tensor("keys", keys, (2,), "(K, D)")
    for name, x in (("prototypes", prototypes), ("keys", keys)):
        check_same(name, x, "queries", queries)
        if x.shape[1] != queries.shape[1]:
            raise ValueError(f"{name} must have the feature size of queries (D={queries.shape[1]}), "
                             f"got {tuple(x.shape)}")
    C = prototypes.shape[0]
    yq = check_labels("query_labels", query_labels, queries.shape[0], queries, C)
    yk = check_labels("key_labels", key_labels, keys.shape[0], queries, C, ignore_label)
    tau = check_tau("tau", tau)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(negatives, torch.Tensor) and negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be 'topk', 'class_graph' or a (Q, n) int64 index tensor, got {negatives!r}")
    return yq, yk, tau

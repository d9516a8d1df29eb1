"""Input checks shared by every public op: the one place that decides what is valid.

Every error names the argument, what was expected, what came, and how to fix it.
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
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}; move it with .to({ref_name}.device)"
        )
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}; cast it with .to({ref_name}.dtype)"
        )


def row_layout(name: str, x: torch.Tensor) -> RowLayout:
    """Layout of rows (N, D) or a channel-first map (B, D, *spatial) with 1 to 3 spatial dims."""
    check_tensor(name, x, (2, 3, 4, 5), "(N, D) or (B, D, *spatial)")
    if x.dim() == 2:
        return RowLayout(1, x.shape[0], x.shape[1], ())
    spatial = tuple(x.shape[2:])
    return RowLayout(x.shape[0], math.prod(spatial), x.shape[1], spatial)


def check_weight(weight, layout: RowLayout, ref: torch.Tensor, check_values: bool = True) -> torch.Tensor | None:
    """weight: (N,) for rows, (B, *spatial) or (N,) for maps; non-negative. Returns it flattened to (N,)."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    allowed = [(layout.rows,)]
    if layout.spatial:
        allowed.append((layout.batch, *layout.spatial))
    if tuple(weight.shape) not in allowed:
        raise ValueError(
            f"weight must have shape {' or '.join(str(a) for a in allowed)} (one weight per row of student), "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != ref.device:
        raise ValueError(f"weight must be on {ref.device} like student, got {weight.device}")
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
        raise ValueError(
            f"keys must have the same feature size as student (D={layout.features}), got keys of shape {tuple(keys.shape)}"
        )
    if keys.shape[0] == 0:
        raise ValueError("keys must hold at least one key (K >= 1), got an empty bank of shape " f"{tuple(keys.shape)}")
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

"""Input checks of every public op: the one place that decides what is valid.

One check function per op (check_soft_contrastive, check_hard_negative_topk, check_indexed_cosine,
check_class_prototypes, check_class_graph_negatives, check_anatomical_contrast) and one per drop-in autograd
Function over row views (check_soft_contrastive_views, check_topk_views, check_indexed_cosine_views), built from the
shared checks above them. Every error names the argument, what was expected, what came, and how to fix it.

Value checks (weights finite and >= 0, labels in range, indices in range, prototypes finite for sampling, logits
in range with normalize=False) read the data, so on a GPU each costs a host synchronisation, which drains the
stream. They are deferred into a ValueChecks: each check adds a device flag, and one host sync per op call reads
all of them, folded into the sync the op needs anyway to decide whether any row must be rescaled or zeroed
(ops/_normalization.kernel_inputs); the precise error is built only on failure. Value checks are skipped, with no
host sync at all, inside torch.compile'd graphs and when switched off (set_value_checks(False) or
ACTION_KERNELS_VALUE_CHECKS=0): the caller then vouches for the values (out-of-range labels or indices then fail
in indexing, negative or NaN weights give a meaningless loss). Shapes, dtypes and devices are always checked.

Float inputs of one call may differ in dtype (a bf16 student under autocast with an fp32 bank): they are promoted
to a common dtype (torch.promote_types), which the call then runs in; gradients come back in each input's dtype.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
# Below this temperature the logits cos/τ exceed 1e4: the float32 rounding of a cosine (~1e-7) then moves a logit
# by more than 1e-3, and at τ ~ 1e-38 1/τ itself overflows float32 (τ = 1e-45 gave NaN on every backend).
TAU_MIN = 1e-4
# normalize=False: largest |logit| accepted, as a fraction of the work dtype's range. The softmax takes
# differences of logits, the loss sums K terms and the reductions sum N rows: 2^-24 of the range leaves room
# for all of them (float32: 2.0e31).
DOT_RANGE_FRACTION = 2.0 ** -24


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


# -- value checks: deferred device flags, one host sync per op call ------------------------------------------------
VALUE_CHECKS_ENV = "ACTION_KERNELS_VALUE_CHECKS"
_value_checks = [os.environ.get(VALUE_CHECKS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")]


def set_value_checks(enabled: bool) -> bool:
    """Switches the value checks of every op on or off (default on; ACTION_KERNELS_VALUE_CHECKS=0 starts off);
    returns the previous setting. Off, the ops never synchronise with the host for their inputs' values."""
    previous = _value_checks[0]
    _value_checks[0] = bool(enabled)
    return previous


def value_checks_active() -> bool:
    """Whether value checks run: switched on, and not inside a torch.compile'd graph (no host sync there)."""
    return _value_checks[0] and not torch.compiler.is_compiling()


class ValueCheckFailed(ValueError):
    """A deferred value check failed inside a library op; the caller's ValueChecks.raise_failed() names it."""


class ValueChecks:
    """The value checks of one op call, deferred: each check adds a 0-d bool device tensor (True: it failed) and a
    function that raises its precise error (it may synchronise: it runs only on failure). flag() is all of them in
    one tensor, for an op to read with its own host sync; verify() reads it itself (one sync) and raises."""

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._raisers: list[Callable[[], None]] = []

    def add(self, flag: torch.Tensor, raiser: Callable[[], None]) -> None:
        self._flags.append(flag.reshape(()))
        self._raisers.append(raiser)

    def flag(self) -> torch.Tensor | None:
        if not self._flags:
            return None
        return self._flags[0] if len(self._flags) == 1 else torch.stack(self._flags).any()

    def raise_failed(self) -> None:
        for raiser in self._raisers:
            raiser()
        raise ValueCheckFailed("a value check failed, but none reproduced it (inputs changed in place?)")

    def verify(self) -> None:
        flag = self.flag()
        if flag is not None and bool(flag):
            self.raise_failed()


def _deferred(checks: ValueChecks | None, flag_fn: Callable[[], torch.Tensor], raiser: Callable[[], None]) -> None:
    """Adds a value check to `checks`, or runs it now (one host sync) without; nothing when checks are off."""
    if not value_checks_active():
        return
    flag = flag_fn()
    if flag.device.type == "meta":  # shapes only: no values to check
        return
    if checks is not None:
        checks.add(flag, raiser)
    elif bool(flag):
        raiser()


def _floats_bad(x: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    ok = torch.isfinite(x) & (x >= 0) if nonnegative else torch.isfinite(x)
    return ~ok


def _raise_floats(x: torch.Tensor, name: str, nonnegative: bool) -> None:
    bad = _floats_bad(x, nonnegative)
    if x.numel() and bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        what = "non-negative and finite" if nonnegative else "finite"
        raise ValueError(f"{name} must be {what}, got {float(x.reshape(-1)[first])} at flat index {first}")


def check_floats(x: torch.Tensor, name: str, nonnegative: bool, checks: ValueChecks | None = None) -> None:
    """Every value of x finite (and >= 0 when nonnegative)."""
    _deferred(checks, lambda: _floats_bad(x, nonnegative).any(), lambda: _raise_floats(x, name, nonnegative))


def _labels_bad(labels: torch.Tensor, num_classes: int, ignore_label: int | None) -> torch.Tensor:
    bad = (labels < 0) | (labels >= num_classes)
    return bad & (labels != ignore_label) if ignore_label is not None else bad


def _raise_labels(labels: torch.Tensor, name: str, num_classes: int, ignore_label: int | None) -> None:
    bad = _labels_bad(labels, num_classes, ignore_label)
    if labels.numel() and bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be in [0, {num_classes}) (num_classes = {num_classes})"
                         + (f" or ignore_label={ignore_label}" if ignore_label is not None else "")
                         + f", got {int(labels[first])} at index {first}")


def _raise_indices(indices: torch.Tensor, name: str, num_keys: int) -> None:
    bad = (indices < -1) | (indices >= num_keys)
    if indices.numel() and bool(bad.any()):
        raise ValueError(f"{name} must be key indices in [0, K={num_keys}) or -1 for padding, got "
                         f"{int(indices[bad][0])}")


def check_dot_range(op: str, named_rows: tuple[tuple[str, torch.Tensor, float], ...], keys: torch.Tensor,
                    work: torch.dtype) -> None:
    """normalize=False: raises unless every logit max||x|| max||k|| scale (x: each named (..., D) tensor with its
    logit scale, e.g. 1/τ) and the student gradient scale max||k|| scale stay within DOT_RANGE_FRACTION of the work
    dtype's range. Non-finite rows are left out (they give NaN by the NaN policy). One host synchronisation."""
    limit = torch.finfo(work).max * DOT_RANGE_FRACTION
    key_norm = _max_finite_norm(keys)
    for name, x, scale in named_rows:
        bound = _max_finite_norm(x) * key_norm * scale
        if bound > limit or key_norm * scale > limit:
            raise ValueError(
                f"{op}: with normalize=False the logits {name}·keys{' / tau' if scale != 1.0 else ''} can reach "
                f"{bound:.3g} (max ||{name}|| = {_max_finite_norm(x):.3g}, max ||keys|| = {key_norm:.3g}"
                + (f", 1/tau = {scale:g}" if scale != 1.0 else "") + f"), beyond the {limit:.3g} that {work} "
                f"arithmetic carries through the softmax and its gradient; use normalize=True (cosine logits), or "
                f"scale the inputs down")


def dot_range_flag(named_rows: tuple[tuple[str, torch.Tensor, float], ...], keys: torch.Tensor,
                   work: torch.dtype) -> torch.Tensor:
    """check_dot_range's condition as a 0-d bool device tensor (no host sync): True when it would raise."""
    limit = torch.finfo(work).max * DOT_RANGE_FRACTION
    key_norm = _max_finite_norm_t(keys)
    flag = key_norm * max(scale for _, _, scale in named_rows) > limit
    for _, x, scale in named_rows:
        flag = flag | (_max_finite_norm_t(x) * key_norm * scale > limit)
    return flag


def _max_finite_norm_t(x: torch.Tensor) -> torch.Tensor:
    """_max_finite_norm as a float64 0-d device tensor (no host sync)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    m = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    norms = torch.linalg.vector_norm(rows / m[:, None], dim=1) * m
    return torch.where(torch.isfinite(rows).all(dim=1), norms, torch.zeros_like(norms)).amax()


def _max_finite_norm(x: torch.Tensor) -> float:
    """max over the finite rows of ||x_row|| (float64, scaled per row, so no row overflows), 0 for no rows."""
    if x.numel() == 0:
        return 0.0
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    finite = torch.isfinite(rows).all(dim=1)
    rows = rows[finite]
    if rows.numel() == 0:
        return 0.0
    m = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return float((torch.linalg.vector_norm(rows / m, dim=1) * m[:, 0]).max())


# -- shared checks -------------------------------------------------------------------------------------------------
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
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) tau is a symbolic float (they guard on it)
    if not TAU_MIN <= tau < math.inf:  # NaN fails both
        raise ValueError(f"{name} must be a finite temperature >= {TAU_MIN:g} (e.g. 0.1), got {tau}"
                         + (f"; below {TAU_MIN:g} the logits cos/{name} exceed {1 / TAU_MIN:g} and float32 rounding "
                            f"of the cosines decides the result" if math.isfinite(tau) and tau > 0 else ""))
    return float(tau)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same device (dtypes may differ: see common_dtype)."""
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}; "
                         f"move it with .to({ref_name}.device)")


def common_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype a call runs in: torch's promotion of its float inputs (bf16 with fp32 -> fp32)."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def check_feature_size(name: str, x: torch.Tensor, ref_name: str, d: int) -> None:
    if x.shape[-1] != d:
        raise ValueError(f"{name} must have the feature size of {ref_name} (D={d}), got {name} of shape "
                         f"{tuple(x.shape)}")


def row_layout(name: str, x: torch.Tensor) -> RowLayout:
    """Layout of rows (N, D) or a channel-first map (B, D, *spatial) with 1 to 3 spatial dims."""
    check_tensor(name, x, (2, 3, 4, 5), "(N, D) or (B, D, *spatial)")
    if x.dim() == 2:
        return RowLayout(1, x.shape[0], x.shape[1], ())
    spatial = tuple(x.shape[2:])
    return RowLayout(x.shape[0], math.prod(spatial), x.shape[1], spatial)


def check_keys(keys, ref_name: str, ref: torch.Tensor, d: int, allow_empty: bool) -> None:
    check_tensor("keys", keys, (2,), f"(K, D={d})")
    check_same("keys", keys, ref_name, ref)
    check_feature_size("keys", keys, ref_name, d)
    if not allow_empty and keys.shape[0] == 0:
        raise ValueError(f"keys must hold at least one key (K >= 1), got an empty bank of shape {tuple(keys.shape)}")


def per_row_shapes(layout: RowLayout) -> list[tuple[int, ...]]:
    """The shapes a per-row tensor (weights, masks, labels) of a rows or map input may have: (N,) always; for a map
    (B, D, *spatial) also (B, *spatial) and MONAI's channel-first (B, 1, *spatial). Nothing is ever resized."""
    shapes = [(layout.rows,)]
    if layout.spatial:
        shapes += [(layout.batch, *layout.spatial), (layout.batch, 1, *layout.spatial)]
    return shapes


def _shape_choices(layout: RowLayout) -> str:
    return " or ".join(str(a) for a in per_row_shapes(layout))


def _same_shape(shape, want: tuple) -> bool:
    """Dimension by dimension (under torch.compile(dynamic=True) the sizes are symbolic: each == is a guard)."""
    if len(shape) != len(want):
        return False
    for got, expected in zip(shape, want):
        if got != expected:
            return False
    return True


def is_per_row(shape, layout: RowLayout) -> bool:
    """Whether `shape` is one of per_row_shapes(layout) (compared as _same_shape does)."""
    return any(_same_shape(shape, a) for a in per_row_shapes(layout))


def check_weight(weight, layout: RowLayout, ref: torch.Tensor, check_values: bool = True,
                 ref_name: str = "student", checks: ValueChecks | None = None) -> torch.Tensor | None:
    """weight: (N,) for rows, (B, *spatial), (B, 1, *spatial) or (N,) for maps of `ref_name`; finite and
    non-negative (a value check: deferred into `checks`, or one host sync; skipped with check_values=False). Returns
    it flattened to (N,), bool as float32."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not is_per_row(weight.shape, layout):
        raise ValueError(
            f"weight must have shape {_shape_choices(layout)} (one weight per row of {ref_name}, whose shape is "
            f"{tuple(ref.shape)}), got {tuple(weight.shape)}; nothing is resized: bring the mask to the feature grid "
            f"first (e.g. F.interpolate(mask.float(), size=..., mode='nearest'))"
        )
    if weight.device != ref.device:
        raise ValueError(f"weight must be on {ref.device} like {ref_name}, got {weight.device}")
    if weight.dtype == torch.bool:
        weight = weight.to(torch.float32)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating point or bool tensor (a mask is a weight), got {weight.dtype}")
    weight = weight.reshape(layout.rows)
    # A negative weight turns the loss into a reward and a NaN one poisons the mean: refused.
    if check_values:
        check_floats(weight, "weight", True, checks)
    return weight


def check_labels(name: str, labels, count: int, ref: torch.Tensor, num_classes: int | None = None,
                 ignore_label: int | None = None, layout: RowLayout | None = None,
                 ref_name: str = "", checks: ValueChecks | None = None) -> torch.Tensor:
    """Integer labels on ref's device -> flat contiguous int64. With the layout of a map `ref_name` (B, D, *S):
    shape (B, *S), (B, 1, *S) or (N,) exactly (nothing is resized); otherwise any shape with `count` elements.

    With num_classes, every label must be in [0, num_classes) or equal ignore_label (a value check: deferred into
    `checks`, or one host sync).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {labels.dtype}; convert with {name}.long()")
    if layout is not None and layout.spatial and not is_per_row(labels.shape, layout):
        raise ValueError(f"{name} must have shape {_shape_choices(layout)} (one label per location of {ref_name}, "
                         f"whose shape is {tuple(ref.shape)}), got {tuple(labels.shape)}; nothing is resized: bring "
                         f"the labels to the feature grid first (e.g. nearest-neighbour F.interpolate, or strided "
                         f"slicing)")
    if labels.numel() != count:
        raise ValueError(f"{name} must have {count} elements (one per row), got shape {tuple(labels.shape)}")
    if labels.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {labels.device}")
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    if num_classes is not None:
        ign = None if ignore_label is None else int(ignore_label)
        _deferred(checks, lambda: _labels_bad(flat, num_classes, ign).any(),
                  lambda: _raise_labels(flat, name, num_classes, ign))
    return flat


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int >= 1, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (the number of negatives per anchor), got {k}")
    return k


def check_ignore_label(ignore_label) -> int:
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int):
        raise TypeError(f"ignore_label must be an int, got {type(ignore_label).__name__}")
    return ignore_label


def check_teacher_grad(teacher: torch.Tensor, needs_grad: bool | None = None) -> None:
    """needs_grad: whether the teacher would get a gradient (default: it requires grad and grad mode is on; an
    autograd Function passes ctx.needs_input_grad, its forward running without grad mode)."""
    if needs_grad is None:
        needs_grad = teacher.requires_grad and torch.is_grad_enabled()
    if needs_grad:
        raise ValueError(
            "teacher must not require grad: the teacher's distribution is the target of the distillation; "
            "pass teacher.detach() (the teacher is an EMA copy updated without gradients)"
        )


# -- one check per op ----------------------------------------------------------------------------------------------
def check_soft_contrastive(student, teacher, keys, tau_student, tau_teacher, weight, reduction,
                           checks: ValueChecks | None = None):
    """Validates soft_contrastive_loss arguments (the weight's values deferred into `checks`); returns (layout, tau_s,
    tau_t, flat weight or None, reduction, the dtype the call runs in)."""
    layout = row_layout("student", student)
    check_tensor("teacher", teacher, (student.dim(),), f"{tuple(student.shape)} like student")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the shape of student {tuple(student.shape)}, got {tuple(teacher.shape)}")
    check_same("teacher", teacher, "student", student)
    check_keys(keys, "student", student, layout.features, allow_empty=True)
    if layout.features == 0:
        raise ValueError(f"student must have a feature size D >= 1, got shape {tuple(student.shape)}")
    check_teacher_grad(teacher)
    tau_s = check_tau("tau_student", tau_student)
    tau_t = check_tau("tau_teacher", tau_teacher)
    w = check_weight(weight, layout, student, checks=checks)
    return layout, tau_s, tau_t, w, check_reduction(reduction), common_dtype(student, teacher, keys)


def check_row_views(name: str, x, ref_name: str | None = None, ref: torch.Tensor | None = None) -> None:
    """A (B, P, D) row view (rows: x.unsqueeze(0); maps: x.flatten(2).transpose(1, 2)), as the Functions take."""
    check_tensor(name, x, (3,), "(B, P, D) (rows: x.unsqueeze(0); maps: x.flatten(2).transpose(1, 2))")
    if ref is not None:
        if x.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
        check_same(name, x, ref_name, ref)


def check_soft_contrastive_views(s, t, k, tau_s, tau_t, teacher_needs_grad: bool):
    """Validates SoftContrastiveLossFunction.apply arguments (s, t: (B, P, D) views, k: (K, D)); returns (tau_s,
    tau_t, the dtype the call runs in)."""
    check_row_views("s", s)
    check_row_views("t", t, "s", s)
    check_keys(k, "s", s, s.shape[2], allow_empty=True)
    if s.shape[2] == 0:
        raise ValueError(f"s must have a feature size D >= 1, got shape {tuple(s.shape)}")
    check_teacher_grad(t, teacher_needs_grad)
    return check_tau("tau_s", tau_s), check_tau("tau_t", tau_t), common_dtype(s, t, k)


def check_hard_negative_topk(anchors, anchor_labels, keys, key_labels, k, ignore_label):
    """Validates hard_negative_topk arguments; returns (layout, flat anchor labels, flat key labels, k,
    ignore_label as int, the dtype the call runs in)."""
    layout = row_layout("anchors", anchors)
    check_keys(keys, "anchors", anchors, layout.features, allow_empty=True)
    k = check_k(k)
    ignore_label = check_ignore_label(ignore_label)
    ya = check_labels("anchor_labels", anchor_labels, layout.rows, anchors, layout=layout, ref_name="anchors")
    yk = check_labels("key_labels", key_labels, keys.shape[0], anchors)
    return layout, ya, yk, k, ignore_label, common_dtype(anchors, keys)


def check_topk_views(anchors, anchor_labels, keys, key_labels, k, ignore_label):
    """Validates HardNegativeTopkFunction.apply arguments (anchors: a (B, P, D) view); returns (flat anchor labels,
    flat key labels, k, ignore_label, the dtype the call runs in)."""
    check_row_views("anchors", anchors)
    check_keys(keys, "anchors", anchors, anchors.shape[2], allow_empty=True)
    k = check_k(k)
    ignore_label = check_ignore_label(ignore_label)
    ya = check_labels("anchor_labels", anchor_labels, anchors.shape[0] * anchors.shape[1], anchors)
    yk = check_labels("key_labels", key_labels, keys.shape[0], anchors)
    return ya, yk, k, ignore_label, common_dtype(anchors, keys)


def check_indices(indices, rows: int, keys: torch.Tensor, ref: torch.Tensor,
                  checks: ValueChecks | None = None) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != rows:
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must have shape ({rows}, n), one row per anchor, got {got}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}; convert with indices.long()")
    if indices.device != ref.device:
        raise ValueError(f"indices must be on {ref.device}, got {indices.device}")
    K = keys.shape[0]
    _deferred(checks, lambda: ((indices < -1) | (indices >= K)).any(), lambda: _raise_indices(indices, "indices", K))
    return indices


def check_indexed_cosine(anchors, keys, indices, checks: ValueChecks | None = None):
    """Validates indexed_cosine arguments (keys (K, D); indices: (N, n) int64, each < K or -1, a value check);
    returns (the anchors' layout, checked indices, the dtype the call runs in)."""
    layout = row_layout("anchors", anchors)
    check_keys(keys, "anchors", anchors, layout.features, allow_empty=True)
    idx = check_indices(indices, layout.rows, keys, anchors, checks)
    return layout, idx, common_dtype(anchors, keys)


def check_indexed_cosine_views(anchors, keys, indices):
    """Validates IndexedCosineFunction.apply arguments (anchors: a (B, P, D) view); returns (checked indices, the
    dtype the call runs in)."""
    check_row_views("anchors", anchors)
    check_keys(keys, "anchors", anchors, anchors.shape[2], allow_empty=True)
    idx = check_indices(indices, anchors.shape[0] * anchors.shape[1], keys, anchors)
    return idx, common_dtype(anchors, keys)


def check_class_prototypes(features, labels, num_classes, weight, ignore_label):
    """Validates class_prototypes arguments (labels and weights read with one host sync); returns (layout, flat
    labels, flat weight or None)."""
    layout = row_layout("features", features)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    checks = ValueChecks()
    y = check_labels("labels", labels, layout.rows, features, num_classes, check_ignore_label(ignore_label), layout,
                     "features", checks=checks)
    w = check_weight(weight, layout, features, ref_name="features", checks=checks)
    checks.verify()
    return layout, y, w


def check_class_graph_negatives(prototypes, query_labels, key_labels, num_negatives, tau, ignore_label,
                                checks: ValueChecks | None = None):
    """Validates class_graph_negatives arguments (values deferred into `checks`, else one host sync); returns
    (prototypes, flat query labels, flat key labels, tau as float). Query and key labels are in [0, C) or
    ignore_label. The sampler draws from softmax(cos(μ_c, μ_v)/τ): a non-finite prototype leaves it undefined and an
    integer index has no NaN, so finite prototypes are required."""
    own = checks is None
    checks = ValueChecks() if own else checks
    check_tensor("prototypes", prototypes, (2,), "(C, D)")
    C = prototypes.shape[0]
    for name, y in (("query_labels", query_labels), ("key_labels", key_labels)):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be an integer torch.Tensor, got {type(y).__name__}")
    ignore_label = check_ignore_label(ignore_label)
    yq = check_labels("query_labels", query_labels, query_labels.numel(), prototypes, C, ignore_label, checks=checks)
    yk = check_labels("key_labels", key_labels, key_labels.numel(), prototypes, C, ignore_label, checks=checks)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    check_floats(prototypes.detach(), "prototypes", False, checks)
    tau = check_tau("tau", tau)
    if own:
        checks.verify()
    return prototypes.detach(), yq, yk, tau


NEGATIVE_MODES = ("topk", "class_graph")


def check_anatomical_contrast(queries, query_labels, prototypes, keys, key_labels, tau, negatives, reduction,
                              ignore_label, weight, checks: ValueChecks | None = None):
    """Validates anatomical_contrast_loss arguments (values deferred into `checks`; an index tensor of negatives is
    checked by indexed_cosine): queries (Q, D) rows or a (B, D, *S) map with query_labels of its per-row shapes
    (per_row_shapes), in [0, C) or ignore_label; returns (the queries' layout, flat query labels, flat key labels,
    tau as float, reduction, flat weight or None)."""
    layout = row_layout("queries", queries)
    check_tensor("prototypes", prototypes, (2,), "(C, D)")
    check_tensor("keys", keys, (2,), "(K, D)")
    for name, x in (("prototypes", prototypes), ("keys", keys)):
        check_same(name, x, "queries", queries)
        check_feature_size(name, x, "queries", layout.features)
    C = prototypes.shape[0]
    ignore_label = check_ignore_label(ignore_label)
    yq = check_labels("query_labels", query_labels, layout.rows, queries, C, ignore_label, layout, "queries",
                      checks=checks)
    yk = check_labels("key_labels", key_labels, keys.shape[0], queries, C, ignore_label, checks=checks)
    tau = check_tau("tau", tau)
    reduction = check_reduction(reduction)
    if not isinstance(negatives, torch.Tensor) and negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be 'topk', 'class_graph' or a (Q, n) int64 index tensor, got {negatives!r}")
    w = check_weight(weight, layout, queries, ref_name="queries", checks=checks)
    return layout, yq, yk, tau, reduction, w


def check_bank_push(features, labels, mask, dim: int, num_classes: int | None, ignore_label: int):
    """Validates MemoryBank.push arguments (plain tensors: the bank unwraps subclasses first): features (n, D) rows or
    a (B, D, *S) map with D = the bank's dim; labels (one per row, per_row_shapes) in [0, num_classes) or
    ignore_label, required exactly when the bank stores labels; mask None or one value per row (any dtype, kept
    where non-zero). Returns (layout, flat int64 labels or None, flat bool mask or None)."""
    layout = row_layout("features", features)
    if layout.features != dim:
        raise ValueError(f"features must have the bank's feature size D={dim} (rows (n, {dim}) or a channel-first map "
                         f"(B, {dim}, *S)), got shape {tuple(features.shape)}")
    y = None
    if num_classes is not None:
        if labels is None:
            raise ValueError(f"labels are required: this MemoryBank stores labels (num_classes={num_classes}); pass "
                             f"one label per row of features {tuple(features.shape)}")
        y = check_labels("labels", labels, layout.rows, features, num_classes, check_ignore_label(ignore_label),
                         layout, "features")
    elif labels is not None:
        raise ValueError("labels given to a MemoryBank built without num_classes, which stores no labels; build it "
                         "with num_classes=C to keep them, or choose the rows to push with mask=")
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if not is_per_row(mask.shape, layout):
            raise ValueError(f"mask must have shape {_shape_choices(layout)} (one value per row of features, whose "
                             f"shape is {tuple(features.shape)}), got {tuple(mask.shape)}; nothing is resized")
        if mask.device != features.device:
            raise ValueError(f"mask must be on {features.device} like features, got {mask.device}")
        keep = mask.reshape(-1) != 0
    return layout, y, keep

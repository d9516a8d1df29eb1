"""soft_contrastive_loss: the pixel-wise soft-label contrastive distillation loss, from kernel to user.

    loss_i = KL( softmax(n(t_i) n(K)ᵀ / τ_t) || softmax(n(s_i) n(K)ᵀ / τ_s) ),   reduced with optional row weights.

Layers: the torch.library op `action_kernels::soft_contrastive_rows` (per-row loss of (B, P, D) views, autograd
registered, so torch.compile keeps it as one node); its autograd route (_setup_context, _backward), which the
drop-in `SoftContrastiveLossFunction` uses too; and the functional `soft_contrastive_loss` (validation, dispatch,
reduction). The kernels are the chosen backend's (dispatch.CONTRACTS["soft_contrastive_loss"]).
"""
from __future__ import annotations

import torch

from action_kernels import dispatch
from action_kernels._rows import as_row_view, plain, reduce_rows, work_dtype
from action_kernels._validation import (
    ValueCheckFailed,
    ValueChecks,
    check_dot_range,
    check_soft_contrastive,
    check_soft_contrastive_views,
    dot_range_flag,
    value_checks_active,
)
from action_kernels.ops._autograd import no_autocast, once_differentiable
from action_kernels.ops._normalization import kernel_inputs, through_normalization

OP = "soft_contrastive_loss"


def _prepared(s, t, k, inv_tau_s, inv_tau_t, normalize, checks: bool, guard: torch.Tensor | None = None):
    """What the kernels read (rows in range, non-finite rows zeroed: ops/_normalization.kernel_inputs), their inverse
    norms (ones when not normalising) and those of s and k themselves, and the rows whose loss is NaN by the NaN
    policy: (s, t, k, (rs (N,), rt (N,), rk (K,)), (rs_x (N,), rk_x (K,)), bad (N,) bool, or None when every
    row is known finite). With checks: the
    caller's deferred value checks (guard) and normalize=False's logit range are read in kernel_inputs' one host
    sync; a failure raises (the range check's own error, or ValueCheckFailed for the caller to name)."""
    flags = []
    if checks:
        flags = [guard] if guard is not None else []
        if not normalize:
            rows = (("student", s, inv_tau_s), ("teacher", t, inv_tau_t))
            flags.append(dot_range_flag(rows, k, work_dtype(s)))
    ((s, bad_s, rs, rs_x), (t, bad_t, rt, _), (k, bad_k, rk, rk_x)), failed, clean = kernel_inputs(
        normalize, s, t, k, sync=checks, flags=flags)
    if failed:
        if not normalize:
            check_dot_range(OP, rows, k, work_dtype(s))
        raise ValueCheckFailed(f"{OP}: an input value failed its check")
    bad = None if clean else (bad_s | bad_t).reshape(-1) | bad_k.any()
    return s, t, k, (rs.reshape(-1), rt.reshape(-1), rk), (rs_x.reshape(-1), rk_x), bad


@torch.library.custom_op("action_kernels::soft_contrastive_rows", mutates_args=())
def soft_contrastive_rows(
    s: torch.Tensor, t: torch.Tensor, k: torch.Tensor, inv_tau_s: float, inv_tau_t: float, normalize: bool,
    backend: str, with_grad: bool, checks: bool = True, guard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """s, t: (B, P, D) raw views; k: (K, D) -> loss (N,), lse_s (N,), lse_t (N,), pivot (N,) int32, pivot_r (N,),
    ds0 (N, D) or (0,).

    Normalisation (when asked) is fused: the kernels scale logits by per-row and per-key inverse norms instead of
    reading normalised copies. ds0 is dL/ds (through the normalisation) per unit upstream gradient, formed in the
    forward pass when with_grad (exact: row i's gradient is linear in its own upstream gradient).
    pivot, pivot_r: what the backend's key gradient needs besides lse (the row's top teacher key and the exact
    (log p - log q - KL) there: docs/kernels.md, op 1), -1 and 0 where the backend's key gradient recomputes them.
    checks: read the value checks (guard: the caller's deferred ones, a 0-d bool) with the one host sync of the
    call; without, no host sync (inside compiled graphs, or value checks switched off).
    NaN policy: a row with a non-finite value in s or t, or any non-finite key, has loss NaN and ds0 row NaN.
    """
    return _rows(s, t, k, inv_tau_s, inv_tau_t, normalize, backend, with_grad, checks, guard)


def _rows(s, t, k, inv_tau_s, inv_tau_t, normalize, backend, with_grad, checks, guard):
    """soft_contrastive_rows' implementation (the library op's body, and _EagerRows')."""
    with torch.no_grad(), no_autocast(s.device):
        s_in = s
        s, t, k, (rs, rt, rk), (rs_x, _), bad = _prepared(s, t, k, inv_tau_s, inv_tau_t, normalize, checks, guard)
        if k.shape[0] == 0:
            loss, lse_s, lse_t, pivot, pivot_r, ds0 = _empty_bank(s, with_grad)
        else:
            loss, lse_s, lse_t, pivot, pivot_r, ds0 = dispatch.kernels(OP, backend).soft_contrastive_forward(
                s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, with_grad)
        if with_grad and normalize:
            B, P, D = s_in.shape
            ds0 = through_normalization(s_in.reshape(B * P, D), rs_x, ds0)
        if bad is not None:
            nan = torch.tensor(float("nan"), dtype=loss.dtype, device=loss.device)
            loss = torch.where(bad, nan, loss)
            if with_grad:
                ds0 = torch.where(bad[:, None], nan, ds0)
        return loss, lse_s, lse_t, pivot, pivot_r, ds0


def _empty_bank(s: torch.Tensor, with_grad: bool):
    """K = 0 keys: no distribution to match, so every row's loss is 0 and its gradient 0 (the op's outputs for an
    empty bank, on every backend; lse = -inf, the log of an empty sum)."""
    B, P, D = s.shape
    loss = torch.zeros(B * P, dtype=work_dtype(s), device=s.device)
    lse = torch.full_like(loss, float("-inf"))
    ds0 = torch.zeros((B * P, D) if with_grad else (0,), dtype=loss.dtype, device=s.device)
    return loss, lse, lse.clone(), torch.full((B * P,), -1, dtype=torch.int32, device=s.device), loss.clone(), ds0


@soft_contrastive_rows.register_fake
def _(s, t, k, inv_tau_s, inv_tau_t, normalize, backend, with_grad, checks=True, guard=None):
    B, P, D = s.shape
    loss = s.new_empty((B * P,), dtype=work_dtype(s))
    ds0 = s.new_empty((B * P, D) if with_grad else (0,), dtype=work_dtype(s))
    return (loss, torch.empty_like(loss), torch.empty_like(loss), s.new_empty((B * P,), dtype=torch.int32),
            torch.empty_like(loss), ds0)


@torch.library.custom_op("action_kernels::soft_contrastive_key_grad", mutates_args=())
def soft_contrastive_key_grad(
    s: torch.Tensor, t: torch.Tensor, k: torch.Tensor, inv_tau_s: float, inv_tau_t: float, normalize: bool,
    loss: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, pivot: torch.Tensor, pivot_r: torch.Tensor,
    g: torch.Tensor, backend: str, checks: bool = True,
) -> torch.Tensor:
    """dL/dk (K, D) (through the normalisation) given the forward's loss, lse_s, lse_t, pivot, pivot_r and the
    upstream g (N,). checks: as soft_contrastive_rows (one host sync with, none without).
    NaN policy: all NaN when any row or key is non-finite (every key reads every row)."""
    with torch.no_grad(), no_autocast(s.device):
        k_raw = k
        s, t, k, (rs, rt, rk), (_, rk_x), bad = _prepared(s, t, k, inv_tau_s, inv_tau_t, normalize, checks)
        if k.shape[0] == 0:
            return torch.zeros(k.shape, dtype=work_dtype(s), device=s.device)
        dk_hat = dispatch.kernels(OP, backend).soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t,
                                                                         loss, lse_s, lse_t, pivot, pivot_r, g)
        dk = through_normalization(k_raw, rk_x, dk_hat) if normalize else dk_hat
        if bad is None:
            return dk
        return torch.where(bad.any(), torch.tensor(float("nan"), dtype=dk.dtype, device=dk.device), dk)


@soft_contrastive_key_grad.register_fake
def _(s, t, k, inv_tau_s, inv_tau_t, normalize, loss, lse_s, lse_t, pivot, pivot_r, g, backend, checks=True):
    return k.new_empty(k.shape, dtype=work_dtype(s))


def _row_and_key_grads(saved, inv_tau_s, inv_tau_t, normalize, backend, checks, g_loss, need_s: bool,
                       need_k: bool):
    """dL/ds (or None) and dL/dk (or None) from the saved forward and the upstream per-row gradient g_loss (N,)."""
    s, t, k, loss, lse_s, lse_t, pivot, pivot_r, ds0 = saved
    ds = dk = None
    g = g_loss.to(loss.dtype)
    with torch.no_grad(), no_autocast(s.device):
        if need_s:
            if ds0.numel() == 0 and s.numel() != 0:
                raise RuntimeError("soft_contrastive_rows was called with with_grad=False but student needs a "
                                   "gradient")
            ds = (g.view(*s.shape[:2], 1) * ds0.view(s.shape)).to(s.dtype)  # ds0 is through the normalisation
        if need_k:
            dk = soft_contrastive_key_grad(s, t, k, inv_tau_s, inv_tau_t, normalize, loss, lse_s, lse_t, pivot,
                                           pivot_r, g, backend, checks).to(k.dtype)
    return once_differentiable(f"{OP} on backend {backend!r}", "its backward runs fused kernels",
                               "Use backend='torch' (the materialising reference, differentiable to any order) for "
                               "higher-order gradients", (ds, dk), (s, k))


# -- the autograd route: the library op registers these; SoftContrastiveLossFunction calls them -------------------
def _save(ctx, inputs, output) -> None:
    s, t, k, inv_tau_s, inv_tau_t, normalize, backend, _, checks, _ = inputs
    ctx.save_for_backward(s, t, k, *output)
    ctx.args = (inv_tau_s, inv_tau_t, normalize, backend, checks)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)
    ctx.mark_non_differentiable(*output[1:])  # lse_s, lse_t, pivot, pivot_r, ds0


def _backward(ctx, g_loss, *_g_saved):
    ds, dk = _row_and_key_grads(ctx.saved_tensors, *ctx.args, g_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
    return ds, None, dk, None, None, None, None, None, None, None


soft_contrastive_rows.register_autograd(_backward, setup_context=_setup_context)


class _EagerRows(torch.autograd.Function):
    """soft_contrastive_rows in eager mode: the same implementation, setup_context and backward, without the
    torch.library dispatch around them (about 0.1 ms a call, a sixth of a tiny call's cost); torch.compile traces
    the library op itself (rows_op)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _rows(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def rows_op(device: torch.device):
    """The per-row loss op to call: the library op under torch.compile and for meta tensors (its fake
    implementation gives the shapes), its eager twin otherwise."""
    return soft_contrastive_rows if torch.compiler.is_compiling() or device.type == "meta" else _EagerRows.apply


def _fused_backend(backend, device: torch.device, dtype: torch.dtype, d: int) -> str:
    """The Functions run a fused backend: one of dispatch.FUSED that can run here (else a clear error)."""
    if backend not in dispatch.FUSED:
        raise ValueError(f"backend must be one of {dispatch.FUSED} (the Function runs a fused backend's kernels; "
                         f"for the materialising reference call soft_contrastive_loss(..., backend='torch')), "
                         f"got {backend!r}")
    return dispatch.select(OP, backend, device, dtype, D=d)


class SoftContrastiveLossFunction(torch.autograd.Function):
    """Per-row loss as a drop-in autograd Function: the library op's forward and its registered backward, for code
    that composes its own autograd. Validated like soft_contrastive_loss (shapes, devices, temperatures, backend;
    mixed float dtypes promoted).

    Args: s, t: (B, P, D) views (rows: x.unsqueeze(0); maps: x.flatten(2).transpose(1, 2)), k: (K, D),
    tau_s, tau_t: temperatures, normalize: fuse the L2 normalisation, backend: a name of dispatch.FUSED.
    Returns (B * P,) fp32 per-row losses. Once differentiable (see ops/_autograd.py).
    """

    @staticmethod
    def forward(ctx, s, t, k, tau_s: float, tau_t: float, normalize: bool, backend: str):
        tau_s, tau_t, dtype = check_soft_contrastive_views(s, t, k, tau_s, tau_t, ctx.needs_input_grad[1])
        backend = _fused_backend(backend, s.device, dtype, s.shape[2])
        s, t, k = s.to(dtype), t.to(dtype), k.to(dtype)
        inputs = (s, t, k, 1.0 / tau_s, 1.0 / tau_t, bool(normalize), backend, ctx.needs_input_grad[0],
                  value_checks_active(), None)
        output = _rows(*inputs)
        _save(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, g_loss):
        return _backward(ctx, g_loss)[:7]


def soft_contrastive_loss(
    student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor, tau_student: float = 0.1,
    tau_teacher: float = 0.01, weight: torch.Tensor | None = None, reduction: str = "mean", normalize: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Soft-label contrastive distillation loss (ACTION's global and local distillation).

    Shapes: student, teacher: (N, D) rows or channel-first maps (B, D, H, W) / (B, D, Z, H, W), read in place;
    keys: (K, D); weight: None, (N,), (B, *spatial) or MONAI's (B, 1, *spatial), non-negative (a bool mask is a
    weight; nothing resized: a mask off the feature grid is an error naming both shapes).
    Returns: () fp32 for "mean" (weighted mean) and "sum"; (N,) fp32 per row, in the input's row order, for "none"
    (multiplied by the weight when given). fp64 inputs give fp64 results on the torch and chunked backends.

    Args:
        tau_student, tau_teacher: softmax temperatures (> 0). normalize: L2-normalise rows and keys (fused into
        the kernels as per-row / per-key scales, no normalised copies; gradients flow through it).
        backend: None (ACTION_KERNELS_BACKEND, then automatic), "torch" (materialising reference), or a name of
        dispatch.FUSED ("chunked", "triton", "cuda").

    Gradients flow to student and, when keys.requires_grad, to keys. teacher must not require grad.
    student, teacher and keys may differ in float dtype (a bf16 student with an fp32 bank): they are promoted.
    The same answer inside and outside torch.autocast. Once differentiable on the fused backends (double backward
    raises; backend="torch" is differentiable to any order).
    An empty bank (K = 0) gives a loss of 0 that keeps the graph: backward gives zero gradients to student and keys
    (the op's outputs for K = 0 on every backend).
    NaN policy (docs/failure-behaviour.md): a non-finite value in a student or teacher row makes that row's loss NaN,
    one in keys every row's; its gradient rows are NaN likewise (the key gradient when any row is NaN).

    Raises:
        ValueError / TypeError: shapes, feature sizes, dtypes or devices that do not match, tau < 1e-4, negative
        or non-finite weights, a teacher that requires grad, normalize=False with logits beyond
        the float32 range. RuntimeError: a forced backend that cannot run.

    Example:
        >>> s, t = torch.randn(2, 64, 32, 32, requires_grad=True), torch.randn(2, 64, 32, 32)
        >>> soft_contrastive_loss(s, t, torch.randn(512, 64)).backward()
    """
    checks = ValueChecks()
    layout, tau_s, tau_t, w, reduction, dtype = check_soft_contrastive(
        student, teacher, keys, tau_student, tau_teacher, weight, reduction, checks)
    name = dispatch.select(OP, backend, student.device, dtype, D=layout.features)
    with no_autocast(student.device):
        student, teacher, keys = student.to(dtype), teacher.to(dtype), keys.to(dtype)
        if name == "torch":
            if not normalize and value_checks_active():  # the fused backends check it inside their library op
                views = [as_row_view(x.detach(), layout) for x in (student, teacher)]
                rows = (("student", views[0], 1.0 / tau_s), ("teacher", views[1], 1.0 / tau_t))
                checks.add(dot_range_flag(rows, keys, work_dtype(keys)),
                           lambda: check_dot_range(OP, rows, keys, work_dtype(keys)))
            checks.verify()
            return dispatch.reference(OP)(student, teacher, keys, tau_s, tau_t, w, reduction, normalize)
        # a tensor subclass (MONAI's MetaTensor) would carry its per-op bookkeeping into the kernels' row slicing;
        # plain views keep the autograd graph
        s, t, keys = as_row_view(plain(student), layout), as_row_view(plain(teacher), layout), plain(keys)
        with_grad = torch.is_grad_enabled() and s.requires_grad
        try:  # the weight's value check is read in the library op's one host sync
            loss = rows_op(s.device)(s, t, keys, 1.0 / tau_s, 1.0 / tau_t, bool(normalize), name, with_grad,
                             value_checks_active(), checks.flag())[0]
        except ValueCheckFailed:
            checks.raise_failed()
        return reduce_rows(loss, w, reduction)

"""hard_negative_topk and indexed_cosine: selecting hard negatives and differentiating through their similarities.

    values_ir = cos(a_i, k_{idx_ir}),  idx_i = the k keys of highest cosine with a_i among keys of another class
    (and not ignore_label), descending, ties to the lower index, padded with (-inf, -1).

The selection runs in the chosen backend's fused kernel (no N x K matrix); the gradient of the values is a gather:
    dL/dâ_i = Σ_r g_ir k̂_{idx_ir},   dL/dk̂_j = Σ_{(i,r): idx_ir = j} g_ir â_i,
mapped through the normalisation, computed here in row chunks. The same gather gives `indexed_cosine`, the
similarities to explicitly chosen keys (class-graph or user negatives). The row gradient is a weighted
embedding_bag. The forward gather and the key gradient choose per call between sparse (gather the c x n x D
selected keys of a row chunk; index_add) and, when n is a sizeable fraction of K (K <= DENSE_RATIO n), dense (a
c x K chunk of all similarities by GEMM; the scattered c x K gradient, transposed, times Â by GEMM). Measured on
2 CPU cores at Q = 1024, n = 512, K = 16384, D = 512: key gradient 1.78 s sparse, 0.26 s dense.

Both library ops register their autograd route (setup_context, backward) once; HardNegativeTopkFunction and
IndexedCosineFunction are the same forward and backward as drop-in autograd Functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from action_kernels import dispatch
from action_kernels._rows import as_row_view, work_dtype
from action_kernels._validation import (
    ValueCheckFailed,
    ValueChecks,
    check_dot_range,
    check_hard_negative_topk,
    check_indexed_cosine,
    check_indexed_cosine_views,
    check_topk_views,
    dot_range_flag,
    value_checks_active,
)
from action_kernels.ops._autograd import no_autocast
from action_kernels.ops._normalization import (
    kernel_inputs,
    nonfinite_rows,
    row_and_key_scales,
    through_normalization,
    unit_rows,
)

OP = "hard_negative_topk"
GATHER_BYTES = 32 << 20  # the (c, n, D) gathered keys, or the (c, K) dense block, of one row chunk
DENSE_RATIO = 64


def _dense(n: int, num_keys: int) -> bool:
    return num_keys <= DENSE_RATIO * n


def _row_chunk(n: int, d: int) -> int:
    return max(1, GATHER_BYTES // (4 * max(n, 1) * max(d, 1)))


def _nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


def _finite_only(x_hat: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Unit rows with the non-finite ones zeroed: a dense GEMM would otherwise spread their NaN to every output."""
    return torch.where(bad[:, None], torch.zeros((), dtype=x_hat.dtype, device=x_hat.device), x_hat)


def _gathered_dots(a_hat: torch.Tensor, k_hat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a_hat (N, D), k_hat (K, D), idx (N, n) with -1 padding -> (N, n) dots, -inf at padding, in row chunks."""
    out = torch.empty(idx.shape, dtype=a_hat.dtype, device=a_hat.device)
    if k_hat.shape[0] == 0:  # nothing to point at: every index is padding (checked)
        return out.fill_(float("-inf"))
    dense = _dense(idx.shape[1], k_hat.shape[0])
    step = _row_chunk(k_hat.shape[0] if dense else idx.shape[1], 1 if dense else a_hat.shape[1])
    for r0 in range(0, idx.shape[0], step):
        ic = idx[r0:r0 + step]
        if dense:
            dots = torch.mm(a_hat[r0:r0 + step], k_hat.T).gather(1, ic.clamp_min(0))
        else:
            dots = torch.bmm(k_hat[ic.clamp_min(0)], a_hat[r0:r0 + step, :, None]).squeeze(2)  # (c, n, D) gather
        out[r0:r0 + step] = dots.masked_fill_(ic < 0, float("-inf"))
    return out


def _reads_nan(idx: torch.Tensor, bad_a: torch.Tensor, bad_k: torch.Tensor) -> torch.Tensor:
    """(N, n) bool: the outputs (i, r) that read a non-finite row, anchor i or key idx_ir (padding reads none)."""
    valid = idx >= 0
    key_bad = bad_k[idx.clamp_min(0)] if bad_k.numel() else torch.zeros_like(valid)
    return valid & (bad_a[:, None] | key_bad)


def _gather_backward(a3, keys, idx, g, normalize: bool, need_a: bool, need_k: bool, nan_rows=None):
    """Gradient of values = cos(a_i, k_idx) for upstream g (N, n): (dA as a3's (B, P, D) view shape or None, dK).

    NaN policy: the gradient of an input row is NaN when the row is non-finite or fed a NaN output (an anchor row
    in nan_rows included, e.g. a top-k row that read a non-finite candidate); every other entry is finite."""
    ra, rk = row_and_key_scales(a3, keys, normalize)
    B, P, D = a3.shape
    a_hat, k_hat = unit_rows(a3, keys, ra, rk)
    bad_a, bad_k = nonfinite_rows(a_hat), nonfinite_rows(k_hat)
    a_hat, k_hat = _finite_only(a_hat, bad_a), _finite_only(k_hat, bad_k)
    valid = idx >= 0
    nan_out = _reads_nan(idx, bad_a, bad_k)
    g = torch.where(valid, g.to(ra.dtype), torch.zeros((), dtype=ra.dtype, device=g.device))
    g = torch.where(nan_out, torch.zeros((), dtype=g.dtype, device=g.device), g)
    da = dk = None
    if need_a:
        # Σ_r g_ir k̂_{idx_ir} without materialising the gathered keys: embedding_bag's weighted sum (deterministic;
        # measured 66 ms against 278 ms for a dense scatter + GEMM at Q = 1024, n = 512, K = 16384, D = 512)
        if k_hat.shape[0]:
            da_hat = F.embedding_bag(idx.clamp_min(0), k_hat, per_sample_weights=g, mode="sum")
        else:
            da_hat = a_hat.new_zeros(a_hat.shape)
        da = da_hat.view(B, P, D)
        if normalize:
            da = through_normalization(a3, ra.view(B, P), da)
        nan_a = nan_out.any(1) if nan_rows is None else nan_out.any(1) | nan_rows
        da = torch.where(nan_a.view(B, P, 1), _nan_like(da), da).to(a3.dtype)
    if need_k and k_hat.shape[0] == 0:  # an empty bank: nothing was selected, nothing to scatter into
        dk = torch.zeros(keys.shape, dtype=keys.dtype, device=keys.device)
    elif need_k:
        if _dense(idx.shape[1], k_hat.shape[0]):
            dk = torch.zeros_like(k_hat)
            step = _row_chunk(k_hat.shape[0], 1)
            for r0 in range(0, idx.shape[0], step):
                ic, gc = idx[r0:r0 + step].clamp_min(0), g[r0:r0 + step]
                block = gc.new_zeros(ic.shape[0], k_hat.shape[0]).scatter_add_(1, ic, gc)
                dk.addmm_(block.T, a_hat[r0:r0 + step])
        else:  # row chunks like the forward: the (c, n, D) weighted rows of one chunk at a time, never (N, n, D)
            dk = torch.zeros_like(k_hat)
            step = _row_chunk(idx.shape[1], a_hat.shape[1])
            for r0 in range(0, idx.shape[0], step):
                ic, vc = idx[r0:r0 + step], valid[r0:r0 + step]
                rows = torch.arange(r0, r0 + ic.shape[0], device=idx.device)[:, None].expand_as(ic)[vc]
                dk.index_add_(0, ic[vc], g[r0:r0 + step][vc][:, None] * a_hat[rows])
        if normalize:
            dk = through_normalization(keys, rk, dk)
        # keys that fed a NaN output: index_add of the NaN outputs' counts (no host sync)
        fed = torch.zeros(k_hat.shape[0], dtype=g.dtype, device=g.device).index_add_(
            0, idx.clamp_min(0).reshape(-1), nan_out.reshape(-1).to(g.dtype))
        dk = torch.where(((fed > 0) | bad_k)[:, None], _nan_like(dk), dk).to(keys.dtype)
    return da, dk


def _poisoned_rows(ya: torch.Tensor, yk: torch.Tensor, bad_a: torch.Tensor, bad_k: torch.Tensor,
                   ignore_label: int) -> torch.Tensor:
    """(N,) bool: top-k rows whose anchor is non-finite or whose candidates (keys of another label, not ignored)
    include a non-finite key. Without an (N, K) mask: the labels of the non-finite candidate keys are all equal to
    row i's exactly when their minimum and maximum both are, so two reductions over K decide every row."""
    cand_bad = bad_k & (yk != ignore_label)
    if yk.numel() == 0:
        return bad_a
    top = torch.iinfo(torch.int64).max
    lo = torch.where(cand_bad, yk, torch.full_like(yk, top)).amin()
    hi = torch.where(cand_bad, yk, torch.full_like(yk, -top - 1)).amax()
    return bad_a | (cand_bad.any() & ((ya != lo) | (ya != hi)))


@torch.library.custom_op("action_kernels::hard_negative_topk", mutates_args=())
def _topk_op(
    a: torch.Tensor, a_labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, k: int,
    ignore_label: int, normalize: bool, backend: str, checks: bool = True, guard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """a: (B, P, D) view -> values (N, k) fp32 (fp64 for fp64), indices (N, k) int64.

    checks: read the value checks (guard: the caller's deferred ones) in the op's one host sync; without, none.
    NaN policy: a row whose anchor, or any of whose candidate keys, is non-finite has values NaN and indices -1
    (its ranking is undefined); the kernels see zeros in place of non-finite rows."""
    with torch.no_grad(), no_autocast(a.device):
        flags = [guard] if checks and guard is not None else []
        rows = (("anchors", a, 1.0),)
        if checks and not normalize:
            flags.append(dot_range_flag(rows, keys, work_dtype(a)))
        ((a, bad_a, ra, _), (keys, bad_k, rk, _)), failed, _ = kernel_inputs(normalize, a, keys, sync=checks,
                                                                             flags=flags)
        if failed:
            if not normalize:
                check_dot_range(OP, rows, keys, work_dtype(a))
            raise ValueCheckFailed(f"{OP}: an input value failed its check")
        ra = ra.reshape(-1)
        values, indices = dispatch.kernels(OP, backend).hard_negative_topk(a, a_labels, keys, key_labels, ra, rk, k,
                                                                           ignore_label)
        poisoned = _poisoned_rows(a_labels, key_labels, bad_a.reshape(-1), bad_k, ignore_label)[:, None]
        values = values.to(work_dtype(a))
        return torch.where(poisoned, _nan_like(values), values), torch.where(poisoned, -1, indices)


@_topk_op.register_fake
def _(a, a_labels, keys, key_labels, k, ignore_label, normalize, backend, checks=True, guard=None):
    n = a.shape[0] * a.shape[1]
    return a.new_empty((n, k), dtype=work_dtype(a)), a.new_empty((n, k), dtype=torch.int64)


# -- the autograd route of the top-k: the library op registers these; HardNegativeTopkFunction calls them --------
def _topk_save(ctx, inputs, output) -> None:
    a, _, keys, _, _, _, normalize, *_ = inputs
    ctx.save_for_backward(a, keys, output[1], torch.isnan(output[0][:, :1]).reshape(-1))
    ctx.normalize = normalize


def _topk_setup(ctx, inputs, output):
    _topk_save(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])


def _topk_backward(ctx, g_values, _g_indices=None):
    a, keys, idx, poisoned = ctx.saved_tensors
    with no_autocast(a.device):
        da, dk = _gather_backward(a, keys, idx, g_values, ctx.normalize, ctx.needs_input_grad[0],
                                  ctx.needs_input_grad[2], nan_rows=poisoned)
    return da, None, dk, None, None, None, None, None, None, None


_topk_op.register_autograd(_topk_backward, setup_context=_topk_setup)


class HardNegativeTopkFunction(torch.autograd.Function):
    """hard_negative_topk as a drop-in autograd Function: the library op's forward and its registered backward (the
    values' gradient), for code that composes its own autograd. Validated like hard_negative_topk (shapes, labels,
    k, backend; mixed float dtypes promoted).

    Args: anchors: (B, P, D) view (rows: x.unsqueeze(0); maps: x.flatten(2).transpose(1, 2)), anchor_labels: (N,)
    int64, keys: (K, D), key_labels: (K,) int64, k: int >= 1, ignore_label: int, normalize: bool, backend: a name
    of dispatch.FUSED. Returns values (N, k) fp32 (differentiable to anchors and keys), indices (N, k) int64.
    """

    @staticmethod
    def forward(ctx, anchors, anchor_labels, keys, key_labels, k: int, ignore_label: int, normalize: bool,
                backend: str):
        ya, yk, k, ignore_label, dtype = check_topk_views(anchors, anchor_labels, keys, key_labels, k, ignore_label)
        if backend not in dispatch.FUSED:
            raise ValueError(f"backend must be one of {dispatch.FUSED} (the Function runs a fused backend's kernels; "
                             f"for the reference call hard_negative_topk(..., backend='torch')), got {backend!r}")
        backend = dispatch.select(OP, backend, anchors.device, dtype, k=k, D=anchors.shape[2])
        inputs = (anchors.to(dtype), ya, keys.to(dtype), yk, k, ignore_label, bool(normalize), backend,
                  value_checks_active(), None)
        output = _topk_op(*inputs)
        _topk_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, g_values, g_indices):
        return _topk_backward(ctx, g_values)


@torch.library.custom_op("action_kernels::indexed_cosine", mutates_args=())
def _indexed_cosine_op(a: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, normalize: bool) -> torch.Tensor:
    """a: (B, P, D) view, keys (K, D), idx (N, n) -> (N, n) similarities (-inf where idx is -1).
    NaN policy: NaN where anchor i or key idx_ir is non-finite."""
    with torch.no_grad(), no_autocast(a.device):
        if not normalize and value_checks_active():
            check_dot_range("indexed_cosine", (("anchors", a, 1.0),), keys, work_dtype(a))
        a_hat, k_hat = unit_rows(a, keys, *row_and_key_scales(a, keys, normalize))
        bad_a, bad_k = nonfinite_rows(a_hat), nonfinite_rows(k_hat)
        out = _gathered_dots(_finite_only(a_hat, bad_a), _finite_only(k_hat, bad_k), idx)
        return torch.where(_reads_nan(idx, bad_a, bad_k), _nan_like(out), out)


@_indexed_cosine_op.register_fake
def _(a, keys, idx, normalize):
    return a.new_empty(idx.shape, dtype=work_dtype(a))


# -- the autograd route of indexed_cosine: the library op registers these; IndexedCosineFunction calls them --------
def _cos_setup(ctx, inputs, output):
    a, keys, idx, normalize = inputs
    ctx.save_for_backward(a, keys, idx)
    ctx.normalize = normalize


def _cos_backward(ctx, g):
    a, keys, idx = ctx.saved_tensors
    with no_autocast(a.device):
        da, dk = _gather_backward(a, keys, idx, g, ctx.normalize, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return da, dk, None, None


_indexed_cosine_op.register_autograd(_cos_backward, setup_context=_cos_setup)


class IndexedCosineFunction(torch.autograd.Function):
    """indexed_cosine as a drop-in autograd Function: the library op's forward and its registered backward,
    validated like indexed_cosine. Args: anchors (B, P, D) view, keys (K, D), indices (N, n) int64 with -1
    padding, normalize: bool. Returns (N, n) similarities, -inf at padding."""

    @staticmethod
    def forward(ctx, anchors, keys, indices, normalize: bool):
        idx, dtype = check_indexed_cosine_views(anchors, keys, indices)
        inputs = (anchors.to(dtype), keys.to(dtype), idx, bool(normalize))
        output = _indexed_cosine_op(*inputs)
        _cos_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, g):
        return _cos_backward(ctx, g)


def hard_negative_topk(
    anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, k: int,
    ignore_label: int = -1, normalize: bool = True, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k hardest negatives of each anchor: the most similar keys of another class.

    Shapes: anchors (N, D) or (B, D, *spatial) read in place; anchor_labels (N,), (B, *spatial) or (B, 1, *spatial)
    int (nothing resized: labels off the anchors' grid are an error naming both shapes);
    keys (K, D); key_labels (K,) int. Returns values (N, k) fp32, sorted descending, and indices (N, k) int64;
    rows with fewer than k candidates are padded with -inf and -1 (k > K and K = 0 are allowed). Ties go to the
    lower key index. Keys labelled ignore_label are never selected. anchors and keys may differ in float dtype
    (promoted). NaN policy: a row whose anchor or any candidate key is non-finite gets values NaN, indices -1.
    values are differentiable (to anchors, and to keys when they require grad); indices are not. Fused backends
    never hold the N x K similarity matrix.

    Example:
        >>> values, idx = hard_negative_topk(pixel_emb, pixel_labels, bank, bank_labels, k=64)
    """
    layout, ya, yk, k, ignore_label, dtype = check_hard_negative_topk(anchors, anchor_labels, keys, key_labels, k,
                                                                      ignore_label)
    return _topk(anchors, layout, ya, keys, yk, k, ignore_label, normalize, backend, dtype)


def _topk(anchors, layout, ya, keys, yk, k: int, ignore_label: int, normalize: bool, backend, dtype,
          checks: ValueChecks | None = None):
    """hard_negative_topk after validation; `checks`: the caller's deferred value checks, read in the op's one
    host sync (anatomical_contrast_loss's labels)."""
    name = dispatch.select(OP, backend, anchors.device, dtype, k=k, D=layout.features)
    checks = checks if checks is not None else ValueChecks()
    with no_autocast(anchors.device):
        anchors, keys = anchors.to(dtype), keys.to(dtype)
        if name == "torch":
            if not normalize and value_checks_active():  # the fused backends check it inside their library op
                rows = (("anchors", as_row_view(anchors.detach(), layout), 1.0),)
                checks.add(dot_range_flag(rows, keys, work_dtype(keys)),
                           lambda: check_dot_range(OP, rows, keys, work_dtype(keys)))
            checks.verify()
            return dispatch.reference(OP)(anchors, ya, keys, yk, k, ignore_label, normalize)
        try:
            return _topk_op(as_row_view(anchors, layout), ya, keys, yk, k, ignore_label, bool(normalize), name,
                            value_checks_active(), checks.flag())
        except ValueCheckFailed:
            checks.raise_failed()


def indexed_cosine(anchors: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor,
                   normalize: bool = True) -> torch.Tensor:
    """cos(anchor_i, keys[indices_ir]): anchors (N, D) or (B, D, *spatial), keys (K, D), indices (N, n) int64
    with -1 padding -> (N, n) fp32, -inf at padding, NaN where a non-finite anchor or key is read. Gathers keys in
    row chunks (never an (N, n, D) tensor whole); differentiable to anchors and keys."""
    layout, idx, dtype = check_indexed_cosine(anchors, keys, indices)
    with no_autocast(anchors.device):
        return _indexed_cosine_op(as_row_view(anchors.to(dtype), layout), keys.to(dtype), idx, bool(normalize))

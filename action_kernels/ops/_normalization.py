"""The L2 normalisation every op folds into its kernels, its gradient, and what the kernels are handed.

Backends never read normalised copies: they take raw rows x and inverse norms r = 1 / max(||x||, eps), so that
x̂ = r x (all ones when the op does not normalise). Gradients arrive with respect to x̂ and are mapped back to x
here, once for every op and backend.

Range: a norm computed as sqrt(Σ x²) overflows float32 once |x| ~ 1e19 (then r = 0 and x̂ = 0: a finite, wrong
cosine), and a kernel that forms the raw dot x·k before scaling overflows at |x||k| ~ 1e38. So inverse_norms
divides each row by a power of two near its largest |x| before summing squares (exact, no overflow for any finite
row), and kernel_inputs hands backends rows scaled by a power of two into |x| <= 2^50 when larger ones occur
(cosines unchanged, bit for bit, since the scale is exact).

NaN policy (one place, the same for every backend): kernel_inputs also reports the non-finite rows and hands the
kernels zeros in their place, so no kernel ever sees NaN or Inf; the ops then write NaN into every output that
read such a row (ops/*.py, and reference.py for the torch backend).
"""
from __future__ import annotations

import torch

from action_kernels._rows import work_dtype

NORM_EPS = 1e-12  # as F.normalize
# rows handed to kernels keep |x| < 2^(BOUND_EXP + 1): squares and dots over D <= 2^25 features stay finite in
# float32 (2^102 * 2^25 < 2^128); float64 has room for far more
BOUND_EXP = {torch.float32: 50, torch.float64: 500}
# Device types whose values the host reads without draining a stream: there kernel_inputs reads its rescaling
# decision even without sync (value checks off, compiled graphs), since the device-side handling it replaces costs
# more than the read (CPU, N = K = 64, D = 16: 0.73 ms a forward with value checks off against 0.38 ms with them)
FREE_HOST_READS = ("cpu",)


def _pow2_near(m: torch.Tensor) -> torch.Tensor:
    """m >= 0 (finite) -> c = 2^(e-1) with c <= m < 2 c (1/2 for m = 0), same dtype: dividing by it is exact, and
    it stays finite at the dtype's largest values (2^e would be 2^128 = inf in float32)."""
    e = torch.frexp(m).exponent  # m = f 2^e, f in [0.5, 1)
    return torch.ldexp(torch.ones_like(m), e - 1)


def row_abs_max(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: (..., D) -> (...) max |x| of each row (its inf norm) in `dtype` (default the work dtype), 0 for rows of no
    values. An empty x gets no inf norm taken: torch.compile's fake tensors refuse one over a (0, D) tensor."""
    dtype = dtype or work_dtype(x)
    if x.numel() == 0:
        return torch.zeros(x.shape[:-1], dtype=dtype, device=x.device)
    return torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1, dtype=dtype)


def inverse_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """x: (..., D) -> (...) 1 / max(||x||, eps) in fp32 (fp64 for fp64), or ones when not normalising.

    Overflow-free for every finite row: ||x|| = c ||x / c|| with c a power of two near max |x| (so x / c is exact
    and in [-2, 2]), and r = (1 / ||x / c||) / c. Non-finite rows give NaN or 0 (the ops mask them).
    Differentiable (c is piecewise constant): the backward passes use it, double backward too.
    (kernel_inputs gives the kernels' rows their norms in one pass: they are in range there.)
    """
    work = work_dtype(x)
    if not normalize:
        return torch.ones(x.shape[:-1], dtype=work, device=x.device)
    xw = x.to(work)
    m = row_abs_max(xw)
    c = _pow2_near(torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    c = torch.where(m > 0, c, torch.ones_like(c))
    ns = torch.linalg.vector_norm(xw / c[..., None], dim=-1)
    clamped = ns * c <= NORM_EPS  # ns * c may overflow to inf for huge rows: then it is not clamped, correctly
    eps_r = torch.full_like(ns, 1.0 / NORM_EPS)
    return torch.where(clamped, eps_r, ns.clamp_min(torch.finfo(work).tiny).reciprocal() / c)


def through_normalization(x: torch.Tensor, r: torch.Tensor, g_hat: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. raw x (..., D) from the gradient w.r.t. x̂ = r x: r (g - x̂ (x̂·g)), as F.normalize's backward.

    Where the norm was clamped to eps (r = 1/eps), x̂ = x / eps is linear in x and the projection term vanishes.
    """
    x_hat = x.to(g_hat.dtype) * r[..., None]
    unclamped = r < torch.full_like(r, 1.0 / NORM_EPS)
    proj = (x_hat * g_hat).sum(-1, keepdim=True) * unclamped[..., None]
    return (g_hat - x_hat * proj) * r[..., None]


def row_and_key_scales(rows: torch.Tensor, keys: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: a (B, P, D) view, keys: (K, D) -> (r_rows (N,), r_keys (K,)): the inverse norms of raw rows."""
    return inverse_norms(rows, normalize).reshape(-1), inverse_norms(keys, normalize)


def unit_rows(rows: torch.Tensor, keys: torch.Tensor, r_rows: torch.Tensor, r_keys: torch.Tensor):
    """(x̂ (N, D), k̂ (K, D)) in the work dtype: the scaled rows and keys that the gathers of ops/ read."""
    B, P, D = rows.shape
    return rows.reshape(B * P, D).to(r_rows.dtype) * r_rows[:, None], keys.to(r_keys.dtype) * r_keys[:, None]


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """x: (..., D) -> (...) bool, True where the row holds a NaN or an Inf (no host sync)."""
    return ~torch.isfinite(row_abs_max(x))


def kernel_inputs(normalize: bool, *xs: torch.Tensor, sync: bool = True, flags=()):
    """Each x (..., D) -> (what the kernels read, its non-finite rows (...) bool, the inverse norms r (...) of what the
    kernels read, those of x itself); whether any of `flags` (0-d bool device tensors: the caller's deferred
    value checks, ValueChecks) is set; and whether every row is known finite and in range (no NaN masking needed).
    With sync, one host sync in all (one flag for every tensor: when any needs the slow path, all take it);
    without, none: every tensor then takes the slow path's device-side handling.

    What the kernels read is x itself in the common case; a copy when x has non-finite rows (set to zero: no kernel
    sees NaN or Inf) or, when normalising, rows with |x| > 2^BOUND_EXP (divided by a power of two: same cosines,
    bit for bit). The common case costs one pass, the norms the kernels need anyway: a row with a NaN, an Inf or a
    value too large for the sum of squares has a non-finite norm, and only then does the slow path look closer.
    Called inside the ops' library ops only (opaque to torch.compile, so the syncs are no graph break). On the
    device types of FREE_HOST_READS the rescaling decision is read even without sync (flags are then not read).
    """
    norms = [torch.linalg.vector_norm(x.detach(), dim=-1, dtype=work_dtype(x)) for x in xs]
    decide = bool(xs) and (sync or (all(x.device.type in FREE_HOST_READS for x in xs)
                                   and not torch.compiler.is_compiling()))
    if decide:  # one flag for all tensors (one work dtype; the slow path is rare: then all take it), then the
        n = torch.cat([n.reshape(-1) for n in norms])  # caller's flags, in one host read
        slow = ~(n <= 2.0 ** BOUND_EXP[n.dtype]).all()  # NaN compares False
        flags = flags if sync else ()
        values = torch.stack([slow, *(f.reshape(()) for f in flags)]).tolist() if flags else [bool(slow)]
        slows, failed = [values[0]] * len(xs), any(values[1:])
    elif sync:
        slows, failed = [], bool(torch.stack([f.reshape(()) for f in flags]).any()) if flags else False
    else:
        slows, failed = [True] * len(xs), False
    out = []
    clean = decide and not any(slows)
    for x, n, slow in zip(xs, norms, slows):
        scale = None
        if not slow:
            bad = torch.zeros(n.shape, dtype=torch.bool, device=n.device)
        else:
            m = row_abs_max(x, n.dtype)
            bad = ~torch.isfinite(m)
            if normalize:  # c > m / 2, so |x| / (c 2^-BOUND_EXP) < 2^(BOUND_EXP + 1)
                big = (m > 2.0 ** BOUND_EXP[m.dtype]) & ~bad
                scale = torch.where(big, _pow2_near(torch.where(big, m, torch.ones_like(m))) *
                                    2.0 ** -BOUND_EXP[m.dtype], torch.ones_like(m))
                x = torch.where(bad[..., None], torch.zeros((), dtype=x.dtype, device=x.device),
                                x / scale[..., None].to(x.dtype))
            else:
                x = torch.where(bad[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x)
            n = torch.linalg.vector_norm(x, dim=-1, dtype=n.dtype)
        if normalize:
            r = n.clamp_min(NORM_EPS).reciprocal()
            r_x = r if scale is None else r / scale
        else:
            r = r_x = torch.ones(n.shape, dtype=n.dtype, device=n.device)
        out.append((x, bad, r, r_x))
    return out, failed, clean

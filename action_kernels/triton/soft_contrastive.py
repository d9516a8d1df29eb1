"""Triton kernels of the soft-label contrastive loss (launchers only; autograd lives in ops/).

Three kernels, each holding at most one fp32 accumulator tile, so that none spills (checked by
the kernel report's CI test for every configuration the launchers can choose, sm_80 and sm_90):
  forward   per row block, streams key tiles: online softmax statistics of student and teacher and the KL
            accumulator (2 GEMM-equivalents: s·kᵀ and t·kᵀ).
  row_grad  per row block, streams key tiles again: recomputes both logits from the saved log-sum-exps and
            accumulates (q - p) k̂ (3 GEMM-equivalents). forward + row_grad = the 5 GEMM-equivalents of forward
            and backward to the student, with one accumulator instead of two.
  key_grad  per key block, streams row tiles: the key gradient (4 GEMM-equivalents), deterministic (no atomics).
Exponentials are exp2 with log2(e) folded into the per-row scales. Rows and keys reach the kernels as dense
(R, BLOCK_D) tiles (see _common.padded_rows), so tile offsets are int32 and hoisted out of the key loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from action_kernels.triton import _common as C

OP = "soft_contrastive"
# (kernel, arch, "16" | "32" input bits, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, num_stages[, RELOAD]). Chosen
# by the static estimate of the kernel report among the configurations that compile with no local memory
# (its tuner, docs/kernel-report.md); where the tuner found none, or the entry is not retuned yet (the
# fp32 entries), the report shows its local memory and docs/known-limits.md lists it. arch 80 is used for sm_8x,
# 90 for sm_90 and newer. RELOAD
# re-reads the loop-invariant operand tile (rows; keys in the key gradient) every iteration instead of holding it:
# mma.sync (sm_80) takes its A operand from registers, D/4 of them per operand at 16 bits, and tf32x3 splits fp32
# operands in registers, so wide rows cannot stay resident there.
CONFIGS = {
    ("forward", 90, "16", 64): (64, 128, 8, 2), ("forward", 90, "16", 128): (64, 128, 8, 2),
    ("forward", 90, "16", 256): (64, 64, 8, 2), ("forward", 90, "16", 512): (64, 32, 8, 2),
    ("forward", 80, "16", 64): (64, 64, 4, 2), ("forward", 80, "16", 128): (64, 32, 4, 2),
    ("forward", 80, "16", 256): (32, 64, 4, 2, True), ("forward", 80, "16", 512): (32, 32, 4, 2),
    ("forward", 90, "32", 64): (64, 32, 4, 2), ("forward", 90, "32", 128): (64, 32, 4, 2),
    ("forward", 90, "32", 256): (64, 16, 8, 1), ("forward", 90, "32", 512): (64, 16, 8, 1),
    ("forward", 80, "32", 64): (16, 64, 4, 2), ("forward", 80, "32", 128): (16, 64, 4, 2),
    ("forward", 80, "32", 256): (16, 32, 4, 1), ("forward", 80, "32", 512): (16, 16, 4, 1),
    ("row_grad", 90, "16", 64): (64, 64, 4, 2), ("row_grad", 90, "16", 128): (64, 64, 4, 2),
    ("row_grad", 90, "16", 256): (64, 32, 8, 2), ("row_grad", 90, "16", 512): (64, 32, 8, 1),
    ("row_grad", 80, "16", 64): (64, 64, 4, 2), ("row_grad", 80, "16", 128): (32, 32, 4, 2),
    ("row_grad", 80, "16", 256): (32, 32, 4, 2, True), ("row_grad", 80, "16", 512): (32, 32, 4, 1),
    ("row_grad", 90, "32", 64): (64, 32, 4, 2), ("row_grad", 90, "32", 128): (64, 32, 4, 1),
    ("row_grad", 90, "32", 256): (64, 16, 8, 1), ("row_grad", 90, "32", 512): (64, 16, 8, 1),
    ("row_grad", 80, "32", 64): (16, 64, 4, 2), ("row_grad", 80, "32", 128): (16, 32, 4, 1),
    ("row_grad", 80, "32", 256): (16, 16, 4, 1), ("row_grad", 80, "32", 512): (16, 16, 4, 1),
    ("key_grad", 90, "16", 64): (64, 64, 4, 2), ("key_grad", 90, "16", 128): (64, 32, 4, 2),
    ("key_grad", 90, "16", 256): (64, 32, 8, 2), ("key_grad", 90, "16", 512): (32, 32, 4, 2),
    ("key_grad", 80, "16", 64): (64, 32, 4, 2), ("key_grad", 80, "16", 128): (32, 32, 4, 2),
    ("key_grad", 80, "16", 256): (32, 32, 4, 2, True), ("key_grad", 80, "16", 512): (32, 32, 4, 1),
    ("key_grad", 90, "32", 64): (32, 64, 4, 2), ("key_grad", 90, "32", 128): (32, 64, 4, 1),
    ("key_grad", 90, "32", 256): (16, 64, 8, 1), ("key_grad", 90, "32", 512): (16, 64, 8, 1),
    ("key_grad", 80, "32", 64): (64, 16, 4, 2), ("key_grad", 80, "32", 128): (32, 16, 4, 1),
    ("key_grad", 80, "32", 256): (16, 16, 4, 1), ("key_grad", 80, "32", 512): (16, 16, 4, 1),
}
# Under TRITON_INTERPRET=1 one fixed configuration (the interpreter's cost grows with block iterations, and the
# tests set smaller tiles through this dict).
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "RELOAD": False}


def config_key(kernel: str, arch: int, dtype: torch.dtype, BLOCK_D: int, k: int = 0) -> tuple:
    return (kernel, 90 if arch >= 90 else 80, "32" if dtype == torch.float32 else "16", BLOCK_D)


def config(kernel: str, arch: int, dtype: torch.dtype, BLOCK_D: int) -> dict:
    """The launch configuration of `kernel` for this architecture, input dtype and feature tile."""
    if C.interpreting():
        return dict(INTERPRETER_BLOCKS, num_warps=4, num_stages=1)
    key = config_key(kernel, arch, dtype, BLOCK_D)
    if key not in CONFIGS:
        raise NotImplementedError(f"soft_contrastive triton kernels support feature sizes up to 512 (their tiles and "
                                  f"accumulators must fit registers and shared memory), got a feature tile of "
                                  f"{BLOCK_D}; use backend='chunked' or 'cuda'")
    bm, bn, warps, stages, *reload = CONFIGS[key]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, RELOAD=bool(reload and reload[0]))


# ---------------------------------------------------------------------------------------------------------------
# forward: per row i, with a_ij = (s_i·k_j) rk_j (raw dot times the key's inverse norm) and b_ij likewise for t,
# the logits in log2 units are A_ij = a_ij cs_i, B_ij = b_ij ct_i, cs = rs log2(e)/τ_s, ct = rt log2(e)/τ_t.
# Online over key tiles: m_s = max A, l_s = Σ 2^(A - m_s), m_t, l_t likewise (w = 2^(B - m_t)), and the KL in the
# shifted form, which never forms the logits' size 1/τ again: with u_s = A - m_s, u_t = B - m_t, d = u_s - u_t and
# the row's pivot j* (its largest teacher logit, the first among ties) with Δ = d_j*,
#   R = Σ_j w_j (d_j - Δ),   r = ln2 R / l_t = Σ_j p_j (δ_j* - δ_j)   (δ = ln p - ln q),
#   loss = KL = δ_j* - r = ln2 (-Δ - log2 l_t + log2 l_s - R / l_t).
# Each term of R is exactly 0 at the pivot (d and Δ are the same number) and of the size of its own p_j otherwise.
# r and the pivot go to the key gradient, whose teacher term p (δ - KL) at the pivot is p r (below). R is
# rescaled with the teacher's running max like l_t, and re-referenced when the pivot moves (R += l_t (Δ_old - Δ));
# Δ follows the maxima (d = u_s - u_t shifts by the change of m_t minus that of m_s).
@triton.jit
def _forward_tile(s, t, s_ptrs, t_ptrs, row_mask, k_ptrs, RK, j0, K, cs, ct, m_s, l_s, m_t, l_t, R, piv, delta,
                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, RELOAD: tl.constexpr):
    if RELOAD:  # the row tiles from L2 every tile, so that they need no registers across the loop (mma.sync, tf32x3)
        s = tl.load(s_ptrs, mask=row_mask[:, None], other=0.0)
        t = tl.load(t_ptrs, mask=row_mask[:, None], other=0.0)
    c = tl.arange(0, BLOCK_N)
    cols = j0 + c
    if MASKED:
        kt = tl.load(k_ptrs, mask=(cols < K)[:, None], other=0.0)
        rk = tl.load(RK + cols, mask=cols < K, other=0.0)
    else:
        kt = tl.load(k_ptrs)
        rk = tl.load(RK + cols)
    a = tl.dot(s, tl.trans(kt), input_precision=PRECISION) * rk[None, :]
    b = tl.dot(t, tl.trans(kt), input_precision=PRECISION) * rk[None, :]
    if MASKED:  # keys past K leave the statistics alone (cs, ct > 0, so -inf stays -inf)
        a = tl.where((cols < K)[None, :], a, float("-inf"))
        b = tl.where((cols < K)[None, :], b, float("-inf"))
    tb = tl.max(b, axis=1)
    ms_new = tl.maximum(m_s, tl.max(a, axis=1) * cs)
    mt_new = tl.maximum(m_t, tb * ct)
    us = a * cs[:, None] - ms_new[:, None]
    ut = b * ct[:, None] - mt_new[:, None]
    l_s = l_s * tl.exp2(m_s - ms_new) + tl.sum(tl.exp2(us), axis=1)
    beta = tl.exp2(m_t - mt_new)
    w = tl.exp2(ut)
    d = us - ut
    if MASKED:  # w = 0 there, but 0 * (-inf - -inf) would be NaN
        d = tl.where((cols < K)[None, :], d, 0.0)
    # Δ of the current pivot at this tile's references (d shifts with the maxima)
    delta = delta - (ms_new - m_s) + (mt_new - m_t)
    # a new pivot where this tile's largest teacher logit beats the running max (strictly: ties keep the lower key);
    # its Δ is read from the tile itself, so that its own term of R is exactly 0. Rare after the first tiles: only
    # when some row of the block has one.
    new = tb * ct > m_t
    if tl.max(new.to(tl.int32), axis=0) > 0:
        jt = tl.argmax(b, axis=1, tie_break_left=True)
        d_new = tl.sum(tl.where(c[None, :] == jt[:, None], d, 0.0), axis=1)
        R = tl.where(new, R + l_t * (delta - d_new), R)
        delta = tl.where(new, d_new, delta)
        piv = tl.where(new, j0 + jt, piv)
    l_t = l_t * beta + tl.sum(w, axis=1)
    R = R * beta + tl.sum(w * (d - delta[:, None]), axis=1)
    return ms_new, l_s, mt_new, l_t, R, piv, delta


@triton.jit(do_not_specialize=["N", "K"])
def _forward_kernel(S, T, Kp, RS, RT, RK, Loss, LseS, LseT, Piv, PivR, N, K, inv_tau_s, inv_tau_t,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    RELOAD: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + r
    row_mask = rows < N
    d = tl.arange(0, BLOCK_D)
    base = pid.to(tl.int64) * (BLOCK_M * BLOCK_D)  # the only 64-bit offset: per program, outside the loop
    tile = r[:, None] * BLOCK_D + d[None, :]
    s = tl.load(S + base + tile, mask=row_mask[:, None], other=0.0)
    t = tl.load(T + base + tile, mask=row_mask[:, None], other=0.0)
    rs = tl.load(RS + rows, mask=row_mask, other=1.0)
    rt = tl.load(RT + rows, mask=row_mask, other=1.0)
    cs = rs * (inv_tau_s * 1.4426950408889634)
    ct = rt * (inv_tau_t * 1.4426950408889634)
    # finite "minus infinity" for the running maxima: the first tile's shifts of Δ stay finite (times l = 0)
    m_s = tl.full([BLOCK_M], -1e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    R = tl.zeros([BLOCK_M], tl.float32)
    piv = tl.zeros([BLOCK_M], tl.int32)
    delta = tl.zeros([BLOCK_M], tl.float32)
    k_ptrs = Kp + tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + d[None, :]
    n_full = K // BLOCK_N
    for jt in range(0, n_full):
        m_s, l_s, m_t, l_t, R, piv, delta = _forward_tile(
            s, t, S + base + tile, T + base + tile, row_mask, k_ptrs + jt * (BLOCK_N * BLOCK_D), RK, jt * BLOCK_N, K,
            cs, ct, m_s, l_s, m_t, l_t, R, piv, delta, PRECISION, BLOCK_N, False, RELOAD)
    if n_full * BLOCK_N < K:
        m_s, l_s, m_t, l_t, R, piv, delta = _forward_tile(
            s, t, S + base + tile, T + base + tile, row_mask, k_ptrs + n_full * (BLOCK_N * BLOCK_D), RK,
            n_full * BLOCK_N, K, cs, ct, m_s, l_s, m_t, l_t, R, piv, delta, PRECISION, BLOCK_N, True, RELOAD)
    log_ls, log_lt = tl.log2(l_s), tl.log2(l_t)
    r2 = R / l_t  # l_t >= 1: its largest term is 1
    tl.store(LseS + rows, (m_s + log_ls) * 0.6931471805599453, mask=row_mask)
    tl.store(LseT + rows, (m_t + log_lt) * 0.6931471805599453, mask=row_mask)
    tl.store(Loss + rows, (log_ls - log_lt - delta - r2) * 0.6931471805599453, mask=row_mask)
    tl.store(Piv + rows, piv, mask=row_mask)
    tl.store(PivR + rows, r2 * 0.6931471805599453, mask=row_mask)


# ---------------------------------------------------------------------------------------------------------------
# row gradient: ds0_i = Σ_j (q_ij - p_ij) k̂_j / τ_s = dL_i/dŝ_i per unit upstream gradient (ŝ = rs s), with
# q_ij = 2^(A_ij - lse_s,i log2 e), p_ij = 2^(B_ij - lse_t,i log2 e) recomputed from the forward's lse, and
# k̂_j = rk_j k_j folded into the weights: acc += ((q - p) rk) · k. q - p is formed in fp32 before the cast to the
# input dtype (late in training q ≈ p: casting q and p separately would lose the difference).
@triton.jit
def _row_grad_tile(s, t, s_ptrs, t_ptrs, row_mask, k_ptrs, RK, j0, K, cs, ct, ls2, lt2, acc,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, RELOAD: tl.constexpr):
    if RELOAD:
        s = tl.load(s_ptrs, mask=row_mask[:, None], other=0.0)
        t = tl.load(t_ptrs, mask=row_mask[:, None], other=0.0)
    cols = j0 + tl.arange(0, BLOCK_N)
    if MASKED:
        kt = tl.load(k_ptrs, mask=(cols < K)[:, None], other=0.0)
        rk = tl.load(RK + cols, mask=cols < K, other=0.0)
    else:
        kt = tl.load(k_ptrs)
        rk = tl.load(RK + cols)
    a = tl.dot(s, tl.trans(kt), input_precision=PRECISION) * rk[None, :]
    b = tl.dot(t, tl.trans(kt), input_precision=PRECISION) * rk[None, :]
    q = tl.exp2(a * cs[:, None] - ls2[:, None])
    p = tl.exp2(b * ct[:, None] - lt2[:, None])
    dz = (q - p) * rk[None, :]
    if MASKED:  # keys past K contribute exactly 0: their logit reads 0, so q = 2^(-lse_s log2 e) overflows to inf
        dz = tl.where((cols < K)[None, :], dz, 0.0)  # once lse_s < -88.7, and (inf - p) * 0 would be NaN
    return tl.dot(dz.to(kt.dtype), kt, acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=["N", "K"])
def _row_grad_kernel(S, T, Kp, RS, RT, RK, LseS, LseT, DS, N, K, inv_tau_s, inv_tau_t,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     RELOAD: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + r
    row_mask = rows < N
    d = tl.arange(0, BLOCK_D)
    base = pid.to(tl.int64) * (BLOCK_M * BLOCK_D)
    tile = r[:, None] * BLOCK_D + d[None, :]
    s = tl.load(S + base + tile, mask=row_mask[:, None], other=0.0)
    t = tl.load(T + base + tile, mask=row_mask[:, None], other=0.0)
    cs = tl.load(RS + rows, mask=row_mask, other=1.0) * (inv_tau_s * 1.4426950408889634)
    ct = tl.load(RT + rows, mask=row_mask, other=1.0) * (inv_tau_t * 1.4426950408889634)
    ls2 = tl.load(LseS + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    lt2 = tl.load(LseT + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_ptrs = Kp + tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + d[None, :]
    n_full = K // BLOCK_N
    for jt in range(0, n_full):
        acc = _row_grad_tile(s, t, S + base + tile, T + base + tile, row_mask, k_ptrs + jt * (BLOCK_N * BLOCK_D),
                             RK, jt * BLOCK_N, K, cs, ct, ls2, lt2, acc, PRECISION, BLOCK_N, False, RELOAD)
    if n_full * BLOCK_N < K:
        acc = _row_grad_tile(s, t, S + base + tile, T + base + tile, row_mask, k_ptrs + n_full * (BLOCK_N * BLOCK_D),
                             RK, n_full * BLOCK_N, K, cs, ct, ls2, lt2, acc, PRECISION, BLOCK_N, True, RELOAD)
    tl.store(DS + base + tile, acc * inv_tau_s, mask=row_mask[:, None])


# ---------------------------------------------------------------------------------------------------------------
# key gradient, one program per BLOCK_N keys, streaming row tiles in order (deterministic, no atomics):
#   dL/dk̂_j = Σ_i g_i [ (q_ij - p_ij) ŝ_i / τ_s + p_ij (log p_ij - log q_ij - loss_i) t̂_i / τ_t ]
# with ŝ_i = rs_i s_i folded into the row weights of the two (BLOCK_N x BLOCK_M) · (BLOCK_M x D) products; the
# logits are computed transposed (keys x rows), so both products take the row tiles as they were loaded.
# At row i's pivot key (its largest teacher logit) log p - log q - loss is r_i from the forward: recomputed here it
# would be a difference of numbers of size 1/τ that cancel to far less when p_i is nearly one-hot (small τ_t), and
# the recomputed logits differ from the forward's in their last bits. fp16 inputs: the weights are cast to fp16 for
# the products, and g (q - p) rs / τ is often far below fp16's normal range (g = 1/N for a mean over N rows): they
# are scaled by a power of two per tile, falling so that the tile's largest stays below 2^15 (SCALE16; the CUDA
# kernel's ScaleF16), and dk by its inverse at the end.
@triton.jit
def _key_grad_tile(kb, kb_ptrs, k_mask, keys, s_ptrs, t_ptrs, RS, RT, Loss, LseS, LseT, Piv, PivR, G, i0, N, ck_s,
                   ck_t, inv_tau_s, inv_tau_t, dk, e, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   MASKED: tl.constexpr, RELOAD: tl.constexpr, SCALE16: tl.constexpr):
    if RELOAD:
        kb = tl.load(kb_ptrs, mask=k_mask[:, None], other=0.0)
    rows = i0 + tl.arange(0, BLOCK_M)
    if MASKED:  # g = 0 past N zeroes those rows' weights
        m = rows < N
        s = tl.load(s_ptrs, mask=m[:, None], other=0.0)
        t = tl.load(t_ptrs, mask=m[:, None], other=0.0)
        rs = tl.load(RS + rows, mask=m, other=0.0)
        rt = tl.load(RT + rows, mask=m, other=0.0)
        g = tl.load(G + rows, mask=m, other=0.0)
        loss = tl.load(Loss + rows, mask=m, other=0.0)
        ls2 = tl.load(LseS + rows, mask=m, other=0.0) * 1.4426950408889634
        lt2 = tl.load(LseT + rows, mask=m, other=0.0) * 1.4426950408889634
        piv = tl.load(Piv + rows, mask=m, other=-1)
        pr = tl.load(PivR + rows, mask=m, other=0.0)
    else:
        s = tl.load(s_ptrs)
        t = tl.load(t_ptrs)
        rs = tl.load(RS + rows)
        rt = tl.load(RT + rows)
        g = tl.load(G + rows)
        loss = tl.load(Loss + rows)
        ls2 = tl.load(LseS + rows) * 1.4426950408889634
        lt2 = tl.load(LseT + rows) * 1.4426950408889634
        piv = tl.load(Piv + rows)
        pr = tl.load(PivR + rows)
    # log2 q and log2 p, (BLOCK_N keys, BLOCK_M rows); ck = rk log2(e)/τ per key
    y = tl.dot(kb, tl.trans(s), input_precision=PRECISION) * ck_s[:, None] * rs[None, :] - ls2[None, :]
    z = tl.dot(kb, tl.trans(t), input_precision=PRECISION) * ck_t[:, None] * rt[None, :] - lt2[None, :]
    p = tl.exp2(z)
    dz_s = (tl.exp2(y) - p) * (g * rs * inv_tau_s)[None, :]
    coef = tl.where(keys[:, None] == piv[None, :], pr[None, :], (z - y) * 0.6931471805599453 - loss[None, :])
    dz_t = p * coef * (g * rt * inv_tau_t)[None, :]
    if SCALE16:  # fp16 products: the weights times 2^e, e falling so that the tile's largest stays below 2^15
        # (keys past K first set to 0: their logits read 0, so 2^(0 - lse log2 e) can be inf and would set the scale)
        dz_s = tl.where(k_mask[:, None], dz_s, 0.0)
        dz_t = tl.where(k_mask[:, None], dz_t, 0.0)
        amax = tl.maximum(tl.max(tl.abs(dz_s)), tl.max(tl.abs(dz_t)))
        e_new = tl.where(amax > 0.0, tl.minimum(e, 14.0 - tl.floor(tl.log2(amax))), e)
        if e_new < e:
            dk = dk * tl.exp2(e_new - e)
        e = e_new
        dz_s = dz_s * tl.exp2(e)
        dz_t = dz_t * tl.exp2(e)
    dk = tl.dot(dz_s.to(s.dtype), s, dk, input_precision=PRECISION)
    return tl.dot(dz_t.to(t.dtype), t, dk, input_precision=PRECISION), e


@triton.jit(do_not_specialize=["N", "K"])
def _key_grad_kernel(S, T, Kp, RS, RT, RK, Loss, LseS, LseT, Piv, PivR, G, DK, N, K, inv_tau_s, inv_tau_t,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     RELOAD: tl.constexpr, SCALE16: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_N)
    keys = pid * BLOCK_N + c
    k_mask = keys < K
    d = tl.arange(0, BLOCK_D)
    base = pid.to(tl.int64) * (BLOCK_N * BLOCK_D)
    tile = c[:, None] * BLOCK_D + d[None, :]
    kb = tl.load(Kp + base + tile, mask=k_mask[:, None], other=0.0)
    rk = tl.load(RK + keys, mask=k_mask, other=0.0)
    ck_s = rk * (inv_tau_s * 1.4426950408889634)
    ck_t = rk * (inv_tau_t * 1.4426950408889634)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    e = tl.full([], 126.0, tl.float32)  # the fp16 weights' scale exponent (SCALE16)
    row_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + d[None, :]
    n_full = N // BLOCK_M
    for it in range(0, n_full):
        off = it * (BLOCK_M * BLOCK_D)
        dk, e = _key_grad_tile(kb, Kp + base + tile, k_mask, keys, S + off + row_tile, T + off + row_tile, RS, RT,
                               Loss, LseS, LseT, Piv, PivR, G, it * BLOCK_M, N, ck_s, ck_t, inv_tau_s, inv_tau_t, dk, e,
                               PRECISION, BLOCK_M, False, RELOAD, SCALE16)
    if n_full * BLOCK_M < N:
        off = n_full * (BLOCK_M * BLOCK_D)
        dk, e = _key_grad_tile(kb, Kp + base + tile, k_mask, keys, S + off + row_tile, T + off + row_tile, RS, RT,
                               Loss, LseS, LseT, Piv, PivR, G, n_full * BLOCK_M, N, ck_s, ck_t, inv_tau_s, inv_tau_t,
                               dk, e, PRECISION, BLOCK_M, True, RELOAD, SCALE16)
    if SCALE16:
        dk = dk * tl.exp2(-e)
    tl.store(DK + base + tile, dk, mask=k_mask[:, None])


# ---------------------------------------------------------------------------------------------------------------
def _prepare(s, t, k, rs, rt, rk):
    """(B, P, D) views and (K, D) keys -> dense padded rows/keys in the kernel dtype and fp32 aligned scales."""
    dtype = C.kernel_dtype(s)
    D = s.shape[-1]
    BD = C.block_d(D)
    N, K = s.shape[0] * s.shape[1], k.shape[0]
    C.check_int32("rows x BLOCK_D", N * BD)
    C.check_int32("keys x BLOCK_D", K * BD)
    rows = [C.padded_rows(x, dtype, BD) for x in (s, t)]
    keys = C.padded_rows(k, dtype, BD)
    scales = [C.aligned(x.float().contiguous()) for x in (rs, rt, rk)]
    return rows, keys, scales, N, K, D, BD, dtype


def forward_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, with_grad, out):
    """The launches of soft_contrastive_forward (returned, for the launcher and the kernel report)."""
    (s2, t2), k2, (rs2, rt2, rk2), N, K, D, BD, dtype = _prepare(s, t, k, rs, rt, rk)
    arch = C.target_arch(s.device)
    prec = C.dot_precision(dtype)
    plans = []
    cfg = config("forward", arch, dtype, BD)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    plans.append(C.Launch(
        OP, "forward", _forward_kernel, (triton.cdiv(N, bm),),
        dict(S=s2, T=t2, Kp=k2, RS=rs2, RT=rt2, RK=rk2, Loss=out["loss"], LseS=out["lse_s"], LseT=out["lse_t"],
             Piv=out["pivot"], PivR=out["pivot_r"], N=N, K=K, inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t),
        dict(PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, RELOAD=cfg["RELOAD"]), cfg["num_warps"],
        cfg["num_stages"]))
    if with_grad:
        cfg = config("row_grad", arch, dtype, BD)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        plans.append(C.Launch(
            OP, "row_grad", _row_grad_kernel, (triton.cdiv(N, bm),),
            dict(S=s2, T=t2, Kp=k2, RS=rs2, RT=rt2, RK=rk2, LseS=out["lse_s"], LseT=out["lse_t"], DS=out["ds0p"],
                 N=N, K=K, inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t),
            dict(PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, RELOAD=cfg["RELOAD"]), cfg["num_warps"],
            cfg["num_stages"]))
    return plans


def soft_contrastive_forward(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) inverse norms -> loss, lse_s, lse_t, pivot, pivot_r
    (N,), ds0 (N, D).

    The contract of dispatch.SoftContrastiveKernels; ds0 is empty when not with_grad.
    """
    B, P, D = s.shape
    N = B * P
    loss = torch.empty(N, dtype=torch.float32, device=s.device)
    lse_s, lse_t, pivot_r = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
    pivot = torch.empty(N, dtype=torch.int32, device=s.device)
    if N == 0:
        ds0 = torch.empty((0, D) if with_grad else (0,), dtype=torch.float32, device=s.device)
        return loss, lse_s, lse_t, pivot, pivot_r, ds0
    BD = C.block_d(D)
    ds0p = torch.empty((N, BD) if with_grad else (0,), dtype=torch.float32, device=s.device)
    out = dict(loss=loss, lse_s=lse_s, lse_t=lse_t, pivot=pivot, pivot_r=pivot_r, ds0p=ds0p)
    for plan in forward_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, with_grad, out):
        C.launch(plan)
    ds0 = (ds0p if BD == D else ds0p[:, :D].contiguous()) if with_grad else ds0p
    return loss, lse_s, lse_t, pivot, pivot_r, ds0


def key_grad_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, loss, lse_s, lse_t, pivot, pivot_r, g, dkp):
    (s2, t2), k2, (rs2, rt2, rk2), N, K, D, BD, dtype = _prepare(s, t, k, rs, rt, rk)
    cfg = config("key_grad", C.target_arch(s.device), dtype, BD)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    return [C.Launch(
        OP, "key_grad", _key_grad_kernel, (triton.cdiv(K, bn),),
        dict(S=s2, T=t2, Kp=k2, RS=rs2, RT=rt2, RK=rk2, Loss=C.aligned(loss), LseS=C.aligned(lse_s),
             LseT=C.aligned(lse_t), Piv=C.aligned(pivot), PivR=C.aligned(pivot_r), G=C.aligned(g.float().contiguous()),
             DK=dkp, N=N, K=K, inv_tau_s=inv_tau_s,
             inv_tau_t=inv_tau_t),
        dict(PRECISION=C.dot_precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, RELOAD=cfg["RELOAD"],
             SCALE16=dtype == torch.float16),
        cfg["num_warps"], cfg["num_stages"])]


def soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, pivot,
                              pivot_r, g):
    """dL/dk̂ (K, D) fp32 from the forward's loss, lse_s, lse_t, pivot, pivot_r (N,) and the upstream per-row
    gradient g (N,)."""
    K, D = k.shape
    if s.shape[0] * s.shape[1] == 0:
        return torch.zeros((K, D), dtype=torch.float32, device=k.device)
    BD = C.block_d(D)
    dkp = torch.empty((K, BD), dtype=torch.float32, device=k.device)
    for plan in key_grad_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, loss, lse_s, lse_t, pivot, pivot_r, g,
                                  dkp):
        C.launch(plan)
    return dkp if BD == D else dkp[:, :D].contiguous()

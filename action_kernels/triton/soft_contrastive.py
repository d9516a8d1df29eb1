"""Triton kernels of the soft-label contrastive loss (launchers only; autograd lives in ops/).

Three kernels, each holding at most one fp32 accumulator tile, so that none spills (checked by
tests/test_kernel_report.py for every configuration the launchers can choose, sm_80 and sm_90):
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
# (python -m action_kernels.kernel_report.tune); where the tuner found none, or the entry is not retuned yet (the
# fp32 entries), the report shows its local memory and README's Known limits lists it. arch 80 is used for sm_8x,
# 90 for sm_90 and newer. RELOAD
# re-reads the loop-invariant operand tile (rows; keys in the key gradient) every iteration instead of holding it:
# mma.sync (sm_80) takes its A operand from registers, D/4 of them per operand at 16 bits, and tf32x3 splits fp32
# operands in registers, so wide rows cannot stay resident there.
CONFIGS = {
    ("forward", 90, "16", 64): (128, 128, 8, 2), ("forward", 90, "16", 128): (128, 128, 8, 2),
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
    ("key_grad", 80, "16", 64): (64, 64, 4, 2), ("key_grad", 80, "16", 128): (32, 32, 4, 2),
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
# Online over key tiles: m_s = max A, l_s = Σ 2^(A - m_s), m_t, l_t likewise, and with w_ij = 2^(B_ij - m_t)
#   acc_b = Σ w b, acc_a = Σ w a  (rescaled with the teacher's running max), so that
#   loss_i = KL(p_i || q_i) = (rt/τ_t acc_b - rs/τ_s acc_a)/l_t - lse_t + lse_s,  lse = ln2 (m + log2 l).
# Gradient: the row gradient kernel below; the key gradient kernel after it.
@triton.jit
def _forward_tile(s, t, s_ptrs, t_ptrs, row_mask, k_ptrs, RK, j0, K, cs, ct, m_s, l_s, m_t, l_t, acc_b, acc_a,
                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, RELOAD: tl.constexpr):
    if RELOAD:  # the row tiles from L2 every tile, so that they need no registers across the loop (mma.sync, tf32x3)
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
    if MASKED:  # keys past K leave the statistics alone (cs, ct > 0, so -inf stays -inf)
        a = tl.where((cols < K)[None, :], a, float("-inf"))
        b = tl.where((cols < K)[None, :], b, float("-inf"))
    ms_new = tl.maximum(m_s, tl.max(a, axis=1) * cs)
    l_s = l_s * tl.exp2(m_s - ms_new) + tl.sum(tl.exp2(a * cs[:, None] - ms_new[:, None]), axis=1)
    mt_new = tl.maximum(m_t, tl.max(b, axis=1) * ct)
    beta = tl.exp2(m_t - mt_new)
    w = tl.exp2(b * ct[:, None] - mt_new[:, None])
    if MASKED:  # w = 0 there, but 0 * -inf would be NaN
        b = tl.where((cols < K)[None, :], b, 0.0)
        a = tl.where((cols < K)[None, :], a, 0.0)
    l_t = l_t * beta + tl.sum(w, axis=1)
    acc_b = acc_b * beta + tl.sum(w * b, axis=1)
    acc_a = acc_a * beta + tl.sum(w * a, axis=1)
    return ms_new, l_s, mt_new, l_t, acc_b, acc_a


@triton.jit(do_not_specialize=["N", "K"])
def _forward_kernel(S, T, Kp, RS, RT, RK, Loss, LseS, LseT, N, K, inv_tau_s, inv_tau_t,
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
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc_b = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M], tl.float32)
    k_ptrs = Kp + tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + d[None, :]
    n_full = K // BLOCK_N
    for jt in range(0, n_full):
        m_s, l_s, m_t, l_t, acc_b, acc_a = _forward_tile(
            s, t, S + base + tile, T + base + tile, row_mask, k_ptrs + jt * (BLOCK_N * BLOCK_D), RK, jt * BLOCK_N, K,
            cs, ct, m_s, l_s, m_t, l_t, acc_b, acc_a, PRECISION, BLOCK_N, False, RELOAD)
    if n_full * BLOCK_N < K:
        m_s, l_s, m_t, l_t, acc_b, acc_a = _forward_tile(
            s, t, S + base + tile, T + base + tile, row_mask, k_ptrs + n_full * (BLOCK_N * BLOCK_D), RK,
            n_full * BLOCK_N, K, cs, ct, m_s, l_s, m_t, l_t, acc_b, acc_a, PRECISION, BLOCK_N, True, RELOAD)
    lse_s = (m_s + tl.log2(l_s)) * 0.6931471805599453
    lse_t = (m_t + tl.log2(l_t)) * 0.6931471805599453
    loss = (rt * inv_tau_t * acc_b - rs * inv_tau_s * acc_a) / l_t - lse_t + lse_s
    tl.store(Loss + rows, loss, mask=row_mask)
    tl.store(LseS + rows, lse_s, mask=row_mask)
    tl.store(LseT + rows, lse_t, mask=row_mask)


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
@triton.jit
def _key_grad_tile(kb, kb_ptrs, k_mask, s_ptrs, t_ptrs, RS, RT, Loss, LseS, LseT, G, i0, N, ck_s, ck_t, inv_tau_s,
                   inv_tau_t, dk, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                   RELOAD: tl.constexpr):
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
    else:
        s = tl.load(s_ptrs)
        t = tl.load(t_ptrs)
        rs = tl.load(RS + rows)
        rt = tl.load(RT + rows)
        g = tl.load(G + rows)
        loss = tl.load(Loss + rows)
        ls2 = tl.load(LseS + rows) * 1.4426950408889634
        lt2 = tl.load(LseT + rows) * 1.4426950408889634
    # log2 q and log2 p, (BLOCK_N keys, BLOCK_M rows); ck = rk log2(e)/τ per key
    y = tl.dot(kb, tl.trans(s), input_precision=PRECISION) * ck_s[:, None] * rs[None, :] - ls2[None, :]
    z = tl.dot(kb, tl.trans(t), input_precision=PRECISION) * ck_t[:, None] * rt[None, :] - lt2[None, :]
    p = tl.exp2(z)
    dz_s = (tl.exp2(y) - p) * (g * rs * inv_tau_s)[None, :]
    dz_t = p * ((z - y) * 0.6931471805599453 - loss[None, :]) * (g * rt * inv_tau_t)[None, :]
    dk = tl.dot(dz_s.to(s.dtype), s, dk, input_precision=PRECISION)
    return tl.dot(dz_t.to(t.dtype), t, dk, input_precision=PRECISION)


@triton.jit(do_not_specialize=["N", "K"])
def _key_grad_kernel(S, T, Kp, RS, RT, RK, Loss, LseS, LseT, G, DK, N, K, inv_tau_s, inv_tau_t,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     RELOAD: tl.constexpr):
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
    row_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + d[None, :]
    n_full = N // BLOCK_M
    for it in range(0, n_full):
        off = it * (BLOCK_M * BLOCK_D)
        dk = _key_grad_tile(kb, Kp + base + tile, k_mask, S + off + row_tile, T + off + row_tile, RS, RT, Loss, LseS,
                            LseT, G, it * BLOCK_M, N, ck_s, ck_t, inv_tau_s, inv_tau_t, dk, PRECISION, BLOCK_M, False,
                            RELOAD)
    if n_full * BLOCK_M < N:
        off = n_full * (BLOCK_M * BLOCK_D)
        dk = _key_grad_tile(kb, Kp + base + tile, k_mask, S + off + row_tile, T + off + row_tile, RS, RT, Loss, LseS,
                            LseT, G, n_full * BLOCK_M, N, ck_s, ck_t, inv_tau_s, inv_tau_t, dk, PRECISION, BLOCK_M,
                            True, RELOAD)
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
             N=N, K=K, inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t),
        dict(PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, RELOAD=cfg["RELOAD"]), cfg["num_warps"],
        cfg["num_stages"], trips=[K // bn]))
    if with_grad:
        cfg = config("row_grad", arch, dtype, BD)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        plans.append(C.Launch(
            OP, "row_grad", _row_grad_kernel, (triton.cdiv(N, bm),),
            dict(S=s2, T=t2, Kp=k2, RS=rs2, RT=rt2, RK=rk2, LseS=out["lse_s"], LseT=out["lse_t"], DS=out["ds0p"],
                 N=N, K=K, inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t),
            dict(PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, RELOAD=cfg["RELOAD"]), cfg["num_warps"],
            cfg["num_stages"], trips=[K // bn]))
    return plans


def soft_contrastive_forward(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) inverse norms -> loss, lse_s, lse_t (N,), ds0 (N, D).

    The contract of action_kernels/chunked/soft_contrastive.py; ds0 is empty when not with_grad.
    """
    B, P, D = s.shape
    N = B * P
    loss = torch.empty(N, dtype=torch.float32, device=s.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    if N == 0:
        ds0 = torch.empty((0, D) if with_grad else (0,), dtype=torch.float32, device=s.device)
        return loss, lse_s, lse_t, ds0
    BD = C.block_d(D)
    ds0p = torch.empty((N, BD) if with_grad else (0,), dtype=torch.float32, device=s.device)
    out = dict(loss=loss, lse_s=lse_s, lse_t=lse_t, ds0p=ds0p)
    for plan in forward_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, with_grad, out):
        C.launch(plan)
    ds0 = (ds0p if BD == D else ds0p[:, :D].contiguous()) if with_grad else ds0p
    return loss, lse_s, lse_t, ds0


def key_grad_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, loss, lse_s, lse_t, g, dkp):
    (s2, t2), k2, (rs2, rt2, rk2), N, K, D, BD, dtype = _prepare(s, t, k, rs, rt, rk)
    cfg = config("key_grad", C.target_arch(s.device), dtype, BD)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    return [C.Launch(
        OP, "key_grad", _key_grad_kernel, (triton.cdiv(K, bn),),
        dict(S=s2, T=t2, Kp=k2, RS=rs2, RT=rt2, RK=rk2, Loss=C.aligned(loss), LseS=C.aligned(lse_s),
             LseT=C.aligned(lse_t), G=C.aligned(g.float().contiguous()), DK=dkp, N=N, K=K, inv_tau_s=inv_tau_s,
             inv_tau_t=inv_tau_t),
        dict(PRECISION=C.dot_precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, RELOAD=cfg["RELOAD"]),
        cfg["num_warps"], cfg["num_stages"], trips=[N // bm])]


def soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, g):
    """dL/dk̂ (K, D) fp32 from the forward's loss, lse_s, lse_t (N,) and the upstream per-row gradient g (N,)."""
    K, D = k.shape
    if s.shape[0] * s.shape[1] == 0:
        return torch.zeros((K, D), dtype=torch.float32, device=k.device)
    BD = C.block_d(D)
    dkp = torch.empty((K, BD), dtype=torch.float32, device=k.device)
    for plan in key_grad_launches(s, t, k, rs, rt, rk, inv_tau_s, inv_tau_t, loss, lse_s, lse_t, g, dkp):
        C.launch(plan)
    return dkp if BD == D else dkp[:, :D].contiguous()

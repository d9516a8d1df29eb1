"""Triton kernels of the soft-label contrastive loss (launchers only; autograd lives in ops/).

Rows come as (B, P, D) strided views (row n = (n // P, n % P)), so channel-first maps are read in place.
Block sizes are module settings (`BLOCKS`) so tests under TRITON_INTERPRET=1 can use small tiles.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# GPU defaults for D <= 128; tests set smaller tiles. num_warps only matters on a GPU.
BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}


def _blocks(D: int) -> dict:
    """Tiles for feature size D: a program holds its row tiles (and, with gradients, two BLOCK_M x D fp32
    accumulators) in registers, so wider rows get fewer rows per program and more warps (not yet tuned on a GPU)."""
    blocks = dict(BLOCKS)
    if D > 128 and blocks["BLOCK_M"] > 32:
        blocks["BLOCK_M"] = 32 if D <= 256 else 16
        blocks["num_warps"] = 8
    return blocks


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full precision (tf32 would cost ~3e-4 relative error); 16-bit inputs use tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _load_rows(ptr, rows, P, sb, sp, sd, d, row_mask, d_mask):
    r = rows.to(tl.int64)
    offs = (r // P) * sb + (r % P) * sp
    mask = row_mask[:, None] & d_mask[None, :]
    return tl.load(ptr + offs[:, None] + d[None, :].to(tl.int64) * sd, mask=mask, other=0.0)


# Forward, one program per BLOCK_M rows, streaming key tiles in order (normalisation fused as scales: ŝ = rs s,
# k̂ = rk k, so the dot products read the raw inputs and no normalised copy exists):
#   a = ŝ k̂ᵀ/τ_s, b = t̂ k̂ᵀ/τ_t; online (m_s, l_s), (m_t, l_t) and acc = Σ_j e^{b_j - m_t} (b_j - a_j)
#   loss = acc / l_t - lse_t + lse_s.
# With WITH_GRAD, also the two attention-style outputs o_s = Σ_j e^{a_j - m_s} k̂_j and o_t (teacher), so
#   ds0 = (o_s / l_s - o_t / l_t) / τ_s = (q - p) k̂ / τ_s = dL/dŝ per unit upstream gradient.
@triton.jit
def _soft_contrastive_fwd_kernel(
    S, T, Kp, RS, RT, RK, Loss, LseS, LseT, DS,
    N, P, K, D,
    s_sb, s_sp, s_sd, t_sb, t_sp, t_sd, k_sk, k_sd,
    inv_tau_s, inv_tau_t,
    WITH_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    s = _load_rows(S, rows, P, s_sb, s_sp, s_sd, d, row_mask, d_mask)
    t = _load_rows(T, rows, P, t_sb, t_sp, t_sd, d, row_mask, d_mask)
    scale_s = tl.load(RS + rows, mask=row_mask, other=0.0) * inv_tau_s
    scale_t = tl.load(RT + rows, mask=row_mask, other=0.0) * inv_tau_t

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    o_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    o_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, K, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        k_mask = keys < K
        kt = tl.load(Kp + keys[None, :].to(tl.int64) * k_sk + d[:, None].to(tl.int64) * k_sd,
                     mask=k_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        rk = tl.load(RK + keys, mask=k_mask, other=0.0)
        a = tl.dot(s, kt, input_precision=PRECISION) * scale_s[:, None] * rk[None, :]
        b = tl.dot(t, kt, input_precision=PRECISION) * scale_t[:, None] * rk[None, :]
        # a finite sentinel: e^{-1e30 - m} is 0 and (b - a) stays 0 for masked keys, where -inf would give NaN
        a = tl.where(k_mask[None, :], a, -1e30)
        b = tl.where(k_mask[None, :], b, -1e30)

        m_s_new = tl.maximum(m_s, tl.max(a, axis=1))
        alpha = tl.exp(m_s - m_s_new)
        e_s = tl.exp(a - m_s_new[:, None])
        l_s = l_s * alpha + tl.sum(e_s, axis=1)
        m_s = m_s_new

        m_t_new = tl.maximum(m_t, tl.max(b, axis=1))
        beta = tl.exp(m_t - m_t_new)
        e_t = tl.exp(b - m_t_new[:, None])
        l_t = l_t * beta + tl.sum(e_t, axis=1)
        acc = acc * beta + tl.sum(e_t * (b - a), axis=1)
        m_t = m_t_new
        if WITH_GRAD:
            k_rows = tl.trans(kt)  # (BLOCK_N, BLOCK_D)
            o_s = o_s * alpha[:, None] + tl.dot((e_s * rk[None, :]).to(k_rows.dtype), k_rows,
                                                input_precision=PRECISION)
            o_t = o_t * beta[:, None] + tl.dot((e_t * rk[None, :]).to(k_rows.dtype), k_rows,
                                               input_precision=PRECISION)

    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    tl.store(Loss + rows, acc / l_t - lse_t + lse_s, mask=row_mask)
    tl.store(LseS + rows, lse_s, mask=row_mask)
    tl.store(LseT + rows, lse_t, mask=row_mask)
    if WITH_GRAD:
        ds = (o_s / l_s[:, None] - o_t / l_t[:, None]) * inv_tau_s
        tl.store(DS + rows[:, None].to(tl.int64) * D + d[None, :], ds, mask=row_mask[:, None] & d_mask[None, :])


# Key gradient, one program per BLOCK_N keys, streaming row tiles in order (deterministic, no atomics):
#   dL/dk̂_j = Σ_i g_i [ (q_ij - p_ij) ŝ_i / τ_s + p_ij (log p_ij - log q_ij - loss_i) t̂_i / τ_t ]
# with ŝ_i = rs_i s_i folded into the row weights of the two (BLOCK_N x BLOCK_M) @ (BLOCK_M x D) products.
@triton.jit
def _soft_contrastive_key_grad_kernel(
    S, T, Kp, RS, RT, RK, Loss, LseS, LseT, G, DK,
    N, P, K, D,
    s_sb, s_sp, s_sd, t_sb, t_sp, t_sd, k_sk, k_sd,
    inv_tau_s, inv_tau_t,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    keys = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = keys < K
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    kt = tl.load(Kp + keys[None, :].to(tl.int64) * k_sk + d[:, None].to(tl.int64) * k_sd,
                 mask=k_mask[None, :] & d_mask[:, None], other=0.0)
    rk = tl.load(RK + keys, mask=k_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i0 in range(0, N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        s = _load_rows(S, rows, P, s_sb, s_sp, s_sd, d, row_mask, d_mask)
        t = _load_rows(T, rows, P, t_sb, t_sp, t_sd, d, row_mask, d_mask)
        g = tl.load(G + rows, mask=row_mask, other=0.0)
        loss = tl.load(Loss + rows, mask=row_mask, other=0.0)
        lse_s = tl.load(LseS + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(LseT + rows, mask=row_mask, other=0.0)
        rs = tl.load(RS + rows, mask=row_mask, other=0.0)
        rt = tl.load(RT + rows, mask=row_mask, other=0.0)
        log_q = tl.dot(s, kt, input_precision=PRECISION) * (rs * inv_tau_s)[:, None] * rk[None, :] - lse_s[:, None]
        log_p = tl.dot(t, kt, input_precision=PRECISION) * (rt * inv_tau_t)[:, None] * rk[None, :] - lse_t[:, None]
        p = tl.exp(log_p)
        dz_s = (tl.exp(log_q) - p) * (g * rs * inv_tau_s)[:, None]
        dz_t = p * (log_p - log_q - loss[:, None]) * (g * rt * inv_tau_t)[:, None]
        dk += tl.dot(tl.trans(dz_s).to(s.dtype), s, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dz_t).to(t.dtype), t, input_precision=PRECISION)
    tl.store(DK + keys[:, None].to(tl.int64) * D + d[None, :], dk, mask=k_mask[:, None] & d_mask[None, :])


def _interpreter_safe(*xs):
    # Triton's CPU interpreter computes bf16 tl.dot wrongly (garbage, not rounding): there, and only there, bf16
    # inputs are read as fp32. On a GPU the bf16 tensor-core path runs and is checked by the CUDA tests.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and xs[0].dtype == torch.bfloat16:
        return tuple(x.float() for x in xs)
    return xs


def _common(s, t, k):
    B, P, D = s.shape
    return dict(N=B * P, P=P, K=k.shape[0], D=D,
                s_sb=s.stride(0), s_sp=s.stride(1), s_sd=s.stride(2),
                t_sb=t.stride(0), t_sp=t.stride(1), t_sd=t.stride(2),
                k_sk=k.stride(0), k_sd=k.stride(1),
                PRECISION=_dot_precision(s.dtype), BLOCK_D=max(16, triton.next_power_of_2(D)))


def soft_contrastive_forward(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) inverse norms -> loss, lse_s, lse_t (N,), ds0 (N, D).

    The contract of action_kernels/chunked/soft_contrastive.py; ds0 is empty when not with_grad.
    """
    s, t, k = _interpreter_safe(s, t, k)
    dims = _common(s, t, k)
    N, D = dims["N"], dims["D"]
    loss = torch.empty(N, dtype=torch.float32, device=s.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    ds0 = torch.empty((N, D) if with_grad else (0,), dtype=torch.float32, device=s.device)
    if N == 0:
        return loss, lse_s, lse_t, ds0
    blocks = _blocks(D)
    grid = (triton.cdiv(N, blocks["BLOCK_M"]),)
    _soft_contrastive_fwd_kernel[grid](
        s, t, k, rs, rt, rk, loss, lse_s, lse_t, ds0 if with_grad else loss, **dims,
        inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t, WITH_GRAD=with_grad, **blocks,
    )
    return loss, lse_s, lse_t, ds0


def soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, g):
    """dL/dk̂ (K, D) fp32 from the forward's loss, lse_s, lse_t (N,) and the upstream per-row gradient g (N,)."""
    s, t, k = _interpreter_safe(s, t, k)
    dims = _common(s, t, k)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    if dims["N"] == 0:
        return dk
    blocks = _blocks(dims["D"])
    grid = (triton.cdiv(dims["K"], blocks["BLOCK_N"]),)
    _soft_contrastive_key_grad_kernel[grid](
        s, t, k, rs, rt, rk, loss, lse_s, lse_t, g.float().contiguous(), dk, **dims,
        inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t, **blocks,
    )
    return dk

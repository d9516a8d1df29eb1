"""Triton kernel of the fused similarity + streaming hard-negative top-k (launcher only; autograd lives in ops/).

One program per BLOCK_M anchors streams key tiles of width BLOCK_N (a power of two >= KP, the next power of two
>= k): the tile's similarities are packed with their indices into int64 keys (value order, then lower index
first; masked candidates get INT64_MIN), reduced to the tile's top-KP, and merged with the running top-KP by
tl.topk over the joined (BLOCK_M, 2 KP) keys. Nothing N x K exists. Wide tiles mean fewer merges, which is also
what keeps Triton's interpreter (about 2 s per tl.topk) usable in tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from action_kernels.triton.soft_contrastive import _dot_precision, _interpreter_safe, _load_rows

BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4}
_NONE = -(2**63)


@triton.jit
def _ordered(v):
    u = v.to(tl.int32, bitcast=True)
    return tl.where(u < 0, u ^ 0x7FFFFFFF, u).to(tl.int64)


@triton.jit
def _unordered(u):
    u = tl.where(u < 0, u ^ 0x7FFFFFFF, u)
    return u.to(tl.float32, bitcast=True)


# sim_ij = (a_i·k_j) ra_i rk_j; candidate iff key_label_j != anchor_label_i and key_label_j != ignore;
# running top-KP of packed (ordered(sim) << 32) + (2^32 - 1 - j), merged per tile with tl.topk.
@triton.jit
def _topk_kernel(
    A, Kp, RA, RK, YA, YK, Values, Indices,
    N, P, K, D, k_out, ignore_label,
    a_sb, a_sp, a_sd, k_sk, k_sd,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    a = _load_rows(A, rows, P, a_sb, a_sp, a_sd, d, row_mask, d_mask)
    ra = tl.load(RA + rows, mask=row_mask, other=0.0)
    ya = tl.load(YA + rows, mask=row_mask, other=0)
    best = tl.full([BLOCK_M, KP], -(2**63), tl.int64)
    for j0 in range(0, K, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        k_mask = keys < K
        kt = tl.load(Kp + keys[None, :].to(tl.int64) * k_sk + d[:, None].to(tl.int64) * k_sd,
                     mask=k_mask[None, :] & d_mask[:, None], other=0.0)
        rk = tl.load(RK + keys, mask=k_mask, other=0.0)
        yk = tl.load(YK + keys, mask=k_mask, other=ignore_label)
        sim = tl.dot(a, kt, input_precision=PRECISION) * ra[:, None] * rk[None, :]
        ok = (yk[None, :] != ya[:, None]) & (yk[None, :] != ignore_label) & k_mask[None, :]
        packed = (_ordered(sim) << 32) + (4294967295 - keys.to(tl.int64))[None, :]
        packed = tl.where(ok, packed, -(2**63))
        if BLOCK_N > KP:
            packed = tl.topk(packed, KP, dim=1)
        both = tl.reshape(tl.join(best, packed), [BLOCK_M, 2 * KP])
        best = tl.topk(both, KP, dim=1)
    valid = best != -(2**63)
    idx = tl.where(valid, 4294967295 - (best & 0xFFFFFFFF), -1)
    val = tl.where(valid, _unordered((best >> 32).to(tl.int32)), float("-inf"))
    cols = tl.arange(0, KP)
    out = rows[:, None].to(tl.int64) * k_out + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < k_out)
    tl.store(Values + out, val, mask=mask)
    tl.store(Indices + out, idx, mask=mask)


def hard_negative_topk(anchors, anchor_labels, keys, key_labels, ra, rk, k: int, ignore_label: int):
    """anchors: (B, P, D) view, keys: (K, D), ra (N,), rk (K,), labels int64 -> values (N, k) fp32, indices (N, k)."""
    anchors, keys = _interpreter_safe(anchors, keys)
    B, P, D = anchors.shape
    N, K = B * P, keys.shape[0]
    values = torch.empty((N, k), dtype=torch.float32, device=anchors.device)
    indices = torch.empty((N, k), dtype=torch.int64, device=anchors.device)
    if N == 0:
        return values, indices
    KP = max(16, triton.next_power_of_2(k))
    blocks = dict(BLOCKS, BLOCK_N=max(KP, BLOCKS["BLOCK_N"]))
    if KP >= 256:  # the running (BLOCK_M, KP) int64 keys and their doubled merge buffer live in registers
        blocks["BLOCK_M"] = min(blocks["BLOCK_M"], 16)
    grid = (triton.cdiv(N, blocks["BLOCK_M"]),)
    _topk_kernel[grid](
        anchors, keys, ra.float().contiguous(), rk.float().contiguous(), anchor_labels.reshape(-1).contiguous(),
        key_labels.contiguous(), values, indices, N, P, K, D, k, ignore_label,
        anchors.stride(0), anchors.stride(1), anchors.stride(2), keys.stride(0), keys.stride(1),
        PRECISION=_dot_precision(anchors.dtype), KP=KP, BLOCK_D=max(16, triton.next_power_of_2(D)), **blocks,
    )
    return values, indices

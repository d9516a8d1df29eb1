"""CUDA (csrc/soft_contrastive.cu) launchers of the soft-label contrastive loss: Python allocates, C++ computes.

The kernels read bf16 / fp16 / fp32 rows and keys natively (no copies, any strides) and run on tensor cores: bf16
and fp16 on m16n8k16 mma with fp32 accumulation, fp32 on tf32 mma split three ways (about fp32 accuracy). Rows
and keys must share one dtype; the inverse norms and all outputs are fp32.
"""
from __future__ import annotations

import torch

from action_kernels._extension import Buffer, check_buffers
from action_kernels.cuda import launch_context, rows_arg
from action_kernels.cuda._operands import check_feature_size, check_soft_buffers, dtype_name, keys_arg, streamable


def _args(mod, s, t, k, scales, inv_tau_s, inv_tau_t):
    B, P, D = s.shape
    return dict(dtype=dtype_name(s, t, k), s=rows_arg(mod, s), t=rows_arg(mod, t), k=keys_arg(mod, k),
                scales=mod.Scales(*(x.data_ptr() for x in scales)), N=B * P, K=k.shape[0], D=D,
                inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t)


def _fp32(*xs):
    return tuple(x.float().contiguous() for x in xs)


def soft_contrastive_forward(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) inverse norms -> loss, lse_s, lse_t, pivot, pivot_r
    (N,), ds0 (N, D).

    The contract of dispatch.SoftContrastiveKernels; ds0 is empty when not with_grad.
    """
    check_feature_size("soft_contrastive_loss", s.shape[2])
    rs, rt, rk = _fp32(rs, rt, rk)
    B, P, D = s.shape
    loss = torch.empty(B * P, dtype=torch.float32, device=s.device)
    lse_s, lse_t, pivot_r = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
    pivot = torch.empty(B * P, dtype=torch.int32, device=s.device)
    ds0 = torch.empty((B * P, D) if with_grad else (0,), dtype=torch.float32, device=s.device)
    mod, stream, guard = launch_context(s.device)
    k = streamable(mod, k, dtype_name(s, t, k), keys=True)  # the row kernels stream the keys
    N, K = B * P, k.shape[0]
    check_soft_buffers("soft_contrastive_forward", s, t, k, dict(
        rs=(rs, (N,)), rt=(rt, (N,)), rk=(rk, (K,)), loss=(loss, (N,)), lse_s=(lse_s, (N,)), lse_t=(lse_t, (N,)),
        pivot_r=(pivot_r, (N,)), ds0=(ds0, (N, D) if with_grad else (0,))))
    check_buffers("soft_contrastive_forward", s.device, pivot=Buffer(pivot, (N,), torch.int32))
    args = _args(mod, s, t, k, (rs, rt, rk), inv_tau_s, inv_tau_t)
    with guard:
        mod.soft_contrastive_forward(**args, loss=loss.data_ptr(), lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(),
                                     pivot=pivot.data_ptr(), pivot_r=pivot_r.data_ptr(), stream=stream)
        if with_grad:
            mod.soft_contrastive_row_grad(**args, lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(),
                                          ds0=ds0.data_ptr(), stream=stream)
    return loss, lse_s, lse_t, pivot, pivot_r, ds0


def soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, pivot,
                              pivot_r, g):
    """dL/dk̂ (K, D) fp32 from the forward's loss, lse_s, lse_t, pivot, pivot_r (N,) and the upstream per-row
    gradient g (N,)."""
    check_feature_size("soft_contrastive_loss", s.shape[2])
    rs, rt, rk, g, loss, lse_s, lse_t, pivot_r = _fp32(rs, rt, rk, g, loss, lse_s, lse_t, pivot_r)
    pivot = pivot.to(torch.int32).contiguous()
    n_rows = s.shape[0] * s.shape[1]
    # the kernel writes every element when there are rows; with none, the gradient is zero
    dk = (torch.empty if n_rows else torch.zeros)(k.shape, dtype=torch.float32, device=k.device)
    mod, stream, guard = launch_context(s.device)
    name = dtype_name(s, t, k)
    s, t = streamable(mod, s, name), streamable(mod, t, name)  # the key-owned kernel streams the rows
    N, K = n_rows, k.shape[0]
    check_soft_buffers("soft_contrastive_key_grad", s, t, k, dict(
        rs=(rs, (N,)), rt=(rt, (N,)), rk=(rk, (K,)), loss=(loss, (N,)), lse_s=(lse_s, (N,)), lse_t=(lse_t, (N,)),
        pivot_r=(pivot_r, (N,)), g=(g, (N,)), dk=(dk, (K, k.shape[1]))))
    check_buffers("soft_contrastive_key_grad", s.device, pivot=Buffer(pivot, (N,), torch.int32))
    with guard:
        mod.soft_contrastive_key_grad(**_args(mod, s, t, k, (rs, rt, rk), inv_tau_s, inv_tau_t), loss=loss.data_ptr(),
                                      lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(), pivot=pivot.data_ptr(),
                                      pivot_r=pivot_r.data_ptr(), g=g.data_ptr(), dk=dk.data_ptr(), stream=stream)
    return dk

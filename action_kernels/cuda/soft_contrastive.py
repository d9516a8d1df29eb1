"""CUDA (csrc/soft_contrastive.cu) launchers of the soft-label contrastive loss: Python allocates, C++ computes.

The kernels are fp32 SIMT: 16-bit inputs are read after an upcast (an O(N D) copy, never O(N K)).
"""
from __future__ import annotations

import torch

from action_kernels.cuda import launch_context, rows_arg


def _args(mod, s, t, k, scales, inv_tau_s, inv_tau_t):
    B, P, D = s.shape
    return dict(s=rows_arg(mod, s), t=rows_arg(mod, t), k=k.data_ptr(), k_sk=k.stride(0), k_sd=k.stride(1),
                scales=mod.Scales(*(x.data_ptr() for x in scales)), N=B * P, K=k.shape[0], D=D,
                inv_tau_s=inv_tau_s, inv_tau_t=inv_tau_t)


def _fp32(*xs):
    return tuple(x.float().contiguous() if x.dim() == 1 else x.float() for x in xs)


def soft_contrastive_forward(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) inverse norms -> loss, lse_s, lse_t (N,), ds0 (N, D).

    The contract of action_kernels/chunked/soft_contrastive.py; ds0 is empty when not with_grad.
    """
    s, t, k, rs, rt, rk = _fp32(s, t, k, rs, rt, rk)
    B, P, D = s.shape
    loss = torch.empty(B * P, dtype=torch.float32, device=s.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    ds0 = torch.zeros((B * P, D) if with_grad else (0,), dtype=torch.float32, device=s.device)
    mod, stream, guard = launch_context(s.device)
    args = _args(mod, s, t, k, (rs, rt, rk), inv_tau_s, inv_tau_t)
    with guard:
        mod.soft_contrastive_forward(**args, loss=loss.data_ptr(), lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(),
                                     stream=stream)
        if with_grad:
            mod.soft_contrastive_row_grad(**args, lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(),
                                          ds0=ds0.data_ptr(), stream=stream)
    return loss, lse_s, lse_t, ds0


def soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, g):
    """dL/dk̂ (K, D) fp32 from the forward's loss, lse_s, lse_t (N,) and the upstream per-row gradient g (N,)."""
    s, t, k, rs, rt, rk, g = _fp32(s, t, k, rs, rt, rk, g)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    mod, stream, guard = launch_context(s.device)
    with guard:
        mod.soft_contrastive_key_grad(**_args(mod, s, t, k, (rs, rt, rk), inv_tau_s, inv_tau_t), loss=loss.data_ptr(),
                                      lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(), g=g.data_ptr(),
                                      dk=dk.data_ptr(), stream=stream)
    return dk

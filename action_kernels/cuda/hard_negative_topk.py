"""CUDA (csrc/hard_negative_topk.cu) launcher of the fused hard-negative top-k: Python allocates, C++ computes."""
from __future__ import annotations

import torch

from action_kernels.cuda import launch_context, rows_arg


def hard_negative_topk(anchors, anchor_labels, keys, key_labels, ra, rk, k: int, ignore_label: int):
    """anchors: (B, P, D) view, keys: (K, D), ra (N,), rk (K,), labels int64 -> values (N, k) fp32, indices (N, k)."""
    a, kf = anchors.float(), keys.float()
    B, P, D = a.shape
    N, K = B * P, kf.shape[0]
    values = torch.empty((N, k), dtype=torch.float32, device=a.device)
    indices = torch.empty((N, k), dtype=torch.int64, device=a.device)
    work = torch.empty((N, k), dtype=torch.int64, device=a.device)
    ra, rk = ra.float().contiguous(), rk.float().contiguous()
    ya, yk = anchor_labels.reshape(-1).contiguous(), key_labels.contiguous()
    mod, stream, guard = launch_context(a.device)
    with guard:
        mod.hard_negative_topk(a=rows_arg(mod, a), k=kf.data_ptr(), k_sk=kf.stride(0), k_sd=kf.stride(1),
                               ra=ra.data_ptr(), rk=rk.data_ptr(), ya=ya.data_ptr(), yk=yk.data_ptr(),
                               ignore_label=ignore_label, N=N, K=K, D=D, k_out=k, work=work.data_ptr(),
                               values=values.data_ptr(), indices=indices.data_ptr(), stream=stream)
    return values, indices

"""CUDA (csrc/hard_negative_topk.cu) launcher of the fused hard-negative top-k: Python allocates, C++ computes.

Anchors and keys are read natively in their dtype (bf16 / fp16 / fp32, any strides); similarities come from
tensor cores (fp32 through the 3xTF32 split), the selection from a per-row threshold and per-warp queues.
"""
from __future__ import annotations

import torch

from action_kernels._extension import Buffer, check_buffers
from action_kernels.cuda import launch_context, rows_arg
from action_kernels.cuda._operands import check_feature_size, dtype_name, keys_arg, streamable


def hard_negative_topk(anchors, anchor_labels, keys, key_labels, ra, rk, k: int, ignore_label: int):
    """anchors: (B, P, D) view, keys: (K, D), ra (N,), rk (K,), labels int64 -> values (N, k) fp32, indices (N, k)."""
    check_feature_size("hard_negative_topk", anchors.shape[2])
    B, P, D = anchors.shape
    N, K = B * P, keys.shape[0]
    if N == 0 or K == 0:  # no candidates at all: every row is padding, as on every other backend
        return (torch.full((N, k), float("-inf"), dtype=torch.float32, device=anchors.device),
                torch.full((N, k), -1, dtype=torch.int64, device=anchors.device))
    values = torch.empty((N, k), dtype=torch.float32, device=anchors.device)
    indices = torch.empty((N, k), dtype=torch.int64, device=anchors.device)
    ra, rk = ra.float().contiguous(), rk.float().contiguous()
    ya, yk = anchor_labels.reshape(-1).contiguous(), key_labels.contiguous()
    mod, stream, guard = launch_context(anchors.device)
    keys = streamable(mod, keys, dtype_name(anchors, keys), keys=True)  # streamed in the main loop
    f32, i64 = torch.float32, torch.int64
    check_buffers("hard_negative_topk", anchors.device, anchors=Buffer(anchors, (B, P, D), anchors.dtype, "strided"),
                  keys=Buffer(keys, (K, D), anchors.dtype, "strided"), ra=Buffer(ra, (N,), f32),
                  rk=Buffer(rk, (K,), f32), anchor_labels=Buffer(ya, (N,), i64), key_labels=Buffer(yk, (K,), i64),
                  values=Buffer(values, (N, k), f32), indices=Buffer(indices, (N, k), i64))
    with guard:
        mod.hard_negative_topk(dtype=dtype_name(anchors, keys), a=rows_arg(mod, anchors), k=keys_arg(mod, keys),
                               ra=ra.data_ptr(), rk=rk.data_ptr(), ya=ya.data_ptr(), yk=yk.data_ptr(),
                               ignore_label=ignore_label, N=N, K=K, D=D, k_out=k, values=values.data_ptr(),
                               indices=indices.data_ptr(), stream=stream)
    return values, indices

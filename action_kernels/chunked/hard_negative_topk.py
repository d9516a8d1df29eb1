"""Memory-bounded hard-negative top-k (the CPU path): row chunks of similarities, never the N x K matrix.

Per chunk of c rows: sim = â k̂ᵀ by a GEMM (c x K fp32), then per row the k best keys whose label differs from the
row's and is not the ignore label, ties to the lower index. On CPU the selection runs in csrc/cpu/topk_rows.cpp
(a size-k heap per row) when the host build is present; otherwise torch.topk over packed int64 keys
(value bits, then inverted index), which gives the same deterministic order.

Implements dispatch.HardNegativeTopkKernels (the backend contract), fp64 included.
"""
from __future__ import annotations

import torch

from action_kernels._extension import Buffer, check_buffers, host_module
from action_kernels._rows import work_dtype as _work_dtype
from action_kernels.chunked._chunking import row_chunks

USE_NATIVE = True
CHUNK_BYTES = 16 << 20  # the c x K similarity block (plus, on the torch path, its packed int64 copy)


def _native(x: torch.Tensor):
    if not USE_NATIVE or x.device.type != "cpu" or _work_dtype(x) != torch.float32:
        return None
    mod = host_module()
    return mod if mod is not None and hasattr(mod, "hard_negative_topk_rows_cpu") else None


def _ordered(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 with the same order (the float bits, magnitude flipped for negatives)."""
    u = v.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(u < 0, u ^ 0x7FFFFFFF, u)


def _select_torch(sim, ya, yk, ignore_label, k, values, indices):
    allowed = (ya[:, None] != yk[None, :]) & (yk[None, :] != ignore_label)
    K = sim.shape[1]
    packed = (_ordered(sim.float()) << 32) + (4294967295 - torch.arange(K, device=sim.device))
    packed = packed.masked_fill_(~allowed, torch.iinfo(torch.int64).min)
    kk = min(k, K)
    top = torch.topk(packed, kk, dim=1).values  # unique keys: the order is fully determined
    idx = 4294967295 - (top & 0xFFFFFFFF)
    valid = top != torch.iinfo(torch.int64).min
    values[:, :kk] = torch.where(valid, sim.gather(1, idx.clamp_max(K - 1)), float("-inf"))
    indices[:, :kk] = torch.where(valid, idx, -1)


def hard_negative_topk(anchors, anchor_labels, keys, key_labels, ra, rk, k: int, ignore_label: int):
    B, P, D = anchors.shape
    N, K = B * P, keys.shape[0]
    work = _work_dtype(anchors)
    k_t = (keys.to(work) * rk.to(work)[:, None]).T.contiguous()
    values = torch.full((N, k), float("-inf"), dtype=work, device=anchors.device)
    indices = torch.full((N, k), -1, dtype=torch.int64, device=anchors.device)
    if N == 0 or K == 0:  # no candidates at all: every row is padding, as on every other backend
        return values, indices
    ya, yk = anchor_labels.reshape(-1), key_labels.contiguous()
    native = _native(anchors)
    step = max(1, CHUNK_BYTES // ((4 if native is not None else 12) * K))
    for r0, ac in row_chunks(anchors, ra.to(work), step):
        r1 = r0 + ac.shape[0]
        sim = torch.mm(ac, k_t)
        if native is not None:
            rows_y, out_v, out_i = ya[r0:r1].contiguous(), values[r0:r1], indices[r0:r1]
            c, f32, i64 = r1 - r0, torch.float32, torch.int64
            check_buffers("hard_negative_topk_rows_cpu", anchors.device, sim=Buffer(sim, (c, K), f32),
                          row_labels=Buffer(rows_y, (c,), i64), key_labels=Buffer(yk, (K,), i64),
                          values=Buffer(out_v, (c, k), f32), indices=Buffer(out_i, (c, k), i64))
            native.hard_negative_topk_rows_cpu(sim.data_ptr(), r1 - r0, K, rows_y.data_ptr(), yk.data_ptr(),
                                               ignore_label, k, out_v.data_ptr(), out_i.data_ptr(),
                                               torch.get_num_threads())
        else:
            _select_torch(sim, ya[r0:r1], yk, ignore_label, k, values[r0:r1], indices[r0:r1])
    return values, indices

"""Row views, accumulation precision and the reduction of per-row losses: what every production path shares.

A row matrix (N, D) is its own view; a channel-first map (B, D, *spatial) is read as B row blocks of P =
prod(spatial) rows, row n = (b, p) = (n // P, n % P), without copying when the spatial dims collapse.
(reference.py keeps its own copies of these few lines on purpose: the ground truth shares no code with what it
checks.)
"""
from __future__ import annotations

import torch

from action_kernels._validation import RowLayout


def plain(x):
    """A tensor subclass (MONAI's MetaTensor, ...) as a plain torch.Tensor sharing its data; anything else as is."""
    if not isinstance(x, torch.Tensor) or type(x) is torch.Tensor:
        return x
    if hasattr(x, "as_tensor"):  # MetaTensor: drops the metadata without its per-op bookkeeping
        return x.as_tensor()
    with torch._C.DisableTorchFunctionSubclass():
        return x.as_subclass(torch.Tensor)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of every path: fp64 inputs stay fp64, everything else (fp32/fp16/bf16) runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D); (B, D, *spatial) -> (B * prod(spatial), D) in (b, *spatial) row order (a copy)."""
    if x.dim() == 2:
        return x
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


def as_row_view(x: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """(N, D) -> (1, N, D) view; (B, D, *spatial) -> (B, P, D) view (no copy when the spatial dims collapse)."""
    if not layout.spatial:
        return x.unsqueeze(0)
    return x.flatten(2).transpose(1, 2)


def reduce_rows(loss: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """loss: (N,) per-row, weight: (N,) or None -> () for "mean"/"sum", (N,) for "none".

    "mean" is the weighted mean sum(w l) / sum(w); with N = 0 or all weights zero it is 0 with zero gradients.
    """
    weighted = loss * weight.to(loss.dtype) if weight is not None else loss
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / max(loss.numel(), 1)
    return total / weight.sum().to(loss.dtype).clamp_min(torch.finfo(loss.dtype).tiny)

"""Row chunks of (B, P, D) views, the unit of work of every chunked kernel: c rows at a time against all keys."""
from __future__ import annotations

import torch

from action_kernels._rows import work_dtype


def row_chunks(x: torch.Tensor, scale: torch.Tensor, step: int):
    """Yields (row offset, scale ⊙ rows as (c <= step, D) in the work dtype) over the rows of a (B, P, D) view,
    in row order (b, then p): chunks never straddle two row blocks, so each is a strided view of x, read once."""
    B, P, _ = x.shape
    for b in range(B):
        for p0 in range(0, P, step):
            rows = x[b, p0:p0 + step].to(work_dtype(x))
            r0 = b * P + p0
            yield r0, rows * scale[r0:r0 + rows.shape[0], None]

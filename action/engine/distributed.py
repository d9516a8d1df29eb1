"""Multi-process training on torch.distributed (torchrun; NCCL on GPUs, gloo on CPU).

How a step is shared: every rank builds the same global batch t (a pure function of (seed, t)) and applies the
same global preparation (augmentation, teacher pseudo-labels, mixing across samples); the prepared batch is cut
into world x accumulate contiguous shards and rank r computes the losses of shards r*accumulate ... (r+1)*accumulate
- 1. Gradients are averaged over all shards (an all-reduce of flattened gradient buckets, what
DistributedDataParallel does, done explicitly because the ACTION stages call several sub-networks per step), and
what goes into memory banks and queues is all-gathered in shard order, so every rank holds identical weights,
teachers and banks. BatchNorm normalises with each shard's own statistics (SyncBatchNorm needs GPUs); its running
statistics are updated from the same starting values by every shard and then averaged over all shards (within a
process, then across ranks), so they too are identical everywhere. One process with accumulate = world x
accumulate therefore computes the same step: tests compare a 2-process gloo run with it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device_kind: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def average_gradients(parameters, bucket_mib: float = 25.0) -> None:
    """All-reduce (mean) the gradients of `parameters` in flattened buckets; parameters without a gradient on
    this rank contribute zeros (so every rank joins every collective)."""
    n = world()
    if n == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    limit = bucket_mib * 2**20

    def flush():
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= n
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    for p in params:
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= limit:
            flush()
            bucket, size = [], 0
    if bucket:
        flush()


def average_buffers(buffers) -> None:
    """All-reduce (mean) floating-point buffers (BatchNorm running statistics) so every rank keeps the same ones."""
    n = world()
    if n == 1:
        return
    floats = [b for b in buffers if b.is_floating_point()]
    if floats:
        flat = torch.cat([b.reshape(-1) for b in floats])
        dist.all_reduce(flat)
        flat /= n
        offset = 0
        for b in floats:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def mean_values(values: dict[str, float]) -> dict[str, float]:
    """Mean of per-rank scalars (for logging)."""
    n = world()
    if n == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / n).tolist()))


def gather_in_order(items: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    """items: (name, tensors) deferred by this rank's shards -> every rank's items, rank 0 first (banks and
    queues see the shards in global order)."""
    n = world()
    if n == 1:
        return items
    out = [None] * n
    dist.all_gather_object(out, [(name, tuple(t.cpu() for t in ts)) for name, ts in items])
    return [item for part in out for item in part]


def barrier() -> None:
    if world() > 1:
        dist.barrier()

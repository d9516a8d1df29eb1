"""Multi-process training on torch.distributed (torchrun; NCCL on GPUs, gloo on CPU) with DistributedDataParallel.

How a step is shared: every rank builds the same global batch t (a pure function of (seed, t)) and applies the
same global preparation (augmentation, teacher pseudo-labels, mixing across samples); the prepared batch is cut
into world x accumulate contiguous shards and rank r computes the losses of shards r*accumulate ... (r+1)*accumulate
- 1. The losses run inside DistributedDataParallel over one container module of the trained networks
(TrainedNetworks: the trainer's model, a UNet or the ACTION stages' ModuleDict of network and heads, whose forward
is the stage's compute_losses), so gradients are all-reduced in buckets while backward still runs (the last
shard's; the others accumulate under no_sync) and averaged over ranks. What goes into memory banks and queues is
all-gathered in shard order, so every rank holds identical weights, teachers and banks. BatchNorm normalises with
each shard's own statistics; its running statistics are updated from the same starting values by every shard and
then averaged over all shards (within a process, then across ranks: DDP's buffer broadcast is off), so they too
are identical everywhere, and one process with accumulate = world x accumulate computes the same step (tests
compare a 2-process gloo run with it). With sync_bn (CUDA only) BatchNorm normalises with the statistics of all
ranks' shards together (SyncBatchNorm): the step then equals one process with one shard per rank's share
(accumulate = the per-rank accumulate).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def init_from_env(device_kind: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when torchrun set WORLD_SIZE > 1: NCCL for
    CUDA runs, gloo on CPU, or $ACTION_DIST_BACKEND (e.g. gloo for ranks sharing one GPU, which NCCL refuses). A
    group the caller initialised itself (any world size) is used as it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = os.environ.get("ACTION_DIST_BACKEND") or ("nccl" if device_kind == "cuda" else "gloo")
        if backend == "nccl":  # NCCL's collectives (all_gather_object too) run on the current device
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend)
    if not initialized():
        return 0, 1, 0
    return dist.get_rank(), dist.get_world_size(), local_rank


def initialized() -> bool:
    """Whether a torch.distributed process group exists (then steps run under DistributedDataParallel)."""
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class TrainedNetworks(nn.Module):
    """The networks a trainer trains as one module (the trainer's `model`, registered, so DDP sees every parameter)
    whose forward(views, generator) is the trainer's compute_losses (so DDP prepares its gradient reduction for
    everything a step runs, several sub-networks and forwards included)."""

    def __init__(self, model: nn.Module, compute_losses):
        super().__init__()
        self.model = model
        self._compute_losses = compute_losses

    def forward(self, views: dict, generator: torch.Generator) -> dict:
        return self._compute_losses(views, generator)


def wrap(model: nn.Module, compute_losses, device: torch.device, sync_bn: bool = False) -> DDP:
    """DistributedDataParallel over TrainedNetworks(model, compute_losses): find_unused_parameters (the ACTION
    stages leave some heads or the decoder unused in a step), no buffer broadcast (BatchNorm statistics are averaged
    by average_buffers instead); with sync_bn, the model's BatchNorm layers become SyncBatchNorm first (in place:
    the same parameters, so the optimizer is unaffected)."""
    if sync_bn:
        if device.type != "cuda":
            raise ValueError(f"sync_bn: torch's SyncBatchNorm runs on CUDA tensors only, this run is on {device}; "
                             f"drop --sync-bn (each rank's shard then has its own BatchNorm statistics)")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return DDP(TrainedNetworks(model, compute_losses), device_ids=ids, broadcast_buffers=False,
               find_unused_parameters=True)


def shard(views: dict, index: int, count: int) -> dict:
    """The index-th of count contiguous shards of a step's views ("_l" keys by the labelled batch, "_u" keys by the
    unlabelled one, anything else whole)."""
    if count == 1:
        return views
    out = {}
    for key, value in views.items():
        if isinstance(value, torch.Tensor) and key.endswith(("_l", "_u")):
            n = value.shape[0] // count
            out[key] = value[index * n:(index + 1) * n]
        else:
            out[key] = value
    return out


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
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
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

"""What a run needs from its environment, checked before a process group is joined or any data is loaded, each miss a
one-line ValueError naming the option or variable and the fix (the config's own rules, such as stage iii's
unlabelled batch, are in TrainConfig.validate):

    ACTION_KERNELS_BACKEND   a forced kernel backend must run on the run's device (the ACTION stages call the fused
                             ops; the supervised stage calls none, so the variable does not concern it)
    ACTION_DIST_BACKEND      under torchrun (WORLD_SIZE > 1): a torch.distributed backend, and nccl only on CUDA
    sync_bn                  CUDA and several ranks (torchrun): SyncBatchNorm has nothing to synchronise otherwise
"""
from __future__ import annotations

import os

import torch

from action.config import PIPELINE


def check_requirements(cfg, device: torch.device) -> None:
    """Raises ValueError for the first requirement (module docstring) that `cfg` on `device` does not meet."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    forced = os.environ.get("ACTION_KERNELS_BACKEND", "").strip().lower()
    if forced and forced != "auto" and cfg.stage in (*PIPELINE, "pipeline"):
        from action_kernels import dispatch

        if forced not in dispatch.REGISTRY:
            raise ValueError(f"$ACTION_KERNELS_BACKEND={forced!r} is not a backend; expected one of "
                             f"{dispatch.BACKENDS} or auto (or unset it)")
        why = dispatch.unavailable_reason(forced, device, torch.float32)
        if why:
            raise ValueError(f"$ACTION_KERNELS_BACKEND={forced!r} cannot run on {device}: {why}; unset it (the "
                             f"automatic choice runs everywhere) or choose a backend for this device")
    chosen = os.environ.get("ACTION_DIST_BACKEND", "").strip().lower()
    if world > 1 and chosen:
        known = [b for b in ("gloo", "nccl", "mpi", "ucc") if b in torch.distributed.Backend.backend_list]
        if chosen not in known:
            raise ValueError(f"$ACTION_DIST_BACKEND={chosen!r} is not a torch.distributed backend of this torch; "
                             f"expected one of {known} (or unset it: nccl on CUDA, gloo on CPU)")
        if chosen == "nccl" and device.type != "cuda":
            raise ValueError(f"$ACTION_DIST_BACKEND='nccl' needs CUDA devices, this run is on {device}: use gloo "
                             f"(or unset it)")
    if cfg.sync_bn and (device.type != "cuda" or world == 1):
        raise ValueError(f"config sync_bn: SyncBatchNorm needs CUDA and several ranks under torchrun; this run has "
                         f"{world} process(es) on {device}: drop --sync-bn")

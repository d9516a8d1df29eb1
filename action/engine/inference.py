"""Inference on whole volumes: slice-wise 2D (resize each slice to the training size and back) and sliding-window
3D (overlapping patches, softmax averaged). Both return integer label volumes of the input's shape."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


@torch.no_grad()
def predict_slices(model, volume: torch.Tensor, size: tuple[int, int], batch: int = 16, device=None) -> torch.Tensor:
    """volume (Z, H, W) float -> labels (Z, H, W) int64. Each slice is resized to `size` (bilinear), segmented,
    and the label map resized back with nearest neighbour (the reference evaluation's convention)."""
    if volume.dim() != 3:
        raise ValueError(f"predict_slices needs a (Z, H, W) volume, got {tuple(volume.shape)}")
    device = device or next(model.parameters()).device
    Z, H, W = volume.shape
    out = torch.empty(Z, H, W, dtype=torch.long)
    for z0 in range(0, Z, batch):
        x = volume[z0:z0 + batch].to(device, torch.float32).unsqueeze(1)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        labels = model(x).argmax(1, keepdim=True).float()
        if tuple(labels.shape[-2:]) != (H, W):
            labels = F.interpolate(labels, size=(H, W), mode="nearest")
        out[z0:z0 + batch] = labels[:, 0].long().cpu()
    return out


def _starts(n: int, patch: int, stride: int) -> list[int]:
    if n <= patch:
        return [0]
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


@torch.no_grad()
def predict_sliding_window(model, volume: torch.Tensor, patch: tuple[int, int, int], num_classes: int,
                           stride: tuple[int, int, int] | None = None, batch: int = 2, device=None) -> torch.Tensor:
    """volume (Z, H, W) or (C, Z, H, W) -> labels (Z, H, W) int64: softmax of overlapping patches (stride default
    half the patch) averaged per voxel; a volume smaller than the patch is zero-padded and cropped back."""
    device = device or next(model.parameters()).device
    vol = volume.unsqueeze(0) if volume.dim() == 3 else volume
    if vol.dim() != 4 or len(patch) != 3:
        raise ValueError(f"need a (Z, H, W) or (C, Z, H, W) volume and a 3-element patch, got "
                         f"{tuple(volume.shape)} and {patch}")
    stride = stride or tuple(max(1, p // 2) for p in patch)
    shape = vol.shape[1:]
    pad = []
    for n, p in zip(reversed(shape), reversed(patch)):
        pad += [0, max(0, p - n)]
    vol = F.pad(vol.float(), pad)
    full = vol.shape[1:]
    probs = torch.zeros(num_classes, *full)
    count = torch.zeros(*full)
    corners = list(itertools.product(*[_starts(n, p, s) for n, p, s in zip(full, patch, stride)]))
    for i in range(0, len(corners), batch):
        group = corners[i:i + batch]
        x = torch.stack([vol[(slice(None),) + tuple(slice(c, c + p) for c, p in zip(cs, patch))] for cs in group])
        p_out = model(x.to(device)).float().softmax(1).cpu()
        for cs, p_one in zip(group, p_out):
            sl = tuple(slice(c, c + p) for c, p in zip(cs, patch))
            probs[(slice(None),) + sl] += p_one
            count[sl] += 1
    labels = (probs / count).argmax(0)
    return labels[:shape[0], :shape[1], :shape[2]]


@torch.no_grad()
def predict_volume_3d(model, volume: torch.Tensor, size: tuple[int, int], patch: tuple[int, int, int],
                      num_classes: int, device=None) -> torch.Tensor:
    """volume (Z, H, W) -> labels (Z, H, W): every slice resized in-plane to `size` (bilinear; the 3D training
    resolution), sliding-window 3D segmentation, labels resized back with nearest neighbour."""
    if volume.dim() != 3:
        raise ValueError(f"predict_volume_3d needs a (Z, H, W) volume, got {tuple(volume.shape)}")
    Z, H, W = volume.shape
    vol = volume.float()
    if (H, W) != tuple(size):
        vol = F.interpolate(vol[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    labels = predict_sliding_window(model, vol, patch, num_classes, device=device).float()
    if (H, W) != tuple(size):
        labels = F.interpolate(labels[:, None], size=(H, W), mode="nearest")[:, 0]
    return labels.long()


def volume_predictor(model, cfg, device=None):
    """case image (Z, H, W) -> labels (Z, H, W) as the config's training evaluates: slice-wise 2D at the training
    size, or sliding-window 3D over patches of cfg.patch at the training in-plane size."""
    size = (cfg.size, cfg.size)
    if cfg.dims == 2:
        return lambda image: predict_slices(model, image, size, device=device)
    return lambda image: predict_volume_3d(model, image, size, tuple(cfg.patch), cfg.num_classes, device=device)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches) -> torch.nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated as the plain average over `batches`
    (an iterable of input tensors (B, C, *S)), every other weight unchanged; the copy is returned in eval mode.

    Why: a network trained on augmented, mixed (labelled + cutmixed unlabelled) batches keeps running statistics
    of those batches; evaluated on clean images they can be far off (README, the stage iii diagnostics)."""
    import copy

    from torch.nn.modules.batchnorm import _BatchNorm

    net = copy.deepcopy(model).eval()
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return net
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    for x in batches:
        net(x)
        seen += 1
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: `batches` yielded no batch")
    for m in norms:
        m.eval()
    return net

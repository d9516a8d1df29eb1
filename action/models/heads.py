"""The heads ACTION puts on the segmentation network.

- ProjectionHead: global image embedding, bottleneck (B, C, *S) -> global average pool -> MLP -> (B, out_dim)
  (512-d in 2D, 128-d in 3D in the papers).
- PredictorHead: the student-only MLP on top of the projection, (B, d) -> (B, d).
- RepresentationHead: per-pixel embeddings for local distillation and anatomical contrast: the decoder's
  multi-scale features upsampled to the finest one, concatenated, then a 1x1 conv MLP -> (B, out_dim, *S).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    def __init__(self, in_channels: int, out_dim: int = 512, hidden: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.mlp(bottleneck.flatten(2).mean(2))


class PredictorHead(nn.Module):
    def __init__(self, dim: int = 512, hidden: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)


class RepresentationHead(nn.Module):
    """RepresentationHead(feature_channels=(128, 64, 32, 16), out_dim=512, dims=2): features is the decoder's list
    from coarse to fine (UNet.forward(..., return_features=True)[1])."""

    def __init__(self, feature_channels=(128, 64, 32, 16), out_dim: int = 512, hidden: int = 256, dims: int = 2):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.dims = dims
        self.mlp = nn.Sequential(conv(sum(feature_channels), hidden, 1), bn(hidden), nn.ReLU(inplace=True),
                                 conv(hidden, out_dim, 1))

    def forward(self, features: list[torch.Tensor], size=None) -> torch.Tensor:
        """-> (B, out_dim, *size); size defaults to the finest feature map's. Finer maps are average-pooled down
        to `size`, coarser ones interpolated up, so a coarse embedding grid costs only its own pixels."""
        size = tuple(size) if size is not None else tuple(features[-1].shape[2:])
        mode = "bilinear" if self.dims == 2 else "trilinear"
        pool = F.adaptive_avg_pool2d if self.dims == 2 else F.adaptive_avg_pool3d
        resized = []
        for f in features:
            if tuple(f.shape[2:]) == size:
                resized.append(f)
            elif all(a >= b for a, b in zip(f.shape[2:], size)):
                resized.append(pool(f, size))
            else:
                resized.append(F.interpolate(f, size=size, mode=mode, align_corners=False))
        return self.mlp(torch.cat(resized, dim=1))

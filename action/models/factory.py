"""The model factory: the segmentation network a config trains and evaluates."""
from __future__ import annotations

from torch import nn

from action.models.unet import UNet2D, UNet3D


def build_network(cfg) -> nn.Module:
    """The segmentation network of a config: UNet2D (dims 2) or UNet3D (dims 3, base_channels x 1, 2, 4, 8, 16), with
    cfg.in_channels input channels (None, as in configs written before it existed: 1)."""
    channels = getattr(cfg, "in_channels", None) or 1
    if cfg.dims == 2:
        return UNet2D(channels, cfg.num_classes)
    return UNet3D(channels, cfg.num_classes, channels=tuple(cfg.base_channels * m for m in (1, 2, 4, 8, 16)))

"""The UNet used by the ACTION papers' ACDC experiments (the common semi-supervised benchmark network), in 2D
(UNet2D, the papers' network) and 3D (UNet3D: the same design with 3D convolutions, for volumetric patches).

Encoder: five stages of (3x3 conv, BN, LeakyReLU, dropout, 3x3 conv, BN, LeakyReLU) with 16-32-64-128-256
channels, 2x2 max pooling between stages, dropout 0.05-0.1-0.2-0.3-0.5. Decoder: four stages of a 2x2 transposed
convolution, concatenation with the skip, and the same double convolution; a 3x3 output convolution.
forward(x) -> logits (B, C, *S); forward(x, return_features=True) -> (logits, [decoder features at 1/8, 1/4,
1/2, 1/1 resolution], bottleneck) for the ACTION heads (global pooling of the bottleneck, per-pixel features).
"""
from __future__ import annotations

import torch
from torch import nn

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


_LAYERS = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
           3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d)}


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dropout: float, dims: int = 2):
        conv, bn, _, _ = _LAYERS[dims]
        super().__init__(
            conv(cin, cout, 3, padding=1), bn(cout), nn.LeakyReLU(),
            nn.Dropout(dropout),
            conv(cout, cout, 3, padding=1), bn(cout), nn.LeakyReLU(),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, dims: int = 2):
        super().__init__()
        self.up = _LAYERS[dims][3](cin, cskip, 2, stride=2)
        self.conv = DoubleConv(2 * cskip, cout, 0.0, dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """UNet(in_channels, num_classes, dims=2|3). Every spatial size of the input must be a multiple of 16."""

    dims = 2

    def __init__(self, in_channels: int = 1, num_classes: int = 4, channels=CHANNELS, dropout=DROPOUT,
                 dims: int | None = None):
        super().__init__()
        self.dims = dims or type(self).dims
        if self.dims not in _LAYERS:
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError(f"channels and dropout must list 5 stages, got {len(channels)} and {len(dropout)}")
        conv, _, pool, _ = _LAYERS[self.dims]
        self.in_channels, self.num_classes, self.channels = in_channels, num_classes, tuple(channels)
        self.encoder = nn.ModuleList([DoubleConv(in_channels, channels[0], dropout[0], self.dims)] + [
            nn.Sequential(pool(2), DoubleConv(channels[i - 1], channels[i], dropout[i], self.dims))
            for i in range(1, 5)])
        self.decoder = nn.ModuleList([Up(channels[i], channels[i - 1], channels[i - 1], self.dims)
                                      for i in range(4, 0, -1)])
        self.head = conv(channels[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.dim() != 2 + self.dims or any(n % 16 for n in x.shape[2:]):
            axes = "(B, C, H, W)" if self.dims == 2 else "(B, C, D, H, W)"
            raise ValueError(f"{type(self).__name__} expects {axes} with spatial sizes multiples of 16, got "
                             f"{tuple(x.shape)}")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        bottleneck = x
        features = []
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
            features.append(x)
        logits = self.head(x)
        return (logits, features, bottleneck) if return_features else logits


class UNet2D(UNet):
    """The ACTION papers' 2D UNet: UNet2D(in_channels=1, num_classes=4); 1,944,324 parameters for 4 classes."""

    dims = 2


class UNet3D(UNet):
    """The same UNet with 3D convolutions, for volumetric patches (B, C, D, H, W), sizes multiples of 16."""

    dims = 3

"""The 2D UNet used by the ACTION papers' ACDC experiments (the common semi-supervised benchmark network).

Encoder: five stages of (3x3 conv, BN, LeakyReLU, dropout, 3x3 conv, BN, LeakyReLU) with 16-32-64-128-256
channels, 2x2 max pooling between stages, dropout 0.05-0.1-0.2-0.3-0.5. Decoder: four stages of a 2x2 transposed
convolution, concatenation with the skip, and the same double convolution; a 3x3 output convolution.
forward(x) -> logits (B, C, H, W); forward(x, return_features=True) -> (logits, [decoder features at 1/8, 1/4,
1/2, 1/1 resolution], bottleneck) for the ACTION heads (global pooling of the bottleneck, per-pixel features).
"""
from __future__ import annotations

import torch
from torch import nn

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cskip, 2, stride=2)
        self.conv = DoubleConv(2 * cskip, cout, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet2D(nn.Module):
    """UNet2D(in_channels=1, num_classes=4). Input height and width must be multiples of 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, channels=CHANNELS, dropout=DROPOUT):
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError(f"channels and dropout must list 5 stages, got {len(channels)} and {len(dropout)}")
        self.encoder = nn.ModuleList([DoubleConv(in_channels, channels[0], dropout[0])] + [
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(channels[i - 1], channels[i], dropout[i])) for i in range(1, 5)])
        self.decoder = nn.ModuleList([Up(channels[i], channels[i - 1], channels[i - 1]) for i in range(4, 0, -1)])
        self.head = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.dim() != 4 or x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"UNet2D expects (B, C, H, W) with H and W multiples of 16, got {tuple(x.shape)}")
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

"""The 2D UNet: shapes, multi-scale features, parameter count, bad input."""
import pytest
import torch

from action.models import UNet2D


def test_unet_shapes_and_multiscale_features():
    net = UNet2D(in_channels=1, num_classes=4).eval()
    x = torch.randn(2, 1, 64, 48)
    logits, feats, bottleneck = net(x, return_features=True)
    assert logits.shape == (2, 4, 64, 48)
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 8, 6), (64, 16, 12), (32, 32, 24), (16, 64, 48)]
    assert bottleneck.shape == (2, 256, 4, 3)
    assert torch.equal(net(x), logits)


def test_unet_parameter_count_is_that_of_the_reference_network():
    # the ACTION papers' 2D UNet has about 1.94 M parameters for 4 classes; this architecture has exactly 1,944,324
    count = sum(p.numel() for p in UNet2D(1, 4).parameters())
    assert count == 1_944_324


def test_unet_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet2D()(torch.randn(1, 1, 30, 32))

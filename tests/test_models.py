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


def test_unet3d_heads_and_ema_teacher():
    from action.models import EMATeacher, PredictorHead, ProjectionHead, RepresentationHead, UNet3D

    torch.manual_seed(0)
    net = UNet3D(1, 3, channels=(4, 8, 16, 32, 64))
    logits, feats, bottleneck = net(torch.randn(2, 1, 16, 32, 16), return_features=True)
    assert logits.shape == (2, 3, 16, 32, 16) and [f.shape[1] for f in feats] == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 1, 8, 32, 32))
    rep = RepresentationHead((32, 16, 8, 4), out_dim=24, dims=3)(feats)
    assert rep.shape == (2, 24, 16, 32, 16)
    z = ProjectionHead(64, out_dim=32, hidden=48)(bottleneck)
    assert z.shape == (2, 32) and PredictorHead(32, 16)(z).shape == (2, 32)

    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    teacher = EMATeacher(student, decay=0.9)
    teacher.train()
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.parameters())
    before = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(0.5)
    assert teacher.update(student, step=0) == 0.0  # warm-up: the first teacher is the student
    torch.testing.assert_close(teacher.module[0].weight, student[0].weight)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    alpha = teacher.update(student, step=100)
    assert alpha == 0.9
    torch.testing.assert_close(teacher.module[0].weight, 0.9 * (before + 1) + 0.1 * student[0].weight)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)

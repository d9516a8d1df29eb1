"""Volume inference: slice-wise 2D with resizing, sliding-window 3D with padding and overlap."""
import torch

from action.engine import predict_slices, predict_sliding_window
from helpers import sign_model


def test_sliding_window_equals_the_voxelwise_answer_with_overlap_and_padding():
    g = torch.Generator().manual_seed(0)
    for shape, patch in (((20, 37, 29), (8, 16, 16)), ((5, 9, 7), (8, 16, 16))):  # the second is smaller than a patch
        vol = torch.randn(*shape, generator=g)
        labels = predict_sliding_window(sign_model(3), vol, patch, num_classes=2, stride=(4, 8, 8))
        assert labels.shape == shape and torch.equal(labels, (vol < 0).long())


def test_predict_slices_resizes_and_returns_the_input_shape():
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(7, 32, 24, generator=g)
    same = predict_slices(sign_model(2), vol, size=(32, 24), batch=3)
    assert torch.equal(same, (vol < 0).long())
    blocky = torch.zeros(3, 40, 40)
    blocky[:, :20] = -1.0  # top half class 1
    resized = predict_slices(sign_model(2), blocky, size=(16, 16))
    assert resized.shape == (3, 40, 40) and torch.equal(resized, (blocky < 0).long())

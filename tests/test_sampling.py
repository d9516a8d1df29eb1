"""Batch sampling: stateless two-stream batches, epoch coverage, 3D patches."""
import pytest
import torch

from action.data.sampling import IndexStream, TwoStreamSampler, random_patches


def test_index_stream_covers_each_epoch_and_is_stateless():
    s = IndexStream(7, seed=3)
    first = s.take(0, 7)
    assert sorted(first.tolist()) == list(range(7))
    straddle = IndexStream(7, seed=3).take(5, 4)  # crosses into epoch 1 from a fresh object
    assert straddle[:2].tolist() == first[5:].tolist()
    assert torch.equal(IndexStream(7, seed=3).take(5, 4), straddle)
    assert not torch.equal(IndexStream(7, seed=4).take(0, 7), first)


def test_two_stream_batches_depend_only_on_seed_and_iteration():
    a = TwoStreamSampler(23, 100, 4, 6, seed=1)
    b = TwoStreamSampler(23, 100, 4, 6, seed=1)
    for t in (0, 5, 17, 5):
        la, ua = a.batch(t)
        lb, ub = b.batch(t)
        assert torch.equal(la, lb) and torch.equal(ua, ub) and len(la) == 4 and len(ua) == 6
    seen = torch.cat([a.batch(t)[0] for t in range(23)])  # 23 batches of 4 = 4 labelled epochs
    assert torch.bincount(seen, minlength=23).tolist() == [4] * 23
    with pytest.raises(ValueError, match="needs unlabelled images"):
        TwoStreamSampler(5, 0, 2, 2)
    assert len(TwoStreamSampler(5, 0, 2, 0).batch(3)[1]) == 0


def test_random_patches_pad_crop_and_centre_on_foreground():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(10, 40, 30)
    label = torch.zeros(10, 40, 30, dtype=torch.long)
    label[5, 20, 15] = 2
    imgs, labs = random_patches(image, label, (16, 16, 16), 6, g, foreground_p=1.0)
    assert imgs.shape == (6, 1, 16, 16, 16) and labs.shape == (6, 16, 16, 16)
    assert all(labs[i].max() == 2 for i in range(6))  # every patch holds the foreground voxel
    # patches are crops of the zero-padded volume: the image matches the label wherever the label is foreground
    imgs, labs = random_patches(image, (image > 0.5).long(), (16, 16, 16), 4, g, foreground_p=0.0)
    assert torch.equal(imgs[:, 0] > 0.5, labs == 1)
    with pytest.raises(ValueError, match="label shape"):
        random_patches(image, label[:5], (8, 8, 8), 1, g)

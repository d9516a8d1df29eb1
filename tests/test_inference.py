"""Volume inference: slice-wise 2D with resizing, sliding-window 3D with padding and overlap, probabilities."""
import pytest
import torch

from action.engine import predict_slices, predict_sliding_window
from helpers import ACDC, needs_acdc, sign_model


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


def test_gaussian_importance_follows_its_formula():
    import math

    from action.engine.inference import gaussian_importance

    patch = (8, 16, 12)
    w = gaussian_importance(patch, 0.125)
    assert w.shape == patch and float(w.max()) == 1.0 and float(w[4, 8, 6]) == 1.0  # centre p // 2
    for i in ((0, 0, 0), (3, 9, 11), (7, 15, 0), (4, 2, 6)):
        expected = math.prod(math.exp(-(c - p // 2) ** 2 / (2 * (p / 8) ** 2)) for c, p in zip(i, patch))
        assert abs(float(w[i]) - expected) < 1e-6 * max(expected, 1e-3)
    assert float(w.min()) > 0


def test_monai_gaussian_importance_equals_the_map_monai_computes():
    """MONAI 1.6.1's compute_importance_map(patch, mode="gaussian", sigma_scale=s) at chosen voxels (its numbers,
    fixed here: the live comparison is in the slow MONAI test below): centred between voxels for an even patch, no
    rescaling to 1, corners clamped at 1e-3 unless the minimum is larger."""
    from action.engine.inference import gaussian_importance, gaussian_importance_monai

    monai = {((8, 16, 12), 0.125): {(0, 0, 0): 0.0010000000474974513, (7, 15, 0): 0.0010000000474974513,
                                    (4, 2, 6): 0.01902872510254383, (3, 7, 5): 0.8091219663619995,
                                    (4, 8, 6): 0.8091219663619995},
             ((5, 4, 7), 0.125): {(0, 0, 0): 0.0010000000474974513, (1, 0, 2): 0.0016075223684310913,
                                  (2, 1, 3): 0.6065306663513184, (4, 3, 6): 0.0010000000474974513}}
    for (patch, sigma), values in monai.items():
        w = gaussian_importance_monai(patch, sigma)
        assert w.shape == patch and w.dtype == torch.float32
        for i, v in values.items():
            assert abs(float(w[i]) - v) <= 1e-6 * v, (patch, i, float(w[i]), v)
        assert float(w.max()) == max(values.values()) and float(w.min()) == 0.0010000000474974513
    wide = gaussian_importance_monai((6, 6, 6), 0.5)  # its minimum is above 1e-3: not clamped
    assert abs(float(wide.min()) - 0.3528660833835602) < 1e-7 and abs(float(wide.max()) - 0.9591894745826721) < 1e-7
    assert float((gaussian_importance((8, 16, 12)) - gaussian_importance_monai((8, 16, 12))).abs().max()) > 0.15
    with pytest.raises(ValueError, match="sigma_scale: expected > 0, got 0"):
        gaussian_importance_monai((4, 4, 4), 0)


def test_the_command_line_offers_exactly_the_engine_s_window_modes():
    from action.cli import WINDOW_MODES as CLI_MODES
    from action.engine.inference import WINDOW_MODES

    assert CLI_MODES == WINDOW_MODES


class _CallConstant(torch.nn.Module):
    """Probabilities that differ per call: call n outputs logits (0.1 n, 0) everywhere, so a blend shows its weights."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = []
        for _ in range(x.shape[0]):
            self.calls += 1
            out.append(torch.stack([torch.full(x.shape[2:], float(self.calls) * 0.1), torch.zeros(x.shape[2:])]))
        return torch.stack(out)


def test_gaussian_windows_blend_each_patch_by_its_weight_at_the_voxel():
    import pytest

    from action.engine.inference import gaussian_importance, gaussian_importance_monai, sliding_window_probabilities

    shape, patch, stride = (8, 24, 16), (8, 16, 16), (8, 8, 8)
    flat = sliding_window_probabilities(_CallConstant(), torch.zeros(shape), patch, 2, stride=stride, batch=1)
    both = (torch.sigmoid(torch.tensor(0.1)) + torch.sigmoid(torch.tensor(0.2))) / 2
    torch.testing.assert_close(flat[0, :, 8:16], torch.full((8, 8, 16), float(both)))  # equal weights: the mean
    blends = {}
    for mode, w in (("gaussian", gaussian_importance(patch)), ("gaussian-monai", gaussian_importance_monai(patch))):
        blend = sliding_window_probabilities(_CallConstant(), torch.zeros(shape), patch, 2, stride=stride, batch=1,
                                             mode=mode)
        num, den = torch.zeros(shape), torch.zeros(shape)  # windows at H = 0 and 8; call n: p0 = sigmoid(0.1 n)
        for n, h in enumerate((0, 8), start=1):
            num[:, h:h + 16] += w * torch.sigmoid(torch.tensor(0.1 * n))
            den[:, h:h + 16] += w
        torch.testing.assert_close(blend[0], num / den)
        assert not torch.allclose(blend[0, :, 8:16], flat[0, :, 8:16])
        blends[mode] = blend
    assert not torch.allclose(blends["gaussian"], blends["gaussian-monai"])  # the two owners' weights differ
    with pytest.raises(ValueError, match="expected one of .'constant', 'gaussian', 'gaussian-monai'."):
        sliding_window_probabilities(_CallConstant(), torch.zeros(shape), patch, 2, mode="cosine")


def test_flip_tta_equals_the_mean_of_the_flipped_predictions():
    from action.engine.inference import flip_sets, predict_sliding_window, probabilities

    g = torch.Generator().manual_seed(3)
    for dims in (2, 3):
        conv = (torch.nn.Conv2d, torch.nn.Conv3d)[dims - 2](1, 3, 3, padding=1)
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(2, 1, *(10,) * dims, generator=g)
        sets = flip_sets(dims)
        assert len(sets) == 2 ** dims and sets[0] == ()
        manual = sum(conv(x.flip(a) if a else x).softmax(1).flip(a) if a else conv(x).softmax(1) for a in sets) \
            / len(sets)
        torch.testing.assert_close(probabilities(conv, x, tta=True), manual.detach())
        assert not torch.allclose(probabilities(conv, x, tta=True), probabilities(conv, x))  # asymmetric kernels
    vol = torch.randn(16, 16, 16, generator=g)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    a = predict_sliding_window(conv, vol, (16, 16, 16), 3, tta=True)
    b = probabilities(conv, vol[None, None], tta=True)[0].argmax(0)
    assert torch.equal(a, b)  # one window: the TTA window is the TTA prediction
    conv2 = torch.nn.Conv2d(1, 3, 3, padding=1)
    slices = torch.randn(3, 16, 16, generator=g)
    assert torch.equal(predict_slices(conv2, slices, (16, 16), tta=True),
                       probabilities(conv2, slices[:, None], tta=True).argmax(1))


class _Recorder(torch.nn.Module):
    """The sign model (class 1 where the input is negative) that keeps every window it was given."""

    def __init__(self):
        super().__init__()
        self.net, self.seen = sign_model(3), []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.net(x)


def test_a_volume_thinner_than_the_patch_is_padded_centred_as_training_patches_are():
    from action.data.sampling import random_patches
    from action.engine.inference import sliding_window_probabilities

    g = torch.Generator().manual_seed(4)
    vol = torch.randn(3, 16, 16, generator=g) - 5.0  # 3 slices, patch depth 8: 2 zero slices before, 3 after
    model = _Recorder()
    probs = sliding_window_probabilities(model, vol, (8, 16, 16), 2)
    [window] = model.seen
    assert torch.equal(window[0, 0, 2:5], vol) and not window[0, 0, :2].any() and not window[0, 0, 5:].any()
    assert probs.shape == (2, 3, 16, 16) and torch.equal(probs.argmax(0), torch.ones(3, 16, 16, dtype=torch.long))
    [patch], _ = random_patches(vol, None, (8, 16, 16), 1, g)  # training pads the same way
    assert torch.equal(patch[0], window[0, 0])


def _random_net(dims: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    conv = (torch.nn.Conv2d, torch.nn.Conv3d)[dims - 2](1, classes, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return conv.eval()


@pytest.mark.slow  # importing MONAI takes seconds
def test_sliding_window_equals_monai_on_thin_and_large_volumes_constant_and_gaussian():
    """The live comparison with MONAI's sliding_window_inference (overlap 0.5 = a half-patch stride; MONAI averages
    what its predictor returns, here the softmax), when MONAI is installed."""
    pytest.importorskip("monai", reason="MONAI not installed (pip install monai)")
    from monai.data.utils import compute_importance_map
    from monai.inferers import sliding_window_inference

    from action.engine.inference import gaussian_importance_monai, sliding_window_probabilities

    g = torch.Generator().manual_seed(5)
    net, patch = _random_net(3, 3, 6), (8, 16, 16)
    for shape in ((3, 20, 24), (19, 37, 29)):
        vol = torch.randn(*shape, generator=g)
        for ours, theirs in (("constant", "constant"), ("gaussian-monai", "gaussian")):
            got = sliding_window_probabilities(net, vol, patch, 3, mode=ours)
            want = sliding_window_inference(vol[None, None], patch, 2, lambda x: net(x).softmax(1), overlap=0.5,
                                            mode=theirs, sigma_scale=0.125)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gaussian_importance_monai(patch),
                               compute_importance_map(patch, mode="gaussian", sigma_scale=0.125))


@needs_acdc
@pytest.mark.slow  # about 10 s: MONAI's import and a 16 x 96 x 96 UNet3D on one volume
def test_the_monai_agreement_tool_finds_full_agreement_on_a_thin_acdc_volume(capsys):
    pytest.importorskip("monai", reason="MONAI not installed (pip install monai)")
    from tools.monai_agreement import main

    assert main(["--data", ACDC, "--max-volumes", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("thinner than the patch: argmax agreement 100.000000%") == 2, out


def test_probabilities_are_resampled_like_the_labels_so_labels_are_their_argmax():
    from action.engine.inference import predict_at_spacing, predict_volume_3d

    g = torch.Generator().manual_seed(7)
    net2, net3 = _random_net(2, 3, 8), _random_net(3, 3, 9)
    vol = torch.randn(4, 30, 22, generator=g)
    probs = predict_slices(net2, vol, (16, 16), return_probabilities=True)
    assert probs.shape == (3, 4, 30, 22)
    torch.testing.assert_close(probs.sum(0), torch.ones(4, 30, 22))
    assert torch.equal(probs.argmax(0), predict_slices(net2, vol, (16, 16)))
    for dims, net in ((2, net2), (3, net3)):
        kw = dict(dims=dims, patch=(4, 16, 16), num_classes=3)
        p = predict_at_spacing(net, vol, (1.0, 1.3), (1.5, 1.5), return_probabilities=True, **kw)
        assert p.shape == (3, 4, 30, 22) and torch.equal(p.argmax(0), predict_at_spacing(net, vol, (1.0, 1.3),
                                                                                         (1.5, 1.5), **kw))
    p = predict_volume_3d(net3, vol, (16, 16), (4, 16, 16), 3, return_probabilities=True)
    assert p.shape == (3, 4, 30, 22) and torch.equal(p.argmax(0), predict_volume_3d(net3, vol, (16, 16), (4, 16, 16),
                                                                                    3))

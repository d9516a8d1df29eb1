"""The batched transforms compute only each sample's chosen branch (action.data.augment) and give, for the same
generator state, bitwise the outputs of the implementation they replaced, which computed every branch for every
sample and picked with torch.where. That implementation is kept below (copied as it was, renamed old_*) and both
run on random batches, 2D and 3D, one and two channels, square and not, with labels and confidences, over many
seeds and probabilities; the generator must also end in the same state (the same numbers drawn in the same order),
so a seeded training run draws exactly the batches it drew before."""
import math

import pytest
import torch
import torch.nn.functional as F

from action.data.augment import (
    Augment,
    AugmentConfig,
    flip_rot90,
    gaussian_blur,
    gaussian_noise,
    intensity,
    random_affine,
)


# -- the replaced implementation, as it was ----------------------------------------------------------------------------
def _uniform(shape, lo, hi, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(shape, generator=g, device=g.device) * (hi - lo) + lo).to(device)


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


def _check(image, label, confidence):
    pass


def old_flip_rot90(image, label=None, confidence=None, *, generator, flip_p=0.5, rot90=True):
    """Per sample: each spatial axis flipped with probability flip_p; a rotation by k*90 degrees in the last two
    axes, k uniform in {0, 1, 2, 3} (in {0, 2} when those axes differ in length). Exact (a permutation)."""
    _check(image, label, confidence)
    B, nd = image.shape[0], image.dim() - 2
    fields = [image] + [t.unsqueeze(1) if t is not None else None for t in (label, confidence)]
    flips = _uniform((B, nd), 0, 1, generator, image.device) < flip_p
    ks = torch.randint(0, 4, (B,), generator=generator, device=generator.device).to(image.device)
    square = image.shape[-1] == image.shape[-2]
    if not square:
        ks = (ks // 2) * 2
    out = []
    for t in fields:
        if t is None:
            out.append(None)
            continue
        for axis in range(nd):
            t = torch.where(_bcast(flips[:, axis], t), t.flip(2 + axis), t)
        if rot90:
            rotated = t
            for k in (1, 2, 3):
                if k % 2 and not square:
                    continue
                rotated = torch.where(_bcast(ks == k, t), torch.rot90(t, k, dims=(-2, -1)), rotated)
            t = rotated
        out.append(t)
    image, label, confidence = out
    return image, (label.squeeze(1) if label is not None else None), \
        (confidence.squeeze(1) if confidence is not None else None)


def old_random_affine(image, label=None, confidence=None, *, generator, p=0.5, degrees=15.0, scale=(0.9, 1.1),
                  translate=0.05):
    """Per sample with probability p: rotation in the last two axes by an angle in [-degrees, degrees], isotropic
    scaling in `scale`, translation up to `translate` of the extent per axis; one grid for all fields."""
    _check(image, label, confidence)
    B, nd, dev = image.shape[0], image.dim() - 2, image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    angle = _uniform((B,), -degrees, degrees, generator, dev) * math.pi / 180
    s = _uniform((B,), scale[0], scale[1], generator, dev)
    shift = _uniform((B, nd), -2 * translate, 2 * translate, generator, dev)  # grid units span 2 per axis
    theta = torch.zeros(B, nd, nd + 1, device=dev)
    for i in range(nd):
        theta[:, i, i] = 1.0
    c, si = torch.cos(angle) / s, torch.sin(angle) / s
    # grid coordinates are ordered (x=W, y=H[, z=D]); rotate in the (x, y) plane
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, -si, si, c
    if nd == 3:
        theta[:, 2, 2] = 1.0 / s
    theta[:, :, nd] = shift
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)

    def warp(t, mode):
        return torch.where(_bcast(apply, t), F.grid_sample(t, grid, mode=mode, padding_mode="zeros",
                                                             align_corners=False), t)

    image = warp(image, "bilinear")
    if label is not None:
        label = warp(label.unsqueeze(1).to(image.dtype), "nearest").squeeze(1).round().long()
    if confidence is not None:
        confidence = warp(confidence.unsqueeze(1), "nearest").squeeze(1)
    return image, label, confidence


def old_intensity(image, *, generator, p=0.8, brightness=0.1, contrast=(0.9, 1.1), gamma=(0.8, 1.25)):
    """Per sample with probability p: x -> ((x - m) * contrast + m) + brightness * range, then gamma on the sample's
    [min, max] range (m: the sample mean, range: max - min); each sample keeps its own intensity scale."""
    B, dev = image.shape[0], image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    b = _uniform((B,), -brightness, brightness, generator, dev)
    c = _uniform((B,), contrast[0], contrast[1], generator, dev)
    gam = torch.exp(_uniform((B,), math.log(gamma[0]), math.log(gamma[1]), generator, dev))
    flat = image.flatten(1)
    lo, hi, mean = flat.min(1).values, flat.max(1).values, flat.mean(1)
    rng = (hi - lo).clamp_min(1e-6)
    x = (image - _bcast(mean, image)) * _bcast(c, image) + _bcast(mean + b * rng, image)
    x01 = ((x - _bcast(lo, x)) / _bcast(rng, x)).clamp(0, 1)
    x = x01 ** _bcast(gam, x) * _bcast(rng, x) + _bcast(lo, x)
    return torch.where(_bcast(apply, image), x, image)


def old_gaussian_blur(image, *, generator, p=0.2, sigma=(0.1, 1.0)):
    """Per sample with probability p: a separable Gaussian blur with sigma (pixels) uniform in `sigma`."""
    B, C, dev = image.shape[0], image.shape[1], image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    sig = _uniform((B,), sigma[0], sigma[1], generator, dev)
    radius = max(1, math.ceil(3 * sigma[1]))
    offsets = torch.arange(-radius, radius + 1, device=dev, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sig[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, taps)
    nd = image.dim() - 2
    conv = (F.conv2d, F.conv3d)[nd - 2]
    x = image.reshape(1, B * C, *image.shape[2:])
    for axis in range(nd):
        shape = [B * C, 1] + [1] * nd
        shape[2 + axis] = kernel.shape[1]
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), kernel.view(shape), groups=B * C)
    return torch.where(_bcast(apply, image), x.view_as(image), image)


def old_gaussian_noise(image, *, generator, p=0.2, std=0.03):
    """Per sample with probability p: additive Gaussian noise of standard deviation std x the sample's range."""
    B, dev = image.shape[0], image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    flat = image.flatten(1)
    rng = (flat.max(1).values - flat.min(1).values).clamp_min(1e-6)
    noise = torch.randn(image.shape, generator=generator, device=generator.device).to(dev, image.dtype)
    return torch.where(_bcast(apply, image), image + noise * _bcast(std * rng, image), image)


def old_augment(config: AugmentConfig, image, label, confidence, generator):
    """Augment.__call__ of before, on the old transforms (cutout unchanged: it never computed unused branches)."""
    c = config
    if c.flip_p > 0 or c.rot90:
        image, label, confidence = old_flip_rot90(image, label, confidence, generator=generator, flip_p=c.flip_p,
                                                  rot90=c.rot90)
    if c.affine_p > 0:
        image, label, confidence = old_random_affine(image, label, confidence, generator=generator, p=c.affine_p,
                                                     degrees=c.degrees, scale=c.scale, translate=c.translate)
    if c.intensity_p > 0:
        image = old_intensity(image, generator=generator, p=c.intensity_p, brightness=c.brightness,
                              contrast=c.contrast, gamma=c.gamma)
    if c.blur_p > 0:
        image = old_gaussian_blur(image, generator=generator, p=c.blur_p, sigma=c.blur_sigma)
    if c.noise_p > 0:
        image = old_gaussian_noise(image, generator=generator, p=c.noise_p, std=c.noise_std)
    return image, label, confidence


# -- the comparison ----------------------------------------------------------------------------------------------------
SHAPES = [(8, 1, (32, 32)), (5, 2, (24, 40)), (3, 1, (20, 20)), (2, 1, (16, 32, 32)), (3, 2, (5, 12, 12)),
          (2, 1, (6, 10, 14))]


def batch(B, C, spatial, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, C, *spatial, generator=g) * 50 + 10
    label = torch.randint(0, 4, (B, *spatial), generator=g)
    label[torch.rand(B, *spatial, generator=g) < 0.05] = 255  # ignored pixels travel like any label
    confidence = torch.rand(B, *spatial, generator=g)
    return image, label, confidence


def same(new, old, what):
    for a, b, name in zip(new, old, ("image", "label", "confidence")):
        if a is None or b is None:
            assert a is None and b is None, (what, name)
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (what, name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(a, b), (what, name, (a != b).sum().item())


def generators(seed):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("B,C,spatial", SHAPES)
def test_each_transform_equals_the_old_every_branch_implementation_bitwise(B, C, spatial):
    for seed in range(12):
        image, label, confidence = batch(B, C, spatial, seed)
        p = (0.0, 0.2, 0.5, 0.8, 1.0)[seed % 5]
        with_fields = seed % 3 != 2  # now and then the image alone
        fields = (label, confidence) if with_fields else (None, None)
        g_new, g_old = generators(1000 + seed)
        same(flip_rot90(image, *fields, generator=g_new, flip_p=p, rot90=seed % 4 != 3),
             old_flip_rot90(image, *fields, generator=g_old, flip_p=p, rot90=seed % 4 != 3), f"flip_rot90 {seed}")
        same(random_affine(image, *fields, generator=g_new, p=p),
             old_random_affine(image, *fields, generator=g_old, p=p), f"random_affine {seed}")
        for name, new, old in (("intensity", intensity, old_intensity), ("blur", gaussian_blur, old_gaussian_blur),
                               ("noise", gaussian_noise, old_gaussian_noise)):
            a = new(image, generator=g_new, p=p)
            b = old(image, generator=g_old, p=p)
            assert torch.equal(a, b), (name, seed, p)
        # the same numbers were drawn in the same order
        assert torch.equal(torch.rand(4, generator=g_new), torch.rand(4, generator=g_old)), seed


@pytest.mark.parametrize("B,C,spatial", SHAPES)
def test_the_augment_chain_equals_the_old_one_bitwise(B, C, spatial):
    configs = [AugmentConfig(), AugmentConfig(blur_p=0.5, noise_p=0.5, affine_p=0.8),
               AugmentConfig(flip_p=0.0, rot90=False, affine_p=0.0, intensity_p=0.8, brightness=0.3,
                             contrast=(0.6, 1.4), gamma=(0.6, 1.6), blur_p=0.5, blur_sigma=(0.1, 1.5), noise_p=0.5,
                             noise_std=0.05)]  # the strong photometric view of stage iii
    for seed in range(6):
        image, label, confidence = batch(B, C, spatial, 50 + seed)
        config = configs[seed % len(configs)]
        g_new, g_old = generators(seed)
        same(Augment(config)(image, label, confidence, generator=g_new),
             old_augment(config, image, label, confidence, g_old), f"Augment {seed}")
        assert torch.equal(torch.rand(4, generator=g_new), torch.rand(4, generator=g_old)), seed


def test_a_transform_that_chooses_no_sample_returns_its_input_untouched():
    image, label, confidence = batch(4, 1, (16, 16), 0)
    g = torch.Generator().manual_seed(0)
    assert flip_rot90(image, label, confidence, generator=g, flip_p=0.0, rot90=False)[0] is image
    assert random_affine(image, label, confidence, generator=g, p=0.0)[1] is label
    for fn in (intensity, gaussian_blur, gaussian_noise):
        assert fn(image, generator=g, p=0.0) is image




def test_each_sample_is_permuted_once_and_only_chosen_samples_are_warped(monkeypatch):
    """flip_rot90 flips each sample once (its flips and rotation composed: nothing for a sample that keeps its
    orientation) and calls no rot90; grid_sample runs on the samples the affine chose. The old implementation
    flipped and rotated the whole batch once per axis and per k, and warped every sample."""
    seen = {"flipped": 0, "rot90": 0, "grid_sample": 0}
    flip, grid_sample = torch.Tensor.flip, F.grid_sample

    def counting_flip(t, *dims):
        seen["flipped"] += t.numel()
        return flip(t, *dims)

    def counting_grid_sample(t, grid, **kw):
        seen["grid_sample"] += t.shape[0]
        return grid_sample(t, grid, **kw)

    monkeypatch.setattr(torch.Tensor, "flip", counting_flip)
    monkeypatch.setattr(torch, "rot90", lambda *a, **k: seen.__setitem__("rot90", seen["rot90"] + 1))
    monkeypatch.setattr(F, "grid_sample", counting_grid_sample)
    image, label, confidence = batch(16, 1, (24, 24), 3)
    g = torch.Generator().manual_seed(5)
    flip_rot90(image, label, confidence, generator=g, flip_p=0.5)
    g = torch.Generator().manual_seed(5)
    flips, ks = torch.rand((16, 2), generator=g) < 0.5, torch.randint(0, 4, (16,), generator=g)
    moved = int((flips.any(1) | (ks != 0)).sum())  # a sample with no flip and k = 0 is not flipped
    assert seen["flipped"] <= 3 * moved * 24 * 24 and seen["rot90"] == 0  # at most once per field and sample
    chosen = torch.rand(16, generator=torch.Generator().manual_seed(9)) < 0.5
    random_affine(image, label, confidence, generator=torch.Generator().manual_seed(9), p=0.5)
    assert seen["grid_sample"] == 2 * int(chosen.sum())  # the image, then label and confidence together

"""Batched augmentation on tensors, on the training device, reproducible from one torch.Generator, applied jointly
to images, labels and (pseudo-label) confidences.

Shapes: image (B, C, *S) float, label (B, *S) int64, confidence (B, *S) float, with S = (H, W) or (D, H, W).
Every random number is drawn from the given generator (on its device, then moved), so the same generator state
gives the same batch on any run; per-sample parameters are drawn for every sample even when a transform is skipped
for it, so one sample's choices never shift another's. Only what a sample chose is computed: flips and rotations
per group of samples that chose them, warps and noise for the samples a transform applies to (intensity and blur
for the whole batch once any sample is chosen, so their rounding cannot depend on the batch's composition); a
transform that chooses no sample returns its input. The outputs equal, bit for bit, those of the implementation
that computed every branch for every sample (tests/test_augment_equivalence.py). Geometric transforms move image,
label and confidence together (bilinear for the image, nearest for label and confidence; pixels that come from
outside the image get image 0, label 0 and confidence 0); intensity transforms touch the image only; cutout marks
its box as `ignore_index` in the label and 0 in the confidence. No PIL, no 8-bit round trip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from action.data.labels import IGNORE_INDEX


def _uniform(shape, lo, hi, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(shape, generator=g, device=g.device) * (hi - lo) + lo).to(device)


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcasting against `like`."""
    return x.view(-1, *([1] * (like.dim() - 1)))


def _check(image, label, confidence):
    if image.dim() not in (4, 5) or not image.is_floating_point():
        raise ValueError(f"image must be a float (B, C, H, W) or (B, C, D, H, W) tensor, got "
                         f"{tuple(image.shape)} {image.dtype}")
    spatial = tuple(image.shape[2:])
    for name, t in (("label", label), ("confidence", confidence)):
        if t is not None and (tuple(t.shape) != (image.shape[0], *spatial) or t.device != image.device):
            raise ValueError(f"{name} must have shape (B, *spatial) = {(image.shape[0], *spatial)} on "
                             f"{image.device}, got {tuple(t.shape)} on {t.device}")
    if label is not None and label.dtype != torch.int64:
        raise ValueError(f"label must be int64, got {label.dtype}")


def _chosen(flags: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """flags (B,) bool -> (indices of the True samples, or None when there are none; whether all are True). One
    host sync: which samples a transform touches decides which tensors are computed at all."""
    idx = torch.nonzero(flags)[:, 0]
    n = int(idx.numel())
    return (idx if n else None), n == flags.numel()


def _on_chosen(t: torch.Tensor, idx: torch.Tensor | None, every: bool, fn) -> torch.Tensor:
    """fn applied to the samples idx of t (B, ...) only, the others passed through: t itself when idx is None,
    fn(t) when every sample is chosen. fn must treat each sample on its own (its result for a sample cannot
    depend on which other samples it sees), which makes this equal to torch.where(chosen, fn(t), t)."""
    if idx is None:
        return t
    if every:
        return fn(t)
    out = t.clone()
    out.index_copy_(0, idx, fn(t.index_select(0, idx)))
    return out


def flip_rot90(image, label=None, confidence=None, *, generator, flip_p=0.5, rot90=True):
    """Per sample: each spatial axis flipped with probability flip_p; a rotation by k*90 degrees in the last two
    axes, k uniform in {0, 1, 2, 3} (in {0, 2} when those axes differ in length). Exact (a permutation).

    Each sample's own flips and rotation only: a sample's flips and rotation are one flip of some axes and an
    optional swap of the last two (_flip_rot_plan), copied once into the output, whatever the choices."""
    _check(image, label, confidence)
    B, nd = image.shape[0], image.dim() - 2
    flips = _uniform((B, nd), 0, 1, generator, image.device) < flip_p
    ks = torch.randint(0, 4, (B,), generator=generator, device=generator.device).to(image.device)
    square = image.shape[-1] == image.shape[-2]
    if not square:
        ks = (ks // 2) * 2
    if not rot90:
        ks = torch.zeros_like(ks)
    plans = [_flip_rot_plan(nd, [a for a in range(nd) if f[a]], int(k)) for f, k in zip(flips.tolist(), ks.tolist())]
    if all(not axes and not swap for axes, swap in plans):  # nobody flipped or rotated
        return image, label, confidence

    def permute(t):  # t (B, C, *S): each sample copied once through its own flips (and axis swap)
        if t is None:
            return None
        if len({(tuple(axes), swap) for axes, swap in plans}) == 1:  # one plan for the whole batch
            axes, swap = plans[0]
            x = t.flip([2 + a for a in axes]) if axes else t
            return (x.transpose(-2, -1) if swap else x).contiguous()
        out = torch.empty_like(t)
        for b, (axes, swap) in enumerate(plans):
            x = t[b].flip([1 + a for a in axes]) if axes else t[b]
            out[b].copy_(x.transpose(-2, -1) if swap else x)
        return out

    return permute(image), *(None if t is None else permute(t.unsqueeze(1)).squeeze(1) for t in (label, confidence))


def _flip_rot_plan(nd: int, flipped: list[int], k: int) -> tuple[list[int], bool]:
    """The flips of spatial axes `flipped` followed by rot90 by k in the last two axes, as one flip of some axes and
    an optional swap of the last two (torch.rot90 by 1 is a flip of the last axis then the swap, by 2 a flip of
    both, by 3 a flip of the second-last then the swap) -> (axes to flip, swap)."""
    axes = set(flipped) ^ {0: set(), 1: {nd - 1}, 2: {nd - 2, nd - 1}, 3: {nd - 2}}[k % 4]
    return sorted(axes), k % 2 == 1


def random_affine(image, label=None, confidence=None, *, generator, p=0.5, degrees=15.0, scale=(0.9, 1.1),
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
    idx, every = _chosen(apply)
    if idx is None:
        return image, label, confidence
    chosen = theta if every else theta.index_select(0, idx)  # the grids of the chosen samples only
    grid = F.affine_grid(chosen, [chosen.shape[0], *image.shape[1:]], align_corners=False)

    def sample(t, mode):  # each sample is sampled on its own grid, whatever the others are
        return F.grid_sample(t, grid, mode=mode, padding_mode="zeros", align_corners=False)

    image_dtype = image.dtype
    image = _on_chosen(image, idx, every, lambda t: sample(t, "bilinear"))
    # nearest neighbour moves values without arithmetic: label (as the image's dtype, as it always was) and a
    # confidence of that dtype go through one sampling as two channels
    together = label is not None and confidence is not None and confidence.dtype == image_dtype
    if together:
        both = _on_chosen(torch.stack([label.to(image_dtype), confidence], 1), idx, every,
                          lambda t: sample(t, "nearest"))
        return image, both[:, 0].long(), both[:, 1]
    if label is not None:
        label = _on_chosen(label, idx, every,
                           lambda t: sample(t.unsqueeze(1).to(image_dtype), "nearest")[:, 0].long())
    if confidence is not None:
        confidence = _on_chosen(confidence, idx, every, lambda t: sample(t.unsqueeze(1), "nearest")[:, 0])
    return image, label, confidence


def intensity(image, *, generator, p=0.8, brightness=0.1, contrast=(0.9, 1.1), gamma=(0.8, 1.25)):
    """Per sample with probability p: x -> ((x - m) * contrast + m) + brightness * range, then gamma on the sample's
    [min, max] range (m: the sample mean, range: max - min); each sample keeps its own intensity scale."""
    B, dev = image.shape[0], image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    b = _uniform((B,), -brightness, brightness, generator, dev)
    c = _uniform((B,), contrast[0], contrast[1], generator, dev)
    gam = torch.exp(_uniform((B,), math.log(gamma[0]), math.log(gamma[1]), generator, dev))
    if not bool(apply.any()):
        return image
    # computed for every sample once any is chosen: pow's vectorised and scalar code paths may round the last
    # bit differently, and a subset of the batch would move which elements take which (p = 0.8: little to save)
    flat = image.flatten(1)
    lo, hi, mean = flat.min(1).values, flat.max(1).values, flat.mean(1)
    rng = (hi - lo).clamp_min(1e-6)
    x = (image - _bcast(mean, image)) * _bcast(c, image) + _bcast(mean + b * rng, image)
    x01 = ((x - _bcast(lo, x)) / _bcast(rng, x)).clamp(0, 1)
    x = x01 ** _bcast(gam, x) * _bcast(rng, x) + _bcast(lo, x)
    return torch.where(_bcast(apply, image), x, image)


def gaussian_blur(image, *, generator, p=0.2, sigma=(0.1, 1.0)):
    """Per sample with probability p: a separable Gaussian blur with sigma (pixels) uniform in `sigma`."""
    B, C, dev = image.shape[0], image.shape[1], image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    sig = _uniform((B,), sigma[0], sigma[1], generator, dev)
    radius = max(1, math.ceil(3 * sigma[1]))
    offsets = torch.arange(-radius, radius + 1, device=dev, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sig[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, taps)
    if not bool(apply.any()):
        return image
    # computed for every sample once any is chosen: a grouped convolution of fewer groups may take another
    # algorithm (one group does, on CPU) and round differently; blur is cheap beside the warps
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


def gaussian_noise(image, *, generator, p=0.2, std=0.03):
    """Per sample with probability p: additive Gaussian noise of standard deviation std x the sample's range."""
    B, dev = image.shape[0], image.device
    apply = _uniform((B,), 0, 1, generator, dev) < p
    flat = image.flatten(1)
    rng = (flat.max(1).values - flat.min(1).values).clamp_min(1e-6)
    noise = torch.randn(image.shape, generator=generator, device=generator.device).to(dev, image.dtype)
    idx, every = _chosen(apply)  # the noise is drawn for every sample (the generator moves as it always did)
    scale = _bcast(std * rng, image)
    if idx is not None and not every:
        noise, scale = noise.index_select(0, idx), scale.index_select(0, idx)
    return _on_chosen(image, idx, every, lambda t: t + noise * scale)


def _boxes(shape, generator, device, area):
    """A random box per sample covering a fraction of the extent drawn from `area` per axis -> bool (B, *S)."""
    B, spatial = shape[0], shape[2:]
    mask = torch.ones(B, *spatial, dtype=torch.bool, device=device)
    for axis, n in enumerate(spatial):
        frac = _uniform((B,), area[0], area[1], generator, device) ** (1.0 / len(spatial))
        length = (frac * n).round().clamp(1, n)
        start = (_uniform((B,), 0, 1, generator, device) * (n - length + 1)).floor()
        pos = torch.arange(n, device=device)[None]
        inside = (pos >= start[:, None]) & (pos < (start + length)[:, None])  # (B, n)
        view = [B] + [1] * len(spatial)
        view[1 + axis] = n
        mask = mask & inside.view(view)
    return mask


def cutout(image, label=None, confidence=None, *, generator, p=0.5, area=(0.02, 0.2), ignore_index=IGNORE_INDEX):
    """Per sample with probability p: a box (area fraction in `area`) set to 0 in the image, `ignore_index` in the
    label and 0 in the confidence."""
    _check(image, label, confidence)
    B = image.shape[0]
    apply = _uniform((B,), 0, 1, generator, image.device) < p
    box = _boxes(image.shape, generator, image.device, area) & _bcast(apply, image[:, 0])
    image = image.masked_fill(box.unsqueeze(1), 0.0)
    if label is not None:
        label = label.masked_fill(box, ignore_index)
    if confidence is not None:
        confidence = confidence.masked_fill(box, 0.0)
    return image, label, confidence


def _mix(mask, image, label, confidence, perm):
    image = torch.where(mask.unsqueeze(1), image[perm], image)
    label = torch.where(mask, label[perm], label) if label is not None else None
    confidence = torch.where(mask, confidence[perm], confidence) if confidence is not None else None
    return image, label, confidence


def partners(batch: int, generator: torch.Generator, device, pairing: str = "random") -> torch.Tensor:
    """(batch,) int64: the mixing partner of each sample. "random": a random permutation (a sample is its own
    partner with probability 1/batch); "derangement": a random cyclic order, each sample paired with the next, so
    no sample is its own partner (a batch of one is). Both draw one randperm from `generator`."""
    if pairing not in ("random", "derangement"):
        raise ValueError(f"pairing must be 'random' or 'derangement', got {pairing!r}")
    perm = torch.randperm(batch, generator=generator, device=generator.device).to(device)
    if pairing == "random":
        return perm
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(-1)
    return partner


def cutmix(image, label=None, confidence=None, *, generator, p=0.5, area=(0.1, 0.5), pairing="random"):
    """Per sample b with probability p: a box of sample perm[b] (perm: its partner, `partners(pairing)`) pasted
    into sample b, in image, label and confidence alike. Returns (image, label, confidence, mask, perm)."""
    _check(image, label, confidence)
    B, dev = image.shape[0], image.device
    perm = partners(B, generator, dev, pairing)
    apply = _uniform((B,), 0, 1, generator, dev) < p
    mask = _boxes(image.shape, generator, dev, area) & _bcast(apply, image[:, 0])
    return (*_mix(mask, image, label, confidence, perm), mask, perm)


def classmix(image, label, confidence=None, *, generator, num_classes: int, p=0.5):
    """Per sample b with probability p: the pixels of a random half of the classes of sample perm[b] (each class
    chosen with probability 1/2, by the partner's label) pasted into sample b. Needs labels (or pseudo-labels).
    Returns (image, label, confidence, mask, perm)."""
    _check(image, label, confidence)
    B, dev = image.shape[0], image.device
    perm = torch.randperm(B, generator=generator, device=generator.device).to(dev)
    apply = _uniform((B,), 0, 1, generator, dev) < p
    chosen = _uniform((B, num_classes + 1), 0, 1, generator, dev) < 0.5  # last column: ignore_index / out of range
    partner = label[perm].clamp(0, num_classes)
    mask = torch.gather(chosen, 1, partner.flatten(1)).view_as(label) & _bcast(apply, label)
    return (*_mix(mask, image, label, confidence, perm), mask, perm)


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the standard training augmentation (0 switches a transform off)."""

    flip_p: float = 0.5
    rot90: bool = True
    affine_p: float = 0.5
    degrees: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    intensity_p: float = 0.8
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.9, 1.1)
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_p: float = 0.2
    noise_std: float = 0.03
    cutout_p: float = 0.0
    cutout_area: tuple[float, float] = (0.02, 0.2)
    ignore_index: int = IGNORE_INDEX


# the strong view of stage iii's unlabelled images (FixMatch / UniMatch style: the student sees a strongly perturbed
# copy of what the teacher labelled): photometric only, so the pseudo-labels stay pixel-aligned; geometric fields
# off. Overridden by the strong_augmentation option.
STRONG_PHOTOMETRIC = {"flip_p": 0.0, "rot90": False, "affine_p": 0.0, "intensity_p": 0.8, "brightness": 0.3,
                      "contrast": (0.6, 1.4), "gamma": (0.6, 1.6), "blur_p": 0.5, "blur_sigma": (0.1, 1.5),
                      "noise_p": 0.5, "noise_std": 0.05}


class Augment:
    """augment(image, label=None, confidence=None, generator=g) -> (image, label, confidence): flips/rot90, small
    affine, intensity, blur, noise, cutout, in that order (mixing is separate: cutmix, classmix).
    Shapes: image (B, C, *S), label (B, *S) int64, confidence (B, *S)."""

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()

    def __call__(self, image, label=None, confidence=None, *, generator: torch.Generator):
        image, label, confidence = self.geometric(image, label, confidence, generator=generator)
        return self.photometric(image, label, confidence, generator=generator)

    def geometric(self, image, label=None, confidence=None, *, generator: torch.Generator):
        """Flips/rot90 and affine only (moves image, label, confidence together)."""
        c = self.config
        if c.flip_p > 0 or c.rot90:
            image, label, confidence = flip_rot90(image, label, confidence, generator=generator, flip_p=c.flip_p,
                                                  rot90=c.rot90)
        if c.affine_p > 0:
            image, label, confidence = random_affine(image, label, confidence, generator=generator, p=c.affine_p,
                                                     degrees=c.degrees, scale=c.scale, translate=c.translate)
        return image, label, confidence

    def photometric(self, image, label=None, confidence=None, *, generator: torch.Generator):
        """Intensity, blur, noise and cutout (pixels stay where they are: two views stay pixel-aligned)."""
        c = self.config
        if c.intensity_p > 0:
            image = intensity(image, generator=generator, p=c.intensity_p, brightness=c.brightness,
                              contrast=c.contrast, gamma=c.gamma)
        if c.blur_p > 0:
            image = gaussian_blur(image, generator=generator, p=c.blur_p, sigma=c.blur_sigma)
        if c.noise_p > 0:
            image = gaussian_noise(image, generator=generator, p=c.noise_p, std=c.noise_std)
        if c.cutout_p > 0:
            image, label, confidence = cutout(image, label, confidence, generator=generator, p=c.cutout_p,
                                              area=c.cutout_area, ignore_index=c.ignore_index)
        return image, label, confidence

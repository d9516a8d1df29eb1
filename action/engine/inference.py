"""Inference on whole volumes: slice-wise 2D (resize each slice to the training size and back, or resample it to the
training spacing and back) and sliding-window 3D (overlapping patches, softmax averaged with constant or Gaussian
weights), optionally with flip test-time augmentation. All return integer label volumes of the input's shape, or
with return_probabilities the softmax (K, *shape) resampled back as the labels are (nearest neighbour: labels =
its argmax). volume_predictor (a VolumePredictor) applies a checkpoint's preprocessing (action.data.preprocessing)
to every case first."""
from __future__ import annotations

import itertools
import math
import warnings

import torch
import torch.nn.functional as F

from action.data.preprocessing import Preprocessing, resampled_size, resize_inplane


def flip_sets(dims: int) -> list[tuple[int, ...]]:
    """Every subset of the last `dims` axes of a (B, C, *S) batch: the 2^dims mirrorings of flip test-time
    augmentation (nnU-Net's default: all axes), the identity first."""
    axes = tuple(range(2, 2 + dims))
    return [c for r in range(dims + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def probabilities(model, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """x (B, C, *S) -> softmax (B, K, *S) float32; with tta the mean of the softmax over every mirroring of the
    spatial axes (each input flipped, segmented, and its output flipped back)."""
    if not tta:
        return model(x).float().softmax(1)
    total = None
    sets = flip_sets(x.dim() - 2)
    for axes in sets:
        p = model(x.flip(axes) if axes else x).float().softmax(1)
        p = p.flip(axes) if axes else p
        total = p if total is None else total + p
    return total / len(sets)


def _resize_back(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, K, h, w) -> (N, K, *size) by nearest neighbour: the same voxel choice for a label map (K = 1) and for
    probabilities, so the argmax of resized probabilities equals the resized labels."""
    return scores if tuple(scores.shape[-2:]) == tuple(size) else F.interpolate(scores, size=size, mode="nearest")


@torch.no_grad()
def predict_slices(model, volume: torch.Tensor, size: tuple[int, int], batch: int = 16, device=None,
                   tta: bool = False, return_probabilities: bool = False) -> torch.Tensor:
    """volume (Z, H, W) or (C, Z, H, W) float -> labels (Z, H, W) int64. Each slice is resized to `size`
    (bilinear), segmented, and the label map resized back with nearest neighbour (the reference evaluation's
    convention); with tta the softmax is averaged over the 4 mirrorings of the slice first. return_probabilities:
    the softmax (K, Z, H, W) float32 instead, resized back with nearest neighbour as the labels are."""
    if volume.dim() not in (3, 4):
        raise ValueError(f"predict_slices needs a (Z, H, W) or (C, Z, H, W) volume, got {tuple(volume.shape)}")
    device = device or next(model.parameters()).device
    channels = volume if volume.dim() == 4 else volume[None]
    Z, H, W = channels.shape[1:]
    out = torch.empty(Z, H, W, dtype=torch.long)
    parts = []
    for z0 in range(0, Z, batch):
        x = channels[:, z0:z0 + batch].movedim(0, 1).to(device, torch.float32)  # (slices, C, H, W)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if return_probabilities:
            parts.append(_resize_back(probabilities(model, x, tta), (H, W)).cpu())
            continue
        scores = probabilities(model, x, tta) if tta else model(x)
        labels = _resize_back(scores.argmax(1, keepdim=True).float(), (H, W))
        out[z0:z0 + batch] = labels[:, 0].long().cpu()
    return torch.cat(parts).transpose(0, 1).contiguous() if return_probabilities else out


def _starts(n: int, patch: int, stride: int) -> list[int]:
    if n <= patch:
        return [0]
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """(*patch) weights w(i) = prod_d exp(-(i_d - c_d)^2 / (2 sigma_d^2)) with centre c_d = patch_d // 2 and
    sigma_d = sigma_scale * patch_d, scaled to a peak of 1: nnU-Net v2's compute_gaussian (its default sigma = 1/8
    of the patch; equal to it to float32 rounding); the smallest weight is about exp(-8) = 3.4e-4 at a corner,
    never 0. MONAI's Gaussian differs (gaussian_importance_monai)."""
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale: expected > 0, got {sigma_scale}")
    w = torch.ones(())
    for p in patch:
        i = torch.arange(p, dtype=torch.float64)
        w = w[..., None] * torch.exp(-((i - p // 2) ** 2) / (2 * (sigma_scale * p) ** 2))
    return (w / w.max()).float()


def gaussian_importance_monai(patch: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """(*patch) MONAI's compute_importance_map(mode="gaussian"): prod_d exp(-(i_d - (patch_d - 1) / 2)^2 /
    (2 sigma_d^2)) with sigma_d = sigma_scale * patch_d, centred between voxels for an even patch, not rescaled,
    then clamped below at max(its minimum, 1e-3) (so a corner weighs 1e-3, not exp(-8))."""
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale: expected > 0, got {sigma_scale}")
    w = torch.ones(())
    for p in patch:
        i = torch.arange(p, dtype=torch.float32) - (p - 1) / 2.0
        w = w[..., None] * torch.exp(i ** 2 / (-2 * (sigma_scale * p) ** 2))
    return w.float().clamp(min=max(float(w.min()), 1e-3))


WINDOW_MODES = ("constant", "gaussian", "gaussian-monai")


@torch.no_grad()
def sliding_window_probabilities(model, volume: torch.Tensor, patch: tuple[int, int, int], num_classes: int,
                                 stride: tuple[int, int, int] | None = None, batch: int = 2, device=None,
                                 mode: str = "constant", sigma_scale: float = 0.125,
                                 tta: bool = False) -> torch.Tensor:
    """volume (Z, H, W) or (C, Z, H, W) -> probabilities (K, Z, H, W): softmax of overlapping patches (stride
    default half the patch) averaged per voxel, with equal weights (mode "constant", MONAI's default) or Gaussian
    ones (sum_i w_i(v) p_i(v) / sum_i w_i(v), so a voxel counts most from the patches it is central in: mode
    "gaussian" with nnU-Net's weights, gaussian_importance, or "gaussian-monai" with MONAI's,
    gaussian_importance_monai); with tta each patch's softmax is the mean over its 8 mirrorings. A volume smaller
    than the patch along an axis is zero-padded centred on that axis (as training's random_patches and MONAI's
    sliding_window_inference pad: floor(d / 2) before, the rest after) and cropped back."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"sliding window mode: expected one of {WINDOW_MODES}, got {mode!r}")
    device = device or next(model.parameters()).device
    vol = volume.unsqueeze(0) if volume.dim() == 3 else volume
    if vol.dim() != 4 or len(patch) != 3:
        raise ValueError(f"need a (Z, H, W) or (C, Z, H, W) volume and a 3-element patch, got "
                         f"{tuple(volume.shape)} and {patch}")
    stride = stride or tuple(max(1, p // 2) for p in patch)
    shape = vol.shape[1:]
    before = [max(0, p - n) // 2 for n, p in zip(shape, patch)]
    pad = []
    for n, p, b in zip(reversed(shape), reversed(patch), reversed(before)):
        pad += [b, max(0, p - n) - b]
    vol = F.pad(vol.float(), pad)
    full = vol.shape[1:]
    probs = torch.zeros(num_classes, *full)
    count = torch.zeros(*full)
    importance = {"constant": None, "gaussian": gaussian_importance, "gaussian-monai": gaussian_importance_monai}
    weight = importance[mode](tuple(patch), sigma_scale) if importance[mode] else None
    corners = list(itertools.product(*[_starts(n, p, s) for n, p, s in zip(full, patch, stride)]))
    for i in range(0, len(corners), batch):
        group = corners[i:i + batch]
        x = torch.stack([vol[(slice(None),) + tuple(slice(c, c + p) for c, p in zip(cs, patch))] for cs in group])
        p_out = probabilities(model, x.to(device), tta).cpu()
        for cs, p_one in zip(group, p_out):
            sl = tuple(slice(c, c + p) for c, p in zip(cs, patch))
            if weight is None:
                probs[(slice(None),) + sl] += p_one
                count[sl] += 1
            else:
                probs[(slice(None),) + sl] += p_one * weight
                count[sl] += weight
    crop = tuple(slice(b, b + n) for b, n in zip(before, shape))
    return (probs / count)[(slice(None),) + crop]


def predict_sliding_window(model, volume: torch.Tensor, patch: tuple[int, int, int], num_classes: int,
                           stride: tuple[int, int, int] | None = None, batch: int = 2, device=None,
                           mode: str = "constant", sigma_scale: float = 0.125, tta: bool = False) -> torch.Tensor:
    """volume (Z, H, W) or (C, Z, H, W) -> labels (Z, H, W) int64: the argmax of sliding_window_probabilities."""
    return sliding_window_probabilities(model, volume, patch, num_classes, stride, batch, device, mode, sigma_scale,
                                        tta).argmax(0)


def _resize_volume_back(out: torch.Tensor, size: tuple[int, int], probabilities: bool) -> torch.Tensor:
    """labels (Z, h, w) or probabilities (K, Z, h, w) -> (Z, *size) / (K, Z, *size) by nearest neighbour."""
    if tuple(out.shape[-2:]) == tuple(size):
        return out
    if probabilities:
        return _resize_back(out.transpose(0, 1), size).transpose(0, 1).contiguous()
    return _resize_back(out.float()[:, None], size)[:, 0].long()


@torch.no_grad()
def predict_volume_3d(model, volume: torch.Tensor, size: tuple[int, int], patch: tuple[int, int, int],
                      num_classes: int, device=None, return_probabilities: bool = False, **window) -> torch.Tensor:
    """volume (Z, H, W) or (C, Z, H, W) -> labels (Z, H, W): every slice resized in-plane to `size` (bilinear; the
    3D training resolution), sliding-window 3D segmentation (`window`: mode, sigma_scale, tta of
    predict_sliding_window), labels resized back with nearest neighbour (return_probabilities: the softmax
    (K, Z, H, W), resized alike)."""
    if volume.dim() not in (3, 4):
        raise ValueError(f"predict_volume_3d needs a (Z, H, W) or (C, Z, H, W) volume, got {tuple(volume.shape)}")
    Z, H, W = volume.shape[-3:]
    vol = volume.float()
    if (H, W) != tuple(size):
        vol = resize_inplane(vol, size)
    probs = sliding_window_probabilities(model, vol, patch, num_classes, device=device, **window)
    return _resize_volume_back(probs if return_probabilities else probs.argmax(0), (H, W), return_probabilities)


@torch.no_grad()
def predict_at_spacing(model, volume: torch.Tensor, spacing_hw, target_hw, dims: int = 2, patch=None,
                       num_classes: int | None = None, device=None, tta: bool = False,
                       return_probabilities: bool = False, **window) -> torch.Tensor:
    """volume (Z, H, W) of in-plane spacing `spacing_hw` mm -> labels (Z, H, W): resampled in-plane (bilinear) to
    the training spacing `target_hw`, padded with its minimum to a multiple of 16 (2D: the UNet's input rule),
    segmented whole (2D: slice by slice; 3D: sliding window over `patch`), cropped, and the labels resampled back
    with nearest neighbour (return_probabilities: the softmax (K, Z, H, W), resampled alike). A (C, Z, H, W)
    volume's channels are padded each with its own minimum."""
    Z, H, W = volume.shape[-3:]
    h, w = resampled_size((H, W), spacing_hw, target_hw)
    vol = volume.float()
    if (h, w) != (H, W):
        vol = resize_inplane(vol, (h, w))
    if dims == 2:
        ph, pw = math.ceil(h / 16) * 16, math.ceil(w / 16) * 16
        pad = (0, pw - w, 0, ph - h)
        vol = F.pad(vol, pad, value=float(vol.min())) if vol.dim() == 3 else \
            torch.stack([F.pad(c, pad, value=float(c.min())) for c in vol])
        out = predict_slices(model, vol, (ph, pw), device=device, tta=tta,
                             return_probabilities=return_probabilities)[..., :h, :w]
    else:
        out = sliding_window_probabilities(model, vol, tuple(patch), num_classes, device=device, tta=tta, **window)
        out = out if return_probabilities else out.argmax(0)
    return _resize_volume_back(out, (H, W), return_probabilities)


class VolumePredictor:
    """A network with its run's config and preprocessing, as `action evaluate` / `predict` and validation run it:
    predictor(case) -> labels (Z, H, W) int64; predictor.predict(case, probabilities=True) -> (labels, softmax
    (K, Z, H, W) float32 on the case's grid, resampled back as the labels are, so labels = its argmax before
    postprocessing); `postprocess` (labels -> labels, e.g. action.engine.postprocess.largest_component) runs on
    every label map when set; `preprocessing` is the one applied."""

    def __init__(self, model, cfg, device=None, preprocessing: Preprocessing | None = None, mode: str = "constant",
                 tta: bool = False):
        if cfg.dims == 2 and mode != "constant":
            raise ValueError(f"sliding window mode {mode!r}: 2D models segment whole slices (no windows); use it "
                             f"with a 3D checkpoint")
        if mode not in WINDOW_MODES:
            raise ValueError(f"sliding window mode: expected one of {WINDOW_MODES}, got {mode!r}")
        self.model, self.cfg, self.device = model, cfg, device
        self.preprocessing = preprocessing or Preprocessing()
        self.window = {"mode": mode, "tta": tta}
        self.postprocess = None

    def _run(self, case, probabilities: bool) -> torch.Tensor:
        cfg, prep, window = self.cfg, self.preprocessing, self.window
        image = prep.normalise(case.image)
        prep.check_range(image, case.name, raw=case.image)
        if prep.spacing is not None:
            if case.spacing is not None:
                target_hw = (prep.spacing[1], prep.spacing[0])
                return predict_at_spacing(self.model, image, case.spacing[1:], target_hw, cfg.dims, tuple(cfg.patch),
                                          cfg.num_classes, self.device, return_probabilities=probabilities, **window)
            warnings.warn(f"{case.name}: no voxel spacing (HDF5 layout); the model was trained at "
                          f"{prep.spacing} mm: resizing slices to the training size instead", stacklevel=3)
        if cfg.dims == 2:
            return predict_slices(self.model, image, (cfg.size, cfg.size), device=self.device, tta=window["tta"],
                                  return_probabilities=probabilities)
        return predict_volume_3d(self.model, image, (cfg.size, cfg.size), tuple(cfg.patch), cfg.num_classes,
                                 device=self.device, return_probabilities=probabilities, **window)

    def predict(self, case, probabilities: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(labels (Z, H, W), softmax (K, Z, H, W) or None): with probabilities the labels are their argmax. A model
        guarded by action.engine.finite_weights.refuse_non_finite_outputs raises a ValueError naming the case."""
        from action.engine.finite_weights import NonFiniteOutput

        try:
            probs = self._run(case, True) if probabilities else None
            labels = probs.argmax(0) if probabilities else self._run(case, False)
        except NonFiniteOutput as exc:
            raise ValueError(f"case {case.name!r}: {exc}") from None
        return (labels if self.postprocess is None else self.postprocess(labels)), probs

    def __call__(self, case) -> torch.Tensor:
        return self.predict(case)[0]


def volume_predictor(model, cfg, device=None, preprocessing: Preprocessing | None = None, mode: str = "constant",
                     tta: bool = False) -> VolumePredictor:
    """case (action.data.cases.Case) -> labels (Z, H, W) as the config's training evaluates, after the training
    preprocessing (default: the HDF5 layout's): intensities normalised per volume (with InputRangeWarning for an
    input far from the training range), then slice-wise 2D or sliding-window 3D (`mode`: WINDOW_MODES weights) at
    the training size, or at the training spacing when the run had one and the case has a spacing; tta: flip
    test-time augmentation. A VolumePredictor: .predict(case, probabilities=True) gives the softmax too."""
    return VolumePredictor(model, cfg, device, preprocessing, mode, tta)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches) -> torch.nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated as the plain average over `batches`
    (an iterable of input tensors (B, C, *S)), every other weight unchanged; the copy is returned in eval mode.

    Why: a network trained on augmented, mixed (labelled + cutmixed unlabelled) batches keeps running statistics
    of those batches; evaluated on clean images they can be far off (benchmarks/RESULTS.md, the stage iii
    diagnostics)."""
    import copy

    from torch.nn.modules.batchnorm import _BatchNorm

    net = copy.deepcopy(model).eval()
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return net
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    for x in batches:
        net(x)
        seen += 1
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: `batches` yielded no batch")
    for m in norms:
        m.eval()
    return net

"""What a run did to its images before the network saw them, stored in every checkpoint so that inference does the
same to any input (`action evaluate` / `predict`, validation during training).

    intensity    "minmax" (per volume to [0, 1], the HDF5 layout's convention: its images are stored that way),
                 "zscore" (per volume (x - mean) / std, nnU-Net's default for non-CT images), "ct" (nnU-Net's
                 CTNormalization with the training set's foreground statistics: ct_statistics), "none"; each
                 channel of a multi-channel image on its own
    ct_statistics  per channel (lower, upper, mean, std) of the training cases' foreground voxels (ct_statistics()):
                 "ct" clips to [lower, upper] (the 0.5 and 99.5 percentiles), subtracts mean, divides by std
    ignore_label the label value the training data marked as unannotated (dataset.json's "ignore"), None: none;
                 inference maps it to IGNORE_INDEX in reference label maps, which no metric counts
    spacing      in-plane voxel size (x, y) in mm of the training slices in the training orientation; None: every
                 slice was resized to size x size whatever its spacing (the HDF5 layout stores none)
    orientation  axis codes of the training volumes' (x, y, z) arrays, e.g. "RAS"; inputs are reoriented to it
                 (flips and permutations only) and predictions turned back; slices are cut along z
    quantiles    the normalised training intensities at QUANTILE_LEVELS (empty: unknown, no range check)
    raw_quantiles  the training intensities before normalisation at QUANTILE_LEVELS (the intensity fingerprint of
                 the modality check; empty: unknown, written before it was stored)

An input whose normalised intensities are distributed far from the training images' (distribution_distance above
RANGE_WARNING) gets an InputRangeWarning naming it: an input in a scale that "none" does not normalise, or, when
the histograms differ that much, another modality (coarse: see RANGE_WARNING). The modality check (air_share):
a CT in Hounsfield units has air, voxels below AIR_HU (-500), in a sizeable share of its volume (36% of the CT
fixture), while MR and min-max normalised images have none (0% of the MR fixture; an MR's few interpolation
undershoots reach -47); an input with at least MODALITY_SHARE[1] of its voxels there fed to a model whose
training images had under MODALITY_SHARE[0], or the reverse, is warned about whatever the histogram distance.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

INTENSITY = ("minmax", "zscore", "ct", "none")
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)
# A chosen threshold on distribution_distance, from what was measured with this code against the (min-max
# normalised) ACDC training slices: the 60 ACDC val/test volumes reach at most 0.61 (median 0.20) against the 68
# labelled slices of 3 patients, 0.60 against all 1,312, 0.72 against the 8 of the smoke preset; the
# TotalSegmentator CT fixture (HU, min-max normalised) 0.92 / 1.09 / 0.77, its abdominal MR 0.58 / 0.77 / 0.41; an
# ACDC volume scaled by 1000 under intensity "none" about 900. So a wrong scale is always flagged, another modality
# only where the histograms differ clearly (the CT against 68 or more slices; not the MR).
RANGE_WARNING = 0.8
# the modality check: voxels below AIR_HU are air in a CT in Hounsfield units; one side with under 1% of its voxels
# there and the other with at least 10% are different modalities (a CT and an MR or a normalised image)
AIR_HU = -500.0
MODALITY_SHARE = (0.01, 0.10)
# what a checkpoint written before preprocessing was stored used: the HDF5 layout's convention
LEGACY = {"intensity": "minmax", "spacing": None, "orientation": "RAS", "quantiles": []}


class InputRangeWarning(UserWarning):
    """An inference input whose normalised intensities are far from the training images'."""


def normalise_intensity(volume: torch.Tensor, mode: str, statistics=None) -> torch.Tensor:
    """volume (*S) -> float32 (*S) normalised over the whole volume (computed in float64, so an input scaled by a
    constant normalises to the same values up to float32 rounding): minmax to [0, 1] (a constant volume -> 0),
    zscore to mean 0 and std 1 (a constant volume -> 0), ct with the dataset's statistics (lower, upper, mean,
    std): clip to [lower, upper], then (x - mean) / max(std, 1e-8) (nnU-Net's CTNormalization), none: unchanged."""
    if mode not in INTENSITY:
        raise ValueError(f"intensity: expected one of {INTENSITY}, got {mode!r}")
    if mode == "none":
        return volume.float()
    x = volume.double()
    if mode == "ct":
        if statistics is None or len(statistics) != 4:
            raise ValueError(f"intensity 'ct' needs the training foreground's (lower, upper, mean, std), got "
                             f"{statistics!r}")
        lower, upper, mean, std = (float(v) for v in statistics)
        return ((x.clamp(lower, upper) - mean) / max(std, 1e-8)).float()
    if mode == "minmax":
        lo, hi = x.min(), x.max()
        return ((x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)).float()
    mean, std = x.mean(), x.std(unbiased=False)
    return ((x - mean) / std if std > 0 else torch.zeros_like(x)).float()


def sample_values(values, limit: int = 1 << 20) -> np.ndarray:
    """At most `limit` values of a tensor, array or list of them, by a fixed stride (deterministic)."""
    if isinstance(values, (list, tuple)):
        flat = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in values])
    else:
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
    step = max(1, flat.size // limit)
    return flat[::step]


def intensity_quantiles(images) -> list[float]:
    """The values of normalised training images (a tensor or a list of tensors) at QUANTILE_LEVELS."""
    return [float(v) for v in np.quantile(sample_values(images), QUANTILE_LEVELS)]


def air_share(values=None, quantiles=None) -> float:
    """The share of voxels below AIR_HU, of `values` (any array or tensor) or read from training `quantiles` at
    QUANTILE_LEVELS (to their 1% resolution: the highest level whose value is below AIR_HU)."""
    if values is not None:
        return float((sample_values(values) < AIR_HU).mean())
    q = np.asarray(quantiles, dtype=np.float64)
    below = np.nonzero(q < AIR_HU)[0]
    return float(QUANTILE_LEVELS[below[-1]]) if below.size else 0.0


def distribution_distance(normalised, quantiles) -> float:
    """The Wasserstein-1 distance between the values of `normalised` and the distribution the training
    `quantiles` describe (the mean gap between their quantile functions at QUANTILE_LEVELS), in units of the
    training distribution's standard deviation (estimated from the same quantiles): 0 for the same distribution,
    scale-free, so one threshold serves every intensity mode."""
    q = np.asarray(quantiles, dtype=np.float64)
    mine = np.quantile(sample_values(normalised).astype(np.float64), QUANTILE_LEVELS)
    spread = max(float(q.std()), 1e-12)
    return float(np.abs(mine - q).mean() / spread)


# nnU-Net's dataset fingerprint samples 10^8 / cases foreground voxels per case (with replacement, seed 1234) so
# that every case weighs the same; fewer here (memory), drawn the same way
CT_SAMPLES_PER_CASE = 100_000


def ct_statistics(cases, samples: int = CT_SAMPLES_PER_CASE, seed: int = 1234) -> tuple:
    """cases: an iterable of (image (*S) or (C, *S), label (*S)) of the training cases, raw intensities -> per
    channel (lower, upper, mean, std): the 0.5 and 99.5 percentiles, mean and standard deviation of `samples`
    foreground voxels (label > 0, the ignore label excluded) drawn with replacement from every case (numpy's
    RandomState(seed) per case, as nnU-Net's fingerprint draws them), pooled over the cases."""
    from action.data.labels import IGNORE_INDEX

    pooled: list[list[np.ndarray]] = []
    for image, label in cases:
        image, label = np.asarray(image), np.asarray(label)
        channels = image[None] if image.ndim == label.ndim else image
        fg = (label > 0) & (label != IGNORE_INDEX)
        if not pooled:
            pooled = [[] for _ in channels]
        for c, channel in enumerate(channels):
            values = channel[fg]
            if values.size:
                pooled[c].append(np.random.RandomState(seed).choice(values, samples, replace=True))
    if not pooled or not pooled[0]:
        raise ValueError("intensity 'ct' needs foreground voxels (label > 0) in the labelled training cases; none "
                         "has any")
    out = []
    for chunks in pooled:
        v = np.concatenate(chunks).astype(np.float64)
        lower, upper = np.percentile(v, (0.5, 99.5))
        out.append((float(lower), float(upper), float(v.mean()), float(v.std())))
    return tuple(out)


@dataclass(frozen=True)
class Preprocessing:
    intensity: str = "minmax"
    spacing: tuple[float, float] | None = None
    orientation: str = "RAS"
    quantiles: tuple[float, ...] = ()
    ct_statistics: tuple[tuple[float, float, float, float], ...] = ()
    ignore_label: int | None = None
    raw_quantiles: tuple[float, ...] = ()

    def __post_init__(self):
        if self.intensity not in INTENSITY:
            raise ValueError(f"preprocessing intensity: expected one of {INTENSITY}, got {self.intensity!r}")
        if self.spacing is not None and (len(self.spacing) != 2 or min(self.spacing) <= 0):
            raise ValueError(f"preprocessing spacing: expected two positive in-plane sizes (x, y) in mm or None, got "
                             f"{self.spacing!r}")
        if self.intensity == "ct" and (not self.ct_statistics or any(len(s) != 4 for s in self.ct_statistics)):
            raise ValueError(f"preprocessing intensity 'ct' needs ct_statistics, one (lower, upper, mean, std) per "
                             f"channel, got {self.ct_statistics!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        d = json.loads(text)
        return cls(d["intensity"], None if d["spacing"] is None else tuple(d["spacing"]), d["orientation"],
                   tuple(d["quantiles"]), ct_statistics=tuple(tuple(s) for s in d.get("ct_statistics", ())),
                   ignore_label=d.get("ignore_label"), raw_quantiles=tuple(d.get("raw_quantiles", ())))

    def with_quantiles(self, quantiles, raw_quantiles=None) -> "Preprocessing":
        """A copy with the training intensity quantiles (and the raw ones when given)."""
        raw = self.raw_quantiles if raw_quantiles is None else tuple(raw_quantiles)
        return replace(self, quantiles=tuple(quantiles), raw_quantiles=raw)

    def normalise(self, volume: torch.Tensor) -> torch.Tensor:
        """volume (Z, H, W), or (C, Z, H, W) of several channels (each normalised on its own) -> float32."""
        stats = self.ct_statistics
        channels = 1 if volume.dim() != 4 else volume.shape[0]
        if stats and len(stats) != channels:
            raise ValueError(f"an input of {channels} channel(s) for a model trained on {len(stats)}")
        if volume.dim() != 4:
            return normalise_intensity(volume, self.intensity, stats[0] if stats else None)
        return torch.stack([normalise_intensity(v, self.intensity, stats[c] if stats else None)
                            for c, v in enumerate(volume)])

    def check_range(self, normalised: torch.Tensor, name: str, raw=None) -> float | None:
        """Warns (InputRangeWarning) when `normalised`'s intensities are distributed far from the training images',
        or when the input before normalisation (`raw`, when given) and the training images differ in modality
        (air_share: a CT in HU against a model trained without air, or the reverse); returns the distance (None
        when the training quantiles are unknown)."""
        if raw is not None and self.raw_quantiles:
            mine, trained = air_share(raw), air_share(quantiles=self.raw_quantiles)
            low, high = MODALITY_SHARE
            if (mine >= high and trained < low) or (trained >= high and mine < low):
                warnings.warn(f"{name}: {mine:.0%} of its voxels are below {AIR_HU:g} (air in a CT in Hounsfield "
                              f"units), {trained:.0%} of the training images' were: a different modality (CT "
                              f"against MR) than the model was trained on? The prediction may be wrong.",
                              InputRangeWarning, stacklevel=2)
        if not self.quantiles:
            return None
        distance = distribution_distance(normalised, self.quantiles)
        if distance > RANGE_WARNING:
            q = self.quantiles
            p = np.quantile(sample_values(normalised), [0.05, 0.5, 0.95])
            warnings.warn(f"{name}: intensities far outside the training range after {self.intensity} normalisation "
                          f"(distribution distance {distance:.2f} > {RANGE_WARNING}; 5/50/95th percentiles "
                          f"{p[0]:.3g}/{p[1]:.3g}/{p[2]:.3g}, training {q[5]:.3g}/{q[50]:.3g}/{q[95]:.3g}): a "
                          f"different modality or intensity scale than the model was trained on? The prediction "
                          f"may be wrong.", InputRangeWarning, stacklevel=2)
        return distance


def resize_inplane(volume: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(Z, H, W) or (C, Z, H, W) -> the same with every slice resized to `size` (bilinear), each channel alike."""
    x = volume if volume.dim() == 4 else volume[None]
    x = F.interpolate(x.movedim(0, 1), size=tuple(size), mode="bilinear", align_corners=False).movedim(1, 0)
    return x if volume.dim() == 4 else x[0]


def resampled_size(shape_hw: tuple[int, int], spacing_hw, target_hw) -> tuple[int, int]:
    """The in-plane size (h, w) of a slice of `shape_hw` voxels of `spacing_hw` mm resampled to `target_hw` mm."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape_hw, spacing_hw, target_hw))


def of_training_data(cfg, data) -> Preprocessing:
    """The preprocessing of a run's training images (action.data.training / nifti_training): a NIfTI set carries
    its own; the HDF5 layout's images are min-max normalised already, have no spacing and are taken as RAS (the
    orientation `action data convert` writes them in). Training quantiles from the labelled images."""
    prep = getattr(data, "preprocessing", None)
    if prep is not None:
        return prep
    if cfg.intensity != "minmax" or cfg.spacing is not None:
        raise ValueError(f"config intensity={cfg.intensity!r}, spacing={cfg.spacing!r}: the HDF5 layout's images are "
                         f"min-max normalised already and carry no spacing; use intensity 'minmax' and spacing None "
                         f"with it (or train on a NIfTI folder: action data convert)")
    quantiles = tuple(intensity_quantiles(data.images))  # stored normalised: the raw intensities are these
    return Preprocessing("minmax", None, "RAS", quantiles, raw_quantiles=quantiles)


def checkpoint_preprocessing(state: dict, path: str = "checkpoint") -> Preprocessing:
    """The preprocessing a checkpoint stores; for a checkpoint written before it was stored, the HDF5 layout's
    (LEGACY: min-max intensities, slices resized to the training size, RAS) with a warning that says so."""
    text = state.get("preprocessing")
    if text is None:
        warnings.warn(f"{path} stores no preprocessing (written before checkpoints kept it): assuming the HDF5 "
                      f"layout's: per-volume min-max intensities, slices resized to the training size, orientation "
                      f"RAS; no intensity range check", UserWarning, stacklevel=2)
        return Preprocessing.from_json(json.dumps(LEGACY))
    return Preprocessing.from_json(text)

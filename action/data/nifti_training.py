"""Training images from a NIfTI dataset folder (action.data.layouts: nnU-Net raw, images/labels pairs, raw ACDC),
with the preprocessing that inference repeats (action.data.preprocessing): every volume reoriented to the training
orientation (the most common one of its training cases), its intensities normalised per volume (cfg.intensity),
then in-plane either resampled to cfg.spacing mm (and, in 2D, centre-cropped or padded to size x size) or resized
to size x size (cfg.spacing None, as the HDF5 layout's slices are). NiftiSliceData and NiftiVolumeData hold what
SliceData and VolumeData hold (so batches, patches and BatchNorm re-estimation are theirs), plus the preprocessing
and the validation and test cases."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from action.data.hdf5_training import SliceData, VolumeData
from action.data.layouts import NiftiLayout
from action.data.preprocessing import (
    Preprocessing,
    ct_statistics,
    intensity_quantiles,
    resampled_size,
    resize_inplane,
    sample_values,
)


def training_spacing(spec: str | None, spacings: list[tuple[float, float]]) -> tuple[float, float] | None:
    """cfg.spacing -> in-plane (x, y) mm: None stays None (resize to size), "median" is the per-axis median of the
    training volumes' in-plane spacings, "x,y" (or one number for both) is taken as given."""
    if spec is None:
        return None
    if spec == "median":
        return tuple(float(v) for v in np.median(np.asarray(spacings), axis=0))
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"config spacing: expected 'median', 'x,y' or one size in mm (> 0), got {spec!r}")
    return tuple(values)


def _resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    """(Z, H, W) or (C, Z, H, W) image (bilinear) and (Z, H, W) label (nearest) -> (..., Z, *size)."""
    image = resize_inplane(image, size)
    if label is not None:
        label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return image, label


def centre_fit(image: torch.Tensor, label: torch.Tensor | None, size: int, fill: float | None = None):
    """(..., H, W) -> (..., size, size): centre-cropped where larger, padded where smaller with `fill` (None: the
    image's minimum, per channel of a (C, Z, H, W) image; label 0)."""
    if image.dim() == 4:  # channels: each padded with its own minimum
        image = torch.stack([centre_fit(c, None, size, fill)[0] for c in image])
        return image, (centre_fit(label, None, size, 0.0)[0] if label is not None else None)
    fill = float(image.min()) if fill is None else fill
    out = []
    for t, value in ((image, fill), (label, 0)):
        if t is None:
            out.append(None)
            continue
        for axis in (-2, -1):
            n = t.shape[axis]
            if n > size:
                start = (n - size) // 2
                t = t.narrow(axis, start, size)
            elif n < size:
                before = (size - n) // 2
                pad = [0, 0, 0, 0]
                pad[(-1 - axis) * 2:(-1 - axis) * 2 + 2] = [before, size - n - before]
                t = F.pad(t, pad, value=value)
        out.append(t.contiguous())
    return out[0], out[1]


class _NiftiData:
    """What both NIfTI training sets share: the layout's split, the preprocessing, loading one volume."""

    def _setup(self, cfg, need_unlabelled: bool):
        from action.data.image_io import read_geometry
        from action.data.labels import IGNORE_INDEX
        from action.data.nifti import axis_codes, reoriented_geometry

        self.cfg = cfg
        self.layout = NiftiLayout(cfg.data)
        names, ignore = self.layout.class_names, self.layout.spec.ignore_label
        if names is not None and len(names) != cfg.num_classes:
            raise ValueError(f"{cfg.data}/dataset.json lists {len(names)} classes {list(names)}"
                             + (f" (and the ignore label {ignore}, which is not a class)" if ignore is not None
                                else "") + f", the config's num_classes is {cfg.num_classes}: pass --num-classes "
                             f"{len(names)}")
        if ignore is not None and cfg.augmentation.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
            raise ValueError(f"config augmentation.ignore_index={cfg.augmentation['ignore_index']}: {cfg.data} has an "
                             f"ignore label, which is read as {IGNORE_INDEX}; leave ignore_index at {IGNORE_INDEX}")
        self.class_names, self.channels = names, self.layout.channels
        self.labelled_cases, unlabelled, val, test = self.layout.split(cfg.labelled_patients, cfg.fold,
                                                                        cfg.labelled_cases)
        self.layout.write_folds()  # nnU-Net's default folds, where the folder had none (the run names its split)
        self.unlabelled_cases = unlabelled if need_unlabelled else []
        if need_unlabelled and not unlabelled:
            raise ValueError(f"{cfg.data}: this run needs unlabelled images and the split leaves none (all "
                             f"training cases labelled: lower labelled_patients, or add images without labels)")
        self._named = {c.name: c for c in val + test}
        self.val_names, self.test_names = [c.name for c in val], [c.name for c in test]
        headers = [read_geometry(c.image) for c in self.labelled_cases + self.unlabelled_cases]
        orientation = Counter(axis_codes(affine) for affine, _ in headers).most_common(1)[0][0]
        spacings = [reoriented_geometry(affine, shape, orientation)[3][:2] for affine, shape in headers]
        self.spacing = training_spacing(cfg.spacing, spacings)
        stats = ()
        if cfg.intensity == "ct":  # nnU-Net's CTNormalization: statistics of the labelled training foreground
            stats = ct_statistics((c.image.numpy(), c.label.numpy()) for c in self._read(self.labelled_cases, True,
                                                                                          None))
        self._prep = Preprocessing(cfg.intensity, self.spacing, orientation, ct_statistics=stats,
                                   ignore_label=ignore)
        self._samples, self._raw_samples = [], []

    def _read(self, cases, with_label: bool, orientation):
        """Case records (action.data.cases) of layout cases, every channel, the ignore label mapped."""
        from action.data.cases import nifti_cases

        return nifti_cases([(c.name, c.images, c.label if with_label else None) for c in cases], orientation,
                           ignore_label=self.layout.spec.ignore_label)

    def _load(self, case, with_label: bool):
        """One training volume -> (image (Z, H, W) or (C, Z, H, W) normalised, label (Z, H, W) or None, resampled
        in-plane)."""
        from action.data.labels import IGNORE_INDEX

        [item] = self._read([case], with_label, self._prep.orientation)
        image = self._prep.normalise(item.image)
        if with_label:  # the training intensity distribution, of whole volumes as inference sees them
            self._samples.append(sample_values(image, 1 << 16))
            self._raw_samples.append(sample_values(item.image, 1 << 16))  # before normalisation: the modality check
        label = item.label
        if label is not None:
            valid = label[label != IGNORE_INDEX]
            if valid.numel() and (valid.min() < 0 or valid.max() >= self.cfg.num_classes):
                raise ValueError(f"{case.label}: labels must be in [0, {self.cfg.num_classes}), got "
                                 f"[{int(valid.min())}, {int(valid.max())}]; pass --num-classes")
        if self.spacing is None:
            return _resize(image, label, (self.cfg.size, self.cfg.size))
        target = resampled_size(tuple(image.shape[-2:]), item.spacing[1:], (self.spacing[1], self.spacing[0]))
        return _resize(image, label, target) if target != tuple(image.shape[-2:]) else (image, label)

    def cases(self, names):
        """The validation or test cases `names` (action.data.cases.Case, raw intensities, training orientation)."""
        from action.data.cases import nifti_cases

        return nifti_cases([(n, self._named[n].images, self._named[n].label) for n in names], self._prep.orientation,
                           self.cfg.num_classes, self.layout.spec.ignore_label)


class NiftiSliceData(_NiftiData, SliceData):
    """2D: the slices (along z of the training orientation) of the labelled cases as images (N_l, C, S, S) and
    labels (N_l, S, S), of the unlabelled ones as images (N_u, C, S, S); names <case>_slice_<z>."""

    def __init__(self, cfg, need_unlabelled: bool, progress: bool = True):
        from tqdm.auto import tqdm

        self._setup(cfg, need_unlabelled)
        parts = {"labelled": ([], [], []), "unlabelled": ([], [], [])}
        for kind, cases in (("labelled", self.labelled_cases), ("unlabelled", self.unlabelled_cases)):
            images, labels, names = parts[kind]
            for case in tqdm(cases, desc=f"{kind} volumes", disable=not progress, leave=False):
                image, label = self._load(case, kind == "labelled")
                if self.spacing is not None:
                    image, label = centre_fit(image, label, cfg.size)
                images.append(image[:, None] if image.dim() == 3 else image.movedim(0, 1))  # (Z, C, S, S)
                names += [f"{case.name}_slice_{z}" for z in range(image.shape[0])]
                if label is not None:
                    labels.append(label)
        limit = cfg.max_train_slices
        images, labels, names = parts["labelled"]
        self.images, self.labels, self.names = torch.cat(images)[:limit], torch.cat(labels)[:limit], names[:limit]
        self.unlabelled = torch.cat(parts["unlabelled"][0])[:limit] if self.unlabelled_cases else None
        self.preprocessing = self._prep.with_quantiles(intensity_quantiles(self._samples),
                                                       intensity_quantiles(self._raw_samples))


class NiftiVolumeData(_NiftiData, VolumeData):
    """3D: the cases as volumes (Z, H, W), or (C, Z, H, W), after the preprocessing (resampled in-plane, or resized
    to S x S);
    batches are random patches as VolumeData's."""

    def __init__(self, cfg, need_unlabelled: bool, progress: bool = True):
        self._setup(cfg, need_unlabelled)
        loaded = [self._load(c, True) for c in self.labelled_cases]
        self.images, self.labels = [i for i, _ in loaded], [lab for _, lab in loaded]
        self.names = [c.name for c in self.labelled_cases]
        self.unlabelled = [self._load(c, False)[0] for c in self.unlabelled_cases] if self.unlabelled_cases else None
        self.preprocessing = self._prep.with_quantiles(intensity_quantiles(self._samples),
                                                       intensity_quantiles(self._raw_samples))


def nifti_training_data(cfg, need_unlabelled: bool, progress: bool = True):
    """A run's training images from a NIfTI dataset folder: NiftiSliceData (2D) or NiftiVolumeData (3D)."""
    return (NiftiVolumeData if cfg.dims == 3 else NiftiSliceData)(cfg, need_unlabelled, progress)

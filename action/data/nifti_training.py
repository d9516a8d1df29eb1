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
    intensity_quantiles,
    normalise_intensity,
    resampled_size,
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
    """(Z, H, W) image (bilinear) and label (nearest) -> (Z, *size)."""
    image = F.interpolate(image[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if label is not None:
        label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return image, label


def centre_fit(image: torch.Tensor, label: torch.Tensor | None, size: int, fill: float):
    """(Z, H, W) -> (Z, size, size): centre-cropped where larger, padded with `fill` (label 0) where smaller."""
    out = []
    for t, value in ((image, fill), (label, 0)):
        if t is None:
            out.append(None)
            continue
        for axis in (1, 2):
            n = t.shape[axis]
            if n > size:
                start = (n - size) // 2
                t = t.narrow(axis, start, size)
            elif n < size:
                before = (size - n) // 2
                pad = [0, 0, 0, 0]
                pad[(2 - axis) * 2:(2 - axis) * 2 + 2] = [before, size - n - before]
                t = F.pad(t, pad, value=value)
        out.append(t.contiguous())
    return out[0], out[1]


class _NiftiData:
    """What both NIfTI training sets share: the layout's split, the preprocessing, loading one volume."""

    def _setup(self, cfg, need_unlabelled: bool):
        from action.data.nifti import axis_codes, load_header, reoriented_geometry

        self.cfg = cfg
        self.layout = NiftiLayout(cfg.data)
        names = self.layout.class_names
        if names is not None and len(names) != cfg.num_classes:
            raise ValueError(f"{cfg.data}/dataset.json lists {len(names)} labels {list(names)}, the config's "
                             f"num_classes is {cfg.num_classes}: pass --num-classes {len(names)}")
        self.class_names = names
        self.labelled_cases, unlabelled, val, test = self.layout.split(cfg.labelled_patients)
        self.unlabelled_cases = unlabelled if need_unlabelled else []
        if need_unlabelled and not unlabelled:
            raise ValueError(f"{cfg.data}: this run needs unlabelled images and the split leaves none (all "
                             f"training cases labelled: lower labelled_patients, or add images without labels)")
        self._named = {c.name: c for c in val + test}
        self.val_names, self.test_names = [c.name for c in val], [c.name for c in test]
        headers = [load_header(c.image) for c in self.labelled_cases + self.unlabelled_cases]  # errors name the file
        orientation = Counter(axis_codes(h.affine) for h in headers).most_common(1)[0][0]
        spacings = [reoriented_geometry(h.affine, h.shape, orientation)[3][:2] for h in headers]
        self.spacing = training_spacing(cfg.spacing, spacings)
        self._prep = Preprocessing(cfg.intensity, self.spacing, orientation)
        self._samples = []

    def _load(self, case, with_label: bool):
        """One training volume -> (image (Z, H, W) normalised, label (Z, H, W) or None, resampled in-plane)."""
        from action.data.cases import nifti_cases

        [item] = nifti_cases([(case.name, case.image, case.label if with_label else None)], self._prep.orientation)
        image = normalise_intensity(item.image, self._prep.intensity)
        if with_label:  # the training intensity distribution, of whole volumes as inference sees them
            self._samples.append(sample_values(image, 1 << 16))
        label = item.label
        if label is not None and (label.min() < 0 or label.max() >= self.cfg.num_classes):
            raise ValueError(f"{case.label}: labels must be in [0, {self.cfg.num_classes}), got [{int(label.min())}, "
                             f"{int(label.max())}]; pass --num-classes")
        if self.spacing is None:
            return _resize(image, label, (self.cfg.size, self.cfg.size))
        target = resampled_size(tuple(image.shape[1:]), item.spacing[1:], (self.spacing[1], self.spacing[0]))
        return _resize(image, label, target) if target != tuple(image.shape[1:]) else (image, label)

    def cases(self, names):
        """The validation or test cases `names` (action.data.cases.Case, raw intensities, training orientation)."""
        from action.data.cases import nifti_cases

        return nifti_cases([(n, self._named[n].image, self._named[n].label) for n in names], self._prep.orientation,
                           self.cfg.num_classes)


class NiftiSliceData(_NiftiData, SliceData):
    """2D: the slices (along z of the training orientation) of the labelled cases as images (N_l, 1, S, S) and
    labels (N_l, S, S), of the unlabelled ones as images (N_u, 1, S, S); names <case>_slice_<z>."""

    def __init__(self, cfg, need_unlabelled: bool, progress: bool = True):
        from tqdm.auto import tqdm

        self._setup(cfg, need_unlabelled)
        parts = {"labelled": ([], [], []), "unlabelled": ([], [], [])}
        for kind, cases in (("labelled", self.labelled_cases), ("unlabelled", self.unlabelled_cases)):
            images, labels, names = parts[kind]
            for case in tqdm(cases, desc=f"{kind} volumes", disable=not progress, leave=False):
                image, label = self._load(case, kind == "labelled")
                if self.spacing is not None:
                    image, label = centre_fit(image, label, cfg.size, float(image.min()))
                images.append(image[:, None])
                names += [f"{case.name}_slice_{z}" for z in range(image.shape[0])]
                if label is not None:
                    labels.append(label)
        limit = cfg.max_train_slices
        images, labels, names = parts["labelled"]
        self.images, self.labels, self.names = torch.cat(images)[:limit], torch.cat(labels)[:limit], names[:limit]
        self.unlabelled = torch.cat(parts["unlabelled"][0])[:limit] if self.unlabelled_cases else None
        self.preprocessing = self._prep.with_quantiles(intensity_quantiles(self._samples))


class NiftiVolumeData(_NiftiData, VolumeData):
    """3D: the cases as volumes (Z, H, W) after the preprocessing (resampled in-plane, or resized to S x S);
    batches are random patches as VolumeData's."""

    def __init__(self, cfg, need_unlabelled: bool, progress: bool = True):
        self._setup(cfg, need_unlabelled)
        loaded = [self._load(c, True) for c in self.labelled_cases]
        self.images, self.labels = [i for i, _ in loaded], [lab for _, lab in loaded]
        self.names = [c.name for c in self.labelled_cases]
        self.unlabelled = [self._load(c, False)[0] for c in self.unlabelled_cases] if self.unlabelled_cases else None
        self.preprocessing = self._prep.with_quantiles(intensity_quantiles(self._samples))


def nifti_training_data(cfg, need_unlabelled: bool, progress: bool = True):
    """A run's training images from a NIfTI dataset folder: NiftiSliceData (2D) or NiftiVolumeData (3D)."""
    return (NiftiVolumeData if cfg.dims == 3 else NiftiSliceData)(cfg, need_unlabelled, progress)

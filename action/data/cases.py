"""Whole volumes for validation, evaluation and prediction, as Case records from any layout.

A case is (name, image (Z, H, W) float with raw intensities, label (Z, H, W) int64 or None, spacing (3,) in
(Z, H, W) order or None, the source Volume and the reorientation that took it to the training orientation).
Cases come from the ACDC HDF5 layout (images already min-max normalised, no spacing stored: metrics in voxel
units, the reference tables' convention) or from NIfTI (reoriented to the training orientation, spacing from the
header; predictions are turned back and written with the source's header).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Case:
    name: str
    image: torch.Tensor  # (Z, H, W), or (C, Z, H, W) for several input channels
    label: torch.Tensor | None = None  # (Z, H, W)
    spacing: tuple[float, float, float] | None = None  # (Z, H, W) order, mm
    reference: object | None = None  # action.data.nifti.Volume of the source image, for writing predictions
    reorientation: object | None = None  # action.data.nifti.Reorientation from the source to the training axes

    def to_source(self, prediction: torch.Tensor) -> np.ndarray:
        """prediction (Z, H, W) in the case's axes -> an (X, Y, Z) array in the source image's axes (HDF5 cases:
        (W, H, Z))."""
        data = prediction.numpy().transpose(2, 1, 0)
        return data if self.reorientation is None else self.reorientation.undo(data)


def acdc_cases(root: str, names: list[str], num_classes: int | None = None):
    """Cases of the ACDC HDF5 layout (volumes named in val.list / test.list); labels checked against
    [0, num_classes) when given (the error names the file)."""
    from action.data.acdc import CLASSES, AcdcVolumes

    volumes = AcdcVolumes(root, names, num_classes or len(CLASSES))
    for i in range(len(volumes)):
        item = volumes[i]
        yield Case(item["name"], item["image"], item["label"])


def unique_case_names(names: list[str], paths: list[str]) -> None:
    """Two inputs with one case name (c.nii and c.nii.gz, or one file name in two folders) would write one
    prediction over the other: an error naming them all, before anything runs."""
    seen: dict[str, list[str]] = {}
    for name, path in zip(names, paths):
        seen.setdefault(name, []).append(path)
    clashes = {n: p for n, p in seen.items() if len(p) > 1}
    if clashes:
        listed = "; ".join(f"{n!r}: {', '.join(p)}" for n, p in sorted(clashes.items()))
        raise ValueError(f"{len(clashes)} output name(s) shared by several inputs ({listed}); each would write "
                         f"predictions/<name>.nii.gz over the other: rename or remove the duplicates")


def nifti_cases(items, orientation: str | None = None, num_classes: int | None = None,
                ignore_label: int | None = None):
    """Cases from image files (NIfTI, or other formats through SimpleITK: action.data.image_io): items are (image
    path, label path or None) or (name, image path, label path or None), an image path being one file or a tuple
    of one file per channel (nnU-Net's `_0000`, `_0001`, ...: the case's image is then (C, Z, H, W)). With
    `orientation` (axis codes, e.g. the training orientation "RAS") every volume is first reoriented to it (flips
    and permutations, exact); the (X, Y, Z) arrays are then moved to (Z, Y, X) for slice-wise inference.
    Predictions go back through Case.to_source. Images must be finite, channels of one shape and affine; label maps
    integral and, when num_classes is given, in [0, num_classes), the value ignore_label (dataset.json's "ignore")
    being mapped to IGNORE_INDEX; case names distinct (checked before the first case is read). Each error names
    the file."""
    from action.data.checks import finite_image, labels_in_range
    from action.data.image_io import read_pair, read_volume
    from action.data.labels import IGNORE_INDEX
    from action.data.nifti import case_name, reorient

    items = [item if len(item) == 3 else (case_name(_first(item[0])), *item) for item in items]
    unique_case_names([name for name, _, _ in items], [_first(image) for _, image, _ in items])
    for name, image_paths, label_path in items:
        paths = _paths(image_paths)
        if label_path is not None:
            source, label = read_pair(paths[0], label_path)
            data = label.data
            if ignore_label is not None:
                data = np.where(data == ignore_label, IGNORE_INDEX, data)
            if num_classes is not None:
                labels_in_range(data if ignore_label is None else data[data != IGNORE_INDEX], num_classes, label_path)
        else:
            source, data = read_volume(paths[0], np.float32), None
            finite_image(source.data, paths[0])
        if source.data.ndim != 3:
            raise ValueError(f"{paths[0]}: expected a 3D volume, got shape {source.data.shape} (store channels as "
                             f"separate _0000, _0001 files; time series are not supported)")
        more = [_channel(path, source) for path in paths[1:]]
        image, turn = (source, None) if orientation is None else reorient(source, orientation)
        arrays = [image.data] + [c if turn is None else turn.apply(c) for c in more]
        tensors = [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0))) for a in arrays]
        lab = None
        if data is not None:
            data = data if turn is None else turn.apply(data)
            lab = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))
        yield Case(name, tensors[0] if len(tensors) == 1 else torch.stack(tensors), lab,
                   tuple(reversed(image.spacing[:3])), source, turn)


def _paths(image_paths) -> tuple[str, ...]:
    """One image path (str or path-like) or a sequence of them (one per channel) -> a tuple of str."""
    if isinstance(image_paths, (str, os.PathLike)):
        return (os.fspath(image_paths),)
    return tuple(os.fspath(p) for p in image_paths)


def _first(image_paths) -> str:
    return _paths(image_paths)[0]


def _channel(path: str, first):
    """The array (X, Y, Z) of a further channel's file, checked against channel 0's Volume `first`."""
    from action.data.checks import finite_image
    from action.data.image_io import read_volume

    volume = read_volume(path, np.float32)
    finite_image(volume.data, path)
    if volume.data.shape != first.data.shape:
        raise ValueError(f"{path} shape {volume.data.shape} != {first.path} shape {first.data.shape} (channels of "
                         f"one case must match)")
    if not np.allclose(volume.affine, first.affine, atol=1e-3):
        raise ValueError(f"{path} and {first.path} have different affines (channels of one case must share the "
                         f"grid):\n{volume.affine}\n{first.affine}")
    return volume.data

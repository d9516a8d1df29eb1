"""Whole volumes for validation, evaluation and prediction, as Case records from any layout.

A case is (name, image (Z, H, W) float with raw intensities, label (Z, H, W) int64 or None, spacing (3,) in
(Z, H, W) order or None, the source Volume and the reorientation that took it to the training orientation).
Cases come from the ACDC HDF5 layout (images already min-max normalised, no spacing stored: metrics in voxel
units, the reference tables' convention) or from NIfTI (reoriented to the training orientation, spacing from the
header; predictions are turned back and written with the source's header).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Case:
    name: str
    image: torch.Tensor  # (Z, H, W)
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


def nifti_cases(items, orientation: str | None = None, num_classes: int | None = None):
    """Cases from NIfTI files: items are (image path, label path or None) or (name, image path, label path or
    None). With `orientation` (axis codes, e.g. the training orientation "RAS") every volume is first reoriented to
    it (flips and permutations, exact); nibabel's (X, Y, Z) arrays are then moved to (Z, Y, X) for slice-wise
    inference. Predictions go back through Case.to_source. Images must be finite; label maps integral and, when
    num_classes is given, in [0, num_classes); case names distinct (checked before the first case is read). Each
    error names the file."""
    from action.data.checks import finite_image, labels_in_range
    from action.data.nifti import case_name, load_nifti, load_pair, reorient

    items = [item if len(item) == 3 else (case_name(item[0]), *item) for item in items]
    unique_case_names([name for name, _, _ in items], [image for _, image, _ in items])
    for name, image_path, label_path in items:
        if label_path is not None:
            source, label = load_pair(image_path, label_path)
            if num_classes is not None:
                labels_in_range(label.data, num_classes, label_path)
        else:
            source, label = load_nifti(image_path, np.float32), None
            finite_image(source.data, image_path)
        if source.data.ndim != 3:
            raise ValueError(f"{image_path}: expected a 3D volume, got shape {source.data.shape} (several channels "
                             f"or time points are not supported)")
        image, turn = (source, None) if orientation is None else reorient(source, orientation)
        lab = None
        if label is not None:
            data = label.data if turn is None else turn.apply(label.data)
            lab = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))
        yield Case(name, torch.from_numpy(np.ascontiguousarray(image.data.transpose(2, 1, 0))), lab,
                   tuple(reversed(image.spacing[:3])), source, turn)

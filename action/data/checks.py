"""The value checks every reader applies to what it loads (one place, so the HDF5 and the NIfTI readers agree).

finite_image: images hold no NaN or infinite voxel (one NaN pixel in a training slice reaches every BatchNorm
    running statistic through the forward pass; in inference it silently becomes a label).
label_map: label maps are integers, or floats holding integral values (2.0 is label 2; 2.997 is an error, never
    truncated to 2), returned as int64.
labels_in_range: every label value is a class of the run: 0 <= label < num_classes.

Each error names the source (a file path, or the file and the dataset inside it), what was expected, what came
(counts and a first offending value and position), and the fix.
"""
from __future__ import annotations

import numpy as np


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def finite_image(image: np.ndarray, source: str) -> np.ndarray:
    """image: any shape, float -> the same array, after checking that every voxel is finite."""
    bad = ~np.isfinite(image)
    if bad.any():
        where = _first(bad)
        raise ValueError(f"{source}: image has {int(bad.sum())} non-finite voxel(s) of {image.size} (first "
                         f"{image[where]} at index {where}); fix or drop this file (NaN/inf would spread through "
                         f"the network's BatchNorm statistics or become labels)")
    return image


def label_map(label: np.ndarray, source: str) -> np.ndarray:
    """label: any shape, integer, bool or float -> int64 of the same shape. A float map must hold integral
    values; a fractional or non-finite one is an error (it was resampled with interpolation, or is not a label
    map)."""
    if label.dtype.kind in "iub":
        return label.astype(np.int64)
    if label.dtype.kind != "f":
        raise ValueError(f"{source}: label map of dtype {label.dtype} is not numeric; expected integer labels")
    bad = ~np.isfinite(label)
    if not bad.any():
        bad = label != np.round(label)
    if bad.any():
        where = _first(bad)
        raise ValueError(f"{source}: float label map has {int(bad.sum())} non-integral or non-finite value(s) (first "
                         f"{float(label[where])!r} at index {where}); labels must be whole class numbers: resample "
                         f"label maps with nearest-neighbour interpolation, never linear")
    return label.astype(np.int64)


def labels_in_range(label: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """label: int64 array -> the same array, after checking 0 <= label < num_classes."""
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"{source}: labels must be in [0, {num_classes}) for num_classes={num_classes}, got values "
                         f"{sorted(int(v) for v in np.unique(label))}; set --num-classes to the number of classes "
                         f"the data holds (background included)")
    return label

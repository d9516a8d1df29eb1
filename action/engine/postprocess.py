"""Postprocessing of predicted label maps: keep the largest connected component of each foreground class
(`--largest-component`), as nnU-Net's postprocessing and MONAI's KeepLargestConnectedComponent do.

Connectivity is full (26 neighbours in 3D, 8 in 2D: scipy.ndimage.generate_binary_structure(ndim, ndim)), the
default of both (skimage.measure.label, which nnU-Net's remove_all_but_largest_component calls, and MONAI's
connectivity=None). Voxels of the smaller components become background (0). Ties between components of equal size
keep the first in scipy's labelling order (the first in C order), so the result is deterministic.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def parse_classes(text: str, num_classes: int | None = None) -> tuple[int, ...] | None:
    """--largest-component's value -> the classes it applies to: "all" -> None (every foreground class present),
    or a comma-separated list of foreground class indices, each >= 1 (and < num_classes when given)."""
    if text == "all":
        return None
    try:
        classes = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        classes = ()
    if not classes or min(classes) < 1 or (num_classes is not None and max(classes) >= num_classes):
        top = f", {num_classes})" if num_classes is not None else ", ...)"
        raise ValueError(f"--largest-component: expected 'all' or comma-separated foreground classes in [1{top}, "
                         f"got {text!r}")
    return classes


def largest_component(labels, classes=None):
    """labels: an integer label map (2D or 3D, tensor or array) -> the same map where, for each class in `classes`
    (None: every foreground class present), only its largest connected component is kept (the rest set to 0).
    The type (tensor or array) is kept."""
    is_tensor = isinstance(labels, torch.Tensor)
    arr = labels.numpy().copy() if is_tensor else np.array(labels, copy=True)
    structure = ndimage.generate_binary_structure(arr.ndim, arr.ndim)
    if classes is None:
        classes = [int(c) for c in np.unique(arr) if c > 0]
    for c in classes:
        components, count = ndimage.label(arr == c, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        keep = int(np.argmax(sizes)) + 1
        arr[(components > 0) & (components != keep)] = 0
    return torch.from_numpy(arr) if is_tensor else arr


def component_filter(text: str | None, num_classes: int | None = None):
    """--largest-component's value (None: the option is absent) -> a postprocess callable (labels -> labels)
    keeping the largest component of each class it names, or None."""
    if text is None:
        return None
    classes = parse_classes(text, num_classes)

    def postprocess(labels):
        return largest_component(labels, classes)

    return postprocess

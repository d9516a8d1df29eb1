"""NIfTI volumes through nibabel, with the affine and voxel spacing kept from loading to written predictions.

Arrays are returned in nibabel's (x, y, z) axis order together with the affine; `spacing` is the voxel size in mm
along those axes. `write_like(array, reference, path)` writes a prediction in the space of the image it came from.
Layouts: the raw ACDC release (`patient<NNN>/patient<NNN>_frame<FF>.nii.gz` with `_gt` label maps) and a generic pair of
folders (images/ and labels/ with the same file names). `hdf5_to_nifti` converts the HDF5 layout (no spacing
stored there: pass it, or unit spacing is written).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np


def _nib():
    try:
        import nibabel
    except ImportError as exc:  # a clear message instead of a bare ImportError deep in a loader
        raise ImportError("reading NIfTI needs nibabel: pip install nibabel") from exc
    return nibabel


@dataclass(frozen=True)
class Volume:
    """A loaded volume: data (X, Y, Z) array, affine (4, 4), spacing (3,) in mm, and the source path."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    path: str


def load_nifti(path: str, dtype=None) -> Volume:
    """Reads a .nii / .nii.gz file; the error names the file when it is missing or unreadable."""
    nib = _nib()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    if dtype is not None:
        data = data.astype(dtype)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:data.ndim])
    return Volume(data, np.asarray(img.affine, dtype=np.float64), spacing, path)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str) -> str:
    """Writes data with the given affine (the spacing follows from it). Creates parent folders; written to a
    temporary file first and renamed, so an interrupted write never leaves a truncated volume."""
    nib = _nib()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if path.endswith(".nii.gz") else ".nii"
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)[:-len(suffix)]}{suffix}")
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), tmp)
    os.replace(tmp, path)
    return path


def write_like(data: np.ndarray, reference: Volume, path: str) -> str:
    """Writes a prediction in the space of `reference` (same shape required, affine copied)."""
    if tuple(data.shape) != tuple(reference.data.shape):
        raise ValueError(f"prediction shape {tuple(data.shape)} != reference {reference.path} shape "
                         f"{tuple(reference.data.shape)}")
    return save_nifti(data, reference.affine, path)


def load_pair(image_path: str, label_path: str) -> tuple[Volume, Volume]:
    """An image and its label map, checked to share shape and affine (the error names both files), the image to
    be finite and the label map integral (action.data.checks: a float map with fractions is an error, never
    truncated)."""
    from action.data.checks import finite_image, label_map

    image, label = load_nifti(image_path, np.float32), load_nifti(label_path)
    finite_image(image.data, image_path)
    if image.data.shape != label.data.shape:
        raise ValueError(f"{image_path} shape {image.data.shape} != {label_path} shape {label.data.shape}")
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        raise ValueError(f"{image_path} and {label_path} have different affines:\n{image.affine}\n{label.affine}")
    return image, Volume(label_map(label.data, label_path), label.affine, label.spacing, label.path)


def acdc_raw_pairs(root: str) -> list[tuple[str, str]]:
    """(image, label) paths of the raw ACDC release: patient<NNN>/patient<NNN>_frame<FF>.nii.gz and its _gt."""
    pairs = []
    for label in sorted(glob.glob(os.path.join(root, "patient*", "patient*_frame??_gt.nii*"))):
        image = label.replace("_gt.nii", ".nii")
        if not os.path.isfile(image):
            raise FileNotFoundError(f"label map {label} has no image {image}")
        pairs.append((image, label))
    if not pairs:
        raise FileNotFoundError(f"no patient<NNN>/patient<NNN>_frame<FF>_gt.nii.gz files under {root}")
    return pairs


def folder_pairs(images_dir: str, labels_dir: str) -> list[tuple[str, str]]:
    """(image, label) paths of a generic layout: the same file names in an images folder and a labels folder."""
    images = sorted(glob.glob(os.path.join(images_dir, "*.nii*")))
    if not images:
        raise FileNotFoundError(f"no .nii / .nii.gz files in {images_dir}")
    pairs = []
    for image in images:
        label = os.path.join(labels_dir, os.path.basename(image))
        if not os.path.isfile(label):
            raise FileNotFoundError(f"image {image} has no label map {label}")
        pairs.append((image, label))
    return pairs


def hdf5_to_nifti(root: str, names: list[str], out_dir: str, spacing=(1.0, 1.0, 1.0)) -> list[str]:
    """Converts HDF5 volumes (Z, H, W) of the ACDC layout to NIfTI pairs <name>.nii.gz and <name>_gt.nii.gz in
    (x, y, z) = (W, H, Z) order with a diagonal affine of the given (x, y, z) spacing. Returns the written paths."""
    from action.data.acdc import read_case

    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    written = []
    for name in names:
        image, label = read_case(root, name)
        if image.ndim != 3:
            raise ValueError(f"ACDC case {name!r} is not a volume (shape {image.shape}); convert val/test volumes")
        for suffix, arr in (("", image.astype(np.float32)), ("_gt", label.astype(np.uint8))):
            path = os.path.join(out_dir, f"{name}{suffix}.nii.gz")
            written.append(save_nifti(np.transpose(arr, (2, 1, 0)), affine, path))
    return written

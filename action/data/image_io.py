"""Reading and writing volumes by file ending: NIfTI (.nii, .nii.gz) through nibabel (action.data.nifti), every
other 3D format nnU-Net users keep their data in (.mha, .mhd, .nrrd, .nhdr, .gipl, .gipl.gz) through SimpleITK, the
optional extra `pip install "action-kernels[sitk]"` (without it, one error that names that command).

Every reader returns an action.data.nifti.Volume: data in (x, y, z) order and a RAS affine, as nibabel gives them,
so reorientation, spacing and writing predictions back are the same for every format. SimpleITK's geometry (origin,
spacing, direction, in LPS world coordinates) is turned into that affine and back when a prediction is written in
a SimpleITK reference's space (header fields other than the geometry are not carried over).
"""
from __future__ import annotations

import os

import numpy as np

from action.data.filenames import ENDINGS, NIFTI_ENDINGS, ending_of

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS world coordinates (its own inverse)


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so the command line prints it as one line)."""


def sitk():
    """The SimpleITK module, or MissingExtraError naming the install command."""
    try:
        import SimpleITK
    except ImportError as exc:
        raise MissingExtraError("reading or writing .mha / .nrrd / other non-NIfTI images needs SimpleITK: "
                                "pip install \"action-kernels[sitk]\"") from exc
    return SimpleITK


def _check_ending(path: str) -> str:
    ending = ending_of(path)
    if ending is None:
        raise ValueError(f"{path}: unknown image file ending; expected one of {', '.join(ENDINGS)}")
    return ending


def _affine(geometry) -> np.ndarray:
    """A SimpleITK image's (or image reader's) geometry -> the (4, 4) RAS affine of its (x, y, z) voxel indices."""
    direction = np.asarray(geometry.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(geometry.GetSpacing(), dtype=np.float64)[None]
    lps[:3, 3] = geometry.GetOrigin()
    return _LPS @ lps


def read_volume(path: str, dtype=None):
    """A 3D image of any supported format -> Volume (data (X, Y, Z), RAS affine, spacing, path, header: the NIfTI
    header, None for other formats). Errors name the file."""
    from action.data.nifti import Volume, load_nifti

    if _check_ending(path) in NIFTI_ENDINGS:
        return load_nifti(path, dtype)
    itk = sitk()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        image = itk.ReadImage(path)
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} with SimpleITK ({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3D single-component image, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel (store channels as "
                         f"separate _0000, _0001 files)")
    data = itk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK's (z, y, x) -> (x, y, z)
    if dtype is not None:
        data = data.astype(dtype)
    return Volume(np.ascontiguousarray(data), _affine(image), tuple(float(s) for s in image.GetSpacing()), path)


def read_pair(image_path: str, label_path: str):
    """An image and its label map of any supported format (action.data.nifti.load_pair's checks: shape, affine,
    finite image, integral labels) -> (image Volume float32, label Volume int64)."""
    from action.data.nifti import load_pair

    return load_pair(image_path, label_path, read_volume)


def read_geometry(path: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(RAS affine (4, 4), shape (X, Y, Z)) of an image file from its header alone."""
    if _check_ending(path) in NIFTI_ENDINGS:
        from action.data.nifti import load_header

        header = load_header(path)  # checked (bounded, finite affine); errors name the file
        return np.asarray(header.affine, dtype=np.float64), tuple(header.shape)
    itk = sitk()
    reader = itk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} with SimpleITK ({str(exc).strip().splitlines()[-1]})") from exc
    return _affine(reader), tuple(int(n) for n in reader.GetSize())


def write_volume(data: np.ndarray, reference, path: str) -> str:
    """Writes data (X, Y, Z) in the space of `reference` (a Volume of the same shape) in the format `path`'s ending
    names: NIfTI with the reference's header (action.data.nifti.write_like), other formats through SimpleITK with
    the reference's geometry (origin, spacing, direction from its affine). Written to a temporary file and renamed
    (an interrupted write never leaves a truncated file), except the formats whose header names a separate data
    file (.mhd, .nhdr)."""
    from action.data.nifti import write_like

    if tuple(data.shape) != tuple(reference.data.shape):
        raise ValueError(f"prediction shape {tuple(data.shape)} != reference {reference.path} shape "
                         f"{tuple(reference.data.shape)}")
    ending = _check_ending(path)
    if ending in NIFTI_ENDINGS:
        return write_like(data, reference, path)
    itk = sitk()
    lps = _LPS @ np.asarray(reference.affine, dtype=np.float64)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    image = itk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing[None]).reshape(-1)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if ending in (".mhd", ".nhdr"):  # the header names its data file: written in place
        itk.WriteImage(image, path, True)
        return path
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    itk.WriteImage(image, tmp, True)  # compressed
    os.replace(tmp, path)
    return path

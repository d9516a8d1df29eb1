"""NIfTI volumes through nibabel, with the affine and voxel spacing kept from loading to written predictions.

Arrays are returned in nibabel's (x, y, z) axis order together with the affine and the header; `spacing` is the
voxel size in mm along those axes. `write_like(array, reference, path)` writes a prediction in the space of the image
it came from, with its header (qform and sform matrices and codes, units) kept. `reorient` turns a volume to given
axis codes (e.g. RAS) by flips and axis permutations only (no interpolation), and `Reorientation.undo` turns an
array back. Layouts: the raw ACDC release (`patient<NNN>/patient<NNN>_frame<FF>.nii.gz` with `_gt` label maps) and a
generic pair of folders (images/ and labels/ with the same file names, an image's nnU-Net channel suffix `_0000`
allowed); action.data.layouts reads whole datasets. `hdf5_to_nifti` converts volumes of the HDF5 layout (no spacing
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
    """A loaded volume: data (X, Y, Z) array, affine (4, 4), spacing (3,) in mm, the source path and its NIfTI
    header (None for a volume that did not come from a file)."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    path: str
    header: object | None = None


def case_name(path: str, channel_suffix: bool = False) -> str:
    """A case's name from an image path: the file name without its image ending (.nii.gz, .mha, ...:
    action.data.image_io); with channel_suffix also without nnU-Net's channel suffix (`la_003_0000.nii.gz` ->
    `la_003`)."""
    from action.data.filenames import strip_ending

    name = strip_ending(path)
    stem, sep, channel = name.rpartition("_")
    return stem if channel_suffix and sep and len(channel) == 4 and channel.isdigit() else name


def channel_files(paths: list[str]) -> bool:
    """Whether a folder's image files follow nnU-Net's channel naming: every name ends in `_0000` (one channel)."""
    return bool(paths) and all(case_name(p) != case_name(p, True) and case_name(p).endswith("_0000") for p in paths)


def load_nifti(path: str, dtype=None) -> Volume:
    """Reads a .nii / .nii.gz file; the error names the file when it is missing or unreadable."""
    nib = _nib()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    check_header(path, img)
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:
        raise ValueError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    if dtype is not None:
        data = data.astype(dtype)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:data.ndim])
    return Volume(data, np.asarray(img.affine, dtype=np.float64), spacing, path, img.header.copy())


def load_header(path: str):
    """The nibabel image of a NIfTI file with its header read and checked (check_header), its voxels not read; a
    file that is not NIfTI is a ValueError naming it."""
    try:
        img = _nib().load(path)
    except Exception as exc:  # nibabel raises several types for files that are not NIfTI
        raise ValueError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {str(exc)[:200]})") from exc
    check_header(path, img)
    return img


def check_header(path: str, img) -> None:
    """A loaded NIfTI header checked before its voxels are read: a finite affine, and a declared image size (shape x
    the stored type's size) no larger than the file can hold (deflate's ratio for .gz, the file itself for .nii)
    and the read cap (action.data.limits)."""
    from action.data.limits import DEFLATE_RATIO, check_declared

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise ValueError(f"{path}: the header's affine (sform/qform) holds NaN or infinite values; fix the header "
                         f"(e.g. nibabel's set_sform) or re-export the image")
    dtype = img.get_data_dtype()
    declared = int(np.prod([int(n) for n in img.shape], dtype=object)) * dtype.itemsize
    offset = int(img.header.get("vox_offset", 0)) if not path.endswith(".gz") else 0
    check_declared(path, declared + offset, f"image {tuple(int(n) for n in img.shape)} {dtype}",
                   DEFLATE_RATIO if path.endswith(".gz") else 1.0)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str, header=None) -> str:
    """Writes data with the given affine (the spacing follows from it); with `header` (a source image's), its
    qform and sform matrices and codes, units and descriptions are kept and only the data type follows `data`
    (no intensity scaling). Creates parent folders; written to a temporary file first and renamed, so an
    interrupted write never leaves a truncated volume, and on any error the temporary is removed."""
    nib = _nib()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if path.endswith(".nii.gz") else ".nii"
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)[:-len(suffix)]}{suffix}")
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if header is None:
        img = nib.Nifti1Image(data, affine)
    else:
        img = nib.Nifti1Image(data, affine, header=header.copy())
        # the constructor resets the codes from the affine: put the source's matrices and codes back
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
        img.set_data_dtype(data.dtype)
        img.header.set_slope_inter(None, None)  # labels are written as they are, never rescaled
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only disk: name the file being written
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path


def write_like(data: np.ndarray, reference: Volume, path: str) -> str:
    """Writes a prediction in the space of `reference` (same shape required): its affine, and its header when it
    came from a file (qform/sform codes, xyzt_units)."""
    if tuple(data.shape) != tuple(reference.data.shape):
        raise ValueError(f"prediction shape {tuple(data.shape)} != reference {reference.path} shape "
                         f"{tuple(reference.data.shape)}")
    return save_nifti(data, reference.affine, path, reference.header)


def axis_codes(affine: np.ndarray) -> str:
    """The orientation of an affine's array axes as three letters, e.g. "RAS" (x towards Right, y Anterior, z
    Superior) or "LPS"."""
    return "".join(_nib().aff2axcodes(affine))


@dataclass(frozen=True)
class Reorientation:
    """The flips and axis permutation that take an array in `source` codes to `target` codes (nibabel orientation
    arrays), exact and invertible: apply(x) turns a source-space (X, Y, Z) array to the target's axes, undo(y) back."""

    source: str
    target: str
    forward: np.ndarray
    backward: np.ndarray

    def apply(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(_nib().orientations.apply_orientation(data, self.forward))

    def undo(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(_nib().orientations.apply_orientation(data, self.backward))


def reorient(volume: Volume, target: str) -> tuple[Volume, Reorientation]:
    """volume (X, Y, Z) -> the same voxels with array axes in `target` codes (e.g. "RAS"): data, affine and spacing
    follow, so every voxel keeps its position in the world; header None (write predictions with the source's)."""
    forward, backward, affine, spacing = reoriented_geometry(volume.affine, volume.data.shape[:3], target)
    data = np.ascontiguousarray(_nib().orientations.apply_orientation(volume.data, forward))
    turn = Reorientation(axis_codes(volume.affine), target, forward, backward)
    return Volume(data, affine, spacing, volume.path), turn


def reoriented_geometry(affine: np.ndarray, shape, target: str):
    """(forward and backward nibabel orientation transforms, the affine (4, 4) and the spacing (3,) of a volume of
    `shape` and `affine` reoriented to `target` codes), without touching voxel data."""
    orientations = _nib().orientations
    axis = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    if not isinstance(target, str) or sorted(axis.get(c, -1) for c in target) != [0, 1, 2]:
        raise ValueError(f"orientation: expected three axis codes, one per axis, such as 'RAS' or 'LPS', got "
                         f"{target!r}")
    source = orientations.io_orientation(affine)
    goal = orientations.axcodes2ornt(tuple(target))
    forward, backward = orientations.ornt_transform(source, goal), orientations.ornt_transform(goal, source)
    turned = np.asarray(affine, dtype=np.float64) @ orientations.inv_ornt_aff(forward, tuple(shape)[:3])
    spacing = tuple(float(v) for v in np.sqrt((turned[:3, :3] ** 2).sum(0)))
    return forward, backward, turned, spacing


def load_pair(image_path: str, label_path: str, read=None) -> tuple[Volume, Volume]:
    """An image and its label map, checked to share shape and affine (the error names both files), the image to
    be finite and the label map integral (action.data.checks: a float map with fractions is an error, never
    truncated). read: path, dtype -> Volume (default load_nifti; action.data.image_io.read_pair passes its reader
    of every format)."""
    from action.data.checks import finite_image, label_map

    read = read or load_nifti
    image, label = read(image_path, np.float32), read(label_path)
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


def label_path(image: str, labels_dir: str) -> str | None:
    """The label map of `image` in `labels_dir`: the same file name, or the name without nnU-Net's channel suffix
    (`case_0000.nii.gz` -> `case.nii.gz`, `case_0001.mha` -> `case.mha`); None when neither exists."""
    from action.data.filenames import ending_of

    ending = ending_of(image) or ".nii.gz"
    for name in (os.path.basename(image), case_name(image, True) + ending):
        path = os.path.join(labels_dir, name)
        if os.path.isfile(path):
            return path
    return None


def folder_pairs(images_dir: str, labels_dir: str) -> list[tuple[str, str]]:
    """(image, label) paths of a generic layout: an images folder and a labels folder with the same file names (an
    image's nnU-Net channel suffix `_0000` allowed: imagesTs/case_0000.nii.gz pairs with labelsTs/case.nii.gz)."""
    from action.data.filenames import ENDINGS, ending_of

    images = sorted(p for p in glob.glob(os.path.join(images_dir, "*")) if ending_of(p))
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(ENDINGS)}) in {images_dir}")
    pairs = []
    for image in images:
        label = label_path(image, labels_dir)
        if label is None:
            raise FileNotFoundError(f"image {image} has no label map {os.path.basename(image)} or "
                                    f"{case_name(image, True)}{ending_of(image)} in {labels_dir}")
        pairs.append((image, label))
    return pairs


def hdf5_to_nifti(root: str, names: list[str], out_dir: str, spacing=(1.0, 1.0, 1.0)) -> list[str]:
    """Converts HDF5 volumes (Z, H, W) of the ACDC layout to NIfTI pairs <name>.nii.gz and <name>_gt.nii.gz in
    (x, y, z) = (W, H, Z) order with a diagonal affine of the given (x, y, z) spacing. Returns the written paths."""
    from action.data.acdc import read_case
    from action.data.names import check_case_name, output_path

    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    written = []
    for name in names:
        image, label = read_case(root, name)
        if image.ndim != 3:
            raise ValueError(f"ACDC case {name!r} is not a volume (shape {image.shape}); convert val/test volumes")
        for suffix, arr in (("", image.astype(np.float32)), ("_gt", label.astype(np.uint8))):
            path = output_path(out_dir, f"{check_case_name(name, 'hdf5_to_nifti')}{suffix}.nii.gz")
            written.append(save_nifti(np.transpose(arr, (2, 1, 0)), affine, path))
    return written

"""Per-case output files of inference: where they go (case_file, the one function the new writers build their
paths with) and the probability maps (`--save-probabilities`, `action ensemble`).

Probabilities are written as one 4D NIfTI per case, `<out>/probabilities/<case>.nii.gz`: float32 (X, Y, Z, K), the
softmax of class k in volume k, in the source image's space with its header (affine, qform and sform codes, units),
so they overlay the image in any viewer and `action ensemble` can check that two maps share one space from their
own headers. nnU-Net writes `<case>.npz` (K, z, y, x) with a `<case>.pkl` of geometry instead; a NIfTI keeps the
geometry in the same file and needs no pickle (which is unsafe to load from an untrusted source).
"""
from __future__ import annotations

import numpy as np
import torch

PROBABILITIES = "probabilities"


def case_file(out_dir: str, folder: str, name: str, ext: str = ".nii.gz") -> str:
    """<out_dir>/<folder>/<name><ext>, refusing a case name that is not one plain file name (a separator, "..",
    an empty name or a NUL would write outside the folder or nowhere)."""
    bad = not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")) or name != name.strip()
    if bad:
        raise ValueError(f"case name {name!r} cannot name an output file (one plain file name is needed: no path "
                         f"separator, no '..', no surrounding spaces): rename the input")
    from action.data.names import output_path

    return output_path(out_dir, folder, f"{name}{ext}")  # a symbolic link out of out_dir is refused too


def source_probabilities(case, probs: torch.Tensor) -> np.ndarray:
    """probs (K, Z, H, W) in the case's (training) axes -> float32 (X, Y, Z, K) in the source image's axes (HDF5
    cases: (W, H, Z, K)), as Case.to_source turns a label map."""
    data = probs.float().numpy().transpose(3, 2, 1, 0)
    reorientation = getattr(case, "reorientation", None)
    return np.ascontiguousarray(data if reorientation is None else reorientation.undo(data), dtype=np.float32)


def write_probabilities(data: np.ndarray, reference, path: str) -> str:
    """data (X, Y, Z, K) float32 -> a 4D NIfTI at `path` in the space of `reference` (an action.data.nifti.Volume
    of the source image, its header kept; None: unit spacing, identity affine, as HDF5 cases are written)."""
    from action.data.nifti import save_nifti

    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(f"probabilities must be (X, Y, Z, K), got shape {data.shape}")
    if reference is None:
        return save_nifti(data, np.eye(4), path)
    if tuple(data.shape[:3]) != tuple(reference.data.shape[:3]):
        raise ValueError(f"probabilities of shape {data.shape[:3]} != reference {reference.path} shape "
                         f"{tuple(reference.data.shape[:3])}")
    return save_nifti(data, reference.affine, path, reference.header)

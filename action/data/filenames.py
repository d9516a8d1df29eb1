"""Image file names: the endings the readers know (action.data.image_io reads them), a case's file name without its
ending, a folder's image files. No reading here: action.data.nifti and action.data.image_io both use these."""
from __future__ import annotations

import os

NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".gipl.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl")
ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS


def ending_of(path: str) -> str | None:
    """The known image file ending of a path (".nii.gz", ".mha", ...), None for any other file."""
    name = os.path.basename(path).lower()
    return next((e for e in ENDINGS if name.endswith(e)), None)


def strip_ending(path: str) -> str:
    """A file name without directory and image ending: `imagesTr/la_003_0000.nii.gz` -> `la_003_0000`."""
    name = os.path.basename(path)
    ending = ending_of(name)
    return name[:-len(ending)] if ending else name


def image_files(folder: str, ending: str | None = None) -> list[str]:
    """The image files of a folder, sorted: those with `ending` when given (dataset.json's file_ending), else the
    NIfTI ones (.nii, .nii.gz)."""
    if not os.path.isdir(folder):
        return []
    wanted = (ending.lower(),) if ending else NIFTI_ENDINGS
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(wanted) and not n.startswith("."))

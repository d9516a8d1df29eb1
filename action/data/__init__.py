"""Medical image data for the training package. Present so far: ACDC in the common HDF5 layout, and NIfTI I/O
(action.data.nifti) with affines and spacing kept."""
from action.data.acdc import LABELLED_SLICES, AcdcLayout, AcdcSlices, AcdcVolumes, read_case

__all__ = ["LABELLED_SLICES", "AcdcLayout", "AcdcSlices", "AcdcVolumes", "read_case"]

"""Medical image data for the training package: ACDC in the common HDF5 layout (slices, volumes, splits, volumes
assembled from slices), NIfTI I/O with affines and spacing (action.data.nifti), batched tensor augmentation
(action.data.augment) and batch sampling (action.data.sampling)."""
from action.data.acdc import LABELLED_SLICES, AcdcLayout, AcdcSlices, AcdcVolumes, assemble_volumes, read_case

__all__ = ["LABELLED_SLICES", "AcdcLayout", "AcdcSlices", "AcdcVolumes", "assemble_volumes", "read_case"]

"""action: the training package of action-kernels (ACTION / ACTION++ for semi-supervised segmentation).

Present so far: `action.metrics` (Dice, Jaccard, HD95, ASD per class per volume), `action.data` (ACDC in the HDF5
layout: lists, reference labelled/unlabelled splits, slice and volume datasets), `action.data.nifti` (NIfTI I/O
with affine and spacing) and `action.models.UNet2D`. Augmentation, the 3D network and the ACTION heads, the
training engine, the ACTION stages and the CLI do not exist yet (listed in the README's Known limits).
"""

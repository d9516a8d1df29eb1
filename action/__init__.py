"""action: the training package of action-kernels (ACTION / ACTION++ for semi-supervised segmentation).

Present so far: `action.metrics` (Dice, Jaccard, HD95, ASD per class per volume) and `action.data` (ACDC in the
HDF5 layout: lists, reference labelled/unlabelled splits, slice and volume datasets). NIfTI I/O, augmentation,
models, the training engine, the ACTION stages and the CLI are not implemented yet (see the README's Known limits).
"""

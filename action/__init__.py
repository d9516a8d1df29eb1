"""action: the training package of action-kernels (ACTION / ACTION++ for semi-supervised segmentation).

`action.data` (ACDC HDF5 and NIfTI layouts, augmentation, sampling), `action.models` (UNet2D/3D, ACTION heads,
EMA teacher), `action.metrics` (Dice, Jaccard, HD95, ASD), `action.engine` (trainer, checkpoints, logs,
inference, evaluation, torch.distributed), `action.method` (the three ACTION stages, the pipeline, ACTION++),
`action.config` (options and presets) and `action.cli` (the `action` command). Every stage runs on 2D slices
or 3D patches (`dims`).
"""
from action_kernels import __version__  # one version for both packages of the distribution (action_kernels/_version.py)

__all__ = ["__version__"]

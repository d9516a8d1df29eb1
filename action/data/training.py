"""A run's training images in memory, as the trainer and `action evaluate --bn-recalibrate` load them:
training_data, the one rule for which images a run loads (SliceData / VolumeData of the HDF5 layout from
action.data.hdf5_training, their NIfTI forms from action.data.nifti_training), and check_volumes, which reads and
checks the evaluation volumes a run will use before its first iteration."""
from __future__ import annotations

from action.config import TrainConfig
from action.data.hdf5_training import SliceData, VolumeData
from action.data.layouts import detect_layout
from action.data.nifti_training import nifti_training_data


def training_data(cfg: TrainConfig, uses_unlabelled: bool, progress: bool = True):
    """A run's training images in memory: SliceData (2D) or VolumeData (3D) from the HDF5 layout, their NIfTI forms
    from a NIfTI dataset folder (action.data.nifti_training), the unlabelled ones loaded when the stage uses them
    (uses_unlabelled) or the config asks for an unlabelled batch."""
    need_unlabelled = uses_unlabelled or cfg.unlabelled_batch > 0
    if detect_layout(cfg.data) != "hdf5":  # a NIfTI dataset folder (action.data.layouts)
        if cfg.audit_pseudo_labels:
            raise ValueError(f"--audit-pseudo-labels needs unlabelled images that carry ground truth (the ACDC HDF5 "
                             f"layout); {cfg.data} is a NIfTI dataset whose unlabelled images have none: drop the "
                             f"option")
        return nifti_training_data(cfg, need_unlabelled, progress)
    return (VolumeData if cfg.dims == 3 else SliceData)(cfg, need_unlabelled, progress)


def resolve_input_channels(cfg: TrainConfig, data) -> int:
    """The input channels of a run's network, from its training data (`data.channels`: 1 for the HDF5 layout, the
    dataset's channel files per case for NIfTI), written into cfg.in_channels (stored with the config in every
    checkpoint, which inference builds its network from); a config that names another number is an error."""
    channels = int(getattr(data, "channels", 1))
    if cfg.in_channels is not None and cfg.in_channels != channels:
        raise ValueError(f"config in_channels={cfg.in_channels}: the training data {cfg.data} has {channels} input "
                         f"channel(s) per case; leave in_channels unset (it follows the data)")
    cfg.in_channels = channels
    return channels


def check_volumes(cases_of, names: list[str], what: str) -> None:
    """Reads every volume of `names` through cases_of (names -> Case records, the data class's `cases`, with their
    readers' checks: file present and readable, finite image, integral labels in [0, num_classes), equal shapes,
    3D); raises one ValueError listing every failing file, so a bad validation or test volume stops a run before its
    first iteration instead of at its first validation or after its last iteration."""
    problems = []
    for name in names:
        try:
            for case in cases_of([name]):
                if case.image.dim() not in (3, 4):
                    raise ValueError(f"volume {name!r} must be 3D (or channels x 3D), got shape "
                                     f"{tuple(case.image.shape)}")
        except (ValueError, FileNotFoundError, OSError) as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError(f"{len(problems)} of the {len(names)} {what} volumes cannot be used:\n  "
                         + "\n  ".join(problems))

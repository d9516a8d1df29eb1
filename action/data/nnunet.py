"""nnU-Net v2's dataset description as its users write it: dataset.json (channels, labels, file ending) and the
cross-validation folds of splits_final.json.

dataset.json (`DatasetSpec.read`):
    channel_names  {"0": "CT", "1": "T2", ...} (v1: "modality"): one image file per channel and case,
                   `<case>_0000<ending>`, `<case>_0001<ending>`, ... ; the networks take them as input channels
    labels         {"background": 0, "liver": 1, ...} (v1: {"0": "background", ...}); the values must be 0 .. K-1.
                   A label named "ignore" (the highest value, as nnU-Net requires) marks unannotated voxels: it is
                   mapped to the package's IGNORE_INDEX (action.data.labels) when label maps are read, and no
                   loss, augmentation or metric counts those voxels.
                   Region labels (a list of values, e.g. "organs": [1, 2, 3], nnU-Net's region-based training with
                   overlapping sigmoid outputs) are refused with the reason: ACTION's pseudo-labels, confidences and
                   anatomical contrast are defined on one softmax class per voxel.
    file_ending    ".nii.gz" (default), ".nii", or a format SimpleITK reads (".mha", ".nrrd", ...: action.data.image_io)

Folds (`crossval_folds`): nnU-Net's default split when splits_final.json is absent: 5 folds of scikit-learn's
KFold(shuffle=True, random_state=12345) over the sorted case names (each fold's train and val lists in name order).
Reproduced here with numpy alone: KFold's shuffle is numpy's legacy RandomState(12345).shuffle of the indices, and
its folds are consecutive runs of the shuffled indices, the first n % k of them one longer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NNUNET_SEED, NNUNET_FOLDS = 12345, 5


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset.json says: channel names (one per input channel), class names by value (the ignore label
    left out), the ignore label's value (None: none), the image file ending."""

    channels: tuple[str, ...] = ("",)
    class_names: tuple[str, ...] | None = None
    ignore_label: int | None = None
    file_ending: str | None = None

    @classmethod
    def read(cls, dataset: dict, source: str = "dataset.json") -> "DatasetSpec":
        """dataset: the parsed dataset.json ({} when there is none) -> DatasetSpec; errors name `source`, the
        entry and the fix."""
        channels = dataset.get("channel_names", dataset.get("modality", {"0": ""}))
        if not isinstance(channels, dict) or not channels:
            raise ValueError(f"{source}: channel_names must map channel numbers to names, e.g. {{\"0\": \"CT\"}}, got "
                             f"{channels!r}")
        keys = sorted(channels, key=lambda k: int(k) if str(k).isdigit() else -1)
        if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
            raise ValueError(f"{source}: channel_names keys must be 0 .. {len(keys) - 1}, got {list(channels)}")
        ending = dataset.get("file_ending")
        if ending is not None and (not isinstance(ending, str) or not ending.startswith(".")):
            raise ValueError(f"{source}: file_ending must be a file ending such as \".nii.gz\" or \".mha\", got "
                             f"{ending!r}")
        names, ignore = _labels(dataset.get("labels"), source)
        return cls(tuple(str(channels[k]) for k in keys), names, ignore, ending)


def _labels(labels, source: str) -> tuple[tuple[str, ...] | None, int | None]:
    """dataset.json's "labels" -> (class names by value without the ignore label, the ignore label's value)."""
    if not labels:
        return None, None
    if not isinstance(labels, dict):
        from action.config_file import bounded_repr

        raise ValueError(f"{source}: labels must map names to values, e.g. {{\"background\": 0, \"liver\": 1}}, got "
                         f"{bounded_repr(labels)}")
    if all(str(k).isdigit() for k in labels) and not all(_is_value(v) for v in labels.values()):
        pairs = {int(k): str(v) for k, v in labels.items()}  # nnU-Net v1: {"0": "background", ...}
    else:
        pairs = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            if isinstance(value, (list, tuple)):
                raise ValueError(f"{source}: label {name!r} is a region {list(value)} (nnU-Net's region-based "
                                 f"training, overlapping sigmoid outputs), which is not supported: ACTION's "
                                 f"pseudo-labels, confidences and anatomical contrast need one softmax class per "
                                 f"voxel; list each class with a single value instead")
            if not _is_value(value):
                raise ValueError(f"{source}: label {name!r} must have an integer value, got {value!r}")
            if int(value) in pairs:
                raise ValueError(f"{source}: labels {pairs[int(value)]!r} and {name!r} share the value {int(value)}")
            pairs[int(value)] = str(name)
    ignore = next((v for v, n in pairs.items() if n == "ignore"), None)
    if ignore is not None:
        del pairs[ignore]
        if pairs and ignore < max(pairs):
            raise ValueError(f"{source}: the ignore label ({ignore}) must have the highest value (nnU-Net's rule); "
                             f"labels go up to {max(pairs)}")
    if sorted(pairs) != list(range(len(pairs))):
        raise ValueError(f"{source}: label values must be 0 .. {len(pairs) - 1} (consecutive, background 0), got "
                         f"{sorted(pairs)}")
    return tuple(pairs[v] for v in range(len(pairs))), ignore


def _is_value(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())


def crossval_folds(names, folds: int = NNUNET_FOLDS, seed: int = NNUNET_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's default cross-validation split of case names: [{"train": [...], "val": [...]}] x folds, from the
    sorted names (module docstring: the rule). Needs at least `folds` names."""
    ordered = sorted(names)
    n = len(ordered)
    if n < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} labelled cases, got {n}; add cases "
                         f"or write a splits_final.json")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = [n // folds + (1 if i < n % folds else 0) for i in range(folds)]
    out, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        out.append({"train": [ordered[i] for i in range(n) if i not in val],
                    "val": [ordered[i] for i in range(n) if i in val]})
    return out

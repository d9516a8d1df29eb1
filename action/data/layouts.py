"""Dataset folders of NIfTI volumes, for training and evaluation, next to the ACDC HDF5 layout (action.data.acdc).

    nnunet    nnU-Net's raw layout: imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz, optional
              imagesTs/ (+ labelsTs/), dataset.json (channels, labels) and splits_final.json (fold 0 is used)
    pairs     images/ and labels/ with the same file names (or an image's `_0000` channel suffix)
    acdc-raw  the raw ACDC release: patient<NNN>/patient<NNN>_frame<FF>.nii.gz with its _gt label map
    hdf5      data/*.h5 with train_slices.list, val.list, test.list (action.data.acdc.AcdcLayout)

detect_layout(root) tells them apart by their files. In the NIfTI layouts an image without a label map is an
unlabelled training image (semi-supervised training). Splits (NiftiLayout.split): validation is fold 0 of
splits_final.json when the folder has one, else every fifth labelled case in name order (cases 0, 5, 10, ...);
the labelled set is the first `labelled_patients` patients of the remaining labelled cases in split order (a
patient: the cases sharing a name before `_frame<NN>`, as ACDC names them; any other case is its own patient), the
other training images are unlabelled; the test set is imagesTs with labelsTs (nnunet), else the validation cases.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

LAYOUTS = ("hdf5", "nnunet", "pairs", "acdc-raw")


@dataclass(frozen=True)
class NiftiCase:
    """One case of a NIfTI layout: name, image path, label path (None: unlabelled)."""

    name: str
    image: str
    label: str | None = None


def detect_layout(root: str) -> str:
    """The layout of a dataset folder (one of LAYOUTS); a folder that matches none is taken as HDF5, whose reader
    then names what is missing."""
    def has(*parts):
        return os.path.isdir(os.path.join(root, *parts))

    if has("imagesTr"):
        return "nnunet"
    if has("images") and has("labels"):
        return "pairs"
    if glob.glob(os.path.join(root, "patient*", "patient*_frame??.nii*")):
        return "acdc-raw"
    return "hdf5"


def patient_of(name: str) -> str:
    """The patient a case belongs to: the name before `_frame<NN>` (ACDC's naming), else the case itself."""
    match = re.match(r"(.+)_frame\d+$", name)
    return match.group(1) if match else name


def _images(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.nii.gz")) + glob.glob(os.path.join(folder, "*.nii")))


def _folder_cases(images_dir: str, labels_dir: str | None, nnunet: bool) -> list[NiftiCase]:
    """Cases of an image folder, each with its label map from labels_dir when one exists. nnU-Net channel files
    (`<case>_<CCCC>`) are grouped per case; only single-channel datasets are supported."""
    from action.data.nifti import case_name, channel_files, label_path

    paths = _images(images_dir)
    strip = nnunet or channel_files(paths)
    cases = {}
    for path in paths:
        name = case_name(path, strip)
        if name in cases:
            raise NotImplementedError(f"{images_dir}: case {name!r} has several channel files ({cases[name].image}, "
                                      f"{path}); the networks here take one input channel")
        label = label_path(path, labels_dir) if labels_dir and os.path.isdir(labels_dir) else None
        cases[name] = NiftiCase(name, path, label)
    return list(cases.values())


class NiftiLayout:
    """A NIfTI dataset folder: `training` (cases of imagesTr / images / patient*, labelled or not), `test` (imagesTs
    with labelsTs when present), `dataset` (dataset.json, {} without one), `folds` (splits_final.json, [] without
    one), `kind` (a LAYOUTS name). Errors name the folder and what is missing."""

    def __init__(self, root: str, kind: str | None = None):
        self.root, self.kind = root, kind or detect_layout(root)
        if self.kind == "hdf5":
            raise FileNotFoundError(f"{root}: not a NIfTI dataset folder (expected imagesTr/ [nnU-Net], images/ and "
                                    f"labels/, or patient<NNN>/ [raw ACDC])")
        self.dataset = self._json("dataset.json", {})
        self.folds = self._json("splits_final.json", [])
        if self.kind == "nnunet":
            channels = self.dataset.get("channel_names", self.dataset.get("modality", {"0": ""}))
            if len(channels) != 1:
                raise NotImplementedError(f"{root}/dataset.json lists {len(channels)} channels ({channels}); the "
                                          f"networks here take one input channel")
            self.training = _folder_cases(os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr"), True)
            self.test = [c for c in _folder_cases(os.path.join(root, "imagesTs"), os.path.join(root, "labelsTs"),
                                                  True) if c.label is not None] if os.path.isdir(
                os.path.join(root, "imagesTs")) else []
        elif self.kind == "pairs":
            self.training = _folder_cases(os.path.join(root, "images"), os.path.join(root, "labels"), False)
            self.test = []
        else:
            self.training = []
            for image in sorted(glob.glob(os.path.join(root, "patient*", "patient*_frame??.nii*"))):
                label = image.replace(".nii", "_gt.nii")
                self.training.append(NiftiCase(os.path.basename(image).split(".nii")[0], image,
                                               label if os.path.isfile(label) else None))
            self.test = []
        if not any(c.label is not None for c in self.training):
            raise FileNotFoundError(f"{root}: no training image has a label map (layout {self.kind})")

    def _json(self, name: str, default):
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            return default
        try:
            with open(path) as fh:
                return json.load(fh)
        except (ValueError, RecursionError) as exc:  # syntax, not UTF-8, nested too deep, a 5,000-digit number
            raise ValueError(f"{path}: not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Class names by label value from dataset.json ("labels": {name: value} in nnU-Net v2, {value: name} in
        v1), None without one."""
        labels = self.dataset.get("labels")
        if not labels:
            return None
        try:
            pairs = [(int(v), k) for k, v in labels.items()] if all(str(v).isdigit() for v in labels.values()) \
                else [(int(k), v) for k, v in labels.items()]
            return tuple(str(name) for _, name in sorted(pairs))
        except (AttributeError, TypeError, ValueError):
            from action.config_file import bounded_repr

            raise ValueError(f"{os.path.join(self.root, 'dataset.json')}: \"labels\" must map class names to label "
                             f"values (nnU-Net v2, {{\"background\": 0, ...}}) or values to names (v1), got "
                             f"{bounded_repr(labels)}") from None

    def split(self, labelled_patients: int | None):
        """(labelled, unlabelled, validation, test) lists of NiftiCase (module docstring: the rule)."""
        labelled = [c for c in self.training if c.label is not None]
        by_name = {c.name: c for c in labelled}
        if self.folds:
            fold = self.folds[0]
            unknown = [n for n in list(fold.get("train", [])) + list(fold.get("val", [])) if n not in by_name]
            if unknown:
                raise ValueError(f"{self.root}/splits_final.json names cases without an image and label map: "
                                 f"{unknown[:5]}")
            val = [by_name[n] for n in fold["val"]]
            train = [by_name[n] for n in fold["train"]]
        else:
            val = labelled[0::5]
            train = [c for i, c in enumerate(labelled) if i % 5]
        if not val or not train:
            raise ValueError(f"{self.root}: {len(labelled)} labelled case(s) give {len(train)} training and "
                             f"{len(val)} validation cases; need at least one of each (add cases, or a "
                             f"splits_final.json)")
        keep = train
        if labelled_patients is not None:
            patients = list(dict.fromkeys(patient_of(c.name) for c in train))
            if labelled_patients > len(patients):
                raise ValueError(f"labelled_patients={labelled_patients}: {self.root} has {len(patients)} patients "
                                 f"with labelled training cases")
            chosen = set(patients[:labelled_patients])
            keep = [c for c in train if patient_of(c.name) in chosen]
        kept = {c.name for c in keep}
        unlabelled = [c for c in train if c.name not in kept] + [c for c in self.training if c.label is None]
        return keep, unlabelled, val, (self.test or val)

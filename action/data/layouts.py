"""Dataset folders of NIfTI volumes, for training and evaluation, next to the ACDC HDF5 layout (action.data.acdc).

    nnunet    nnU-Net's raw layout: imagesTr/<case>_<CCCC><ending> (one file per channel) with
              labelsTr/<case><ending>, optional imagesTs/ (+ labelsTs/), dataset.json (channels, labels, file
              ending: action.data.nnunet) and splits_final.json (its folds)
    pairs     images/ and labels/ with the same file names (or an image's `_0000` channel suffix)
    acdc-raw  the raw ACDC release: patient<NNN>/patient<NNN>_frame<FF>.nii.gz with its _gt label map
    hdf5      data/*.h5 with train_slices.list, val.list, test.list (action.data.acdc.AcdcLayout)

detect_layout(root) tells them apart by their files. In the NIfTI layouts an image without a label map is an
unlabelled training image (semi-supervised training). Splits (NiftiLayout.split): validation is fold K (`--fold`,
default 0) of splits_final.json; a folder without one gets nnU-Net's default 5 folds of its labelled cases
(action.data.nnunet.crossval_folds; one fold per case below 5 labelled cases), written to splits_final.json when
a run trains on it. The labelled set is the first `labelled_cases` cases of the fold's training list, or the
first `labelled_patients` patients (a patient: the cases sharing a name before `_frame<NN>`, as ACDC names them;
any other case is its own patient); the other training images are unlabelled; the test set is imagesTs with
labelsTs (nnunet), else the validation cases.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

from action.data.nnunet import NNUNET_FOLDS, DatasetSpec, crossval_folds

LAYOUTS = ("hdf5", "nnunet", "pairs", "acdc-raw")


@dataclass(frozen=True)
class NiftiCase:
    """One case of a NIfTI layout: name, image path (channel 0), label path (None: unlabelled), the image files of
    channels 1, 2, ... (nnU-Net's `_0001`, `_0002`, ...; empty for one channel)."""

    name: str
    image: str
    label: str | None = None
    more_channels: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[str, ...]:
        """The image file of every channel, channel 0 first."""
        return (self.image, *self.more_channels)


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


def channel_groups(paths: list[str], channels: int = 1, suffixed: bool = False) -> list[tuple[str, list[str]]]:
    """Image files -> [(case name, [file of channel 0, 1, ...])] in name order. With one channel a name loses its
    `_0000` suffix when `suffixed` (nnU-Net folders) or when every file has one (an images/ folder of nnU-Net
    names); with several, each case needs the files `_0000` .. `_000{channels-1}`. Errors name the case and the
    missing or surplus file."""
    from action.data.nifti import case_name, channel_files

    if channels == 1 and not suffixed:  # every file a case (two files of one name: cases.unique_case_names says so)
        strip = channel_files(paths)
        return [(case_name(p, strip), [p]) for p in paths]
    groups: dict[str, dict[int, str]] = {}
    for path in paths:
        name = case_name(path, True)
        channel = int(case_name(path)[len(name) + 1:]) if name != case_name(path) else 0
        groups.setdefault(name, {})
        if channel in groups[name]:
            raise ValueError(f"case {name!r}: two files for channel {channel}: {groups[name][channel]}, {path}")
        groups[name][channel] = path
    out = []
    for name, files in sorted(groups.items()):
        if sorted(files) != list(range(channels)):
            listed = ", ".join(os.path.basename(f) for _, f in sorted(files.items()))
            raise ValueError(f"case {name!r} has the channel files {listed}; expected {channels} channel(s), "
                             f"_0000 .. _{channels - 1:04d} (dataset.json channel_names, or the model's input "
                             f"channels)")
        out.append((name, [files[c] for c in range(channels)]))
    return out


def _folder_cases(images_dir: str, labels_dir: str | None, nnunet: bool, ending: str | None = None,
                  channels: int = 1) -> list[NiftiCase]:
    """Cases of an image folder (files ending in `ending`, default .nii / .nii.gz), each with its label map from
    labels_dir when one exists; nnU-Net channel files (`<case>_<CCCC>`) grouped per case (channel_groups)."""
    from action.data.filenames import image_files
    from action.data.nifti import label_path

    cases = []
    for name, files in channel_groups(image_files(images_dir, ending), channels, nnunet):
        label = label_path(files[0], labels_dir) if labels_dir and os.path.isdir(labels_dir) else None
        cases.append(NiftiCase(name, files[0], label, tuple(files[1:])))
    return cases


class NiftiLayout:
    """A NIfTI dataset folder: `training` (cases of imagesTr / images / patient*, labelled or not), `test` (imagesTs
    with labelsTs when present), `dataset` (dataset.json, {} without one) and `spec` (what it says:
    action.data.nnunet.DatasetSpec), `folds` (splits_final.json's, else nnU-Net's default 5 folds of the labelled
    cases: folds_generated tells), `kind` (a LAYOUTS name). Errors name the folder and what is missing."""

    def __init__(self, root: str, kind: str | None = None):
        self.root, self.kind = root, kind or detect_layout(root)
        if self.kind == "hdf5":
            raise FileNotFoundError(f"{root}: not a NIfTI dataset folder (expected imagesTr/ [nnU-Net], images/ and "
                                    f"labels/, or patient<NNN>/ [raw ACDC])")
        self.dataset = self._json("dataset.json", {})
        self.spec = DatasetSpec.read(self.dataset, os.path.join(root, "dataset.json"))
        ending, channels = self.spec.file_ending, len(self.spec.channels)
        if self.kind == "nnunet":
            self.training = _folder_cases(os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr"), True,
                                          ending, channels)
            self.test = [c for c in _folder_cases(os.path.join(root, "imagesTs"), os.path.join(root, "labelsTs"),
                                                  True, ending, channels) if c.label is not None]
        elif self.kind == "pairs":
            self.training = _folder_cases(os.path.join(root, "images"), os.path.join(root, "labels"), False, ending,
                                          channels)
            self.test = []
        else:
            self.training = []
            for image in sorted(glob.glob(os.path.join(root, "patient*", "patient*_frame??.nii*"))):
                label = image.replace(".nii", "_gt.nii")
                self.training.append(NiftiCase(os.path.basename(image).split(".nii")[0], image,
                                               label if os.path.isfile(label) else None))
            self.test = []
        if not any(c.label is not None for c in self.training):
            found = sorted({os.path.basename(p).split(".", 1)[-1] for p in glob.glob(os.path.join(root, "*", "*.*"))})
            raise FileNotFoundError(f"{root}: no training image has a label map (layout {self.kind}; image files "
                                    f"ending in {ending or '.nii / .nii.gz'}"
                                    + (f"; the folder holds .{', .'.join(found)} files: is dataset.json's "
                                       f"file_ending right?" if found else "") + ")")
        self.folds = self._json("splits_final.json", [])
        self.folds_generated = not self.folds
        if self.folds_generated:
            names = [c.name for c in self.training if c.label is not None]
            self.folds = crossval_folds(names, min(NNUNET_FOLDS, len(names))) if len(names) >= 2 else []

    def _json(self, name: str, default):
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            return default
        try:
            with open(path) as fh:
                return json.load(fh)
        except (ValueError, RecursionError) as exc:  # syntax, not UTF-8, nested too deep, a 5,000-digit number
            raise ValueError(f"{path}: not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None

    def write_folds(self) -> str | None:
        """Writes generated folds to <root>/splits_final.json, as nnU-Net does, so that later runs, `action
        evaluate` and the user see (and may edit) the split; a folder that is not writable keeps none (the folds
        are a pure function of the case names). Returns the path written, else None."""
        if not self.folds_generated or not self.folds:
            return None
        path = os.path.join(self.root, "splits_final.json")
        tmp = os.path.join(self.root, f".splits_final.json.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as fh:
                json.dump(self.folds, fh, indent=4)
            os.replace(tmp, path)
        except OSError:
            return None
        self.folds_generated = False
        return path

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Class names by label value from dataset.json ("labels": {name: value} in nnU-Net v2, {value: name} in
        v1; the ignore label left out), None without one."""
        return self.spec.class_names

    @property
    def channels(self) -> int:
        """Image files (input channels) per case: dataset.json's channel_names, 1 without one."""
        return len(self.spec.channels)

    def split(self, labelled_patients: int | None, fold: int = 0, labelled_cases: int | None = None):
        """(labelled, unlabelled, validation, test) lists of NiftiCase (module docstring: the rule); fold: which
        of `folds` validates; labelled_cases, when given, keeps the first N training cases of the fold labelled
        instead of the first labelled_patients patients."""
        labelled = [c for c in self.training if c.label is not None]
        by_name = {c.name: c for c in labelled}
        if not self.folds:
            raise ValueError(f"{self.root}: {len(labelled)} labelled case(s); need at least two to split into "
                             f"training and validation (add cases, or a splits_final.json)")
        if not 0 <= fold < len(self.folds):
            source = "the generated split" if self.folds_generated else f"{self.root}/splits_final.json"
            raise ValueError(f"fold {fold}: {source} has {len(self.folds)} folds (0 .. {len(self.folds) - 1})")
        chosen_fold = self.folds[fold]
        unknown = [n for n in list(chosen_fold.get("train", [])) + list(chosen_fold.get("val", []))
                   if n not in by_name]
        if unknown:
            raise ValueError(f"{self.root}/splits_final.json names cases without an image and label map: "
                             f"{unknown[:5]}")
        val = [by_name[n] for n in chosen_fold["val"]]
        train = [by_name[n] for n in chosen_fold["train"]]
        if not val or not train:
            raise ValueError(f"{self.root}: fold {fold} has {len(train)} training and {len(val)} validation cases; "
                             f"need at least one of each (add cases, or edit splits_final.json)")
        keep = train
        if labelled_cases is not None:
            if labelled_cases > len(train):
                raise ValueError(f"labelled_cases={labelled_cases}: fold {fold} of {self.root} has {len(train)} "
                                 f"labelled training cases")
            keep = train[:labelled_cases]
        elif labelled_patients is not None:
            patients = list(dict.fromkeys(patient_of(c.name) for c in train))
            if labelled_patients > len(patients):
                raise ValueError(f"labelled_patients={labelled_patients}: {self.root} has {len(patients)} patients "
                                 f"with labelled training cases")
            chosen = set(patients[:labelled_patients])
            keep = [c for c in train if patient_of(c.name) in chosen]
        kept = {c.name for c in keep}
        unlabelled = [c for c in train if c.name not in kept] + [c for c in self.training if c.label is None]
        return keep, unlabelled, val, (self.test or val)

"""ACDC cardiac MRI in the common semi-supervised HDF5 layout.

Layout (a folder, e.g. ../shared/data/acdc): `data/<name>.h5` with datasets `image` (float, [0, 1]) and `label`
(integers 0 background, 1 RV, 2 myocardium, 3 LV); `train_slices.list` (one 2D training slice per line:
`patient<NNN>_frame<FF>_slice_<Z>`), `val.list` and `test.list` (one 3D volume per line: `patient<NNN>_frame<FF>`).
The labelled set for N labelled patients is every slice of the first N patients of train_slices.list (for 3 / 7:
its first 68 / 136 lines, the reference mapping; for 1 the reference's first 23 lines); the remaining slices are
the unlabelled set. The HDF5 files carry no voxel spacing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from action.data.checks import finite_image, label_map, labels_in_range

CLASSES = ("background", "RV", "Myo", "LV")
LABELLED_SLICES = {1: 23, 3: 68, 7: 136}


def patient_of(name: str) -> str:
    """The patient of a slice or volume name: `patient<NNN>_frame<FF>[_slice_<Z>]` -> `patient<NNN>`."""
    return name.split("_", 1)[0]


def _read_list(path: str) -> list[str]:
    """The names of a list file, each a checked case name (action.data.names: the error names the file and line)."""
    from action.data.names import read_name_list

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ACDC list file not found: {path}")
    names = read_name_list(path)
    if not names:
        raise ValueError(f"ACDC list file is empty: {path}")
    return names


def read_case(root: str, name: str, num_classes: int | None = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label int64) of one slice (H, W) or volume (Z, H, W), checked (action.data.checks: a finite
    image, an integral label map, labels in [0, num_classes) unless num_classes is None, the shapes equal): the
    error names the file."""
    import h5py

    from action.data.names import check_case_name

    path = os.path.join(root, "data", f"{check_case_name(name, 'ACDC case')}.h5")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ACDC case {name!r}: file not found: {path}")
    try:
        with h5py.File(path, "r") as fh:
            missing = [k for k in ("image", "label") if k not in fh]
            if missing:
                raise ValueError(f"ACDC case {name!r}: {path} has no dataset(s) {missing} (found {list(fh.keys())})")
            check_datasets(path, fh, ("image", "label"))
            image = np.asarray(fh["image"][()], dtype=np.float32)
            raw_label = np.asarray(fh["label"][()])
    except OSError as exc:
        raise ValueError(f"ACDC case {name!r}: cannot read {path} as HDF5 ({exc})") from exc
    if image.shape != raw_label.shape:
        raise ValueError(f"ACDC case {name!r}: image shape {image.shape} != label shape {raw_label.shape} in {path}")
    finite_image(image, f"ACDC case {name!r}: {path} dataset 'image'")
    label = label_map(raw_label, f"ACDC case {name!r}: {path} dataset 'label'")
    if num_classes is not None:
        labels_in_range(label, num_classes, f"ACDC case {name!r}: {path} dataset 'label'")
    return image, label


def check_datasets(path: str, fh, keys) -> None:
    """HDF5 datasets `keys` of open file `fh` (at `path`) checked before they are read: each a dataset (not a group)
    of real numbers (not complex, compound or strings), together no larger than the file can hold and the read cap
    allow (action.data.limits: a 4 kB file declaring 10 GB is refused before any allocation)."""
    import h5py

    from action.data.limits import DEFLATE_RATIO, check_declared

    total, ratio, shown = 0, 1.0, []
    for key in keys:
        item = fh[key]
        if not isinstance(item, h5py.Dataset):
            raise ValueError(f"{path}: {key!r} is an HDF5 {type(item).__name__.lower()}, not a dataset; expected an "
                             f"array of numbers")
        if item.dtype.names or item.dtype.kind not in "biuf":
            kind = "compound" if item.dtype.names else {"c": "complex", "S": "string", "U": "string", "O": "object"
                                                        }.get(item.dtype.kind, str(item.dtype))
            raise ValueError(f"{path}: dataset {key!r} holds {kind} values ({item.dtype}); expected real numbers "
                             f"(integers or floats)")
        total += int(item.size) * item.dtype.itemsize
        ratio = DEFLATE_RATIO if item.chunks is not None else ratio  # chunked: compressed, or unwritten (fill value)
        shown.append(f"{key!r} {tuple(item.shape)} {item.dtype}")
    check_declared(path, total, f"dataset(s) {', '.join(shown)}", ratio)


@dataclass(frozen=True)
class AcdcLayout:
    """The lists of an ACDC folder, validated on construction (missing lists fail here, before any training)."""

    root: str

    def __post_init__(self):
        if not os.path.isdir(os.path.join(self.root, "data")):
            raise FileNotFoundError(f"ACDC root {self.root!r} has no data/ folder of .h5 files")

    @property
    def train_slices(self) -> list[str]:
        return _read_list(os.path.join(self.root, "train_slices.list"))

    @property
    def val_volumes(self) -> list[str]:
        return _read_list(os.path.join(self.root, "val.list"))

    @property
    def test_volumes(self) -> list[str]:
        return _read_list(os.path.join(self.root, "test.list"))

    def split(self, labelled_patients: int | None = None, labelled: list[str] | None = None,
              labelled_cases: int | None = None):
        """(labelled slice names, unlabelled slice names): by number of labelled patients N (every slice of the
        first N patients of train_slices.list, in order of first appearance: the reference's 68 / 136 slices for
        3 / 7; N = 1 keeps the reference's first 23 lines, LABELLED_SLICES), by number of labelled cases N (every
        slice of the first N volumes `patient<NNN>_frame<FF>`, in order of first appearance) or by an explicit list
        of slice names."""
        names = self.train_slices
        if sum(x is not None for x in (labelled_patients, labelled, labelled_cases)) != 1:
            raise ValueError("give exactly one of labelled_patients (a number of patients >= 1), labelled_cases (a "
                             "number of volumes >= 1) and labelled (a list of slice names)")
        if labelled_cases is not None:
            if isinstance(labelled_cases, bool) or not isinstance(labelled_cases, int) or labelled_cases < 1:
                raise ValueError(f"labelled_cases must be a number of volumes >= 1, got {labelled_cases!r}")
            volumes = list(dict.fromkeys(n.rpartition("_slice_")[0] or n for n in names))
            if labelled_cases >= len(volumes):
                raise ValueError(f"labelled_cases={labelled_cases}: train_slices.list of {self.root} has "
                                 f"{len(volumes)} volumes, and at least one must stay unlabelled; choose at most "
                                 f"{len(volumes) - 1}")
            chosen = set(volumes[:labelled_cases])
            inside = [(n.rpartition("_slice_")[0] or n) in chosen for n in names]
            return [n for n, k in zip(names, inside) if k], [n for n, k in zip(names, inside) if not k]
        if labelled_patients is not None:
            if isinstance(labelled_patients, bool) or not isinstance(labelled_patients, int) or labelled_patients < 1:
                raise ValueError(f"labelled_patients must be a number of patients >= 1, got {labelled_patients!r}")
            if labelled_patients in LABELLED_SLICES:
                n = LABELLED_SLICES[labelled_patients]
                return names[:n], names[n:]
            patients = list(dict.fromkeys(patient_of(n) for n in names))
            if labelled_patients >= len(patients):
                raise ValueError(f"labelled_patients={labelled_patients}: train_slices.list of {self.root} has "
                                 f"{len(patients)} patients, and at least one must stay unlabelled; choose at most "
                                 f"{len(patients) - 1}")
            chosen = set(patients[:labelled_patients])
            return [n for n in names if patient_of(n) in chosen], [n for n in names if patient_of(n) not in chosen]
        chosen = set(labelled)
        unknown = sorted(chosen - set(names))
        if unknown:
            raise ValueError(f"labelled names not in train_slices.list: {unknown[:5]}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        return [n for n in names if n in chosen], [n for n in names if n not in chosen]


class AcdcSlices(Dataset):
    """2D slices: item -> {"image": (1, H, W) float32, "label": (H, W) int64, "name": str}, resized to `size`
    (bilinear for the image, nearest for the label) when given; labels=False drops the label (unlabelled use);
    used labels outside [0, num_classes) are an error naming the file (read_case)."""

    def __init__(self, root: str, names: list[str], size: tuple[int, int] | None = None, labels: bool = True,
                 num_classes: int | None = len(CLASSES)):
        if not names:
            raise ValueError("AcdcSlices needs at least one slice name")
        self.root, self.names, self.size, self.labels = root, list(names), size, labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        image, label = read_case(self.root, self.names[i], self.num_classes if self.labels else None)
        if image.ndim != 2:
            raise ValueError(f"ACDC slice {self.names[i]!r} must be 2D, got shape {image.shape}")
        img = torch.from_numpy(image)[None]
        lab = torch.from_numpy(label)
        if self.size is not None and tuple(img.shape[-2:]) != tuple(self.size):
            img = F.interpolate(img[None], size=self.size, mode="bilinear", align_corners=False)[0]
            lab = F.interpolate(lab[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        item = {"image": img, "name": self.names[i]}
        if self.labels:
            item["label"] = lab
        return item


class AcdcVolumes(Dataset):
    """3D volumes for evaluation: item -> {"image": (Z, H, W) float32, "label": (Z, H, W) int64, "name": str},
    labels checked against [0, num_classes) (read_case)."""

    def __init__(self, root: str, names: list[str], num_classes: int = len(CLASSES)):
        if not names:
            raise ValueError("AcdcVolumes needs at least one volume name")
        self.root, self.names, self.num_classes = root, list(names), num_classes

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        image, label = read_case(self.root, self.names[i], self.num_classes)
        if image.ndim != 3:
            raise ValueError(f"ACDC volume {self.names[i]!r} must be 3D, got shape {image.shape}")
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "name": self.names[i]}


def assemble_volumes(root: str, slice_names: list[str], size: tuple[int, int] | None = None,
                     num_classes: int | None = len(CLASSES)):
    """Training slices (`<volume>_slice_<Z>`) grouped into volumes in slice order -> (images [(Z, H, W) float32],
    labels [(Z, H, W) int64], volume names), every slice resized in-plane to `size` when given (bilinear image,
    nearest label); labels checked against [0, num_classes) unless it is None (unlabelled use)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in slice_names:
        volume, sep, z = name.rpartition("_slice_")
        if not sep or not z.isdigit():
            raise ValueError(f"slice name {name!r} does not end in _slice_<Z>; cannot assemble volumes")
        groups.setdefault(volume, []).append((int(z), name))
    images, labels, names = [], [], []
    for volume, members in groups.items():
        dataset = AcdcSlices(root, [n for _, n in sorted(members)], size, num_classes=num_classes)
        items = [dataset[i] for i in range(len(dataset))]
        if size is None and len({tuple(it["image"].shape) for it in items}) > 1:
            raise ValueError(f"volume {volume}: slices differ in shape; pass a size")
        images.append(torch.cat([it["image"] for it in items]))
        labels.append(torch.stack([it["label"] for it in items]))
        names.append(volume)
    return images, labels, names

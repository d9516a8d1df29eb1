"""`action data convert`: the ACDC HDF5 layout -> nnU-Net's raw layout, which every command reads back
(`action train --data`, `action evaluate --data` or `--images/--labels`, `action predict --input`).

    imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz   training volumes (assembled from train_slices.list, in
                                                          its order) and the validation volumes (val.list)
    imagesTs/<case>_0000.nii.gz, labelsTs/<case>.nii.gz   the test volumes (test.list)
    splits_final.json   [{"train": [...], "val": [...]}]: the HDF5 split as nnU-Net's fold 0
    dataset.json        channel_names, labels, numTraining, file_ending (nnU-Net v2)

The folder appears whole or not at all (action.data.staging): everything is written into a hidden temporary folder
beside --out and renamed into place at the end, so a killed or failed conversion leaves no --out that a later
command could take for a complete dataset. --out must not exist (or be empty). Every file name comes from a checked
case name (action.data.names) and stays inside the folder.

Arrays are written in (x, y, z) = (W, H, Z) order with a diagonal affine of the given spacing (RAS: the orientation
an HDF5-trained checkpoint records). The HDF5 files store no spacing: pass it, or 1 mm is written.
"""
from __future__ import annotations

import json
import os

import numpy as np

from action.data.acdc import CLASSES, AcdcLayout, assemble_volumes, read_case
from action.data.names import check_case_name, output_path
from action.data.nifti import save_nifti
from action.data.staging import staged_folder


def _write_case(out_dir: str, images: str, labels: str, name: str, image: np.ndarray, label: np.ndarray,
                affine: np.ndarray) -> list[str]:
    """One volume (Z, H, W) as <images>/<name>_0000.nii.gz and <labels>/<name>.nii.gz."""
    check_case_name(name, "data convert")
    return [save_nifti(np.transpose(image.astype(np.float32), (2, 1, 0)), affine,
                       output_path(out_dir, images, f"{name}_0000.nii.gz")),
            save_nifti(np.transpose(label.astype(np.uint8), (2, 1, 0)), affine,
                       output_path(out_dir, labels, f"{name}.nii.gz"))]


def hdf5_to_nnunet(root: str, out_dir: str, names: str | list[str] = "all", spacing=(1.0, 1.0, 1.0),
                   max_volumes: int | None = None, progress: bool = True) -> dict:
    """Writes the nnU-Net raw layout (module docstring) for `names`: "all" (training + validation into imagesTr
    with the split in splits_final.json, test into imagesTs), "test" or "val" (those volumes into imagesTs), or a
    list of volume names (into imagesTs); max_volumes: only the first N volumes of each list (quick checks).
    Written whole or not at all (module docstring): `out_dir` must not exist or be empty.
    Returns {"training": n, "test": n, "files": [...]}."""
    layout = AcdcLayout(root)
    with staged_folder(out_dir) as staging:
        done = _convert(layout, staging, names, spacing, max_volumes, progress)
    done["files"] = [os.path.join(out_dir, os.path.relpath(f, staging)) for f in done["files"]]
    return done


def _convert(layout: AcdcLayout, out_dir: str, names, spacing, max_volumes: int | None, progress: bool) -> dict:
    """hdf5_to_nnunet's writing, into `out_dir` (the staging folder)."""
    from tqdm.auto import tqdm

    root = layout.root
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    files: list[str] = []
    train_names: list[str] = []
    val_names: list[str] = []
    if names == "all":
        slices = layout.train_slices
        if max_volumes is not None:  # the slices of the first N volumes, in the list's order
            first = list(dict.fromkeys(n.rpartition("_slice_")[0] for n in slices))[:max_volumes]
            slices = [n for n in slices if n.rpartition("_slice_")[0] in set(first)]
        images, labels, train_names = assemble_volumes(root, slices)
        for name, image, label in tqdm(list(zip(train_names, images, labels)), desc="training volumes",
                                       disable=not progress, leave=False):
            files += _write_case(out_dir, "imagesTr", "labelsTr", name, image.numpy(), label.numpy(), affine)
        val_names = layout.val_volumes[:max_volumes]
        for name in tqdm(val_names, desc="validation volumes", disable=not progress, leave=False):
            files += _write_case(out_dir, "imagesTr", "labelsTr", name, *read_case(root, name), affine)
        test = layout.test_volumes
    else:
        test = {"test": layout.test_volumes, "val": layout.val_volumes}.get(names, names) \
            if isinstance(names, str) else names
        if isinstance(test, str):
            raise ValueError(f"--names: expected all, test, val or a file of volume names, got {names!r}")
    test = test[:max_volumes]
    for name in tqdm(test, desc="test volumes", disable=not progress, leave=False):
        image, label = read_case(root, name)
        if image.ndim != 3:
            raise ValueError(f"ACDC case {name!r} is not a volume (shape {image.shape}); convert val/test volumes")
        files += _write_case(out_dir, "imagesTs", "labelsTs", name, image, label, affine)
    dataset = {"name": "ACDC, converted from the HDF5 layout by `action data convert`",
               "channel_names": {"0": "MRI"}, "labels": {c: i for i, c in enumerate(CLASSES)},
               "numTraining": len(train_names) + len(val_names), "file_ending": ".nii.gz"}
    with open(output_path(out_dir, "dataset.json"), "w") as fh:
        json.dump(dataset, fh, indent=1)
    files.append(os.path.join(out_dir, "dataset.json"))
    if train_names:
        with open(output_path(out_dir, "splits_final.json"), "w") as fh:
            json.dump([{"train": train_names, "val": val_names}], fh, indent=1)
        files.append(os.path.join(out_dir, "splits_final.json"))
    return {"training": len(train_names) + len(val_names), "test": len(test), "files": files}

"""Evaluation of a trained model on whole volumes: per-case metrics (CSV), a summary table (mean and std per
class and overall, Markdown + JSON), optional NIfTI predictions in the source space, PNG overlays of a few slices.

A case is (name, image (Z, H, W) float, label (Z, H, W) int64 or None, spacing (3,) in (Z, H, W) order or None,
reference Volume or None). Cases come from the ACDC HDF5 layout (no spacing stored: metrics in voxel units, the
reference tables' convention) or from NIfTI (spacing from the header; predictions written with its affine).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from action.engine.logs import dump_json
from action.metrics import SegmentationMetrics


@dataclass
class Case:
    name: str
    image: torch.Tensor  # (Z, H, W)
    label: torch.Tensor | None = None  # (Z, H, W)
    spacing: tuple[float, float, float] | None = None  # (Z, H, W) order, mm
    reference: object | None = None  # action.data.nifti.Volume of the image, for writing predictions


def acdc_cases(root: str, names: list[str], num_classes: int | None = None):
    """Cases of the ACDC HDF5 layout (volumes named in val.list / test.list); labels checked against
    [0, num_classes) when given (the error names the file)."""
    from action.data import AcdcVolumes
    from action.data.acdc import CLASSES

    volumes = AcdcVolumes(root, names, num_classes or len(CLASSES))
    for i in range(len(volumes)):
        item = volumes[i]
        yield Case(item["name"], item["image"], item["label"])


def case_name(image_path: str) -> str:
    """The case name of a NIfTI image (its predictions/<name>.nii.gz, overlays/<name>.png): the file name
    without .nii / .nii.gz."""
    return os.path.basename(image_path).split(".nii")[0]


def unique_case_names(paths: list[str]) -> list[str]:
    """The case names of NIfTI image paths; two inputs with one name (c.nii and c.nii.gz, or the same file name
    in two folders) would write one prediction over the other: an error naming them all, before anything runs."""
    names: dict[str, list[str]] = {}
    for path in paths:
        names.setdefault(case_name(path), []).append(path)
    clashes = {n: p for n, p in names.items() if len(p) > 1}
    if clashes:
        listed = "; ".join(f"{n!r}: {', '.join(p)}" for n, p in sorted(clashes.items()))
        raise ValueError(f"{len(clashes)} output name(s) shared by several inputs ({listed}); each would write "
                         f"predictions/<name>.nii.gz over the other: rename or remove the duplicates")
    return list(names)


def nifti_cases(pairs: list[tuple[str, str | None]], num_classes: int | None = None):
    """Cases from NIfTI files: (image path, label path or None). nibabel's (X, Y, Z) arrays are moved to
    (Z, Y, X) for slice-wise inference and back when written. Images must be finite; label maps integral and,
    when num_classes is given, in [0, num_classes); output names distinct (unique_case_names, checked before the
    first case is read). Each error names the file."""
    from action.data.checks import finite_image, labels_in_range
    from action.data.nifti import load_nifti, load_pair

    unique_case_names([image for image, _ in pairs])
    for image_path, label_path in pairs:
        if label_path is not None:
            image, label = load_pair(image_path, label_path)
            if num_classes is not None:
                labels_in_range(label.data, num_classes, label_path)
            lab = torch.from_numpy(np.ascontiguousarray(label.data.transpose(2, 1, 0)))
        else:
            image, lab = load_nifti(image_path, np.float32), None
            finite_image(image.data, image_path)
        yield Case(case_name(image_path), torch.from_numpy(np.ascontiguousarray(image.data.transpose(2, 1, 0))),
                   lab, tuple(reversed(image.spacing[:3])), image)


def save_overlays(case: Case, prediction: torch.Tensor, path: str, slices: int = 3) -> str | None:
    """A PNG with `slices` rows (slices with the most foreground) of image | ground truth | prediction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ref = case.label if case.label is not None else prediction
    order = torch.argsort((ref > 0).flatten(1).sum(1), descending=True)[:slices].sort().values.tolist()
    cols = 3 if case.label is not None else 2
    fig, axes = plt.subplots(len(order), cols, figsize=(3 * cols, 3 * len(order)), squeeze=False)
    vmax = max(int(prediction.max()), int(ref.max()), 1)
    for r, z in enumerate(order):
        panels = [("image", None)] + ([("ground truth", case.label[z])] if case.label is not None else []) + \
                 [("prediction", prediction[z])]
        for c, (title, lab) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(case.image[z].numpy(), cmap="gray")
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab.numpy(), 0), cmap="jet", alpha=0.45, vmin=0, vmax=vmax,
                          interpolation="nearest")
            ax.set_title(f"{title} z={z}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def evaluate(predict, cases, out_dir: str | None, num_classes: int, class_names=None, save_predictions=False,
             overlays: int = 0, progress: bool = True, total: int | None = None,
             written: list | None = None) -> SegmentationMetrics:
    """predict: Case -> labels (Z, H, W). Scores every case with labels; writes under out_dir (when given)
    metrics.csv (per case), summary.md and summary.json (standard JSON: NaN as null beside its counts),
    predictions/<name>.nii.gz (save_predictions; with the source affine for NIfTI cases, unit spacing for HDF5
    ones; each path appended to `written` when given) and overlays/<name>.png for the first `overlays` cases.
    Two cases of one name are an error before the second is predicted (its files would replace the first's)."""
    from tqdm.auto import tqdm

    from action.data.nifti import save_nifti, write_like

    metrics = SegmentationMetrics(num_classes, class_names)
    seen: set[str] = set()
    for i, case in enumerate(tqdm(cases, desc="evaluating", total=total, disable=not progress, leave=False)):
        if case.name in seen:
            raise ValueError(f"two cases are named {case.name!r}: the second would overwrite the first's outputs")
        seen.add(case.name)
        pred = predict(case)
        if case.label is not None:
            metrics.update(pred.numpy(), case.label.numpy(), case.spacing, case.name)
        if out_dir and save_predictions:
            path = os.path.join(out_dir, "predictions", f"{case.name}.nii.gz")
            data = pred.numpy().astype(np.uint8).transpose(2, 1, 0)
            if case.reference is not None:
                write_like(data, case.reference, path)
            else:
                save_nifti(data, np.eye(4), path)
            if written is not None:
                written.append(path)
        if out_dir and i < overlays:
            save_overlays(case, pred, os.path.join(out_dir, "overlays", f"{case.name}.png"))
    if out_dir and metrics.cases:
        os.makedirs(out_dir, exist_ok=True)
        metrics.to_csv(os.path.join(out_dir, "metrics.csv"))
        with open(os.path.join(out_dir, "summary.md"), "w") as fh:
            fh.write(metrics.summary_table() + "\n")
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            dump_json(metrics.aggregate(), fh, indent=1)  # NaN as null; the NaN counts are in the summary
    return metrics


def fast_dice(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> list[float]:
    """Dice per foreground class of one volume (both empty -> 1), for validation during training."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        denom = int(p.sum() + g.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out

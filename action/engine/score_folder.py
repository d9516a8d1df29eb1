"""Scoring prediction files that exist, without a checkpoint (`action evaluate --predictions DIR --labels DIR`,
nnUNetv2_evaluate_folder's job): every prediction <case>.nii(.gz) against the label map of the same name, with the
metrics of action.metrics in mm from the label map's header, and the files `action evaluate` writes (metrics.csv,
summary.md, summary.json).

Rules: every prediction needs a label map (else an error naming the missing ones); label maps without a prediction
are listed and left out; a prediction and its label map must share shape and affine (within 1e-3, as image and
label pairs must: action.data.nifti.load_pair) and hold integral labels in [0, num_classes).
"""
from __future__ import annotations

import glob
import os
import sys

import numpy as np

from action.metrics import SegmentationMetrics


def nifti_files(folder: str, what: str, subfolder: str) -> list[str]:
    """The .nii / .nii.gz files of `folder`, or of folder/<subfolder> when `folder` is an output folder of
    `action predict` / `evaluate` / `ensemble` (which write predictions/ and probabilities/ inside it)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {folder}: no such folder")
    files = sorted(glob.glob(os.path.join(folder, "*.nii")) + glob.glob(os.path.join(folder, "*.nii.gz")))
    if not files and os.path.isdir(os.path.join(folder, subfolder)):
        return nifti_files(os.path.join(folder, subfolder), what, subfolder)
    if not files:
        raise FileNotFoundError(f"{what} {folder}: no .nii / .nii.gz files (nor a {subfolder}/ folder holding them)")
    return files


def matched_pairs(predictions: str, labels: str | dict[str, str], names: list[str] | None = None,
                  limit: int | None = None) -> list[tuple[str, str, str]]:
    """(case, prediction path, label path) for every prediction (labels: a folder, or {case: label path}), after
    --cases (names) and --max-volumes (limit)."""
    from action.data.nifti import case_name
    from action.engine.evaluate import select_cases, unique_case_names

    files = nifti_files(predictions, "--predictions", "predictions")
    cases = [case_name(p) for p in files]
    unique_case_names(cases, files)
    if isinstance(labels, str):
        label_files = nifti_files(labels, "--labels", "labels")
        labels = {case_name(p): p for p in label_files}
    missing = [c for c in cases if c not in labels]
    if missing:
        raise FileNotFoundError(f"{len(missing)} prediction(s) have no label map of the same name: {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''}; label maps are named like "
                                f"{sorted(labels)[:3]}")
    spare = sorted(set(labels) - set(cases))
    if spare and names is None:
        print(f"{len(spare)} label map(s) have no prediction and are not scored: {spare[:5]}"
              f"{' ...' if len(spare) > 5 else ''}", file=sys.stderr)
    items = [(c, p, labels[c]) for c, p in zip(cases, files)]
    return select_cases(items, names, limit, lambda i: i[0])


def _load_pair(prediction: str, label: str):
    from action.data.checks import label_map
    from action.data.nifti import load_nifti

    pred, gt = load_nifti(prediction), load_nifti(label)
    if pred.data.shape != gt.data.shape:
        raise ValueError(f"prediction {prediction} shape {pred.data.shape} != label map {label} shape "
                         f"{gt.data.shape}: predictions must be in the label map's space (action predict writes "
                         f"them in the input image's)")
    if not np.allclose(pred.affine, gt.affine, atol=1e-3):
        raise ValueError(f"prediction {prediction} and label map {label} have different affines (a different "
                         f"space):\n{pred.affine}\n{gt.affine}")
    return label_map(pred.data, prediction), label_map(gt.data, label), gt.spacing[:3]


def score_folder(predictions: str, labels, out_dir: str | None, num_classes: int | None = None, class_names=None,
                 names: list[str] | None = None, limit: int | None = None, nsd_tolerance: float | None = None,
                 postprocess=None, progress: bool = True) -> SegmentationMetrics:
    """Scores the prediction files of `predictions` against `labels` (a folder, or {case: label path}) and writes
    metrics.csv, summary.md and summary.json under out_dir (when given). num_classes: from class_names when given,
    else the largest label value found in the label maps and predictions + 1 (a first pass reads them).
    postprocess: labels -> labels applied to each prediction first (e.g. largest component)."""
    from tqdm.auto import tqdm

    from action.data.checks import labels_in_range
    from action.engine.evaluate import write_summary

    items = matched_pairs(predictions, labels, names, limit)
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is None:
        top = 1
        for _, p, g in tqdm(items, desc="reading labels", disable=not progress, leave=False):
            pred, gt, _ = _load_pair(p, g)
            top = max(top, int(pred.max(initial=0)), int(gt.max(initial=0)))
        num_classes = top + 1
    metrics = SegmentationMetrics(num_classes, class_names,
                                  **({} if nsd_tolerance is None else {"nsd_tolerance": nsd_tolerance}))
    for case, p, g in tqdm(items, desc="scoring", disable=not progress, leave=False):
        pred, gt, spacing = _load_pair(p, g)
        labels_in_range(pred, num_classes, p)
        labels_in_range(gt, num_classes, g)
        if postprocess is not None:
            pred = postprocess(pred)
        metrics.update(pred, gt, spacing, case)
    if out_dir and metrics.cases:
        write_summary(metrics, out_dir)
    return metrics

"""Evaluation of a trained model on whole volumes: per-case metrics (CSV), a summary table (mean and std per
class and overall, Markdown + JSON), optional NIfTI predictions in the source space, PNG overlays of a few slices.

Cases (action.data.cases.Case, re-exported here) come from the ACDC HDF5 layout (no spacing stored: metrics in voxel
units, the reference tables' convention) or from NIfTI (spacing from the header; predictions turned back to the
source's axes and written with its header). `select_cases` keeps the named cases or the first N.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from action.data.cases import Case, acdc_cases, nifti_cases, unique_case_names  # noqa: F401  (re-exported)
from action.engine.logs import dump_json
from action.engine.overlays import save_overlays  # noqa: F401  (re-exported)
from action.metrics import SegmentationMetrics

__all__ = ["Case", "acdc_cases", "evaluate", "fast_dice", "nifti_cases", "save_overlays", "select_cases",
           "write_summary"]


def select_cases(items: list, names: list[str] | None = None, limit: int | None = None, name_of=str) -> list:
    """The items (any list, named by name_of(item)) whose names are in `names` (in the items' order; every name
    must exist), then at most the first `limit` of them."""
    if names is not None:
        known = {name_of(item) for item in items}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--cases: no case named {unknown[:5]} here; cases are named like "
                             f"{sorted(known)[:3]} ({len(known)} in all)")
        wanted = set(names)
        items = [item for item in items if name_of(item) in wanted]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--max-volumes: expected >= 1, got {limit}")
        items = items[:limit]
    return items


def evaluate(predict, cases, out_dir: str | None, num_classes: int, class_names=None, save_predictions=False,
             overlays: int = 0, progress: bool = True, total: int | None = None,
             written: list | None = None, save_probabilities: bool = False, desc: str = "evaluating",
             nsd_tolerance: float | None = None) -> SegmentationMetrics:
    """predict: Case -> labels (Z, H, W) (an action.engine.inference.VolumePredictor for save_probabilities).
    Scores every case with labels; writes under out_dir (when given) metrics.csv (per case), summary.md and
    summary.json (standard JSON: NaN as null beside its counts), predictions/<name>.nii.gz (save_predictions; in
    the source's axes with its header for NIfTI cases, unit spacing for HDF5 ones; each path appended to `written`
    when given), probabilities/<name>.nii.gz (save_probabilities: the softmax per class, action.engine.outputs)
    and overlays/<name>.png for the first `overlays` cases. Two cases of one name are an error before the second
    is predicted (its files would replace the first's). desc: the progress bar's label."""
    from tqdm.auto import tqdm

    from action.data.filenames import ending_of
    from action.data.image_io import write_volume
    from action.data.names import check_case_name, output_path
    from action.data.nifti import save_nifti
    from action.engine.outputs import PROBABILITIES, case_file, source_probabilities, write_probabilities

    if save_probabilities and not hasattr(predict, "predict"):
        raise ValueError("save_probabilities needs a VolumePredictor (action.engine.inference.volume_predictor)")
    metrics = SegmentationMetrics(num_classes, class_names, **({} if nsd_tolerance is None else
                                                                 {"nsd_tolerance": nsd_tolerance}))
    orientation = getattr(getattr(predict, "preprocessing", None), "orientation", None)
    seen: set[str] = set()
    for i, case in enumerate(tqdm(cases, desc=desc, total=total, disable=not progress, leave=False)):
        if case.name in seen:
            raise ValueError(f"two cases are named {case.name!r}: the second would overwrite the first's outputs")
        seen.add(check_case_name(case.name, "evaluate"))  # its outputs are named after it
        pred, probs = predict.predict(case, save_probabilities) if hasattr(predict, "predict") else \
            (predict(case), None)
        if case.label is not None:
            metrics.update(pred.numpy(), case.label.numpy(), case.spacing, case.name)
        if out_dir and save_predictions:  # in the input's format (.nii.gz for HDF5 cases)
            ending = ending_of(case.reference.path) if case.reference is not None else None
            path = output_path(out_dir, "predictions", f"{case.name}{ending or '.nii.gz'}")
            data = case.to_source(pred).astype(np.uint8)
            if case.reference is not None:
                write_volume(data, case.reference, path)
            else:
                save_nifti(data, np.eye(4), path)
            if written is not None:
                written.append(path)
        if out_dir and probs is not None:
            path = write_probabilities(source_probabilities(case, probs), case.reference,
                                       case_file(out_dir, PROBABILITIES, case.name))
            if written is not None:
                written.append(path)
        if out_dir and i < overlays:
            save_overlays(case, pred, output_path(out_dir, "overlays", f"{case.name}.png"), class_names=class_names,
                          orientation=orientation if case.reference is not None else None)
    if out_dir and metrics.cases:
        write_summary(metrics, out_dir)
    return metrics


def write_summary(metrics: SegmentationMetrics, out_dir: str) -> None:
    """metrics.csv (per case), summary.md (the table) and summary.json (standard JSON: NaN as null beside its
    counts) under out_dir."""
    from action.data.names import output_path

    os.makedirs(out_dir, exist_ok=True)
    metrics.to_csv(output_path(out_dir, "metrics.csv"))
    with open(output_path(out_dir, "summary.md"), "w") as fh:
        fh.write(metrics.summary_table() + "\n")
    with open(output_path(out_dir, "summary.json"), "w") as fh:
        dump_json(metrics.aggregate(), fh, indent=1)  # NaN as null; the NaN counts are in the summary


def fast_dice(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> list[float]:
    """Dice per foreground class of one volume (both empty -> 1), for validation during training; voxels labelled
    IGNORE_INDEX in gt (a dataset's ignore label) count for neither side."""
    from action.data.labels import IGNORE_INDEX

    valid = gt != IGNORE_INDEX
    out = []
    for c in range(1, num_classes):
        p, g = (pred == c) & valid, gt == c
        denom = int(p.sum() + g.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out

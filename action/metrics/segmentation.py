"""Dice, Jaccard, HD95, ASD and NSD of label volumes, per foreground class, the conventions of the field's tables.

Conventions (those of medpy.metric.binary, which the ACTION and SSL4MIS evaluations use):
- A surface voxel is a foreground voxel with a background neighbour (6-connectivity in 3D, 4 in 2D); a volume
  touching the array border has its border voxels on the surface.
- Surface distances are Euclidean, in the units of `spacing` (mm when the voxel spacing is given, voxels without
  it), from every surface voxel of one mask to the nearest surface voxel of the other, by distance transforms.
- HD95 = 95th percentile of the distances in both directions pooled (medpy's `hd95`); ASD = mean distance from
  the prediction's surface to the ground truth's (medpy's `asd`, one-directional); ASSD = mean over both
  directions pooled.
- hd95_monai = the larger of the two directed 95th percentiles (MONAI's compute_hausdorff_distance with
  percentile=95, directed=False): never below medpy's pooled value, higher where one direction's errors dominate.
- NSD (normalised surface Dice at a tolerance tau, in the units of `spacing`) = the share of both surfaces' voxels
  within tau of the other surface: (|{d_pg <= tau}| + |{d_gp <= tau}|) / (|S_p| + |S_g|), MONAI's
  compute_surface_dice (use_subvoxels=False) and the voxel form of Nikolov et al.'s surface Dice.
  MONAI uses the same surfaces (a foreground voxel with a background face neighbour, the array border counting as
  background) and the same Euclidean distance transforms, so both MONAI numbers are equal here up to its float32.
- Voxels whose ground truth is IGNORE_INDEX (255, action.data.labels; a dataset's `ignore` label is read as it,
  action.data.nnunet) are left out: both masks are restricted to the other voxels (nnU-Net's evaluation does the
  same for Dice).
- Empty cases are explicit: both masks empty -> Dice 1, Jaccard 1, NSD 1, distances 0 (MONAI: NaN); exactly one
  empty -> Dice 0, Jaccard 0, NSD 0, distances NaN (summaries count them separately, never as 0).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from action.data.labels import IGNORE_INDEX

METRICS = ("dice", "jaccard", "hd95", "asd", "assd", "hd95_monai", "nsd")
# the default NSD tolerance, in the units of the spacing (mm for NIfTI cases, voxels for the HDF5 layout)
NSD_TOLERANCE = 2.0


def _as_bool(name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D mask, got shape {arr.shape}")
    return arr.astype(bool)


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must hold {ndim} positive finite values (one per axis), got {spacing!r}")
    return sp


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred, gt, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """pred, gt: non-empty boolean masks of one shape -> (distances from pred's surface to gt's, gt's to pred's)."""
    p, g = _as_bool("pred", pred), _as_bool("gt", gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    if not p.any() or not g.any():
        raise ValueError("surface_distances needs two non-empty masks (binary_metrics handles empty ones)")
    sp = _spacing(spacing, p.ndim)
    sp_, sg = _surface(p), _surface(g)
    to_g = ndimage.distance_transform_edt(~sg, sampling=sp)
    to_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    return to_g[sp_], to_p[sg]


def _tolerance(tolerance) -> float:
    tau = float(tolerance)
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"nsd_tolerance must be a finite distance >= 0 (in the units of the spacing), got "
                         f"{tolerance!r}")
    return tau


def binary_metrics(pred, gt, spacing=None, nsd_tolerance: float = NSD_TOLERANCE) -> dict[str, float]:
    """pred, gt: boolean masks (2D or 3D) -> {dice, jaccard, hd95, asd, assd, hd95_monai, nsd} with the module's
    conventions (nsd at nsd_tolerance, in the units of `spacing`)."""
    p, g = _as_bool("pred", pred), _as_bool("gt", gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    _spacing(spacing, p.ndim)
    tau = _tolerance(nsd_tolerance)
    np_, ng = int(p.sum()), int(g.sum())
    if np_ == 0 and ng == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "hd95_monai": 0.0, "nsd": 1.0}
    inter = int((p & g).sum())
    dice = 2.0 * inter / (np_ + ng)
    jaccard = inter / (np_ + ng - inter)
    if np_ == 0 or ng == 0:
        return {"dice": dice, "jaccard": jaccard, "hd95": math.nan, "asd": math.nan, "assd": math.nan,
                "hd95_monai": math.nan, "nsd": 0.0}
    d_pg, d_gp = surface_distances(p, g, spacing)
    both = np.concatenate([d_pg, d_gp])
    within = int((d_pg <= tau).sum() + (d_gp <= tau).sum())
    return {"dice": dice, "jaccard": jaccard, "hd95": float(np.percentile(both, 95)), "asd": float(d_pg.mean()),
            "assd": float(both.mean()),
            "hd95_monai": float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))),
            "nsd": within / both.size}


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


@dataclass
class SegmentationMetrics:
    """Accumulates per-case, per-class metrics of label volumes and summarises them.

    Example:
        >>> m = SegmentationMetrics(num_classes=4, class_names=("bg", "RV", "Myo", "LV"))
        >>> m.update(pred_volume, gt_volume, spacing=(10.0, 1.5, 1.5), case_id="patient101_frame01")
        >>> m.aggregate()["mean"]["dice"]
    """

    num_classes: int
    class_names: tuple[str, ...] | None = None
    cases: list[dict] = field(default_factory=list)
    nsd_tolerance: float = NSD_TOLERANCE  # in the units of the spacing (mm for NIfTI cases)

    def __post_init__(self):
        self.nsd_tolerance = _tolerance(self.nsd_tolerance)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {self.num_classes}")
        if self.class_names is None:
            self.class_names = tuple(f"class{c}" for c in range(self.num_classes))
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names must name {self.num_classes} classes, got {len(self.class_names)}")

    def update(self, pred, gt, spacing=None, case_id: str | None = None) -> dict:
        """pred, gt: integer label volumes of one shape (2D or 3D). Returns this case's per-class metrics."""
        p, g = np.asarray(pred), np.asarray(gt)
        if p.shape != g.shape:
            raise ValueError(f"case {case_id}: prediction shape {p.shape} != ground truth shape {g.shape}")
        ignored = g == IGNORE_INDEX  # a dataset's ignore label: those voxels count in no metric (module docstring)
        if ignored.any():
            p, g = np.where(ignored, 0, p), np.where(ignored, 0, g)
        for name, arr in (("prediction", p), ("ground truth", g)):
            if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
                raise ValueError(f"case {case_id}: {name} labels must be in [0, {self.num_classes}), "
                                 f"got [{arr.min()}, {arr.max()}]")
        case = {"case": case_id if case_id is not None else str(len(self.cases))}
        for c in range(1, self.num_classes):
            for key, value in binary_metrics(p == c, g == c, spacing, self.nsd_tolerance).items():
                case[f"{self.class_names[c]}/{key}"] = value
        self.cases.append(case)
        return case

    def aggregate(self) -> dict:
        """Over the cases: {"per_class": {name: {metric: (mean, std, n_nan)}}, "mean": {metric: mean over classes},
        "mean_classes": {metric: classes that mean averaged}, "nan_cases": {metric: NaN (case, class) pairs},
        "cases": number of cases, "nsd_tolerance": NSD's tolerance}.

        NaN-aware, explicitly: a class's mean and std are over its cases with a value (one-empty cases give NaN
        distances; they are counted in n_nan, never averaged as 0); the "mean" row averages the classes whose
        mean exists (mean_classes of them; a class NaN in every case has none) and nan_cases totals the pairs
        left out, so a reader sees what a mean stands for. Dice, Jaccard and NSD are never NaN. "nsd_tolerance":
        the NSD's tolerance.
        """
        per_class = {}
        for c in range(1, self.num_classes):
            name = self.class_names[c]
            stats = {}
            for key in METRICS:
                vals = np.array([case[f"{name}/{key}"] for case in self.cases], dtype=float)
                finite = vals[~np.isnan(vals)]
                stats[key] = (float(finite.mean()) if finite.size else math.nan,
                              float(finite.std()) if finite.size else math.nan, int(np.isnan(vals).sum()))
            per_class[name] = stats
        means = {key: [per_class[n][key][0] for n in per_class] for key in METRICS}
        return {"per_class": per_class, "mean": {key: _nanmean(v) for key, v in means.items()},
                "mean_classes": {key: sum(not math.isnan(x) for x in v) for key, v in means.items()},
                "nan_cases": {key: sum(per_class[n][key][2] for n in per_class) for key in METRICS},
                "cases": len(self.cases), "nsd_tolerance": self.nsd_tolerance}

    def to_csv(self, path: str) -> None:
        """One row per case, one column per class and metric."""
        if not self.cases:
            raise ValueError("no cases to write: call update() first")
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.cases[0]))
            writer.writeheader()
            writer.writerows(self.cases)

    def summary_table(self) -> str:
        """A Markdown table: mean ± std per class ("(n NaN)": cases without a value), and the mean over classes
        ("(k of C classes)" when a class had no value in any case; "(n NaN)": the (case, class) pairs left out).
        HD95 is medpy's (pooled), HD95 (MONAI) the larger directed one; NSD at the tolerance in its header."""
        agg = self.aggregate()
        keys = ("dice", "jaccard", "hd95", "asd", "hd95_monai", "nsd")
        lines = [f"| class | Dice | Jaccard | HD95 | ASD | HD95 (MONAI) | NSD ({self.nsd_tolerance:g}) |",
                 "|---|---|---|---|---|---|---|"]
        for name, stats in agg["per_class"].items():
            cells = [f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" + (f" ({stats[k][2]} NaN)" if stats[k][2] else "")
                     for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        classes = self.num_classes - 1
        cells = []
        for k in keys:
            notes = ([f"{agg['mean_classes'][k]} of {classes} classes"] if agg["mean_classes"][k] < classes else []) \
                + ([f"{agg['nan_cases'][k]} NaN"] if agg["nan_cases"][k] else [])
            cells.append(f"{agg['mean'][k]:.4f}" + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append("| mean | " + " | ".join(cells) + " |")
        return "\n".join(lines)

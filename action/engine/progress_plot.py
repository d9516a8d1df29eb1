"""progress.png of a run folder, nnU-Net's learning-curve plot: the loss terms of train.csv, the learning rate, and
the validation Dice per class (by name) and its mean from val.csv, against iterations. Redrawn by RunLogger after
every validation and when training stops; matplotlib (Agg backend, no display needed) is optional: without it one
warning says so and training goes on."""
from __future__ import annotations

import csv
import math
import os
import warnings

_WARNED = []
# train.csv columns that are not loss terms: the schedule, timing and stage iii's pseudo-label diagnostics
_NOT_LOSSES = ("iteration", "lr", "s_per_it")
_DIAGNOSTICS = ("pl_", "audit_")


def _read(path: str) -> dict[str, list[float]]:
    """A log's columns as float lists (empty or non-numeric cells as NaN); {} without the file."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            columns.setdefault(key, []).append(number)
    return columns


def plot_progress(out_dir: str, path: str | None = None) -> str | None:
    """Draws <out_dir>/progress.png (or `path`) from train.csv and val.csv: three panels (loss terms; learning
    rate; validation Dice per class and mean). Returns the path, or None when there is nothing logged yet or
    matplotlib is missing (warned once per process)."""
    train, val = _read(os.path.join(out_dir, "train.csv")), _read(os.path.join(out_dir, "val.csv"))
    if not train and not val:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn("matplotlib is not installed (pip install matplotlib): no progress.png", stacklevel=2)
        return None
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    its = train.get("iteration", [])
    losses = [k for k in train if k not in _NOT_LOSSES and not k.startswith(_DIAGNOSTICS)]
    for key in losses:
        axes[0].plot(its, train[key], label=key, linewidth=2.0 if key == "loss" else 1.0)
    axes[0].set_ylabel("loss")
    axes[0].set_title("training losses")
    if "lr" in train:
        axes[1].plot(its, train["lr"], color="black")
    axes[1].set_ylabel("learning rate")
    if val:
        v_its = val.get("iteration", [])
        for key in val:
            if key == "iteration" or "dice" not in key:
                continue
            mean = key.endswith("mean_dice")
            axes[2].plot(v_its, val[key], marker="o", markersize=3, linewidth=2.0 if key == "mean_dice" else 1.0,
                         linestyle="--" if mean and key != "mean_dice" else "-",
                         label=key[len("dice_"):] if key.startswith("dice_") else key)
        axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_ylabel("validation Dice")
    axes[2].set_xlabel("iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = path or os.path.join(out_dir, "progress.png")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-progress.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)  # a viewer never sees a half-written file
    return path

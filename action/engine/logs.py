"""Training logs: CSV files (always) and TensorBoard (when the tensorboard package is installed).

Rows are keyed by the number of iterations done. On resume from a checkpoint after t iterations, rows with
iteration > t are dropped from the CSV files (work the checkpoint does not hold) and TensorBoard is opened with
purge_step=t + 1, so a resumed run's logs read like an uninterrupted one's. Columns renamed since a log was
written (RENAMED: train.csv's "dice", the Dice loss, is now "dice_loss") are renamed in its header on resume, and
val.csv's per-class columns, once numbered (dice_c1, dice_c2, ...) and now named by class (dice_RV, ...), are
renamed in place when a run resumed from an old log first writes to it (legacy_class_columns).

progress.png (action.engine.progress_plot: losses, learning rate, validation Dice per class) is redrawn from the
CSV files after every validation row and when the logger closes.

json_safe / dump_json: standard JSON for summaries and results (NaN and infinities as null; the counts of NaN
cases are kept beside the values by whoever writes them).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings

# old column name -> new one (a run resumed from a log written before the rename keeps one header)
RENAMED = {"dice": "dice_loss"}


def json_safe(value):
    """value with every non-finite float (NaN, +-inf) replaced by None and tuples made lists: what
    json.dumps(allow_nan=False) accepts, so any JSON reader can parse it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dump_json(value, fh=None, **kwargs) -> str | None:
    """json.dump(s) of json_safe(value), refusing anything non-standard: to fh when given, else returned."""
    if fh is None:
        return json.dumps(json_safe(value), allow_nan=False, **kwargs)
    json.dump(json_safe(value), fh, allow_nan=False, **kwargs)
    return None


def _truncate(path: str, start: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    keep = [[RENAMED.get(c, c) for c in rows[0]]] + [r for r in rows[1:] if r and int(r[0]) <= start]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(keep)


def legacy_class_columns(header: list[str], fields: list[str]) -> bool:
    """Whether `header` (an existing log's) is `fields` with per-class columns numbered the old way: every column
    that differs is <prefix>dice_c<k> in the header and <prefix>dice_<name> in fields, at the same position."""
    if len(header) != len(fields):
        return False
    for old, new in zip(header, fields):
        match = re.fullmatch(r"(.*)dice_c(\d+)", old)
        if old != new and not (match and new.startswith(match.group(1) + "dice_")):
            return False
    return header != fields


def _rename_header(path: str, fields: list[str]) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([fields] + rows[1:])


class RunLogger:
    def __init__(self, out_dir: str, start: int = 0, tensorboard: bool = True, enabled: bool = True):
        """enabled=False (ranks other than 0 of a distributed run): every call is a no-op."""
        self.out_dir, self.enabled, self.tb = out_dir, enabled, None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        for name in ("train", "val"):
            _truncate(os.path.join(out_dir, f"{name}.csv"), start)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard): logging to CSV only",
                              stacklevel=2)
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start + 1)

    def log(self, name: str, iteration: int, values: dict) -> None:
        """Appends one row {iteration, **values} to <out>/<name>.csv and scalars <name>/<key> to TensorBoard."""
        if not self.enabled:
            return
        path = os.path.join(self.out_dir, f"{name}.csv")
        fresh = not os.path.isfile(path) or os.path.getsize(path) == 0
        fields = ["iteration"] + list(values)
        if not fresh:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh))
            if legacy_class_columns(header, fields):
                _rename_header(path, fields)
            elif header != fields:
                raise ValueError(f"{path}: columns {header} differ from this run's {fields}; use a new --out")
        with open(path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if fresh:
                writer.writerow(fields)
            writer.writerow([iteration] + [f"{v:.6g}" if isinstance(v, float) else v for v in values.values()])
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{name}/{key}", value, iteration)
        if name == "val":
            self.plot()

    def image(self, tag: str, iteration: int, render) -> None:
        """A TensorBoard image: render() -> an RGB array (H, W, 3) uint8 or None, called only when TensorBoard
        logs (rendering costs time)."""
        if not self.enabled or self.tb is None:
            return
        rgb = render()
        if rgb is not None:
            self.tb.add_image(tag, rgb, iteration, dataformats="HWC")

    def plot(self) -> None:
        """Redraws <out>/progress.png from the logs (a missing matplotlib: one warning, no plot)."""
        if self.enabled:
            from action.engine.progress_plot import plot_progress

            plot_progress(self.out_dir)

    def close(self) -> None:
        if self.enabled:
            self.plot()
        if self.tb is not None:
            self.tb.close()

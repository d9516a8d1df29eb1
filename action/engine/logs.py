"""Training logs: CSV files (always) and TensorBoard (when the tensorboard package is installed).

Rows are keyed by the number of iterations done. On resume from a checkpoint after t iterations, rows with
iteration > t are dropped from the CSV files (work the checkpoint does not hold) and TensorBoard is opened with
purge_step=t + 1, so a resumed run's logs read like an uninterrupted one's. Columns renamed since a log was
written (RENAMED: train.csv's "dice", the Dice loss, is now "dice_loss") are renamed in its header on resume.

json_safe / dump_json: standard JSON for summaries and results (NaN and infinities as null; the counts of NaN
cases are kept beside the values by whoever writes them).
"""
from __future__ import annotations

import csv
import json
import math
import os
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
            if header != fields:
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

"""Learning curves of training runs: validation mean Dice and training loss against iterations and wall time.

    python benchmarks/learning_curves.py --run baseline=runs/baseline-3p --run ACTION=runs/action-3p/finetune \
        --out benchmarks/learning_curves.png

A run folder is what `action train` writes (train.csv with s_per_it, val.csv); for a pipeline give the stage folders
in order joined by '+' (e.g. ACTION=runs/a/pretrain-global+runs/a/pretrain-local+runs/a/finetune): their
iterations and times are concatenated.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys


def read(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def curve(folders: list[str]) -> dict:
    """Concatenated (iteration, seconds, loss) and (iteration, seconds, mean_dice) over the stage folders."""
    it0, t0 = 0, 0.0
    train, val = [], []
    for folder in folders:
        rows = read(os.path.join(folder, "train.csv"))
        if not rows:
            raise SystemExit(f"{folder}: no train.csv")
        times, last_it, clock = {}, 0, t0
        for r in rows:
            clock += r["s_per_it"] * (r["iteration"] - last_it)
            last_it = r["iteration"]
            times[int(r["iteration"])] = clock
            train.append((it0 + r["iteration"], clock, r["loss"]))
        for r in read(os.path.join(folder, "val.csv")):
            near = min(times, key=lambda i: abs(i - r["iteration"]))
            val.append((it0 + r["iteration"], times[near], r["mean_dice"]))
        it0, t0 = it0 + last_it, clock
    return {"train": train, "val": val}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=FOLDER[+FOLDER...] (repeatable)")
    ap.add_argument("--out", default="learning_curves.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for spec in args.run:
        name, sep, folders = spec.partition("=")
        if not sep:
            raise SystemExit(f"--run takes NAME=FOLDER, got {spec!r}")
        c = curve(folders.split("+"))
        if c["val"]:
            axes[0].plot([v[1] / 60 for v in c["val"]], [v[2] for v in c["val"]], "o-", label=name)
        axes[1].plot([t[1] / 60 for t in c["train"]], [t[2] for t in c["train"]], "-", alpha=0.7, label=name)
    axes[0].set_xlabel("training minutes (sum of logged seconds per iteration)")
    axes[0].set_ylabel("validation mean Dice (RV, Myo, LV)")
    axes[1].set_xlabel("training minutes")
    axes[1].set_ylabel("training loss (each run's own objective)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

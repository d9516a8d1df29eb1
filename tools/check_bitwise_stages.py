"""Fixed-seed runs of every training stage, for checking that a refactoring changed no computed value: each run's
train.csv (without the timing column s_per_it), val.csv and a SHA-256 of its last.pt (model, optimizer and extra state:
bitwise, where the CSVs hold 6 significant digits) are written to <out>/<run>.train.csv / .val.csv / .state.sha256
and, with --reference, compared byte for byte with those of an earlier call (e.g. on the commit before the change).

    python tools/check_bitwise_stages.py --out /tmp/bitwise/before            # on the old commit
    python tools/check_bitwise_stages.py --out /tmp/bitwise/after --reference /tmp/bitwise/before

Runs (20 iterations each at --size 64, one thread, seed 0, a validation on one volume every 10 iterations; in 2D
the first 8 labelled and 8 unlabelled slices): supervised, pretrain-global, pretrain-local, pretrain-local with
accumulate 2, finetune, finetune --plusplus, and a 3D supervised run (one labelled patient, 16 x 32 x 32 patches).
Exit status 1 when a file differs or is missing, 2 when a run fails. About 2 minutes on one core.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--size", "64", "--threads", "1", "--seed", "0", "--labelled-batch", "2",
          "--val-every", "10", "--val-volumes", "1", "--checkpoint-every", "10", "--log-every", "1",
          "--test-at-end", "false", "--device", "cpu"]
SLICES = ["--max-train-slices", "8"]  # 2D only (3D trains on whole volumes: one labelled patient's)
SEMI = [*SLICES, "--unlabelled-batch", "2"]
RUNS = {
    "supervised": ["--stage", "supervised", *SLICES],
    "pretrain-global": ["--stage", "pretrain-global", *SEMI],
    "pretrain-local": ["--stage", "pretrain-local", *SEMI],
    "pretrain-local-accumulate2": ["--stage", "pretrain-local", *SEMI, "--accumulate", "2"],
    "finetune": ["--stage", "finetune", *SEMI],
    "finetune-plusplus": ["--stage", "finetune", *SEMI, "--plusplus", "true"],
    "supervised-3d": ["--stage", "supervised", "--dims", "3", "--patch", "[16, 32, 32]", "--base-channels", "4",
                      "--labelled-patients", "1"],
}


def without_timing(path: str) -> str:
    """A CSV log's text without its s_per_it column (the only value that depends on the machine's speed)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    drop = rows[0].index("s_per_it") if "s_per_it" in rows[0] else None
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow([v for i, v in enumerate(row) if i != drop])
    return out.getvalue()


def state_digest(path: str) -> str:
    """SHA-256 over every tensor's bytes (and every other value's repr) of a checkpoint's model, optimizer and extra
    state (EMA teachers, banks), in key order: equal digests mean bitwise-equal final weights and training state."""
    import torch

    digest = hashlib.sha256()

    def walk(value, key=""):
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(value[k], f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}:{t.dtype}:{tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{key}={value!r}".encode())

    state = torch.load(path, map_location="cpu", weights_only=True)
    walk({k: state[k] for k in ("model", "optimizer", "extra", "iteration")})
    return digest.hexdigest() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs and their CSVs (must not hold earlier runs)")
    p.add_argument("--reference", help="folder of an earlier call's CSVs to compare with")
    p.add_argument("--data", default=os.environ.get("ACTION_ACDC", os.path.join(REPO, "..", "shared", "data", "acdc")),
                   help="ACDC HDF5 folder (default $ACTION_ACDC, else ../shared/data/acdc beside the repository)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--only", nargs="*", choices=list(RUNS), help="run only these")
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    failed, differ = [], []
    for name in args.only or RUNS:
        run_dir = os.path.join(args.out, "runs", name)
        cmd = [sys.executable, "-m", "action.cli", "train", *COMMON, *RUNS[name], "--data", args.data,
               "--iterations", str(args.iterations), "--out", run_dir]
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], flush=True)
            failed.append(name)
            continue
        outputs = {"train.csv": without_timing(os.path.join(run_dir, "train.csv")),
                   "val.csv": without_timing(os.path.join(run_dir, "val.csv")),
                   "state.sha256": state_digest(os.path.join(run_dir, "last.pt"))}
        for kind, text in outputs.items():
            with open(os.path.join(args.out, f"{name}.{kind}"), "w") as fh:
                fh.write(text)
            if args.reference:
                ref = os.path.join(args.reference, f"{name}.{kind}")
                same = os.path.isfile(ref) and open(ref).read() == text
                print(f"  {kind} ({text.count(chr(10))} lines): {'identical' if same else 'DIFFERS from ' + ref}",
                      flush=True)
                if not same:
                    differ.append(f"{name}.{kind}")
    if failed:
        print(f"failed runs: {failed}")
        return 2
    if args.reference:
        print(f"{len(differ)} files differ: {differ}" if differ else "every file is bitwise identical to the reference")
        return 1 if differ else 0
    print(f"CSVs written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

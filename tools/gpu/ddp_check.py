"""The multi-process check for a lent GPU: DistributedDataParallel over NCCL and gloo on CUDA tensors, and
SyncBatchNorm, each against the single-process run that computes the same step. Needs no dataset (it writes a
small synthetic one in the ACDC HDF5 layout: h5py only, so it runs where nibabel is not installed, as on the lent
machine) and about 2 minutes on a GPU (an estimate: not yet timed on one). Exit status 1 when a comparison is
outside its allowance.

    python tools/gpu/ddp_check.py --out DIR              # CUDA: every run below
    python tools/gpu/ddp_check.py --out DIR --device cpu # gloo only (what the CPU can check; CI runs
                                                          # tests/test_distributed.py instead)

Runs, in this order (4 iterations each, fp32: --amp off and NVIDIA_TF32_OVERRIDE=0, so equal math gives equal
numbers up to summation order), each compared with its reference on losses (train.csv) and weights (last.pt); a
reference runs just before the first run that needs it, each row is printed and ddp_check.json rewritten as its run
finishes (a time limit keeps what finished):

    nccl-1rank      one rank in an NCCL process group (DDP's all-reduce over NCCL) of supervised
                    vs the plain single-process run                              (allowances ranks_losses/_weights)
    syncbn-2ranks   torchrun 2 ranks (gloo) with --sync-bn, supervised vs one process with --accumulate 1: BatchNorm
                    statistics over both ranks' shards equal the whole batch's
    gloo-2ranks     torchrun 2 ranks (ACTION_DIST_BACKEND=gloo; on one GPU both ranks share it, which NCCL refuses)
                    of pretrain-local  vs one process with --accumulate 2 (the only run with --device cpu)
    nccl-2ranks     torchrun 2 ranks over NCCL, only with 2 or more GPUs
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from action.data.acdc import LABELLED_SLICES  # noqa: E402
from action_kernels.testing import ALLOWANCES  # noqa: E402

SMALL = {"size": 64, "iterations": 4, "labelled_patients": 1, "labelled_batch": 4, "unlabelled_batch": 4,
         "val_every": 0, "test_at_end": False, "tensorboard": False, "log_every": 1, "checkpoint_every": 4,
         "amp": "off", "global_dim": 32, "global_bank": 8, "local_dim": 16, "local_bank": 64, "local_push": 16,
         "local_grid": 8}

RUN = """
import json, os, sys
import torch.distributed as dist
from action.config import build_config
from action.method import trainer_class
values = json.loads(sys.argv[1])
if os.environ.get("CHECK_INIT_NCCL"):  # a process group this script makes itself: one rank over NCCL
    dist.init_process_group("nccl", rank=0, world_size=1)
cfg = build_config(overrides=values)
trainer_class(cfg)(cfg, progress=False).fit()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dataset(root: str, size: int = 64, depth: int = 8) -> str:
    """The ACDC HDF5 layout (action.data.acdc) at `root`: data/<name>.h5 with `image` (float32 in [0, 1]) and
    `label` (uint8, classes 0-3: three nested discs on noise), slices (size, size) for training, volumes (depth,
    size, size) for validation and test. train_slices.list holds 23 slices of patient001 (frames 01 and 12: the
    labelled set of labelled_patients=1, its first 23 lines) then 16 of patient002 (unlabelled); val.list and
    test.list one volume each (patient003, patient004), written in full although SMALL neither validates nor tests,
    so the lists name real, readable volumes."""
    import h5py

    g = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")

    def case(shape_z: int | None):
        cx, cy = g.integers(size // 3, 2 * size // 3, 2)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        label = np.select([r < size / 10, r < size / 6, r < size / 4.5], [3, 2, 1], 0).astype(np.uint8)
        if shape_z is not None:
            label = np.repeat(label[None], shape_z, 0)
        image = np.clip(label * 0.25 + g.normal(0, 0.06, label.shape), 0, 1).astype(np.float32)
        return image, label

    def write(name: str, image: np.ndarray, label: np.ndarray) -> None:
        with h5py.File(os.path.join(root, "data", f"{name}.h5"), "w") as fh:
            fh.create_dataset("image", data=image)
            fh.create_dataset("label", data=label)

    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    labelled = LABELLED_SLICES[SMALL["labelled_patients"]]  # 23: patient001's two frames, 12 + 11 slices
    slices = ([f"patient001_frame01_slice_{z}" for z in range(12)]
              + [f"patient001_frame12_slice_{z}" for z in range(labelled - 12)]
              + [f"patient002_frame{f}_slice_{z}" for f in ("01", "12") for z in range(8)])
    for name in slices:
        write(name, *case(None))
    lists = {"train_slices.list": slices, "val.list": ["patient003_frame01"], "test.list": ["patient004_frame01"]}
    for name in lists["val.list"] + lists["test.list"]:
        write(name, *case(depth))
    for list_name, names in lists.items():
        with open(os.path.join(root, list_name), "w") as fh:
            fh.write("\n".join(names) + "\n")
    return root


def run(values: dict, ranks: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """One training run of RUN: plain python (ranks 0) or torchrun with `ranks` processes."""
    script = os.path.join(values["out"] + ".py")
    with open(script, "w") as fh:
        fh.write(RUN)
    launcher = [sys.executable] if not ranks else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                   str(ranks), "--master_port", str(free_port())]
    # the caller's PYTHONPATH after the repository (a test may put an import blocker there)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    full = dict(os.environ, OMP_NUM_THREADS="1", NVIDIA_TF32_OVERRIDE="0", PYTHONPATH=path, **(env or {}))
    return subprocess.run([*launcher, script, json.dumps(values)], capture_output=True, text=True, env=full, cwd=ROOT)


def losses(out: str) -> dict[str, np.ndarray]:
    with open(os.path.join(out, "train.csv")) as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in rows[0] if k not in ("iteration", "lr", "s_per_it")]
    return {k: np.array([float(r[k]) for r in rows]) for k in keys}


def excess(x, ref, name: str) -> tuple[float, bool]:
    """(largest |x - ref|, whether every element is within ALLOWANCES[name])."""
    a = ALLOWANCES[name]
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    diff = (x - ref).abs()
    return float(diff.max()) if diff.numel() else 0.0, bool((diff <= a.atol + a.rtol * ref.abs()).all())


def compare(name: str, out: str, ref: str) -> dict:
    from action.engine import load_checkpoint

    la, lb = losses(out), losses(ref)
    loss_diff, loss_ok = max((excess(la[k], lb[k], "ranks_losses") for k in lb), key=lambda t: (not t[1], t[0]))
    wa = load_checkpoint(os.path.join(out, "last.pt"))["model"]
    wb = load_checkpoint(os.path.join(ref, "last.pt"))["model"]
    weight_diff, weight_ok = max((excess(wa[k], wb[k], "ranks_weights") for k in wb), key=lambda t: (not t[1], t[0]))
    return {"run": name, "max_loss_diff": loss_diff, "max_weight_diff": weight_diff, "ok": loss_ok and weight_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ddp_results")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the gloo part")
        return 1
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ddp_check_")
    data = make_dataset(os.path.join(work, "data"))
    base = dict(SMALL, data=data, device=args.device)
    # (name, values, ranks, env, reference name), in this order: under a time limit (gpu_check) the checks only a GPU
    # can make come first (NCCL, SyncBatchNorm), each reference runs just before the first run that needs it
    plans = []
    refs = {"acc2": (dict(base, stage="pretrain-local", accumulate=2), 0, {}),
            "plain": (dict(base, stage="supervised"), 0, {})}
    if args.device == "cuda":
        plans.append(("nccl-1rank", dict(base, stage="supervised"), 0,
                      {"CHECK_INIT_NCCL": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "plain"))
        plans.append(("syncbn-2ranks", dict(base, stage="supervised", sync_bn=True), 2,
                      {"ACTION_DIST_BACKEND": "gloo"}, "plain"))
    plans.append(("gloo-2ranks", dict(base, stage="pretrain-local"), 2, {"ACTION_DIST_BACKEND": "gloo"}, "acc2"))
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        plans.append(("nccl-2ranks", dict(base, stage="pretrain-local"), 2, {}, "acc2"))
    results, seconds = [], {}

    def save(complete: bool) -> None:
        """ddp_check.json, rewritten after every run: a time limit that stops the check keeps what finished."""
        with open(os.path.join(args.out, "ddp_check.json"), "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__, "complete": complete, "results": results,
                       "reference_seconds": {k: v for k, v in seconds.items() if k in refs}}, fh, indent=1)

    # each row as its run finishes (flushed), so a time limit keeps the rows above it
    print(f"{'run':<16}{'max |loss diff|':>18}{'max |weight diff|':>20}  within allowance  seconds", flush=True)
    for name, values, ranks, env, ref_name in plans:
        if ref_name not in seconds:  # only the references a plan uses (CPU: acc2)
            ref_values, ref_ranks, ref_env = refs[ref_name]
            start = time.perf_counter()
            done = run(dict(ref_values, out=os.path.join(work, ref_name)), ref_ranks, ref_env)
            seconds[ref_name] = time.perf_counter() - start
            if done.returncode:
                print(f"reference {ref_name} failed:\n{done.stderr[-3000:]}")
                save(False)
                return 1
            print(f"(reference {ref_name}: {seconds[ref_name]:.0f} s)", flush=True)
        out = os.path.join(work, name)
        start = time.perf_counter()
        done = run(dict(values, out=out), ranks, env)
        seconds[name] = time.perf_counter() - start
        if done.returncode:
            results.append({"run": name, "ok": False, "error": done.stderr[-2000:], "seconds": seconds[name]})
            print(f"{name}: FAILED to run\n{done.stderr[-2000:]}")
            print(f"{name:<16}{'did not run':>18}{'':>20}  {'False':<16}  {seconds[name]:.0f}", flush=True)
        else:
            r = dict(compare(name, out, os.path.join(work, ref_name)), seconds=seconds[name])
            results.append(r)
            print(f"{name:<16}{r['max_loss_diff']:>18.3e}{r['max_weight_diff']:>20.3e}  {r['ok']!s:<16}  "
                  f"{r['seconds']:.0f}", flush=True)
        save(False)
    shutil.rmtree(work, ignore_errors=True)
    save(True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Does this checkout still compute what benchmarks/ssl_protocol.py measured on an earlier commit? Runs every kind of
protocol arm for a few iterations with the protocol's settings (64x64, batch 8 + 4, one thread, the arms' own flags),
in this checkout and in another one (a git worktree of the protocol's commit, e.g. `git worktree add --detach
/tmp/proto <commit>`, with the CPU extension built in place or action_kernels/_C_cpu*.so copied in: without it the
chunked loss runs its torch fallback and rounds differently), and compares each run's train.csv (the columns both
write) and a SHA-256 of the student's final weights (the model state of last.pt: the teachers' BatchNorm statistics
and the banks' layout may differ between commits without changing what is trained).

    python tools/check_protocol_arms.py --other /tmp/proto [--iterations 12] [--out /tmp/protocol-arms]

Exit status 0 when every arm agrees bitwise, 1 when one differs (the table says which and where), 2 when a run
fails. About 5 minutes on one core per checkout.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def protocol_module(tree: str):
    spec = importlib.util.spec_from_file_location("ssl_protocol", os.path.join(tree, "benchmarks", "ssl_protocol.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def arms(iterations: int) -> dict:
    """{arm: train options} with this checkout's protocol flags (TODAY, RECIPE, PLUSPLUS); the pipeline's stages
    scaled down to a few iterations each."""
    p = protocol_module(REPO)
    semi = {"stage": "finetune", "iterations": iterations, "unlabelled_batch": 4}
    return {"sup": {"stage": "supervised", "iterations": iterations},
            "iii-today": {**semi, **p.TODAY}, "iii-recipe": {**semi, **p.RECIPE},
            "iii-plusplus": {**semi, **p.RECIPE, **p.PLUSPLUS},
            "pipeline": {"stage": "pipeline", "unlabelled_batch": 4, **p.DISTILL, **p.RECIPE,
                         "stage_iterations": {"pretrain-global": 2, "pretrain-local": 4, "finetune": iterations}}}


def run(tree: str, name: str, options: dict, out: str, data: str) -> str:
    p = protocol_module(REPO)
    common = {"data": data, "size": 64, "labelled_patients": 3, "threads": 1, "val_every": 0, "test_at_end": False,
              "tensorboard": False, "checkpoint_every": 1000, "log_every": 1, "labelled_batch": 8, "seed": 1337}
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, "-m", "action.cli", "train", *p.flags({**common, **options, "out": folder})]
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tree}: {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return folder


def logs(folder: str) -> list[dict]:
    path = os.path.join(folder, "finetune" if os.path.isdir(os.path.join(folder, "finetune")) else "", "train.csv")
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "s_per_it"} for row in csv.DictReader(fh)]


def student_digest(folder: str) -> str:
    import torch

    sub = os.path.join(folder, "finetune") if os.path.isdir(os.path.join(folder, "finetune")) else folder
    state = torch.load(os.path.join(sub, "last.pt"), map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="the other checkout (a worktree of the protocol's commit)")
    p.add_argument("--iterations", type=int, default=12, help="iterations per arm (default 12)")
    p.add_argument("--out", default="/tmp/protocol-arms", help="where the runs go (default /tmp/protocol-arms)")
    p.add_argument("--data", default=os.environ.get("ACTION_ACDC", os.path.join(REPO, "..", "shared", "data",
                                                                                 "acdc")))
    args = p.parse_args(argv)
    other = os.path.abspath(args.other)
    if not os.path.isfile(os.path.join(other, "benchmarks", "ssl_protocol.py")):
        p.error(f"--other {other}: not a checkout with benchmarks/ssl_protocol.py")
    failed = False
    print("| arm | train.csv rows equal | student weights equal | first difference |\n|---|---|---|---|")
    for name, options in arms(args.iterations).items():
        try:
            mine = run(REPO, name, options, os.path.join(args.out, "this"), os.path.abspath(args.data))
            theirs = run(other, name, options, os.path.join(args.out, "other"), os.path.abspath(args.data))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
        a, b = logs(mine), logs(theirs)
        shared = [k for k in a[0] if k in b[0]]
        diff = next((f"iteration {ra['iteration']}: {k} {ra[k]} vs {rb[k]}" for ra, rb in zip(a, b) for k in shared
                     if ra[k] != rb[k]), "")
        rows_equal = len(a) == len(b) and not diff
        weights_equal = student_digest(mine) == student_digest(theirs)
        failed |= not (rows_equal and weights_equal)
        print(f"| {name} | {rows_equal} | {weights_equal} | {diff} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

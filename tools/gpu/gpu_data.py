"""A compact copy of ACDC that travels with a device call (the 64 MiB carry limit, repository included).

    python tools/gpu/gpu_data.py prepare                       # ../shared/data/acdc -> gpu_data/acdc (ignored)
    python tools/gpu/gpu_data.py check --data gpu_data/acdc    # what a call would carry, against 64 MiB
    python tools/gpu/gpu_data.py compare --data gpu_data/acdc  # short CPU runs: compact copy vs the original

The copy keeps the HDF5 layout the loaders read (data/<name>.h5 with `image` and `label`, train_slices.list,
val.list, test.list), so action.data reads it unchanged:
  - the labelled slices of the split (68 for 3 patients), the val volumes (20) and the test volumes (40) in full;
  - of the unlabelled slices, the largest evenly spaced subset that keeps data + repository under the limit
    (the rest are left out: they are most of the 130 MB, and a few minutes of GPU training at unlabelled batch 4
    sees a few thousand unlabelled images, so a subset of several hundred is each seen several times anyway);
  - images as float16 (gzip 9; reads back as float32 through read_case; the error is measured and stored in the
    manifest), labels as uint8 (gzip 9; exact, checked on read-back).
Why float16 and not 8-bit: the slices hold about 250 grey levels (an 8-bit source rescaled per volume), but no
float dataset of HDF5 decodes an integer code with a scale, and a scaled uint8 copy (about 22% smaller than float16,
measured on 60 slices + 6 volumes: 5.2 vs 6.7 MB) would need a change of the loader.

The manifest (manifest.json, written last: a folder without it is incomplete) says what was kept and left out,
the sizes, the encoding error and the licence. The data is CC BY-NC-SA 4.0: never commit it (gpu_data/ is in
.gitignore); LICENSE-DATA.md travels with the copy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SOURCE = os.environ.get("ACTION_ACDC", os.path.join(REPO, "..", "shared", "data", "acdc"))
DEFAULT_OUT = os.path.join(REPO, "gpu_data", "acdc")
MIB = 1 << 20
CARRY_LIMIT_MIB = 64  # the device tool's limit on what a call carries (working tree + carried paths)
# room left under the limit for what the repository may gain before the call (a few more commits)
DEFAULT_TARGET_MIB = 60
IMAGE_ENCODING = {"dtype": "float16", "compression": "gzip", "compression_opts": 9}
LABEL_ENCODING = {"dtype": "uint8", "compression": "gzip", "compression_opts": 9}


def _read_list(path: str) -> list[str]:
    with open(path) as fh:
        return [line.strip() for line in fh if line.strip()]


def encode_case(src: str, dst: str) -> dict:
    """Copies one case file (a slice (H, W) or a volume (Z, H, W)) with the compact encoding; returns its size in
    bytes and the largest absolute image error of the copy as read_case reads it (float32)."""
    import h5py

    with h5py.File(src, "r") as fh:
        image = np.asarray(fh["image"][()], dtype=np.float32)
        label = np.asarray(fh["label"][()])
    if label.min() < 0 or label.max() > np.iinfo(np.uint8).max:
        raise ValueError(f"{src}: labels in [{label.min()}, {label.max()}] do not fit uint8")
    tmp = dst + ".tmp"
    with h5py.File(tmp, "w") as fh:
        for key, value, enc in (("image", image, IMAGE_ENCODING), ("label", label, LABEL_ENCODING)):
            fh.create_dataset(key, data=value.astype(enc["dtype"]), compression=enc["compression"],
                              compression_opts=enc["compression_opts"])
    with h5py.File(tmp, "r") as fh:
        back = np.asarray(fh["image"][()], dtype=np.float32)
        back_label = np.asarray(fh["label"][()])
    if not np.array_equal(back_label.astype(np.int64), label.astype(np.int64)):
        raise AssertionError(f"{dst}: labels changed in the copy")
    os.replace(tmp, dst)
    return {"bytes": os.path.getsize(dst), "max_abs_error": float(np.abs(back - image).max()) if image.size else 0.0,
            "sum_abs_error": float(np.abs(back - image).sum()), "pixels": int(image.size)}


def evenly_spaced(n: int, m: int) -> list[int]:
    """m indices out of range(n), spread evenly (the middle of each of m equal parts), increasing."""
    return [int((j + 0.5) * n / m) for j in range(m)]


def tracked_files(repo: str) -> tuple[list[str], str]:
    """(paths relative to repo of what a device call sends besides carried paths, how they were found): git's
    tracked and untracked-not-ignored files; without git every file outside .git (an upper bound)."""
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p], "git ls-files (tracked + untracked, not ignored)"
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for root, dirs, files in os.walk(repo):
            dirs[:] = [d for d in dirs if d != ".git"]
            paths += [os.path.relpath(os.path.join(root, f), repo) for f in files]
        return paths, "every file outside .git (no git here: an upper bound, ignored build outputs included)"


def _size(path: str) -> int:
    return os.lstat(path).st_size  # a link travels as a link


def carried_size(repo: str, carry: list[str]) -> dict:
    """Bytes a device call would send: the repository's files (as tracked_files finds them) plus every file under
    each carried path (relative to repo). Files listed by both are counted once."""
    files, method = tracked_files(repo)
    seen = {os.path.normpath(p) for p in files if os.path.lexists(os.path.join(repo, p))}
    repo_bytes = sum(_size(os.path.join(repo, p)) for p in seen)
    carried = {}
    for c in carry:
        top = os.path.join(repo, c)
        if not os.path.lexists(top):
            raise FileNotFoundError(f"carry path {c!r} does not exist under {repo}; prepare it first "
                                    f"(python tools/gpu/gpu_data.py prepare)")
        total = 0
        walk = [(top, [], [""])] if os.path.isfile(top) else os.walk(top)
        for root, _, names in walk:
            for n in names:
                p = os.path.join(root, n) if n else root
                rel = os.path.normpath(os.path.relpath(p, repo))
                if rel not in seen:
                    total += _size(p)
                    seen.add(rel)
        carried[c] = total
    total = repo_bytes + sum(carried.values())
    return {"repository_bytes": repo_bytes, "carried_bytes": carried, "total_bytes": total,
            "total_mib": total / MIB, "limit_mib": CARRY_LIMIT_MIB, "under_limit": total < CARRY_LIMIT_MIB * MIB,
            "method": method, "exact": method.startswith("git")}


def describe_size(report: dict) -> str:
    parts = ", ".join(f"{c} {b / MIB:.2f}" for c, b in report["carried_bytes"].items())
    verdict = "under" if report["under_limit"] else "OVER"
    return (f"carried: {report['total_mib']:.2f} MiB ({verdict} the {report['limit_mib']} MiB limit): repository "
            f"{report['repository_bytes'] / MIB:.2f} MiB, {parts or 'nothing carried'} ({report['method']})")


def prepare(source: str = DEFAULT_SOURCE, out: str = DEFAULT_OUT, labelled_patients: int = 3,
            unlabelled: int | None = None, val: int | None = None, test: int | None = None,
            target_mib: float = DEFAULT_TARGET_MIB, repo: str = REPO, log=print) -> dict:
    """Writes the compact copy of `source` to `out` (replacing it) and returns its manifest.

    unlabelled: how many unlabelled slices to keep (evenly spaced); None: the most that keep the repository's files
    plus the copy under target_mib. val / test: keep only the first n volumes of each list (tiny dry runs); None:
    all of them."""
    sys.path.insert(0, repo)
    from action.data import AcdcLayout

    t0 = time.perf_counter()
    layout = AcdcLayout(source)
    labelled_names, unlabelled_names = layout.split(labelled_patients=labelled_patients)
    val_names = layout.val_volumes[:val] if val else layout.val_volumes
    test_names = layout.test_volumes[:test] if test else layout.test_volumes
    work = out.rstrip("/") + ".partial"
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(os.path.join(work, "data"))
    stats: dict[str, dict] = {}

    def copy(names, into="data"):
        for name in names:
            stats[name] = encode_case(os.path.join(source, "data", f"{name}.h5"),
                                      os.path.join(work, into, f"{name}.h5"))

    copy(labelled_names)
    copy(val_names)
    copy(test_names)
    if unlabelled is None:  # every candidate into a pool first, then the largest evenly spaced subset that fits
        os.makedirs(os.path.join(work, "pool"))
        copy(unlabelled_names, "pool")
        repo_bytes = carried_size(repo, [])["repository_bytes"]
        fixed = sum(stats[n]["bytes"] for n in labelled_names + val_names + test_names) + 64 * 1024  # lists, manifest
        room = target_mib * MIB - repo_bytes - fixed
        sizes = np.array([stats[n]["bytes"] for n in unlabelled_names])
        m = len(unlabelled_names)
        while m > 0 and sizes[evenly_spaced(len(sizes), m)].sum() > room:
            m -= 1
        keep = [unlabelled_names[i] for i in evenly_spaced(len(unlabelled_names), m)]
        for name in keep:
            os.replace(os.path.join(work, "pool", f"{name}.h5"), os.path.join(work, "data", f"{name}.h5"))
        shutil.rmtree(os.path.join(work, "pool"))
        for name in set(unlabelled_names) - set(keep):
            del stats[name]
    else:
        keep = [unlabelled_names[i] for i in evenly_spaced(len(unlabelled_names), min(unlabelled,
                                                                                     len(unlabelled_names)))]
        copy(keep)
    for name, names in (("train_slices.list", labelled_names + keep), ("val.list", val_names),
                        ("test.list", test_names)):
        with open(os.path.join(work, name), "w") as fh:
            fh.write("\n".join(names) + "\n")
    if os.path.isfile(os.path.join(source, "LICENSE-DATA.md")):
        shutil.copy(os.path.join(source, "LICENSE-DATA.md"), os.path.join(work, "LICENSE-DATA.md"))
    pixels = sum(s["pixels"] for s in stats.values())
    data_bytes = sum(s["bytes"] for s in stats.values())
    manifest = {
        "source": os.path.abspath(source),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "encoding": {"image": IMAGE_ENCODING, "label": LABEL_ENCODING},
        "image_max_abs_error": max(s["max_abs_error"] for s in stats.values()),
        "image_mean_abs_error": sum(s["sum_abs_error"] for s in stats.values()) / max(pixels, 1),
        "labelled_patients": labelled_patients,
        "counts": {"labelled": len(labelled_names), "unlabelled": len(keep), "val": len(val_names),
                   "test": len(test_names)},
        "source_counts": {"labelled": len(labelled_names), "unlabelled": len(unlabelled_names),
                          "val": len(layout.val_volumes), "test": len(layout.test_volumes)},
        "left_out": {"unlabelled": len(unlabelled_names) - len(keep),
                     "val": len(layout.val_volumes) - len(val_names),
                     "test": len(layout.test_volumes) - len(test_names)},
        "data_bytes": data_bytes,
        "target_mib": target_mib,
        "licence": "CC BY-NC-SA 4.0 (LICENSE-DATA.md): non-commercial research only; never commit this folder",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with open(os.path.join(work, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(work, out)
    log(f"compact ACDC copy in {out}: {manifest['counts']} of {manifest['source_counts']}, "
        f"{data_bytes / MIB:.2f} MiB, image error max {manifest['image_max_abs_error']:.2e} "
        f"mean {manifest['image_mean_abs_error']:.2e}, {manifest['seconds']} s")
    return manifest


def load_manifest(data: str) -> dict:
    """The manifest of a prepared copy; a folder without one was not finished (or not prepared by this script)."""
    path = os.path.join(data, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data} is not a finished compact copy (no manifest.json); run "
                                f"`python tools/gpu/gpu_data.py prepare --out {data}` first")
    with open(path) as fh:
        return json.load(fh)


def _symlinked_original(data: str, source: str, into: str) -> str:
    """A layout with the compact copy's lists whose data/ files link to the original float32 files: the same
    slices and volumes, only the encoding differs."""
    os.makedirs(os.path.join(into, "data"), exist_ok=True)
    for name in ("train_slices.list", "val.list", "test.list"):
        shutil.copy(os.path.join(data, name), os.path.join(into, name))
    for name in os.listdir(os.path.join(data, "data")):
        link = os.path.join(into, "data", name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(source, "data", name)), link)
    return into


def compare(data: str, source: str, work: str, iterations: int = 200, size: int = 64, val_volumes: int = 4) -> dict:
    """Short CPU runs on the compact copy and on the original float32 files of the same slices and volumes: a
    supervised run, then stage iii (finetune) from that run's best.pt, each validated at the end and tested on every
    test volume of the copy with BatchNorm re-estimated. Returns per stage the largest relative difference of the
    logged losses, and the validation and test Dice of both."""
    import csv

    from action.cli import main as cli

    roots = {"compact": data, "original": _symlinked_original(data, source, os.path.join(work, "original"))}
    out = {}
    for stage in ("supervised", "finetune"):
        runs = {}
        for tag, root in roots.items():
            run = os.path.join(work, f"{stage}-{tag}")
            argv = ["train", "--stage", stage, "--data", root, "--out", run, "--size", str(size), "--iterations",
                    str(iterations if stage == "supervised" else iterations // 2), "--labelled-batch", "8",
                    "--unlabelled-batch", "4", "--val-every", str(iterations), "--val-volumes", str(val_volumes),
                    "--log-every", "5", "--checkpoint-every", str(iterations), "--tensorboard", "false",
                    "--device", "cpu", "--bn-recalibrate", "10", "--threads", "1"]
            if stage == "finetune":
                argv += ["--init", os.path.join(work, f"supervised-{tag}", "best.pt"), "--unsup-mask", "pixel"]
            if cli(argv) != 0:
                raise RuntimeError(f"action {' '.join(argv)} failed")
            with open(os.path.join(run, "train.csv")) as fh:
                losses = [float(r["loss"]) for r in csv.DictReader(fh)]
            with open(os.path.join(run, "val.csv")) as fh:
                val = [float(r["mean_dice"]) for r in csv.DictReader(fh)][-1]
            with open(os.path.join(run, "test", "summary.json")) as fh:
                test = json.load(fh)["mean"]["dice"]
            runs[tag] = {"losses": losses, "val_dice": val, "test_dice": test}
        a, b = runs["compact"], runs["original"]
        out[stage] = {"max_rel_loss_diff": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"],
                                                                                                 b["losses"])),
                      "logged_losses": len(a["losses"]),
                      "val_dice": (a["val_dice"], b["val_dice"]), "test_dice": (a["test_dice"], b["test_dice"]),
                      "first_loss": (a["losses"][0], b["losses"][0]), "last_loss": (a["losses"][-1], b["losses"][-1])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the compact copy")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="ACDC HDF5 folder (default $ACTION_ACDC, else "
                   "../shared/data/acdc)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where the copy goes (an ignored folder of the checkout)")
    p.add_argument("--unlabelled", type=int, default=None, help="unlabelled slices to keep (default: as many as fit)")
    p.add_argument("--val", type=int, default=None, help="keep only the first N val volumes (default: all)")
    p.add_argument("--test", type=int, default=None, help="keep only the first N test volumes (default: all)")
    p.add_argument("--target-mib", type=float, default=DEFAULT_TARGET_MIB,
                   help=f"repository + copy stay under this (the call's limit is {CARRY_LIMIT_MIB} MiB)")
    p = sub.add_parser("check", help="what a device call carrying the copy would send, against the limit")
    p.add_argument("--carry", action="append", default=None, help="carried path relative to the repository "
                   "(default: gpu_data); repeat for several")
    p = sub.add_parser("compare", help="short CPU runs on the copy and on the original files of the same cases")
    p.add_argument("--data", default=DEFAULT_OUT)
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--work", default=os.path.join(REPO, "bench_results", "gpu_data_compare"))
    p.add_argument("--iterations", type=int, default=200, help="supervised iterations (stage iii: half)")
    p.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(args.source, args.out, unlabelled=args.unlabelled, val=args.val, test=args.test,
                target_mib=args.target_mib)
        rel = os.path.relpath(os.path.abspath(args.out), REPO)
        if rel.startswith(os.pardir):
            print(f"{args.out} is outside the repository {REPO}: a device call would not carry it")
            return 0
        args.carry = [rel.split(os.sep)[0]]  # the top folder under the repository, as a call's carry names it
    if args.command in ("prepare", "check"):
        report = carried_size(REPO, args.carry or ["gpu_data"])
        print(describe_size(report))
        return 0 if report["under_limit"] else 1
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    result = compare(args.data, args.source, args.work, args.iterations, args.size)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

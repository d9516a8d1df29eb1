"""The training augmentation on CPU: ours (action.data.augment.Augment, batched, each sample's chosen branch only)
against MONAI's per-sample dictionary pipeline of the same transforms, side by side in one process.

    python benchmarks/bench_augment.py                      # 2D 8 x 128^2 and 3D 2 x 16 x 96 x 96, 1 thread
    python benchmarks/bench_augment.py --repeats 50 --threads 2

Providers, on the same batches (image (B, 1, *S) float, label (B, *S) int64, confidence (B, *S) float):
  ours     Augment(AugmentConfig()): per-axis flips (p 0.5), rot90 (k uniform in 0..3), affine (p 0.5: rotation
           +-15 degrees, scale 0.9-1.1, translation +-5%; bilinear image, nearest label and confidence), intensity
           (p 0.8: contrast 0.9-1.1, brightness +-0.1 range, gamma 0.8-1.25), Gaussian blur (p 0.2, sigma
           0.1-1.0), Gaussian noise (p 0.2, std 0.03 range); one generator for the batch
  before   the same transforms as they were before they computed only each sample's chosen branch (every flip
           and rotation, every warp, blur and noise for every sample, then torch.where): the copy kept in
           tests/test_augment_equivalence.py; shown when that file is present
  monai    monai.transforms.Compose of RandFlipd per axis (p 0.5), RandRotate90d (p 0.75, max_k 3: k uniform in
           1..3, so k in 0..3 as ours), RandAffined (p 0.5, same ranges; bilinear / nearest / nearest, zeros
           padding), RandScaleIntensityd + RandShiftIntensityd + RandAdjustContrastd (p 0.8 each), RandGaussianSmoothd
           (p 0.2, sigma 0.1-1.0), RandGaussianNoised (p 0.2, std 0.03), run per sample on dicts of tensors and the
           samples stacked into a batch (what a MONAI DataLoader's workers and collate do, in one process here)
           when monai is installed; without it only ours (and before) are timed. "monai" keeps MONAI's default
           MetaTensor metadata tracking, "monai, no metadata" runs with set_track_meta(False)
Time: median (min-max) milliseconds per batch over repeats, providers interleaved in every repeat, each repeat on a
fresh batch (the same one for every provider). The transforms' parameters match; MONAI's intensity transforms are
three separate ones where ours is one, as its users would compose them.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from action.data.augment import Augment, AugmentConfig  # noqa: E402
from bench_loss import environment  # noqa: E402

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_augment_equivalence.py")
WORKLOADS = {"2d": (8, (128, 128)), "3d": (2, (16, 96, 96))}


def make_batch(batch: int, spatial: tuple[int, ...], seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, *spatial, generator=g)
    label = torch.randint(0, 4, (batch, *spatial), generator=g)
    return image, label, torch.rand(batch, *spatial, generator=g)


def ours():
    augment = Augment(AugmentConfig())

    def run(image, label, confidence, seed):
        return augment(image, label, confidence, generator=torch.Generator().manual_seed(seed))
    return run


def before():
    """The replaced implementation, from the test that keeps it (None when the tests are not beside us)."""
    if not os.path.isfile(OLD):
        return None
    spec = importlib.util.spec_from_file_location("augment_before", OLD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = AugmentConfig()

    def run(image, label, confidence, seed):
        return module.old_augment(config, image, label, confidence, torch.Generator().manual_seed(seed))
    return run


def monai_pipeline(dims: int, spatial: tuple[int, ...], track_meta: bool = True):
    """MONAI's dict pipeline of the same transforms (None when monai is not installed); track_meta False runs it
    with monai.data.set_track_meta(False) (plain tensors, no metadata: MONAI's faster mode)."""
    try:
        from monai import transforms as mt
        from monai.data import set_track_meta
        from monai.utils import set_determinism
    except ImportError:
        return None
    keys = fields = ("image", "label", "confidence")
    set_determinism(seed=0)
    flips = [mt.RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(dims)]
    compose = mt.Compose([
        *flips,
        mt.RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=(dims - 2, dims - 1)),
        mt.RandAffined(keys, prob=0.5, rotate_range=(0, 0, math.radians(15)) if dims == 3 else (math.radians(15),),
                       scale_range=[0.1] * dims, translate_range=[0.05 * n for n in spatial],
                       mode=("bilinear", "nearest", "nearest"), padding_mode="zeros"),
        mt.RandScaleIntensityd("image", factors=0.1, prob=0.8),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=0.8),
        mt.RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.8),
        mt.RandGaussianSmoothd("image", sigma_x=(0.1, 1.0), sigma_y=(0.1, 1.0), sigma_z=(0.1, 1.0), prob=0.2),
        mt.RandGaussianNoised("image", prob=0.2, std=0.03),
    ])

    def run(image, label, confidence, seed):
        set_track_meta(track_meta)
        compose.set_random_state(seed=seed)
        try:
            outs = [compose({"image": image[b], "label": label[b][None], "confidence": confidence[b][None]})
                    for b in range(image.shape[0])]
        finally:
            set_track_meta(True)
        image, label, confidence = (torch.stack([torch.as_tensor(o[k]) for o in outs]) for k in fields)
        return image, label[:, 0], confidence[:, 0]
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats per provider and workload")
    ap.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the project's CPU runs use 1)")
    ap.add_argument("--workloads", default="2d,3d", help="comma list of " + ", ".join(WORKLOADS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"# {env['date']}, commit {env['commit']}, torch {env['torch']}, {env['device_name']}, "
          f"{args.threads} thread(s), {args.repeats} repeats")
    rows = []
    for name in args.workloads.split(","):
        batch, spatial = WORKLOADS[name]
        providers = {"ours": ours(), "before": before(), "monai": monai_pipeline(len(spatial), spatial),
                     "monai, no metadata": monai_pipeline(len(spatial), spatial, track_meta=False)}
        providers = {k: v for k, v in providers.items() if v is not None}
        times = {k: [] for k in providers}
        for r in range(args.warmup + args.repeats):
            data = make_batch(batch, spatial, r)
            for key, run in providers.items():
                start = time.perf_counter()
                out = run(*data, seed=r)
                elapsed = time.perf_counter() - start
                assert out[0].shape == data[0].shape and out[1].shape == data[1].shape, key
                if r >= args.warmup:
                    times[key].append(elapsed * 1e3)
        base = statistics.median(times["ours"])
        for key, samples in times.items():
            med = statistics.median(samples)
            rows.append((f"{name} {batch} x {'x'.join(map(str, spatial))}", key, med, min(samples), max(samples),
                         med / base))
    print("\n| workload | provider | ms per batch, median (min-max) | time / ours |")
    print("|---|---|---|---|")
    for workload, key, med, lo, hi, ratio in rows:
        print(f"| {workload} | {key} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {ratio:.2f} |")
    if not any(key == "monai" for _, key, *_ in rows):
        print("\n(monai is not installed: pip install monai to time its pipeline beside ours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

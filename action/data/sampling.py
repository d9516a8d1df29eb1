"""Batches for semi-supervised training: in-memory slice sets, a labelled + unlabelled batch sampler whose batch t
is a pure function of (seed, t) (so a resumed run draws exactly the batches it would have drawn), and random 3D
patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from action.data.labels import IGNORE_INDEX


def run_seed(seed: int, step: int) -> int:
    """The seed of step `step` (an iteration, or an epoch of an index stream) of a run seeded with `seed`: every
    per-step random stream of a run (batches, augmentation, dropout, 3D patches) is seeded from it, which makes
    batch t a pure function of (seed, t) and a resumed run exact. The prime multiplier keeps (seed, step) pairs of
    nearby seeds apart."""
    return seed * 1_000_003 + step


class IndexStream:
    """An endless stream over range(n): epoch e is torch.randperm(n) drawn from a generator seeded with
    (seed, e); take(start, count) -> the stream's items start .. start + count - 1 as an int64 tensor."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"IndexStream needs n >= 1 items, got {n}")
        self.n, self.seed, self._cache = n, seed, (None, None)

    def _epoch(self, e: int) -> torch.Tensor:
        if self._cache[0] != e:
            g = torch.Generator().manual_seed(run_seed(self.seed, e))
            self._cache = (e, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def take(self, start: int, count: int) -> torch.Tensor:
        out, pos = [], start
        while len(out) < count:
            e, off = divmod(pos, self.n)
            chunk = self._epoch(e)[off:off + count - len(out)]
            out.extend(chunk.tolist())
            pos += len(chunk)
        return torch.tensor(out, dtype=torch.long)


class TwoStreamSampler:
    """batch(t) -> (labelled indices (labelled_batch,), unlabelled indices (unlabelled_batch,)): each set walks its
    own shuffled epochs independently, so the few labelled images repeat while the many unlabelled ones are
    covered. Stateless given t: resuming at iteration t needs no sampler state."""

    def __init__(self, n_labelled: int, n_unlabelled: int, labelled_batch: int, unlabelled_batch: int, seed: int = 0):
        if labelled_batch < 1:
            raise ValueError(f"labelled_batch must be >= 1, got {labelled_batch}")
        if unlabelled_batch < 0 or (unlabelled_batch > 0 and n_unlabelled < 1):
            raise ValueError(f"unlabelled_batch={unlabelled_batch} needs unlabelled images (have {n_unlabelled})")
        self.labelled = IndexStream(n_labelled, 2 * seed)
        self.unlabelled = IndexStream(n_unlabelled, 2 * seed + 1) if unlabelled_batch else None
        self.lb, self.ub = labelled_batch, unlabelled_batch

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        lab = self.labelled.take(t * self.lb, self.lb)
        unl = self.unlabelled.take(t * self.ub, self.ub) if self.unlabelled else torch.empty(0, dtype=torch.long)
        return lab, unl


def load_slices(dataset, desc: str = "loading slices", progress: bool = True):
    """Stack a slice dataset (items {"image": (1, H, W), "label"?: (H, W)} of one size) into memory:
    -> images (N, 1, H, W) float32, labels (N, H, W) int64 or None, names."""
    from tqdm.auto import tqdm

    images, labels, names = [], [], []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, leave=False):
        item = dataset[i]
        if images and item["image"].shape != images[0].shape:
            raise ValueError(f"{item['name']}: shape {tuple(item['image'].shape)} differs from the first slice's "
                             f"{tuple(images[0].shape)}; give the dataset a fixed size")
        images.append(item["image"])
        names.append(item["name"])
        if "label" in item:
            labels.append(item["label"])
    return torch.stack(images), (torch.stack(labels) if labels else None), names


def random_patches(image: torch.Tensor, label: torch.Tensor | None, patch: tuple[int, int, int], count: int,
                   generator: torch.Generator, foreground_p: float = 0.5):
    """Random 3D patches of one volume: image (Z, H, W) [or (C, Z, H, W)], label (Z, H, W) -> images
    (count, C, *patch), labels (count, *patch). A volume smaller than the patch is zero-padded (label 0). With
    probability foreground_p a patch is centred on a random foreground voxel (when the label has one; ignored voxels
    are not foreground)."""
    img = image if image.dim() == 4 else image.unsqueeze(0)
    if img.dim() != 4 or len(patch) != 3:
        raise ValueError(f"random_patches needs a (Z, H, W) or (C, Z, H, W) volume and a 3-element patch, got "
                         f"{tuple(image.shape)} and {patch}")
    if label is not None and tuple(label.shape) != tuple(img.shape[1:]):
        raise ValueError(f"label shape {tuple(label.shape)} != image spatial shape {tuple(img.shape[1:])}")
    pad = []
    for n, p in zip(reversed(img.shape[1:]), reversed(patch)):
        extra = max(0, p - n)
        pad += [extra // 2, extra - extra // 2]
    img = F.pad(img, pad)
    lab = F.pad(label, pad) if label is not None else None
    shape = img.shape[1:]
    # foreground: a class other than background, not an ignored voxel (action.data.labels.IGNORE_INDEX)
    fg = torch.nonzero((lab > 0) & (lab != IGNORE_INDEX)) if lab is not None else torch.empty(0, 3, dtype=torch.long)
    images, labels = [], []
    for _ in range(count):
        u = torch.rand(4, generator=generator)
        if len(fg) and u[0] < foreground_p:
            centre = fg[int(u[1] * len(fg)) % len(fg)]
            start = [int(min(max(c - p // 2, 0), n - p)) for c, p, n in zip(centre.tolist(), patch, shape)]
        else:
            start = [int(torch.randint(0, n - p + 1, (1,), generator=generator)) for p, n in zip(patch, shape)]
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
        images.append(img[(slice(None),) + sl])
        if lab is not None:
            labels.append(lab[sl])
    return torch.stack(images), (torch.stack(labels) if labels else None)

"""How many prunes the Triton top-k kernel makes per program: a simulation of its rule, for the static estimate.

The kernel appends every key above a row's threshold and prunes a program's rows when any row might overflow its
W slots, keeping about the k best (the simulation keeps exactly k: the kernel's bisection keeps a few more).
The count depends on the data; for keys in random order it depends only on the
ranks, so the simulation draws i.i.d. normal similarities (the same ranks as random unit vectors) with the
labels of the benchmark (4 classes, 80% of the keys in one), for two programs of 64 rows, and returns the larger
count. Keys sorted by increasing similarity would make a merge every few tiles: the estimate states the model.
"""
from __future__ import annotations

import functools

import numpy as np

ROWS = 64
PROGRAMS = 2


@functools.lru_cache(maxsize=None)
def merges(K: int, k: int, BLOCK_N: int, W: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    worst = 0
    for _ in range(PROGRAMS):
        ya = rng.integers(0, 4, ROWS)
        yk = np.where(rng.random(K) < 0.8, 0, rng.integers(1, 4, K))
        sim = rng.standard_normal((ROWS, K)).astype(np.float32)
        sim[yk[None, :] == ya[:, None]] = -np.inf
        kept = [np.empty(0, np.float32) for _ in range(ROWS)]
        pending: list[list] = [[] for _ in range(ROWS)]
        thr = np.full(ROWS, -np.inf, np.float32)
        used = np.zeros(ROWS, np.int64)
        count = 0
        for j0 in range(0, K - K % BLOCK_N, BLOCK_N):
            tile = sim[:, j0:j0 + BLOCK_N]
            cand = tile > thr[:, None]
            for i in np.flatnonzero(cand.any(axis=1)):
                pending[i].append(tile[i][cand[i]])
            used += cand.sum(axis=1)
            if used.max() > W - BLOCK_N:
                count += 1
                for i in range(ROWS):
                    allv = np.concatenate([kept[i], *pending[i]])
                    kept[i] = -np.sort(-allv)[:k]
                    pending[i] = []
                    thr[i] = kept[i][k - 1] if kept[i].size >= k else -np.inf
                    used[i] = kept[i].size
        worst = max(worst, count)
    return worst

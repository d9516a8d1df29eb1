"""How many CPU threads torch uses: `--threads N` on every command, and a default that does not collapse on a busy
machine.

torch's own default is one thread per core, and its OpenMP threads spin-wait for each other: when other processes
already keep the cores busy, every parallel region waits for its slowest (descheduled) thread, and a run slows down
by an order of magnitude instead of sharing the machine (measured: benchmarks/RESULTS.md, Threads under load). The
default here (default_threads) is therefore the cores that are idle now: the cores this process may run on minus the
one-minute load average, rounded, at least 1 and at most MAX_DEFAULT (more threads gain little on the small
convolutions of these networks); OMP_NUM_THREADS, when set, is respected as torch respects it.
"""
from __future__ import annotations

import os

import torch

MAX_DEFAULT = 4


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """The idle cores now (available cores minus the one-minute load average, rounded), in [1, MAX_DEFAULT];
    OMP_NUM_THREADS when set."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(MAX_DEFAULT, cores, round(cores - load)))


def configure_threads(requested: int | None) -> int:
    """Sets torch's intra-op threads to `requested` (>= 1), or to default_threads() when None; returns the number."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ValueError(f"--threads: expected a whole number >= 1, got {requested!r}")
    threads = requested if requested is not None else default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads

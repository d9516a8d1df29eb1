"""Threads (issue 27, finding 9): `--threads` on every command, and a default that does not collapse on a busy machine:
the idle cores (available cores minus the load average, 1 to 4), OMP_NUM_THREADS when set. The measurement behind
the default (torch's 2 threads against 1 under load) is in benchmarks/RESULTS.md, not here. On the code before the
fix evaluate, predict, ensemble and data convert had no --threads, and the default was torch's (both tests fail
there)."""
import os

import pytest
import torch

from action.cli import main
from action.engine import threads


@pytest.mark.parametrize("command", [["train", "--preset", "smoke", "--data", "nowhere"],
                                     ["evaluate", "--checkpoint", "nowhere.pt"],
                                     ["predict", "--checkpoint", "nowhere.pt", "--input", "nowhere"],
                                     ["ensemble", "--predictions", "nowhere-a", "nowhere-b"],
                                     ["data", "convert", "--data", "nowhere"]], ids=lambda c: c[0])
def test_every_command_takes_threads_and_applies_it_first(tmp_path, command):
    before = torch.get_num_threads()
    try:
        assert main([*command, "--out", str(tmp_path / "out"), "--threads", "2"]) == 2  # fails on its input after
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_default_is_the_idle_cores_at_most_four_and_respects_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (11.0, 11.0, 10.0))  # the lead's runs and helpers on 2 cores
    assert threads.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.default_threads() == 2
    monkeypatch.setattr(threads, "available_cores", lambda: 64)
    assert threads.default_threads() == threads.MAX_DEFAULT == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (61.5, 60.0, 60.0))
    assert threads.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    with pytest.raises(ValueError, match="--threads: expected a whole number >= 1, got 0"):
        threads.configure_threads(0)

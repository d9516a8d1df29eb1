"""examples/ run on tiny sizes: the ops in a plain PyTorch loop, in a MONAI loop (skipped without monai), and a
custom stage on the action Trainer's hooks, whose bank goes through checkpoints and an exact resume."""
import csv
import importlib.util
import math
import pathlib

import pytest
import torch

from action.engine import load_checkpoint

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite_and_learning(history, seg_key):
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k != "iteration")
    assert history[0]["local"] == 0.0 and history[0]["anatomical"] == 0.0  # iteration 0: the banks were empty
    assert all(h["local"] > 0 and h["anatomical"] > 0 for h in history[2:])  # both losses act once banks fill
    first, last = history[0][seg_key], sum(h[seg_key] for h in history[-3:]) / 3
    assert last < first, (first, last)  # the segmentation loss goes down


def test_plain_pytorch_example_trains_with_both_losses_and_banks(capsys):
    history = _example("plain_pytorch").main(["--iterations", "12", "--batch", "2", "--size", "32"])
    assert len(history) == 12 and "bank rows" in capsys.readouterr().out
    _finite_and_learning(history, "ce")
    assert history[-1]["bank"] > history[0]["bank"] > 0


def test_monai_example_trains_on_metatensor_batches():
    pytest.importorskip("monai", reason="monai is not installed (an optional test dependency: the dev extra)")
    history = _example("monai_loop").main(["--iterations", "10", "--batch", "2", "--size", "32"])
    assert len(history) == 10
    _finite_and_learning(history, "dice_ce")


def _rows(path):
    with open(path) as fh:
        return {int(r["iteration"]): r for r in csv.DictReader(fh)}


def test_trainer_hooks_example_checkpoints_its_bank_and_resumes_exactly(tmp_path):
    example = _example("trainer_hooks")
    args = ["--iterations", "10", "--size", "32"]
    full = example.main(["--out", str(tmp_path / "full"), *args])
    assert full.bank.count > 0
    crashed, _ = example.make_trainer(["--out", str(tmp_path / "part"), *args])
    original = crashed.after_step

    def crash(t):
        original(t)
        if t == 6:
            raise RuntimeError("simulated crash")

    crashed.after_step = crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert load_checkpoint(str(tmp_path / "part" / "last.pt"))["iteration"] == 5
    resumed = example.main(["--out", str(tmp_path / "part"), *args, "--resume"])
    want, got = _rows(tmp_path / "full" / "train.csv"), _rows(tmp_path / "part" / "train.csv")
    for it in range(6, 11):
        for key in ("loss", "sup", "anco"):
            assert got[it][key] == want[it][key], (it, key)
    assert float(want[10]["anco"]) > 0
    assert torch.equal(resumed.bank.keys(), full.bank.keys()) and torch.equal(resumed.bank.labels(), full.bank.labels())

"""The training engine on real ACDC slices at 64x64: a 20-iteration supervised run that saves, resumes (also after
a SIGKILL of a subprocess) with identical subsequent losses, and evaluates; checkpoint safety; the supervised loss."""
import os
import subprocess
import sys

import pytest
import torch

from action.config import build_config
from action.engine import Trainer, dice_loss, load_checkpoint, save_checkpoint, supervised_loss
from helpers import ACDC, kill_after_checkpoint, losses, needs_acdc, smoke_config


def test_dice_loss_matches_the_formula_and_ignores_pixels():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64).softmax(1)
    target = torch.randint(0, 3, (2, 5, 7), generator=g)
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).double()
    expected = torch.stack([1 - (2 * (probs[:, c] * onehot[:, c]).sum() + 1e-5)
                            / ((probs[:, c] ** 2).sum() + (onehot[:, c] ** 2).sum() + 1e-5) for c in range(3)]).mean()
    torch.testing.assert_close(dice_loss(probs, target), expected)
    ignored = target.clone()
    ignored[0] = 255
    torch.testing.assert_close(dice_loss(probs, ignored), dice_loss(probs[1:], target[1:]))
    all_ignored = supervised_loss(torch.randn(1, 3, 4, 4, requires_grad=True), torch.full((1, 4, 4), 255))
    assert torch.isfinite(all_ignored["sup"])


def test_checkpoint_is_atomic_and_refuses_pickled_code(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, str(path))
    assert load_checkpoint(str(path))["model"]["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "action-checkpoint/1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(str(tmp_path / "evil.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))


@needs_acdc
def test_supervised_run_saves_resumes_identically_and_evaluates(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(smoke_config(full), progress=False).fit()
    reference = losses(full)
    assert sorted(reference) == list(range(1, 21))
    assert reference[20] < reference[1]  # it learns
    # a crash in iteration 9 (0-based): the last checkpoint (every 5) holds 5 iterations; rows 6-9 are dropped
    trainer = Trainer(smoke_config(part), progress=False)
    original = trainer.after_step

    def crash(t):
        original(t)
        if t == 8:
            raise RuntimeError("simulated crash")

    trainer.after_step = crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()
    assert load_checkpoint(str(part / "last.pt"))["iteration"] == 5
    resumed = Trainer(smoke_config(part), progress=False)
    resumed.fit(resume=True)
    got = losses(part)
    assert sorted(got) == list(range(1, 21))
    for it in range(6, 21):
        assert got[it] == reference[it], (it, got[it], reference[it])
    metrics = resumed.test(out_dir=str(tmp_path / "eval"), overlays=1)
    assert metrics.aggregate()["cases"] == 40
    assert (tmp_path / "eval" / "metrics.csv").exists() and (tmp_path / "eval" / "summary.md").exists()
    assert len(os.listdir(tmp_path / "eval" / "overlays")) == 1


@pytest.mark.slow
@needs_acdc
def test_resume_after_sigkill_continues_with_identical_losses(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    Trainer(smoke_config(ref, checkpoint_every=4), progress=False).fit()
    script = ("import sys; from action.config import build_config; from action.engine import Trainer; "
              f"cfg = build_config('smoke', overrides=dict(out={str(killed)!r}, data={ACDC!r}, test_at_end=False, "
              "log_every=1, val_every=0, tensorboard=False, threads=1, checkpoint_every=4)); "
              "Trainer(cfg, progress=False).fit(resume='auto')")
    stopped_at = kill_after_checkpoint(script, killed / "last.pt", 8)
    assert 8 <= stopped_at < 20, stopped_at
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    got, want = losses(killed), losses(ref)
    assert sorted(got) == list(range(1, 21))
    assert all(got[it] == want[it] for it in range(stopped_at + 1, 21)), (got, want)


@needs_acdc
def test_non_finite_loss_stops_with_the_term_and_a_checkpoint(tmp_path):
    trainer = Trainer(smoke_config(tmp_path), progress=False)
    compute = trainer.compute_losses

    def poisoned(views, g):
        out = compute(views, g)
        if trainer.iteration == 3:
            out["dice_loss"] = out["dice_loss"] * float("nan")
        return out

    trainer.compute_losses = poisoned
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss term\(s\) \[.dice_loss.\]"):
        trainer.fit()
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 3


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys \\['sise'\\]"):
        build_config(overrides={"sise": 64})
    with pytest.raises(ValueError, match="config size: expected a multiple of 16"):
        build_config(overrides={"size": 100})
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("acdc-gpu-huge")
    with pytest.raises(ValueError, match="augmentation: unknown keys"):
        build_config(overrides={"augmentation": {"flip": 0.5}})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("size: 32\niterations: 7\n")
    cfg = build_config("smoke", str(cfg_file), {"iterations": 9})
    assert (cfg.size, cfg.iterations, cfg.labelled_batch) == (32, 9, 2)  # preset < file < flags


@needs_acdc
def test_every_documented_hook_is_called_by_the_loop(tmp_path):
    """The hooks of action/engine/trainer.py's docstring (and docs/training.md), each overridden: all take effect."""
    calls = []

    class Recording(Trainer):
        def build_data(self):
            calls.append("build_data")
            return super().build_data()

        def build_model(self):
            calls.append("build_model")
            return super().build_model()

        def setup(self):
            calls.append("setup")
            self.pushed = 0

        def trainable_parameters(self):
            calls.append("trainable_parameters")
            return super().trainable_parameters()

        def prepare(self, batch, generator):
            calls.append("prepare")
            return super().prepare(batch, generator)

        def compute_losses(self, views, generator):
            calls.append("compute_losses")
            self.defer("seen", views["label_l"][:1].float())
            return super().compute_losses(views, generator)

        def apply_deferred(self, name, tensors):
            calls.append(f"apply_deferred:{name}")
            self.pushed += 1

        def after_step(self, iteration):
            calls.append(f"after_step:{iteration}")

        def extra_state(self):
            calls.append("extra_state")
            return {"pushed": self.pushed}

        def load_extra_state(self, state):
            calls.append("load_extra_state")
            self.pushed = state["pushed"]

        def eval_model(self):
            calls.append("eval_model")
            return super().eval_model()

    Recording(smoke_config(tmp_path, iterations=2, val_every=2, val_volumes=1, checkpoint_every=1),
              progress=False).fit()
    assert calls[:4] == ["build_data", "build_model", "setup", "trainable_parameters"]
    for hook in ("prepare", "compute_losses", "apply_deferred:seen", "after_step:0", "after_step:1", "extra_state",
                 "eval_model"):
        assert hook in calls, hook
    assert calls.index("compute_losses") < calls.index("apply_deferred:seen") < calls.index("after_step:0")
    resumed = Recording(smoke_config(tmp_path, iterations=3, val_every=0, checkpoint_every=1), progress=False)
    resumed.fit(resume=True, force=True)  # iterations 2 -> 3: a changed option, resumed on purpose
    assert "load_extra_state" in calls and resumed.pushed == 3  # 2 before the checkpoint, 1 after

"""The 3D path end to end on volumes assembled from the real ACDC slices: assembly, UNet3D on patches, resume,
sliding-window evaluation, and the CLI on a 3D checkpoint."""
import os

import pytest
import torch

from action.cli import main
from action.config import build_config
from action.data.acdc import assemble_volumes, read_case
from action.engine import Trainer, load_checkpoint
from action.engine.inference import predict_volume_3d
from helpers import ACDC, needs_acdc, sign_model


def small_3d(out, **kw):
    values = {"out": str(out), "data": ACDC, "size": 64, "patch": [16, 32, 32], "base_channels": 4, "iterations": 4,
              "val_every": 2, "val_volumes": 1, "checkpoint_every": 2, "log_every": 1, "test_at_end": False,
              "tensorboard": False, "threads": 1}
    values.update(kw)
    return build_config("acdc-3d-cpu", overrides=values)


@needs_acdc
def test_slices_assemble_into_volumes_in_slice_order():
    names = [n for n in open(os.path.join(ACDC, "train_slices.list")).read().split() if n][:40]
    images, labels, volumes = assemble_volumes(ACDC, names)
    assert sum(v.shape[0] for v in images) == 40 and len(volumes) == len(set(n.rsplit("_slice_", 1)[0] for n in names))
    first = volumes[0]
    z = sorted(int(n.rsplit("_", 1)[1]) for n in names if n.startswith(first + "_slice_"))
    image, label = read_case(ACDC, f"{first}_slice_{z[1]}")
    assert torch.equal(images[0][1], torch.from_numpy(image)) and torch.equal(labels[0][1], torch.from_numpy(label))
    with pytest.raises(ValueError, match="_slice_<Z>"):
        assemble_volumes(ACDC, ["patient001_frame01"])


def test_predict_volume_3d_resizes_and_slides():
    vol = torch.zeros(9, 40, 30)
    vol[:, :20] = -1.0
    labels = predict_volume_3d(sign_model(3), vol, (32, 32), (16, 16, 16), 2)
    assert labels.shape == (9, 40, 30) and torch.equal(labels, (vol < 0).long())


@pytest.mark.slow
@needs_acdc
def test_3d_training_resumes_evaluates_and_serves_the_cli(tmp_path, capsys):
    trainer = Trainer(small_3d(tmp_path / "run"), progress=False)
    assert trainer.model.dims == 3
    batch = trainer.batch(0)
    assert batch["image_l"].shape == (2, 1, 16, 32, 32) and batch["label_l"].shape == (2, 16, 32, 32)
    again = Trainer(small_3d(tmp_path / "b"), progress=False)
    assert torch.equal(trainer.batch(3)["image_l"], again.batch(3)["image_l"])
    trainer.fit()
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["iteration"] == 4
    metrics = trainer.test(out_dir=str(tmp_path / "test"), overlays=1)
    assert metrics.aggregate()["cases"] == 40
    resumed = Trainer(small_3d(tmp_path / "run", iterations=6), progress=False)
    resumed.fit(resume=True, force=True)  # iterations 4 -> 6: a changed option, resumed on purpose
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["iteration"] == 6
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", ACDC, "--split", "val",
                 "--out", str(tmp_path / "ev"), "--overlays", "0"]) == 0
    assert "| LV |" in capsys.readouterr().out


@pytest.mark.slow
@needs_acdc
@pytest.mark.parametrize("plusplus", [False, True])
def test_action_pipeline_runs_in_3d(tmp_path, plusplus):
    """Stages i-iii on 3D patches (ACTION++ too): finite losses of every term, 3D heads and grids, hand-over, and the
    EMA teacher tested with the sliding window."""
    import csv

    from action.method import run_pipeline

    cfg = small_3d(tmp_path, stage="pipeline", unlabelled_batch=2, global_dim=16, global_bank=4, local_dim=8,
                   local_bank=64, local_push=16, local_grid=8, rep_dim=8, queries_per_class=8, num_negatives=8,
                   saacl_dim=8, saacl_queue=64, saacl_push=16, plusplus=plusplus, ats=plusplus, eval_teacher=True,
                   unsup_mask="pixel", val_every=2, test_at_end=True,
                   stage_iterations={"pretrain-global": 2, "pretrain-local": 2, "finetune": 2})
    results = run_pipeline(cfg, progress=False)
    assert results["finetune"]["test"]["cases"] == 40
    for stage, terms in [("pretrain-global", ["global"]), ("pretrain-local", ["sup", "global", "local"]),
                         ("finetune", ["sup", "unsup", "anco"] + (["saacl"] if plusplus else []))]:
        with open(tmp_path / stage / "train.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(r[t]))) for r in rows for t in terms), rows
    state = load_checkpoint(str(tmp_path / "finetune" / "last.pt"))
    assert state["model"]["rep.mlp.0.weight"].dim() == 5  # a 3D head (1x1x1 convolutions)


def test_3d_patch_must_fit_the_training_size():
    with pytest.raises(ValueError, match="config patch: expected three multiples of 16"):
        build_config(overrides={"dims": 3, "size": 64, "patch": [16, 96, 96]})
    assert build_config(overrides={"dims": 2, "size": 64, "patch": [16, 96, 96]}).size == 64  # 2D ignores it
    with pytest.raises(ValueError, match="config max_train_slices: expected >= 1, and only with dims 2"):
        build_config("acdc-3d-cpu", overrides={"max_train_slices": 8})

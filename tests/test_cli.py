"""The `action` command line: help for every command, a smoke train -> evaluate -> convert -> predict round trip
on real ACDC data, and clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from action.cli import main
from helpers import ACDC, SHARED, acdc_root, needs_acdc


def test_the_data_root_is_action_acdc_for_tests_and_cli_and_acdc_root_a_deprecated_alias(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ACTION_ACDC set: ACDC_ROOT is ignored without a word
        assert acdc_root({"ACTION_ACDC": "/new", "ACDC_ROOT": "/old"}) == "/new"
        assert acdc_root({}) == os.path.join(SHARED, "acdc")
    with pytest.warns(FutureWarning, match="ACDC_ROOT=/old is deprecated: set ACTION_ACDC") as caught:
        assert acdc_root({"ACDC_ROOT": "/old"}) == "/old"
    assert len(caught) == 1
    code = "from action.config import TrainConfig; print(TrainConfig().data)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ACTION_ACDC": str(tmp_path)},
                         capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path), out.stderr


def test_every_command_explains_itself():
    for cmd in ([], ["train"], ["evaluate"], ["predict"], ["data", "convert"]):
        out = subprocess.run([sys.executable, "-m", "action.cli", *cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: action" in out.stdout, (cmd, out.stderr)
    train_help = subprocess.run([sys.executable, "-m", "action.cli", "train", "--help"], capture_output=True,
                                text=True).stdout
    for option in ("--labelled-patients", "--checkpoint-every", "--augmentation", "--resume", "--preset"):
        assert option in train_help


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--preset", "smoke", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "has no data/ folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--size", "abc"])


@pytest.mark.slow
@needs_acdc
def test_train_evaluate_convert_predict_round_trip(tmp_path, capsys, monkeypatch):
    nib = pytest.importorskip("nibabel")
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--data", ACDC, "--out", str(run), "--iterations", "6",
                 "--val-every", "3", "--val-volumes", "1", "--test-at-end", "false", "--threads", "1"]) == 0
    assert (run / "best.pt").exists() and (run / "tensorboard").is_dir()
    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", ACDC, "--split", "val", "--out", str(ev),
                 "--overlays", "1"]) == 0
    assert "| RV |" in capsys.readouterr().out
    assert len((ev / "metrics.csv").read_text().splitlines()) == 1 + 20
    nii = tmp_path / "nii"
    names = tmp_path / "names.list"
    names.write_text(open(os.path.join(ACDC, "val.list")).readline())
    assert main(["data", "convert", "--data", ACDC, "--names", str(names), "--out", str(nii),
                 "--spacing", "1.5,1.5,10"]) == 0
    [image] = os.listdir(nii / "imagesTs")  # nnU-Net's raw layout: imagesTs/<case>_0000.nii.gz
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(nii / "imagesTs" / image), "--out",
                 str(pred), "--overlays", "0", "--bn-recalibrate", "2"]) == 0
    import action.data.training as training_module

    loads, real = [], training_module.training_data
    monkeypatch.setattr(training_module, "training_data", lambda cfg, uses_unlabelled, *a: loads.append(
        uses_unlabelled) or real(cfg, uses_unlabelled, *a))
    for source in ("run", "unlabelled"):  # a supervised run: its labelled slices, or the unlabelled ones on request
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", ACDC, "--split", "val", "--out",
                     str(tmp_path / f"ev-{source}"), "--overlays", "0", "--bn-recalibrate", "2",
                     "--bn-source", source]) == 0
    assert loads == [False, True]
    with pytest.raises(SystemExit, match="--teacher: .* holds no EMA teacher"):
        main(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(nii / "imagesTs" / image), "--out",
              str(pred), "--teacher"])
    with pytest.raises(SystemExit, match="--bn-recalibrate: expected >= 0 batches, got -1"):
        main(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(nii / "imagesTs" / image), "--out",
              str(pred), "--bn-recalibrate", "-1"])
    src = nib.load(nii / "imagesTs" / image)
    out = nib.load(pred / "predictions" / image.replace("_0000.nii.gz", ".nii.gz"))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2, 3}
    # evaluate on NIfTI folders: metrics in mm from the header spacing
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--images", str(nii / "imagesTs"), "--labels",
                 str(nii / "labelsTs"), "--out", str(tmp_path / "ev2"), "--overlays", "0"]) == 0

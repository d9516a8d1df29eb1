"""NIfTI dataset folders: nnU-Net's raw layout (channel suffixes, dataset.json, splits_final.json), images/labels
pairs, the split rules, and `action data convert` output that train, evaluate and predict all accept."""
import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("nibabel", reason="NIfTI I/O needs nibabel (pip install nibabel)")

from action.data.layouts import NiftiLayout, detect_layout, patient_of  # noqa: E402
from action.data.nifti import save_nifti  # noqa: E402
from helpers import ACDC, SMALL, needs_acdc  # noqa: E402


def write_case(folder, name, label_folder=None, shape=(8, 8, 3)):
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    save_nifti(np.random.default_rng(0).random(shape).astype(np.float32), affine, str(folder / f"{name}.nii.gz"))
    if label_folder is not None:
        save_nifti(np.zeros(shape, np.uint8), affine, str(label_folder / f"{name.removesuffix('_0000')}.nii.gz"))


def test_nnunet_layout_splits_by_fold_patients_and_labels(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    for p in range(1, 6):
        for f in (1, 2):
            write_case(images, f"pat{p}_frame0{f}_0000", labels)
    write_case(images, "extra_0000")  # no label map: an unlabelled training image
    write_case(tmp_path / "imagesTs", "pat9_frame01_0000", tmp_path / "labelsTs")
    assert detect_layout(str(tmp_path)) == "nnunet" and patient_of("pat3_frame02") == "pat3"
    layout = NiftiLayout(str(tmp_path))
    labelled, unlabelled, val, test = layout.split(2)
    assert [c.name for c in val] == ["pat1_frame01", "pat4_frame02"]  # fold 0 of nnU-Net's default folds
    assert [c.name for c in labelled] == ["pat1_frame02", "pat2_frame01", "pat2_frame02"]  # the first 2 patients
    assert {c.name for c in unlabelled} == {"pat3_frame01", "pat3_frame02", "pat4_frame01", "pat5_frame01",
                                            "pat5_frame02", "extra"}
    assert [c.name for c in test] == ["pat9_frame01"] and test[0].label.endswith("labelsTs/pat9_frame01.nii.gz")
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["pat5_frame01", "pat4_frame01"],
                                                             "val": ["pat2_frame02"]}]))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                       "labels": {"background": 0, "RV": 1}}))
    layout = NiftiLayout(str(tmp_path))
    labelled, unlabelled, val, _ = layout.split(None)
    assert [c.name for c in labelled] == ["pat5_frame01", "pat4_frame01"] and [c.name for c in val] == ["pat2_frame02"]
    assert layout.class_names == ("background", "RV")
    with pytest.raises(ValueError, match="labelled_patients=3: .* has 2 patients"):
        layout.split(3)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}}))
    with pytest.raises(ValueError, match="has the channel files extra_0000.nii.gz; expected 2 channel"):
        NiftiLayout(str(tmp_path))


def test_pairs_layout_accepts_channel_suffixes_and_names_missing_labels(tmp_path):
    from action.data.nifti import folder_pairs

    images, labels = tmp_path / "images", tmp_path / "labels"
    for name in ("a_0000", "b_0000"):
        write_case(images, name, labels)
    assert detect_layout(str(tmp_path)) == "pairs"
    assert [c.name for c in NiftiLayout(str(tmp_path)).training] == ["a", "b"]
    assert [os.path.basename(lab) for _, lab in folder_pairs(str(images), str(labels))] == ["a.nii.gz", "b.nii.gz"]
    os.remove(labels / "b.nii.gz")
    with pytest.raises(FileNotFoundError, match="b_0000.nii.gz has no label map"):
        folder_pairs(str(images), str(labels))
    assert detect_layout(str(tmp_path / "nothing")) == "hdf5"


@pytest.mark.slow
@needs_acdc
def test_converted_acdc_trains_evaluates_and_predicts_through_every_command(tmp_path, capsys):
    """`action data convert` (3 volumes per list) -> nnU-Net raw layout -> train (2D, at the median spacing; a
    semi-supervised stage on its unlabelled volume; 3D) -> evaluate --data / --images with --cases, --max-volumes
    -> predict on imagesTs."""
    import nibabel as nib

    from action.cli import main
    from action.data.preprocessing import Preprocessing
    from action.engine import load_checkpoint

    out = tmp_path / "acdc"
    assert main(["data", "convert", "--data", ACDC, "--out", str(out), "--spacing", "1.5,1.5,10",
                 "--max-volumes", "3"]) == 0
    assert sorted(os.listdir(out)) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs",
                                       "splits_final.json"]
    split = json.loads((out / "splits_final.json").read_text())[0]
    assert split["train"] == ["patient099_frame01", "patient099_frame02", "patient038_frame01"]
    assert len(split["val"]) == 3 and len(os.listdir(out / "imagesTs")) == 3
    common = ["--preset", "smoke", "--data", str(out), "--iterations", "2", "--val-every", "2", "--val-volumes", "1",
              "--test-at-end", "false", "--tensorboard", "false", "--threads", "1", "--labelled-patients", "1"]
    run = tmp_path / "run"
    assert main(["train", *common, "--out", str(run), "--spacing", "median"]) == 0
    prep = Preprocessing.from_json(load_checkpoint(str(run / "best.pt"))["preprocessing"])
    assert prep.spacing == (1.5, 1.5) and prep.orientation == "RAS" and prep.intensity == "minmax"
    with open(run / "val.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    small = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k not in ("data", "test_at_end",
                                                                                   "val_every", "tensorboard",
                                                                                   "threads")]
    assert main(["train", *common, *small, "--stage", "pretrain-local", "--out", str(tmp_path / "ssl")]) == 0
    three_d = [c for c in common if c not in ("--preset", "smoke")]  # smoke's max_train_slices is 2D only
    assert main(["train", *three_d, "--dims", "3", "--patch", "[16, 32, 32]", "--base-channels", "2",
                 "--labelled-batch", "1", "--size", "64", "--val-every", "0", "--out", str(tmp_path / "3d")]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "3d" / "best.pt"), "--data", str(out), "--max-volumes",
                 "1", "--sliding-window", "gaussian", "--out", str(tmp_path / "ev3d"), "--overlays", "0"]) == 0
    capsys.readouterr()
    ev = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(out), "--split", "test",
                 "--max-volumes", "2", "--out", str(ev), "--overlays", "0"]) == 0
    assert "| RV |" in capsys.readouterr().out
    assert len((ev / "metrics.csv").read_text().splitlines()) == 1 + 2
    test_names = sorted(n.removesuffix("_0000.nii.gz") for n in os.listdir(out / "imagesTs"))
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--images", str(out / "imagesTs"), "--labels",
                 str(out / "labelsTs"), "--cases", test_names[1], "--out", str(tmp_path / "ev2"),
                 "--overlays", "0", "--tta"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "ev2" / "metrics.csv")))
    assert [r["case"] for r in rows] == [test_names[1]]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(out), "--cases", "nope", "--out",
                 str(tmp_path / "ev3")]) == 2
    assert "--cases: no case named ['nope']" in capsys.readouterr().err
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(out / "imagesTs"), "--out",
                 str(pred), "--overlays", "0"]) == 0
    assert sorted(os.listdir(pred / "predictions")) == [f"{n}.nii.gz" for n in test_names]
    src, got = nib.load(out / "imagesTs" / f"{test_names[0]}_0000.nii.gz"), \
        nib.load(pred / "predictions" / f"{test_names[0]}.nii.gz")
    assert got.shape == src.shape and np.allclose(got.affine, src.affine)

"""Probabilities, ensembling, scoring prediction folders and the largest-component postprocessing, through the
`action` command on small NIfTI volumes and checkpoints of untrained networks (no dataset needed)."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel", reason="NIfTI I/O needs nibabel (pip install nibabel)")
import nibabel as nib  # noqa: E402

from action.cli import main  # noqa: E402
from action.metrics import SegmentationMetrics  # noqa: E402


def _checkpoint(path, seed: int, dims: int = 2, orientation: str = "RAS") -> str:
    """A checkpoint of an untrained network (seeded weights) with z-score preprocessing in `orientation`."""
    from action.config import build_config
    from action.data.preprocessing import Preprocessing
    from action.engine import save_checkpoint
    from action.models import build_network

    extra = {"dims": 3, "patch": [16, 32, 32], "base_channels": 2, "size": 64} if dims == 3 else {"size": 32}
    cfg = build_config("smoke" if dims == 2 else None,  # smoke's max_train_slices is 2D only
                       overrides={"out": str(path.parent), "seed": seed, "threads": 1, **extra})
    torch.manual_seed(seed)
    net = build_network(cfg)
    state = {"iteration": 0, "stage": "supervised", "config": cfg.to_json(), "model": net.state_dict(),
             "preprocessing": Preprocessing("zscore", None, orientation).to_json()}
    return save_checkpoint(state, str(path))


def _images(folder, count: int = 2, seed: int = 0):
    """NIfTI volumes (X, Y, Z) of different shapes and a non-trivial affine, and label maps of 4 classes."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(count):
        shape = (40 + 4 * i, 36, 5 + i)
        affine = np.diag([1.2, 1.4, 6.0, 1.0])
        affine[:3, 3] = [-20, 10, 5 * i]
        image = rng.normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[8:20, 8:20, 1:4], label[22:30, 10:18, :3], label[3:6, 25:30, 2:] = 1, 2, 3
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"case{i}.nii.gz")
    return folder / "images", folder / "labels"


def _data(path):
    return np.asarray(nib.load(path).dataobj)


def test_predict_saves_probabilities_and_both_ensembles_average_them(tmp_path):
    images, labels = _images(tmp_path / "data")
    a, b = _checkpoint(tmp_path / "a.pt", 1), _checkpoint(tmp_path / "b.pt", 2, orientation="LPS")
    for name, ckpt in (("pa", a), ("pb", b)):
        assert main(["predict", "--checkpoint", ckpt, "--input", str(images), "--out", str(tmp_path / name),
                     "--overlays", "0", "--save-probabilities", "--device", "cpu"]) == 0
    probs = {}
    for name in ("pa", "pb"):
        for case in ("case0", "case1"):
            src = nib.load(images / f"{case}_0000.nii.gz")
            p = nib.load(tmp_path / name / "probabilities" / f"{case}.nii.gz")
            assert p.shape == (*src.shape, 4) and np.allclose(p.affine, src.affine)  # the input's space
            data = np.asarray(p.dataobj)
            assert data.dtype == np.float32 and np.allclose(data.sum(-1), 1, atol=1e-5)
            assert np.array_equal(data.argmax(-1), _data(tmp_path / name / "predictions" / f"{case}.nii.gz"))
            probs[name, case] = data
    assert not np.allclose(probs["pa", "case0"], probs["pb", "case0"])  # two different models
    # folders: the mean of the maps, then its argmax
    assert main(["ensemble", "--predictions", str(tmp_path / "pa"), str(tmp_path / "pb" / "probabilities"),
                 "--out", str(tmp_path / "ef"), "--save-probabilities"]) == 0
    # checkpoints (trained in different orientations: averaged in the input's space)
    assert main(["ensemble", "--checkpoints", a, b, "--input", str(images), "--out", str(tmp_path / "ec"),
                 "--device", "cpu", "--save-probabilities"]) == 0
    for case in ("case0", "case1"):
        mean = (probs["pa", case] + probs["pb", case]) / 2
        for out in ("ef", "ec"):
            np.testing.assert_allclose(_data(tmp_path / out / "probabilities" / f"{case}.nii.gz"), mean, atol=1e-6)
            labels_out = nib.load(tmp_path / out / "predictions" / f"{case}.nii.gz")
            assert labels_out.shape == mean.shape[:3] and labels_out.get_data_dtype() == np.uint8
            assert np.allclose(labels_out.affine, nib.load(images / f"{case}_0000.nii.gz").affine)
            assert np.array_equal(np.asarray(labels_out.dataobj), mean.argmax(-1))


def test_largest_component_filters_the_labels_of_predict_evaluate_and_ensemble_not_the_probabilities(tmp_path,
                                                                                                      capsys):
    """An untrained network on noise predicts scattered classes: --largest-component keeps each class's largest
    26-connected part in every command's label maps, and the probabilities stay the network's softmax."""
    from action.engine.postprocess import largest_component

    images, labels = _images(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "a.pt", 3)
    common = ["--checkpoint", ckpt, "--overlays", "0", "--save-probabilities", "--device", "cpu"]
    assert main(["predict", "--input", str(images), "--out", str(tmp_path / "plain"), *common]) == 0
    assert "predicting" in capsys.readouterr().err  # the progress bar's label
    assert main(["predict", "--input", str(images), "--out", str(tmp_path / "lc"), "--largest-component", *common]) == 0
    assert main(["evaluate", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "ev"),
                 "--save-predictions", "--largest-component", *common]) == 0
    changed = 0
    for case in ("case0", "case1"):
        plain = _data(tmp_path / "plain" / "predictions" / f"{case}.nii.gz")
        kept = largest_component(plain)
        changed += int(not np.array_equal(kept, plain))
        probs = _data(tmp_path / "plain" / "probabilities" / f"{case}.nii.gz")
        for out in ("lc", "ev"):
            assert np.array_equal(_data(tmp_path / out / "predictions" / f"{case}.nii.gz"), kept), (out, case)
            np.testing.assert_array_equal(_data(tmp_path / out / "probabilities" / f"{case}.nii.gz"), probs)
    assert changed  # the filter removed components
    # scoring the unfiltered files with --largest-component scores the filtered ones
    for name, extra in (("s_plain", ["--largest-component"]), ("s_lc", [])):
        folder = tmp_path / ("plain" if name == "s_plain" else "lc")
        assert main(["evaluate", "--predictions", str(folder), "--labels", str(labels), "--out", str(tmp_path / name),
                     "--num-classes", "4", *extra]) == 0
    assert (tmp_path / "s_plain" / "metrics.csv").read_text() == (tmp_path / "s_lc" / "metrics.csv").read_text()
    # an ensemble filters its own argmax (two copies of one model average to its probabilities), here one class
    plain = {case: _data(tmp_path / "plain" / "predictions" / f"{case}.nii.gz") for case in ("case0", "case1")}
    split = [c for c in (1, 2, 3) if any(not np.array_equal(largest_component(p, (c,)), p) for p in plain.values())]
    assert main(["ensemble", "--predictions", str(tmp_path / "plain"), str(tmp_path / "lc"), "--out",
                 str(tmp_path / "ens"), "--largest-component", str(split[0])]) == 0
    for case, labels_plain in plain.items():
        got = _data(tmp_path / "ens" / "predictions" / f"{case}.nii.gz")
        assert np.array_equal(got, largest_component(labels_plain, (split[0],)))
        assert np.array_equal(got != labels_plain, (labels_plain == split[0]) & (got == 0))  # only that class lost


def test_folder_ensembles_refuse_maps_of_different_spaces_cases_or_classes(tmp_path, capsys):
    def write(folder, case, shape=(6, 5, 4, 3), affine=np.eye(4)):
        (tmp_path / folder / "probabilities").mkdir(parents=True, exist_ok=True)
        p = np.random.default_rng(0).random(shape).astype(np.float32)
        nib.save(nib.Nifti1Image(p / p.sum(-1, keepdims=True), affine), tmp_path / folder / "probabilities" / case)

    write("a", "x.nii.gz")
    write("b", "x.nii.gz", affine=np.diag([2.0, 1, 1, 1]))
    write("c", "x.nii.gz", shape=(6, 5, 4, 2))
    write("d", "y.nii.gz")
    write("e", "x.nii.gz", shape=(6, 5, 4))
    for other, message in (("b", "different spaces"), ("c", "different number of classes"),
                           ("d", "hold different cases"), ("e", "expected a probability map")):
        assert main(["ensemble", "--predictions", str(tmp_path / "a"), str(tmp_path / other), "--out",
                     str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert main(["ensemble", "--predictions", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    assert "at least two folders" in capsys.readouterr().err
    assert main(["ensemble", "--out", str(tmp_path / "out")]) == 2
    assert "--checkpoints A.pt B.pt" in capsys.readouterr().err


def test_evaluate_predictions_scores_files_without_a_checkpoint(tmp_path, capsys):
    _, labels = _images(tmp_path / "data", count=3)
    preds = tmp_path / "preds"
    preds.mkdir()
    truth, shifted = {}, {}
    for case in ("case0", "case1", "case2"):
        img = nib.load(labels / f"{case}.nii.gz")
        spacing = img.header.get_zooms()  # (1.2, 1.4, 6.0) as float32, as the scorer reads them
        truth[case] = np.asarray(img.dataobj).astype(np.int64)
        shifted[case] = np.roll(truth[case], 2, axis=0)
        nib.save(nib.Nifti1Image(shifted[case].astype(np.uint8), img.affine), preds / f"{case}.nii.gz")
    out = tmp_path / "scores"
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(labels), "--out", str(out),
                 "--nsd-tolerance", "1.5"]) == 0
    assert "HD95 (MONAI) | NSD (1.5)" in capsys.readouterr().out
    want = SegmentationMetrics(4, nsd_tolerance=1.5)
    for case in truth:
        want.update(shifted[case], truth[case], spacing=spacing, case_id=case)
    assert (out / "metrics.csv").read_text() == _csv(want, tmp_path / "want.csv")
    assert (out / "summary.md").is_file() and (out / "summary.json").is_file()
    # a prediction folder written by predict (its predictions/ inside), a subset of the label maps
    (tmp_path / "run" / "predictions").mkdir(parents=True)
    os.replace(preds / "case1.nii.gz", tmp_path / "run" / "predictions" / "case1.nii.gz")
    assert main(["evaluate", "--predictions", str(tmp_path / "run"), "--labels", str(labels), "--out",
                 str(tmp_path / "one"), "--num-classes", "4"]) == 0
    assert len((tmp_path / "one" / "metrics.csv").read_text().splitlines()) == 2
    assert "2 label map(s) have no prediction" in capsys.readouterr().err
    # errors: a prediction without a label map, another space, a checkpoint beside --predictions
    nib.save(nib.Nifti1Image(shifted["case0"].astype(np.uint8), np.eye(4)), preds / "case9.nii.gz")
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(labels), "--out", str(out)]) == 2
    assert "1 prediction(s) have no label map of the same name: ['case9']" in capsys.readouterr().err
    os.remove(preds / "case9.nii.gz")
    nib.save(nib.Nifti1Image(shifted["case0"].astype(np.uint8), np.eye(4)), preds / "case0.nii.gz")
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(labels), "--out", str(out)]) == 2
    assert "different affines" in capsys.readouterr().err
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(labels), "--out", str(out),
                 "--checkpoint", "x.pt"]) == 2
    assert "drop --checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(out)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def _csv(metrics, path) -> str:
    metrics.to_csv(str(path))
    return path.read_text()


def test_largest_component_keeps_each_class_s_largest_26_connected_part():
    from action.engine.postprocess import component_filter, largest_component, parse_classes

    labels = np.zeros((6, 8, 8), np.int64)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels
    labels[4:6, 5:8, 5:8] = 1  # 18 voxels: kept
    labels[2, 2, 2] = 1  # touches the first blob's corner only (26-connected): part of it
    labels[0:3, 5:8, 0:2] = 2
    labels[5, 0, 0] = 2
    out = largest_component(labels, None)
    assert (out == 1).sum() == 18 and (out[4:6, 5:8, 5:8] == 1).all() and out[2, 2, 2] == 0
    assert (out == 2).sum() == 18 and out[5, 0, 0] == 0
    only2 = largest_component(torch.from_numpy(labels), parse_classes("2", 4))
    assert isinstance(only2, torch.Tensor) and (only2 == 1).sum() == (labels == 1).sum() and only2[5, 0, 0] == 0
    assert component_filter(None) is None
    with pytest.raises(ValueError, match=r"--largest-component: expected 'all' or comma-separated foreground "
                                         r"classes in \[1, 4\), got '0,5'"):
        parse_classes("0,5", 4)


def test_evaluate_predictions_takes_the_label_maps_and_class_names_from_a_dataset_folder(tmp_path, capsys):
    """--data instead of --labels: an nnU-Net raw dataset's labelled test cases (imagesTs with labelsTs), scored
    under dataset.json's class names."""
    import json

    data = tmp_path / "Dataset001_X"
    for src, images, labels in ((tmp_path / "tr", "imagesTr", "labelsTr"), (tmp_path / "ts", "imagesTs", "labelsTs")):
        made = _images(src, count=2, seed=len(images))
        os.renames(made[0], data / images)
        os.renames(made[1], data / labels)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3}}))
    preds = tmp_path / "preds"
    preds.mkdir()
    want = SegmentationMetrics(4, ("background", "RV", "Myo", "LV"))
    for case in ("case0", "case1"):
        label = nib.load(data / "labelsTs" / f"{case}.nii.gz")
        truth = np.asarray(label.dataobj).astype(np.int64)
        nib.save(nib.Nifti1Image(np.roll(truth, 1, axis=1).astype(np.uint8), label.affine), preds / f"{case}.nii.gz")
        want.update(np.roll(truth, 1, axis=1), truth, spacing=label.header.get_zooms(), case_id=case)
        empty = nib.load(data / "labelsTr" / f"{case}.nii.gz")  # the training cases' maps differ from the test ones
        nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), data / "labelsTr" / f"{case}.nii.gz")
    assert main(["evaluate", "--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "s")]) == 0
    assert "| Myo |" in capsys.readouterr().out
    csv_text = (tmp_path / "s" / "metrics.csv").read_text()
    assert csv_text == _csv(want, tmp_path / "want.csv") and csv_text.startswith("case,RV/dice,")
    assert main(["evaluate", "--predictions", str(preds), "--out", str(tmp_path / "s")]) == 2
    assert "--predictions needs the label maps to score against" in capsys.readouterr().err


def test_3d_checkpoints_predict_and_ensemble_with_the_window_mode_asked_for(tmp_path):
    from action.cli import _predictor_from_checkpoint
    from action.engine.inference import predict_volume_3d

    images, _ = _images(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "a3.pt", 4, dims=3)
    predictor, cfg = _predictor_from_checkpoint(ckpt, "cpu", window="gaussian-monai", tta=True)
    assert cfg.dims == 3 and predictor.window == {"mode": "gaussian-monai", "tta": True}
    image = torch.from_numpy(_data(images / "case0_0000.nii.gz").transpose(2, 1, 0).copy())  # RAS: (Z, Y, X)
    image = predictor.preprocessing.normalise(image)
    probs = {}
    for mode in ("constant", "gaussian", "gaussian-monai"):
        assert main(["predict", "--checkpoint", ckpt, "--input", str(images), "--out", str(tmp_path / mode),
                     "--overlays", "0", "--save-probabilities", "--device", "cpu", "--sliding-window", mode]) == 0
        probs[mode] = _data(tmp_path / mode / "probabilities" / "case0.nii.gz")
        # 64 x 64 in-plane, 32 x 32 windows at a stride of 16: they overlap, so the weights matter
        want = predict_volume_3d(predictor.model, image, (64, 64), (16, 32, 32), 4, return_probabilities=True,
                                 mode=mode)
        np.testing.assert_allclose(probs[mode], want.numpy().transpose(3, 2, 1, 0), atol=1e-6)
    for other in ("constant", "gaussian"):  # 5e-3 apart here: a mode lost on the way would fail the check above
        assert np.abs(probs[other] - probs["gaussian-monai"]).max() > 1e-3
    # two copies of one checkpoint: the ensemble's mean is that checkpoint's probabilities in the same mode
    assert main(["ensemble", "--checkpoints", ckpt, ckpt, "--input", str(images), "--out", str(tmp_path / "ens"),
                 "--device", "cpu", "--save-probabilities", "--sliding-window", "gaussian-monai"]) == 0
    np.testing.assert_allclose(_data(tmp_path / "ens" / "probabilities" / "case0.nii.gz"), probs["gaussian-monai"],
                               atol=1e-6)

"""A nnU-Net v2 user's own dataset as nnU-Net writes it: dataset.json's file ending (.mha through SimpleITK), several
input channels, an ignore label, region labels (refused with the reason), the cross-validation folds of
splits_final.json (nnU-Net's default 5 folds when it is absent), --fold, --labelled-cases and --labelled-patients
for any N, and nnU-Net's CT normalisation, stored in the checkpoint and repeated at inference."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel", reason="NIfTI I/O needs nibabel (pip install nibabel)")

from action.data.labels import IGNORE_INDEX  # noqa: E402
from action.data.layouts import NiftiLayout  # noqa: E402
from action.data.nifti import save_nifti  # noqa: E402
from action.data.nnunet import DatasetSpec, crossval_folds  # noqa: E402
from helpers import ACDC, NIFTI, needs_acdc, needs_nifti  # noqa: E402

# the folds scikit-learn's KFold(5, shuffle=True, random_state=12345) gives 7 sorted names (the val lists; printed
# by scikit-learn 1.9.1 for this test): nnU-Net's do_split calls it on the sorted case identifiers
SKLEARN_VAL_OF_7 = [["c3", "c6"], ["c0", "c4"], ["c1"], ["c5"], ["c2"]]


def write(path, data, affine=None):
    affine = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine
    if str(path).endswith((".nii", ".nii.gz")):
        return save_nifti(data, affine, str(path))
    from action.data.image_io import write_volume
    from action.data.nifti import Volume

    return write_volume(data, Volume(data, affine, (1.0, 1.0, 1.0), str(path)), str(path))


def tiny_dataset(root, cases=6, ending=".nii.gz", labels=None, channels=1, test_case=False):
    """imagesTr/c<i>_000<k> + labelsTr/c<i> random volumes (8 x 8 x 3), dataset.json."""
    rng = np.random.default_rng(0)
    for i in range(cases):
        for k in range(channels):
            write(root / "imagesTr" / f"c{i}_{k:04d}{ending}", rng.random((8, 8, 3)).astype(np.float32))
        write(root / "labelsTr" / f"c{i}{ending}", rng.integers(0, 2, (8, 8, 3)).astype(np.uint8))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(k): f"m{k}" for k in range(channels)}, "file_ending": ending,
        "labels": labels or {"background": 0, "a": 1}, "numTraining": cases}))
    return root


# -- dataset.json ------------------------------------------------------------------------------------------------------
def test_region_labels_are_refused_in_one_line_naming_the_label_and_the_reason():
    with pytest.raises(ValueError) as err:
        DatasetSpec.read({"labels": {"background": 0, "liver": 1, "tumour": 2, "organs": [1, 2]}}, "ds/dataset.json")
    message = str(err.value)
    assert "\n" not in message and "'organs'" in message and "region" in message and "softmax" in message
    # a one-value list is a plain label, as nnU-Net reads it
    assert DatasetSpec.read({"labels": {"background": 0, "liver": [1]}}).class_names == ("background", "liver")


def test_ignore_label_is_not_a_class_and_must_be_the_highest_value():
    spec = DatasetSpec.read({"labels": {"background": 0, "liver": 1, "ignore": 2}, "channel_names": {"0": "CT",
                                                                                                    "1": "PET"}})
    assert spec.class_names == ("background", "liver") and spec.ignore_label == 2 and spec.channels == ("CT", "PET")
    with pytest.raises(ValueError, match="ignore label .* highest"):
        DatasetSpec.read({"labels": {"background": 0, "ignore": 1, "liver": 2}})
    with pytest.raises(ValueError, match="0 .. 1"):
        DatasetSpec.read({"labels": {"background": 0, "liver": 2}})
    assert DatasetSpec.read({"labels": {"0": "background", "1": "RV"}}).class_names == ("background", "RV")  # v1


def test_folds_are_nnunets_default_split_of_the_sorted_case_names():
    folds = crossval_folds([f"c{i}" for i in (3, 0, 6, 2, 5, 1, 4)])
    assert [f["val"] for f in folds] == SKLEARN_VAL_OF_7
    for f in folds:
        assert f["train"] == sorted(set(f"c{i}" for i in range(7)) - set(f["val"]))
    sklearn = pytest.importorskip("sklearn.model_selection", reason="scikit-learn compares more sizes when installed")
    for n in (5, 9, 23, 101):
        names = [f"case{i:03d}" for i in range(n)]
        ref = [[names[i] for i in te] for _, te in sklearn.KFold(5, shuffle=True, random_state=12345).split(names)]
        assert [f["val"] for f in crossval_folds(names[::-1])] == ref


def test_fold_k_validates_on_fold_k_and_generated_folds_are_written(tmp_path):
    root = tiny_dataset(tmp_path, cases=7)
    layout = NiftiLayout(str(root))
    assert layout.folds_generated and [f["val"] for f in layout.folds] == SKLEARN_VAL_OF_7
    labelled, unlabelled, val, test = layout.split(None, fold=2)
    assert [c.name for c in val] == ["c1"] and test == val
    assert [c.name for c in labelled] == ["c0", "c2", "c3", "c4", "c5", "c6"] and not unlabelled
    assert layout.write_folds() == str(root / "splits_final.json")
    assert json.loads((root / "splits_final.json").read_text()) == layout.folds
    assert not NiftiLayout(str(root)).folds_generated  # read back from the file
    with pytest.raises(ValueError, match="fold 5: .* has 5 folds"):
        layout.split(None, fold=5)
    keep, rest, _, _ = layout.split(3, fold=0, labelled_cases=2)  # labelled_cases wins over labelled_patients
    assert [c.name for c in keep] == ["c0", "c1"] and [c.name for c in rest] == ["c2", "c4", "c5"]
    keep, rest, _, _ = layout.split(2, fold=0)  # every case its own patient
    assert [c.name for c in keep] == ["c0", "c1"]
    with pytest.raises(ValueError, match="labelled_cases=9"):
        layout.split(None, labelled_cases=9)


def test_several_channels_are_grouped_per_case_and_a_missing_one_is_named(tmp_path):
    root = tiny_dataset(tmp_path, cases=5, channels=3)
    layout = NiftiLayout(str(root))
    assert layout.channels == 3
    case = layout.training[0]
    assert [os.path.basename(p) for p in case.images] == ["c0_0000.nii.gz", "c0_0001.nii.gz", "c0_0002.nii.gz"]
    os.remove(root / "imagesTr" / "c3_0001.nii.gz")
    with pytest.raises(ValueError, match="case 'c3' has the channel files c3_0000.nii.gz, c3_0002.nii.gz; expected "
                                         "3 channel"):
        NiftiLayout(str(root))


def test_file_ending_selects_the_files_and_a_wrong_one_says_so(tmp_path):
    root = tiny_dataset(tmp_path, cases=5)
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "file_ending": ".mha"}))
    with pytest.raises(FileNotFoundError, match=r"ending in \.mha; the folder holds \.nii\.gz files: is "
                                                r"dataset.json's file_ending right"):
        NiftiLayout(str(root))


def test_a_missing_simpleitk_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from action.cli import main

    root = tiny_dataset(tmp_path / "ds", cases=5)
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "file_ending": ".mha"}))
    for i in range(5):
        (root / "imagesTr" / f"c{i}_0000.mha").write_bytes(b"")
        (root / "labelsTr" / f"c{i}.mha").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK -> ImportError
    assert main(["train", "--preset", "smoke", "--data", str(root), "--out", str(tmp_path / "run"), "--threads", "1",
                 "--tensorboard", "false", "--num-classes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "action-kernels[sitk]"' in err


# -- reading and writing through SimpleITK -----------------------------------------------------------------------------
@needs_nifti
def test_mha_and_nifti_copies_read_to_the_same_voxels_and_world_geometry(tmp_path):
    pytest.importorskip("SimpleITK", reason="SimpleITK is the [sitk] extra: pip install \"action-kernels[sitk]\"")
    from action.data.image_io import read_geometry, read_volume, write_volume

    for name in ("example_ct_sm.nii.gz", "example_mr_sm.nii.gz"):  # RAS and LPS affines
        src = read_volume(os.path.join(NIFTI, name))
        mha = write_volume(src.data, src, str(tmp_path / name.replace(".nii.gz", ".mha")))
        got = read_volume(mha)
        assert np.array_equal(got.data, src.data) and got.data.dtype == src.data.dtype
        assert np.allclose(got.affine, src.affine, atol=1e-5) and np.allclose(got.spacing, src.spacing)
        affine, shape = read_geometry(mha)
        assert np.allclose(affine, src.affine, atol=1e-5) and shape == src.data.shape
        back = write_volume(got.data, got, str(tmp_path / name))  # and back to NIfTI from a SimpleITK reference
        assert np.allclose(read_volume(back).affine, src.affine, atol=1e-5)


# -- the ignore label in losses and metrics ----------------------------------------------------------------------------
def test_ignored_voxels_count_in_no_metric_and_no_loss():
    from action.engine.evaluate import fast_dice
    from action.engine.losses import supervised_loss
    from action.metrics import SegmentationMetrics

    gt = np.zeros((4, 16, 16), np.int64)
    gt[:, 4:12, 4:12] = 1
    pred = gt.copy()
    gt_ignored = gt.copy()
    gt_ignored[:, 0:3, :] = IGNORE_INDEX  # unannotated rows where the prediction says 1
    pred[:, 0:3, :] = 1
    m = SegmentationMetrics(2)
    case = m.update(pred, gt_ignored, case_id="a")
    assert case["class1/dice"] == 1.0 and case["class1/hd95"] == 0.0
    assert fast_dice(torch.from_numpy(pred), torch.from_numpy(gt_ignored), 2) == [1.0]
    assert fast_dice(torch.from_numpy(pred), torch.from_numpy(gt), 2)[0] < 1.0
    logits = torch.randn(1, 2, 16, 16, requires_grad=True)
    target = torch.from_numpy(gt_ignored[:1])
    loss = supervised_loss(logits, target)["sup"]
    loss.backward()
    assert torch.all(logits.grad[0, :, 0:3, :] == 0) and logits.grad.abs().sum() > 0


def test_scoring_a_prediction_folder_reads_the_ignore_label_from_the_dataset_json_beside_the_labels(tmp_path, capsys):
    """evaluate --predictions with --labels labelsTs/ of a nnU-Net dataset (or --data) scores the classes of its
    dataset.json and leaves the ignore label's voxels out: a prediction right wherever there is an annotation has
    Dice 1, and the ignore value is not counted as a class."""
    from action.cli import main

    root = tmp_path / "Dataset002_Toy"
    gt = np.zeros((12, 12, 3), np.uint8)
    gt[3:9, 3:9] = 1
    gt[:, :2] = 2  # ignore: unannotated rows, predicted as 1
    pred = np.where(gt == 2, 1, gt).astype(np.uint8)
    write(root / "labelsTs" / "t0.nii.gz", gt)
    write(root / "imagesTs" / "t0_0000.nii.gz", gt.astype(np.float32))
    for case in ("c0", "c1"):
        write(root / "imagesTr" / f"{case}_0000.nii.gz", gt.astype(np.float32))
        write(root / "labelsTr" / f"{case}.nii.gz", gt)
    write(tmp_path / "pred" / "t0.nii.gz", pred)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "organ": 1, "ignore": 2}}))
    for source in (["--labels", str(root / "labelsTs")], ["--data", str(root)]):
        assert main(["evaluate", "--predictions", str(tmp_path / "pred"), *source, "--out", str(tmp_path / "ev")]) == 0
        out = capsys.readouterr().out
        assert "| organ | 1.0000" in out and "ignore" not in out and "class2" not in out
        row = next(csv.DictReader(open(tmp_path / "ev" / "metrics.csv")))
        assert float(row["organ/dice"]) == 1.0 and not any(k.startswith(("ignore", "class2")) for k in row)


# -- CT normalisation --------------------------------------------------------------------------------------------------
def test_ct_statistics_are_the_foreground_percentiles_mean_and_std_and_normalise_clips_then_scales():
    from action.data.preprocessing import Preprocessing, ct_statistics, normalise_intensity

    rng = np.random.default_rng(0)
    images = [rng.normal(40, 30, (6, 20, 20)) for _ in range(3)]
    labels = [(rng.random((6, 20, 20)) < 0.3).astype(np.int64) for _ in range(3)]
    labels[0][0, 0, 0] = IGNORE_INDEX
    [(lower, upper, mean, std)] = ct_statistics(zip(images, labels), samples=1000)
    pooled = np.concatenate([np.random.RandomState(1234).choice(i[(lab > 0) & (lab != IGNORE_INDEX)], 1000)
                             for i, lab in zip(images, labels)])
    assert np.allclose([lower, upper, mean, std], [*np.percentile(pooled, (0.5, 99.5)), pooled.mean(), pooled.std()])
    volume = torch.tensor([[[-1000.0, 40.0, 3000.0]]])
    got = normalise_intensity(volume, "ct", (lower, upper, mean, std))
    want = (np.clip([-1000.0, 40.0, 3000.0], lower, upper) - mean) / std
    assert np.allclose(got.numpy().ravel(), want, atol=1e-5)
    prep = Preprocessing("ct", None, "RAS", (), ((lower, upper, mean, std), (0.0, 1.0, 0.5, 2.0)), 3)
    assert Preprocessing.from_json(prep.to_json()) == prep  # stored in the checkpoint as it is
    two = prep.normalise(torch.stack([volume, volume]))  # each channel with its own statistics
    assert torch.allclose(two[0], got) and torch.allclose(two[1], (volume.clamp(0, 1) - 0.5) / 2)
    with pytest.raises(ValueError, match="ct_statistics"):
        Preprocessing("ct")
    old = json.loads(Preprocessing().to_json())
    del old["ct_statistics"], old["ignore_label"]  # a checkpoint written before these were stored
    assert Preprocessing.from_json(json.dumps(old)) == Preprocessing()


# -- ACDC: any N of patients or cases, no folds ------------------------------------------------------------------------
@needs_acdc
def test_acdc_takes_any_number_of_labelled_patients_or_cases_and_keeps_the_reference_mapping():
    from action.data import AcdcLayout

    acdc = AcdcLayout(ACDC)
    assert [len(acdc.split(labelled_patients=n)[0]) for n in (1, 3, 7)] == [23, 68, 136]  # the reference mapping
    two, rest = acdc.split(labelled_patients=2)
    patients = {n.split("_")[0] for n in two}
    assert len(patients) == 2 and not patients & {n.split("_")[0] for n in rest}
    cases, _ = acdc.split(labelled_cases=3)
    assert len({n.rpartition("_slice_")[0] for n in cases}) == 3 and cases == acdc.train_slices[:len(cases)]


@needs_acdc
def test_fold_other_than_zero_on_the_hdf5_layout_says_it_has_one_split(tmp_path, capsys):
    from action.cli import main

    assert main(["train", "--preset", "smoke", "--data", ACDC, "--fold", "1", "--out", str(tmp_path / "r"),
                 "--threads", "1", "--tensorboard", "false"]) == 2
    assert "the HDF5 layout has one split (val.list)" in capsys.readouterr().err


# -- a nnU-Net user's dataset end to end -------------------------------------------------------------------------------
def fixture_dataset(root, ending=".mha", cases=6):
    """A nnU-Net raw dataset from the CT fixture: `cases` z-slabs of 10 slices, two channels (HU and a second
    'modality': the CT's square root above air), labels liver 1 and spleen 2, the voxels of two more organs
    labelled ignore (3), one more slab in imagesTs/labelsTs; files in `ending`."""
    from action.data.image_io import read_volume, write_volume
    from action.data.nifti import Volume

    ct = read_volume(os.path.join(NIFTI, "example_ct_sm.nii.gz"))
    seg = read_volume(os.path.join(NIFTI, "example_seg.nii.gz")).data
    label = np.select([seg == 5, seg == 1, np.isin(seg, (86, 87))], [1, 2, 3], 0).astype(np.uint8)
    second = np.sqrt(np.clip(ct.data.astype(np.float32) + 1024, 0, None))
    for i in range(cases + 1):
        z = slice(2 * i + 4, 2 * i + 14)  # slabs overlapping, each holding liver and spleen
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ np.array([0, 0, z.start]) + ct.affine[:3, 3]
        split = "Ts" if i == cases else "Tr"
        for name, data in ((f"images{split}/s{i}_0000", ct.data[..., z]), (f"images{split}/s{i}_0001",
                                                                            second[..., z]),
                           (f"labels{split}/s{i}", label[..., z])):
            write_volume(np.ascontiguousarray(data), Volume(data, affine, ct.spacing, ""), str(root / (name + ending)))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "sqrtCT"}, "labels": {"background": 0, "liver": 1, "spleen": 2,
                                                               "ignore": 3},
        "numTraining": cases, "file_ending": ending}))
    return root


@needs_nifti
@pytest.mark.slow
def test_a_two_channel_mha_dataset_with_an_ignore_label_trains_evaluates_and_predicts(tmp_path, capsys):
    """The issue's user: .mha files through SimpleITK, two channels, an ignore label, CT normalisation, fold 2 of
    nnU-Net's generated folds, 2 labelled cases; train 2D and 3D (a few iterations), evaluate, predict (.mha out,
    probabilities), score the predictions without the checkpoint."""
    pytest.importorskip("SimpleITK", reason="SimpleITK is the [sitk] extra: pip install \"action-kernels[sitk]\"")
    from action.cli import main
    from action.data.image_io import read_volume
    from action.data.preprocessing import Preprocessing
    from action.engine import load_checkpoint

    root = fixture_dataset(tmp_path / "Dataset001_CT")
    common = ["--data", str(root), "--iterations", "2", "--val-every", "2", "--test-at-end", "true",
              "--tensorboard", "false", "--threads", "1", "--num-classes", "3", "--intensity", "ct", "--fold", "2",
              "--labelled-cases", "2", "--size", "64", "--labelled-batch", "2", "--checkpoint-every", "2"]
    assert main(["train", *common, "--out", str(tmp_path / "2d")]) == 0
    folds = json.loads((root / "splits_final.json").read_text())  # nnU-Net's default folds, written
    assert len(folds) == 5 and [f["val"] for f in folds] == [f["val"] for f in crossval_folds(
        [f"s{i}" for i in range(6)])]
    state = load_checkpoint(str(tmp_path / "2d" / "best.pt"))
    config, prep = json.loads(state["config"]), Preprocessing.from_json(state["preprocessing"])
    assert config["in_channels"] == 2 and config["fold"] == 2
    assert prep.intensity == "ct" and len(prep.ct_statistics) == 2 and prep.ignore_label == 3
    lower, upper, mean, std = prep.ct_statistics[0]
    assert -200 < lower < mean < upper < 400 and 10 < std < 200  # liver and spleen HU, not air
    rows = list(csv.DictReader(open(tmp_path / "2d" / "val.csv")))
    assert len(rows) == 1  # validated on fold 2's val cases
    assert (tmp_path / "2d" / "test" / "metrics.csv").exists()
    assert main(["train", *common, "--dims", "3", "--patch", "[16, 32, 32]", "--base-channels", "2",
                 "--out", str(tmp_path / "3d")]) == 0
    capsys.readouterr()
    for run in ("2d", "3d"):
        ev = tmp_path / f"ev-{run}"
        assert main(["evaluate", "--checkpoint", str(tmp_path / run / "best.pt"), "--data", str(root), "--split",
                     "test", "--out", str(ev), "--overlays", "1"]) == 0
        assert "| liver |" in capsys.readouterr().out and (ev / "overlays" / "s6.png").exists()
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(tmp_path / run / "best.pt"), "--images",
                     str(root / "imagesTs"), "--labels", str(root / "labelsTs"), "--out", str(ev / "folders"),
                     "--overlays", "0"]) == 0
        assert "| liver |" in capsys.readouterr().out  # class names from the dataset.json beside labelsTs/
        pred = tmp_path / f"pred-{run}"
        assert main(["predict", "--checkpoint", str(tmp_path / run / "best.pt"), "--input", str(root / "imagesTs"),
                     "--out", str(pred), "--overlays", "0", "--save-probabilities"]) == 0
        assert os.listdir(pred / "predictions") == ["s6.mha"]  # the input's format
        src, got = read_volume(str(root / "imagesTs" / "s6_0000.mha")), read_volume(str(pred / "predictions" /
                                                                                       "s6.mha"))
        assert got.data.shape == src.data.shape and np.allclose(got.affine, src.affine, atol=1e-5)
        assert set(np.unique(got.data)) <= {0, 1, 2}
        probs = read_volume(str(pred / "probabilities" / "s6.nii.gz"))  # a 4D NIfTI (action.engine.outputs)
        assert probs.data.shape == (*src.data.shape, 3) and np.allclose(probs.affine, src.affine, atol=1e-4)
        assert np.allclose(probs.data.sum(-1), 1, atol=1e-5) and np.array_equal(probs.data.argmax(-1), got.data)
        capsys.readouterr()  # the .mha predictions scored without the checkpoint, the ignore label left out
        assert main(["evaluate", "--predictions", str(pred), "--labels", str(root / "labelsTs"), "--out",
                     str(ev / "scored")]) == 0
        assert "| liver |" in capsys.readouterr().out
        scored, by_model = (list(csv.reader(open(ev / folder / "metrics.csv"))) for folder in ("scored", "folders"))
        assert scored[0] == by_model[0] and [r[0] for r in scored] == [r[0] for r in by_model]  # same columns
        # and the same numbers as scoring with the model
        assert np.allclose(np.array([r[1:] for r in scored[1:]], float), np.array([r[1:] for r in by_model[1:]],
                                                                                  float), rtol=1e-9, equal_nan=True)
    assert main(["ensemble", "--checkpoints", str(tmp_path / "2d" / "best.pt"), str(tmp_path / "3d" / "best.pt"),
                 "--input", str(root / "imagesTs"), "--out", str(tmp_path / "ens"), "--save-probabilities"]) == 0
    assert os.listdir(tmp_path / "ens" / "predictions") == ["s6.mha"]  # the inputs' format, as predict writes
    mean = read_volume(str(tmp_path / "ens" / "probabilities" / "s6.nii.gz")).data
    parts = [read_volume(str(tmp_path / f"pred-{run}" / "probabilities" / "s6.nii.gz")).data for run in ("2d", "3d")]
    assert np.allclose(mean, (parts[0] + parts[1]) / 2, atol=1e-6)
    assert np.array_equal(read_volume(str(tmp_path / "ens" / "predictions" / "s6.mha")).data, mean.argmax(-1))


@needs_nifti
def test_training_data_holds_every_channel_and_the_ignore_label_as_255(tmp_path):
    """What the trainer reads from a two-channel dataset with an ignore label: (N, 2, S, S) slices, labels in
    {0, 1, 2, 255} (3 never), volumes (2, Z, H, W); 3D patches are never centred on an ignored voxel."""
    from action.config import build_config
    from action.data.sampling import random_patches
    from action.data.training import resolve_input_channels, training_data

    root = fixture_dataset(tmp_path / "ds", ending=".nii.gz")
    cfg = build_config("smoke", overrides={"data": str(root), "out": str(tmp_path / "r"), "num_classes": 3,
                                           "threads": 1, "fold": 1, "labelled_patients": 2})
    data = training_data(cfg, uses_unlabelled=True, progress=False)
    assert resolve_input_channels(cfg, data) == 2 and cfg.in_channels == 2
    assert data.images.shape[1:] == (2, 64, 64) and data.unlabelled.shape[1] == 2
    assert set(data.labels.unique().tolist()) == {0, 1, 2, IGNORE_INDEX}
    assert not torch.equal(data.images[:, 0], data.images[:, 1])
    assert data.val_names == crossval_folds([f"s{i}" for i in range(6)])[1]["val"]
    cfg3 = build_config(None, overrides={"data": str(root), "out": str(tmp_path / "r3"), "num_classes": 3,
                                         "dims": 3, "size": 64, "patch": [16, 32, 32], "threads": 1})
    volumes = training_data(cfg3, uses_unlabelled=False, progress=False)
    assert volumes.images[0].shape[0] == 2 and volumes.images[0].shape[1:] == volumes.labels[0].shape
    label = volumes.labels[0].clone()
    label[label > 0] = IGNORE_INDEX
    label[0, 0, 0] = 1  # the one foreground voxel left
    for seed in range(5):
        _, patch = random_patches(volumes.images[0], label, (16, 32, 32), 1, torch.Generator().manual_seed(seed),
                                  foreground_p=1.0)
        assert (patch == 1).any()
    with pytest.raises(ValueError, match="in_channels=1: the training data .* has 2 input channel"):
        resolve_input_channels(build_config("smoke", overrides={"data": str(root), "in_channels": 1}), data)

"""Inference repeats the training preprocessing: intensity normalisation, reorientation to the training orientation
and back (header kept), in-plane resampling to the training spacing and back, the training-range warning, and the
checkpoint record of all of it (old checkpoints load with the documented default)."""
import csv
import json
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel", reason="NIfTI I/O needs nibabel (pip install nibabel)")
import nibabel as nib  # noqa: E402

from action.data.cases import nifti_cases  # noqa: E402
from action.data.nifti import hdf5_to_nifti, load_nifti, reorient, save_nifti, write_like  # noqa: E402
from action.data.preprocessing import (  # noqa: E402
    RANGE_WARNING,
    InputRangeWarning,
    Preprocessing,
    checkpoint_preprocessing,
    distribution_distance,
    intensity_quantiles,
    normalise_intensity,
)
from action.engine.inference import predict_at_spacing, volume_predictor  # noqa: E402
from helpers import ACDC, NIFTI, needs_acdc, needs_nifti, sign_model, smoke_config  # noqa: E402


def test_minmax_and_zscore_normalise_away_the_intensity_scale():
    g = torch.Generator().manual_seed(0)
    vol = torch.rand(5, 12, 9, generator=g) * 300 + 20
    for mode in ("minmax", "zscore"):
        a, b = normalise_intensity(vol, mode), normalise_intensity(vol * 1000 - 7, mode)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    m = normalise_intensity(vol, "minmax")
    assert float(m.min()) == 0.0 and float(m.max()) == 1.0
    z = normalise_intensity(vol, "zscore").double()
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(unbiased=False)) - 1) < 1e-5
    assert torch.equal(normalise_intensity(vol, "none"), vol)
    assert torch.equal(normalise_intensity(torch.full((2, 3, 4), 5.0), "minmax"), torch.zeros(2, 3, 4))
    unit = torch.rand(3, 8, 8, generator=g)
    unit[0, 0, 0], unit[0, 0, 1] = 0.0, 1.0
    assert torch.equal(normalise_intensity(unit, "minmax"), unit)  # the HDF5 layout's images pass unchanged
    with pytest.raises(ValueError, match="intensity: expected one of"):
        normalise_intensity(vol, "hu")
    with pytest.raises(ValueError, match="intensity 'ct' needs the training foreground"):
        normalise_intensity(vol, "ct")  # its statistics come from the dataset (tests/test_nnunet_dataset.py)


def test_an_input_far_from_the_training_intensities_warns_and_a_similar_one_does_not():
    g = torch.Generator().manual_seed(1)
    train = torch.rand(4, 32, 32, generator=g) ** 2
    prep = Preprocessing("none", quantiles=tuple(intensity_quantiles(train)))
    similar = torch.rand(3, 32, 32, generator=g) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prep.check_range(similar, "similar") < 0.1
    with pytest.warns(InputRangeWarning, match=r"scaled: intensities far outside the training range"):
        assert prep.check_range(similar * 1000, "scaled") > RANGE_WARNING
    assert distribution_distance(train, prep.quantiles) < 0.05
    assert Preprocessing().check_range(similar * 1000, "unknown") is None  # no quantiles: no check


def test_reorientation_is_exact_and_keeps_every_voxel_in_place():
    g = np.random.default_rng(2)
    data = g.standard_normal((6, 5, 4)).astype(np.float32)
    affine = np.diag([1.5, 2.0, 10.0, 1.0])
    affine[:3, 3] = [3, -4, 5]
    from action.data.nifti import Volume

    ras = Volume(data, affine, (1.5, 2.0, 10.0), "x")
    for codes in ("LPS", "PIR", "SLA"):
        other, turn = reorient(ras, codes)
        assert "".join(nib.aff2axcodes(other.affine)) == codes
        assert np.array_equal(turn.undo(other.data), data)
        back, _ = reorient(other, "RAS")
        assert np.array_equal(back.data, data) and np.allclose(back.affine, affine)
        assert sorted(other.spacing) == sorted(ras.spacing)
        i = (1, 2, 3)  # one voxel's world position is the same in both arrays
        j = tuple(int(v) for v in np.round(np.linalg.inv(other.affine) @ (affine @ np.array([*i, 1])))[:3])
        assert other.data[j] == data[i]
    with pytest.raises(ValueError, match="three axis codes, one per axis"):
        reorient(ras, "RRS")


@needs_nifti
def test_written_predictions_keep_the_source_header(tmp_path):
    src = load_nifti(os.path.join(NIFTI, "example_mr_sm.nii.gz"))
    img = nib.load(os.path.join(NIFTI, "example_mr_sm.nii.gz"))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "mr.nii.gz")
    src = load_nifti(str(tmp_path / "mr.nii.gz"))
    out = nib.load(write_like((src.data > 100).astype(np.uint8), src, str(tmp_path / "pred.nii.gz")))
    h = out.header
    assert (int(h["qform_code"]), int(h["sform_code"]), h.get_xyzt_units()) == (1, 1, ("mm", "sec"))
    assert np.allclose(out.affine, src.affine) and out.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(out.dataobj), (src.data > 100).astype(np.uint8))


class _ShapeRecorder(torch.nn.Module):
    """sign_model(2) that records the spatial size of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.net, self.sizes = sign_model(2), []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.net(x)


def test_slices_are_resampled_to_the_training_spacing_and_labels_back():
    vol = torch.ones(3, 100, 80)
    vol[:, :50] = -1.0  # the top half is class 1
    model = _ShapeRecorder()
    labels = predict_at_spacing(model, vol, (0.75, 0.75), (1.5, 1.5))
    assert model.sizes == [(64, 48)]  # 100 x 80 at 0.75 mm -> 50 x 40 at 1.5 mm, padded to multiples of 16
    assert labels.shape == vol.shape and torch.equal(labels, (vol < 0).long())
    model.sizes.clear()
    predict_at_spacing(model, vol, (3.0, 1.5), (1.5, 1.5))  # anisotropic: only the coarse axis grows
    assert model.sizes == [(208, 80)]


@needs_acdc
def test_rescaled_and_reoriented_volumes_score_the_same_as_the_originals(tmp_path):
    """Two ACDC test volumes as NIfTI, as they are, scaled by 1000, and reoriented (LPS with codes and units set):
    `action evaluate` with a checkpoint scores all three alike and writes each prediction in its input's space;
    without normalisation or reorientation the scores differ (the test can fail)."""
    from action.cli import main
    from action.engine import Trainer, load_checkpoint
    from action.models import build_network

    trainer = Trainer(smoke_config(tmp_path / "run"), progress=False)
    with torch.no_grad():  # untrained, with a sharper head so that its labels vary with the input
        trainer.model.head.weight.mul_(30)
        trainer.model.head.bias.zero_()
    ckpt = trainer.save("best.pt")
    names = open(os.path.join(ACDC, "test.list")).read().split()[:2]
    hdf5_to_nifti(ACDC, names, str(tmp_path / "nii"), spacing=(1.5, 1.5, 10.0))
    variants = {}
    for variant in ("original", "scaled", "reoriented"):
        images, labels = tmp_path / variant / "images", tmp_path / variant / "labels"
        for name in names:
            image, label = load_nifti(str(tmp_path / "nii" / f"{name}.nii.gz")), \
                load_nifti(str(tmp_path / "nii" / f"{name}_gt.nii.gz"))
            if variant == "scaled":
                save_nifti(image.data * 1000, image.affine, str(images / f"{name}.nii.gz"))
                save_nifti(label.data, label.affine, str(labels / f"{name}.nii.gz"))
                continue
            if variant == "reoriented":
                image, _ = reorient(image, "LPS")
                label, _ = reorient(label, "LPS")
            for vol, folder in ((image, images), (label, labels)):
                out = nib.Nifti1Image(vol.data, vol.affine)
                out.set_qform(vol.affine, code=1)
                out.set_sform(vol.affine, code=1)
                out.header.set_xyzt_units("mm")
                folder.mkdir(parents=True, exist_ok=True)
                nib.save(out, folder / f"{name}.nii.gz")
        assert main(["evaluate", "--checkpoint", ckpt, "--images", str(images), "--labels", str(labels), "--out",
                     str(tmp_path / variant / "eval"), "--overlays", "0", "--save-predictions"]) == 0
        with open(tmp_path / variant / "eval" / "metrics.csv") as fh:
            variants[variant] = list(csv.DictReader(fh))
    assert len(variants["original"]) == 2
    dice = [float(r[k]) for r in variants["original"] for k in r if "dice" in k]
    assert any(0 < d < 1 for d in dice)  # the untrained network predicts something to compare
    for variant in ("scaled", "reoriented"):
        for a, b in zip(variants["original"], variants[variant]):
            for key in a:
                if key != "case":
                    assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-3, nan_ok=True), (variant, key)
    for name in names:
        turned = nib.load(tmp_path / "reoriented" / "eval" / "predictions" / f"{name}.nii.gz")
        source = nib.load(tmp_path / "reoriented" / "images" / f"{name}.nii.gz")
        h = turned.header
        assert "".join(nib.aff2axcodes(turned.affine)) == "LPS" and np.allclose(turned.affine, source.affine)
        assert (int(h["qform_code"]), int(h["sform_code"]), h.get_xyzt_units()[0]) == (1, 1, "mm")
        original = np.asarray(nib.load(tmp_path / "original" / "eval" / "predictions" / f"{name}.nii.gz").dataobj)
        back = reorient(load_nifti(str(tmp_path / "reoriented" / "eval" / "predictions" / f"{name}.nii.gz")), "RAS")
        assert np.mean(back[0].data == original) > 0.9999
    # the controls: the same network without normalisation, or without reorientation, scores differently
    state = load_checkpoint(ckpt)
    net = build_network(trainer.cfg)
    net.load_state_dict(state["model"])
    net.eval()
    prep = checkpoint_preprocessing(state)
    assert prep.intensity == "minmax" and prep.orientation == "RAS" and prep.spacing is None and prep.quantiles

    def first_prediction(variant, preprocessing, orientation):
        case = next(nifti_cases([(tmp_path / variant / "images" / f"{names[0]}.nii.gz", None)], orientation))
        return volume_predictor(net, trainer.cfg, preprocessing=preprocessing)(case)

    reference = first_prediction("original", prep, "RAS")
    assert torch.equal(first_prediction("scaled", prep, "RAS"), reference)
    raw = Preprocessing("none", quantiles=prep.quantiles)
    with pytest.warns(InputRangeWarning):
        assert not torch.equal(first_prediction("scaled", raw, "RAS"), reference)
    unturned = first_prediction("reoriented", prep, None)
    assert unturned.shape == reference.shape and not torch.equal(unturned, reference)


@needs_acdc
def test_checkpoints_store_the_preprocessing_and_old_ones_load_with_the_default_and_a_warning(tmp_path):
    from action.cli import _predictor_from_checkpoint
    from action.engine import Trainer, load_checkpoint, save_checkpoint

    trainer = Trainer(smoke_config(tmp_path), progress=False)
    state = load_checkpoint(trainer.save())
    stored = Preprocessing.from_json(state["preprocessing"])
    assert stored == trainer.preprocessing and len(stored.quantiles) == 101
    assert stored.quantiles[0] >= 0 and stored.quantiles[-1] <= 1  # the HDF5 slices are min-max normalised
    del state["preprocessing"]
    del state["format"]
    old = save_checkpoint(state, str(tmp_path / "old.pt"))
    with pytest.warns(UserWarning, match="stores no preprocessing .* per-volume min-max"):
        predict, _ = _predictor_from_checkpoint(old, "cpu")
    assert predict.preprocessing == Preprocessing.from_json(json.dumps(
        {"intensity": "minmax", "spacing": None, "orientation": "RAS", "quantiles": []}))
    with pytest.raises(ValueError, match="the HDF5 layout's images are min-max normalised already"):
        bad = Trainer(smoke_config(tmp_path / "z", intensity="zscore"), progress=False)
        bad.preprocessing


@needs_acdc
@needs_nifti
def test_the_modality_check_catches_a_ct_fed_to_a_cardiac_mr_model_and_not_an_mr():
    """The smoke model (8 ACDC slices) against the fixtures: the histogram distance alone left the CT at 0.78 < 0.8;
    the air share (voxels below -500: 36% of the CT, 0% of the MR and of the training slices) catches it."""
    import tempfile

    from action.data import AcdcLayout, AcdcVolumes
    from action.data.preprocessing import air_share
    from action.engine import Trainer

    prep = Trainer(smoke_config(tempfile.mkdtemp()), progress=False).preprocessing
    assert len(prep.raw_quantiles) == 101 and air_share(quantiles=prep.raw_quantiles) == 0.0
    ct, mr = (load_nifti(os.path.join(NIFTI, f"example_{m}_sm.nii.gz"), np.float32).data for m in ("ct", "mr"))
    ct, mr = torch.from_numpy(ct), torch.from_numpy(mr)
    with pytest.warns(InputRangeWarning, match=r"ct: 36% of its voxels are below -500 .* 0% of the training"):
        distance = prep.check_range(normalise_intensity(ct, "minmax"), "ct", raw=ct)
    assert distance < RANGE_WARNING  # what the distance alone missed
    acdc = AcdcLayout(ACDC)
    volumes = AcdcVolumes(acdc.root, acdc.val_volumes[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        prep.check_range(normalise_intensity(mr, "minmax"), "mr", raw=mr)  # the matching modality: silent
        for i in range(len(volumes)):
            prep.check_range(volumes[i]["image"], "acdc", raw=volumes[i]["image"])
    # the reverse: a model trained on CT (HU) fed an MR
    ct_model = Preprocessing("minmax", quantiles=tuple(intensity_quantiles(normalise_intensity(ct, "minmax"))),
                             raw_quantiles=tuple(intensity_quantiles(ct)))
    with pytest.warns(InputRangeWarning, match=r"mr: 0% of its voxels are below -500 .* 3[56]% of the training"):
        ct_model.check_range(normalise_intensity(mr, "minmax"), "mr", raw=mr)
    assert Preprocessing.from_json(ct_model.to_json()) == ct_model
    old = json.loads(ct_model.to_json())
    del old["raw_quantiles"]  # a checkpoint written before the fingerprint: no modality check, no error
    assert Preprocessing.from_json(json.dumps(old)).raw_quantiles == ()

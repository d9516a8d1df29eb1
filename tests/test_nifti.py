"""NIfTI I/O on the real volumes in ../shared/data/nifti: affine and spacing survive a round trip; conversion."""
import os

import numpy as np
import pytest

pytest.importorskip("nibabel", reason="NIfTI I/O needs nibabel (pip install nibabel)")

from action.data.nifti import folder_pairs, hdf5_to_nifti, load_nifti, load_pair, save_nifti, write_like  # noqa: E402
from action.metrics import binary_metrics  # noqa: E402
from helpers import ACDC, NIFTI, needs_nifti  # noqa: E402


@needs_nifti
def test_round_trip_keeps_data_affine_and_spacing(tmp_path):
    ct = load_nifti(os.path.join(NIFTI, "example_ct_sm.nii.gz"))
    assert ct.spacing == (3.0, 3.0, 3.0) and ct.data.shape == (122, 101, 30)
    out = save_nifti(ct.data, ct.affine, str(tmp_path / "sub" / "ct.nii.gz"))
    back = load_nifti(out)
    assert np.array_equal(back.data, ct.data) and np.allclose(back.affine, ct.affine) and back.spacing == ct.spacing
    assert not [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp")]


@needs_nifti
def test_prediction_written_in_the_reference_space_scores_perfectly(tmp_path):
    image, label = load_pair(os.path.join(NIFTI, "example_ct_sm.nii.gz"), os.path.join(NIFTI, "example_seg.nii.gz"))
    liver = (label.data == 5).astype(np.uint8)
    back = load_nifti(write_like(liver, image, str(tmp_path / "pred.nii.gz")))
    assert np.allclose(back.affine, image.affine)
    m = binary_metrics(back.data == 1, label.data == 5, spacing=image.spacing)
    assert m["dice"] == 1.0 and m["hd95"] == 0.0
    with pytest.raises(ValueError, match="prediction shape"):
        write_like(liver[:-1], image, str(tmp_path / "bad.nii.gz"))


@needs_nifti
def test_mismatched_pairs_and_missing_files_name_the_files(tmp_path):
    with pytest.raises(ValueError, match="example_mr_sm.nii.gz shape"):
        load_pair(os.path.join(NIFTI, "example_mr_sm.nii.gz"), os.path.join(NIFTI, "example_seg.nii.gz"))
    with pytest.raises(FileNotFoundError, match="nothing.nii.gz"):
        load_nifti(str(tmp_path / "nothing.nii.gz"))
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="corrupt.nii.gz"):
        load_nifti(str(bad))


@pytest.mark.skipif(not os.path.isdir(os.path.join(ACDC, "data")), reason=f"real ACDC data not found at {ACDC}")
def test_hdf5_volumes_convert_to_nifti_pairs(tmp_path):
    paths = hdf5_to_nifti(ACDC, ["patient011_frame01"], str(tmp_path), spacing=(1.5, 1.5, 10.0))
    assert [os.path.basename(p) for p in paths] == ["patient011_frame01.nii.gz", "patient011_frame01_gt.nii.gz"]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    os.replace(paths[0], tmp_path / "images" / "case.nii.gz")
    os.replace(paths[1], tmp_path / "labels" / "case.nii.gz")
    [(img_path, lab_path)] = folder_pairs(str(tmp_path / "images"), str(tmp_path / "labels"))
    image, label = load_pair(img_path, lab_path)
    assert image.spacing == (1.5, 1.5, 10.0) and set(np.unique(label.data)) <= {0, 1, 2, 3}
    assert image.data.shape[2] < image.data.shape[0]  # (x, y, z) order: the ACDC slices are the short axis


def test_raw_acdc_layout_pairs_images_with_their_label_maps(tmp_path):
    from action.data.nifti import acdc_raw_pairs

    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    for frame in ("01", "12"):
        folder = tmp_path / "patient001"
        save_nifti(np.zeros((4, 4, 2), np.float32), affine, str(folder / f"patient001_frame{frame}.nii.gz"))
        save_nifti(np.zeros((4, 4, 2), np.uint8), affine, str(folder / f"patient001_frame{frame}_gt.nii.gz"))
    pairs = acdc_raw_pairs(str(tmp_path))
    assert [os.path.basename(i) for i, _ in pairs] == ["patient001_frame01.nii.gz", "patient001_frame12.nii.gz"]
    assert all(lab.endswith("_gt.nii.gz") for _, lab in pairs)
    os.remove(pairs[0][0])
    with pytest.raises(FileNotFoundError, match="has no image"):
        acdc_raw_pairs(str(tmp_path))

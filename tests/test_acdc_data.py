"""ACDC HDF5 loading on the real data in ../shared/data/acdc (skipped with the reason when it is absent)."""

import numpy as np
import pytest

pytest.importorskip("h5py", reason="h5py is needed to read the ACDC HDF5 files (pip install h5py)")

from action.data import AcdcLayout, AcdcSlices, AcdcVolumes, read_case  # noqa: E402
from helpers import ACDC as ROOT  # noqa: E402
from helpers import needs_acdc  # noqa: E402

pytestmark = needs_acdc


def test_list_counts_and_reference_splits():
    layout = AcdcLayout(ROOT)
    assert len(layout.train_slices) == 1312 and len(layout.val_volumes) == 20 and len(layout.test_volumes) == 40
    for patients, n in ((1, 23), (3, 68), (7, 136)):
        lab, unlab = layout.split(labelled_patients=patients)
        assert len(lab) == n and len(unlab) == 1312 - n
        assert len({name.split("_")[0] for name in lab}) == patients
    with pytest.raises(ValueError, match="labelled_patients must be a number of patients >= 1"):
        layout.split(labelled_patients=0)


def test_slices_and_volumes_load_with_labels_in_range():
    layout = AcdcLayout(ROOT)
    lab, _ = layout.split(labelled_patients=1)
    item = AcdcSlices(ROOT, lab[:3], size=(64, 64))[1]
    assert item["image"].shape == (1, 64, 64) and item["label"].shape == (64, 64)
    assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 3}
    vol = AcdcVolumes(ROOT, layout.test_volumes[:1])[0]
    assert vol["image"].ndim == 3 and vol["image"].shape == vol["label"].shape


def test_missing_case_names_the_file():
    with pytest.raises(FileNotFoundError, match="patient999_frame01.h5"):
        read_case(ROOT, "patient999_frame01")

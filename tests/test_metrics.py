"""action.metrics against independent brute force on small volumes: surfaces, distances, spacing, empty cases."""
import itertools
import math

import numpy as np
import pytest

from action.metrics import SegmentationMetrics, binary_metrics


def _brute_surface(mask):
    """Foreground voxels with a background (or outside-the-array) face neighbour, by explicit loops."""
    pts = []
    for idx in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[idx]:
            continue
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not (0 <= nb[axis] < mask.shape[axis]) or not mask[tuple(nb)]:
                pts.append(idx)
                break
    return np.array(pts, dtype=float)


def _brute(pred, gt, spacing):
    sp = np.asarray(spacing, dtype=float)
    a, b = _brute_surface(pred) * sp, _brute_surface(gt) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = d.min(1), d.min(0)
    both = np.concatenate([d_ab, d_ba])
    inter = (pred & gt).sum()
    return {"dice": 2 * inter / (pred.sum() + gt.sum()), "jaccard": inter / (pred | gt).sum(),
            "hd95": np.percentile(both, 95), "asd": d_ab.mean(), "assd": both.mean()}


def _blob(shape, center, radii):
    grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.5, 0.7)])
def test_3d_metrics_match_brute_force_with_anisotropic_spacing(spacing):
    rng = np.random.default_rng(0)
    for _ in range(3):
        shape = (7, 11, 12)
        pred = _blob(shape, rng.uniform(2, 5, 3), rng.uniform(1.5, 4, 3)) | (rng.random(shape) > 0.97)
        gt = _blob(shape, rng.uniform(2, 5, 3), rng.uniform(1.5, 4, 3))
        got, want = binary_metrics(pred, gt, spacing), _brute(pred, gt, spacing)
        for key in want:
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-9), (key, got[key], want[key])


def test_2d_metrics_and_border_touching_masks_match_brute_force():
    pred = np.zeros((9, 10), bool)
    pred[0:5, 0:6] = True
    gt = np.zeros((9, 10), bool)
    gt[2:9, 3:10] = True
    got, want = binary_metrics(pred, gt, (2.0, 0.5)), _brute(pred, gt, (2.0, 0.5))
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-9), key


def test_empty_cases_are_explicit():
    empty, some = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)
    some[1:3, 1:3, 1:3] = True
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}
    for pred, gt in ((empty, some), (some, empty)):
        m = binary_metrics(pred, gt)
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0
        assert all(math.isnan(m[k]) for k in ("hd95", "asd", "assd"))


def test_accumulator_summarises_per_class_and_counts_nan_cases(tmp_path):
    m = SegmentationMetrics(num_classes=3, class_names=("bg", "A", "B"))
    gt = np.zeros((5, 6, 7), int)
    gt[1:4, 1:4, 1:4] = 1
    gt[0:2, 4:6, 4:7] = 2
    m.update(gt, gt, case_id="perfect")
    pred = gt.copy()
    pred[pred == 2] = 0  # class B missed entirely: Dice 0, distances NaN
    m.update(pred, gt, spacing=(2.0, 1.0, 1.0), case_id="missed")
    agg = m.aggregate()
    assert agg["cases"] == 2
    assert agg["per_class"]["A"]["dice"] == (1.0, 0.0, 0)
    assert agg["per_class"]["B"]["dice"][0] == 0.5
    assert agg["per_class"]["B"]["hd95"] == (0.0, 0.0, 1)  # the NaN case is counted, not averaged as 0
    m.to_csv(tmp_path / "cases.csv")
    assert (tmp_path / "cases.csv").read_text().splitlines()[0].startswith("case,A/dice")
    assert "| B |" in m.summary_table()


def test_bad_input_names_the_problem():
    m = SegmentationMetrics(num_classes=2)
    with pytest.raises(ValueError, match=r"case x: prediction shape \(2, 2\) != ground truth shape \(2, 3\)"):
        m.update(np.zeros((2, 2), int), np.zeros((2, 3), int), case_id="x")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        m.update(np.full((2, 2), 2), np.zeros((2, 2), int), case_id="y")
    with pytest.raises(ValueError, match="spacing must hold 2 positive"):
        binary_metrics(np.ones((2, 2), bool), np.ones((2, 2), bool), spacing=(1.0, 0.0))

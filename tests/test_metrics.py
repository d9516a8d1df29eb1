"""action.metrics against independent brute force on small volumes: surfaces, distances, spacing, empty cases; the
MONAI-convention HD95 and the NSD against numbers MONAI 1.6.1 produced (always) and MONAI itself (when installed)."""
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
            "hd95": np.percentile(both, 95), "asd": d_ab.mean(), "assd": both.mean(),
            "hd95_monai": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), "nsd": (both <= 2.0).mean()}


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
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0,
                                            "hd95_monai": 0.0, "nsd": 1.0}
    for pred, gt in ((empty, some), (some, empty)):
        m = binary_metrics(pred, gt)
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0 and m["nsd"] == 0.0
        assert all(math.isnan(m[k]) for k in ("hd95", "asd", "assd", "hd95_monai"))


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


def _monai_cases():
    """(pred, gt, spacing) test masks: three overlapping 3D blobs with scattered false positives, in two spacings,
    and a 2D pair touching the array border."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        shape = (12, 20, 22)
        pred = _blob(shape, (6, 10, 11) + rng.uniform(-2, 2, 3), rng.uniform(3, 7, 3)) | (rng.random(shape) > 0.995)
        gt = _blob(shape, (6, 10, 11) + rng.uniform(-2, 2, 3), rng.uniform(3, 7, 3))
        out += [(pred, gt, (1.0, 1.0, 1.0)), (pred, gt, (3.0, 1.5, 0.7))]
    pred, gt = np.zeros((9, 10), bool), np.zeros((9, 10), bool)
    pred[0:5, 0:6], gt[2:9, 3:10] = True, True
    return out + [(pred, gt, (2.0, 0.5))]


# MONAI 1.6.1 on _monai_cases(): compute_hausdorff_distance(percentile=95) and compute_surface_dice at tolerance 1
# and 2 (include_background=False, spacing given, one-hot (1, 2, *S) float32 inputs)
MONAI_HD95 = (4.582576, 4.582576, 6.771655, 6.771655, 7.3843, 7.3843, 8.276473, 8.276473, 5.09902, 5.09902,
              9.150956, 9.150956, 8.127837, 8.127837)
MONAI_NSD = {1.0: (0.4879518, 0.2831325, 0.3256351, 0.2286374, 0.3864916, 0.3076923, 0.3333333),
             2.0: (0.7008032, 0.4558233, 0.5103926, 0.3787529, 0.673546, 0.4859287, 0.547619)}


def test_monai_hd95_and_nsd_equal_the_numbers_monai_produced():
    for i, (pred, gt, spacing) in enumerate(_monai_cases()):
        for tau in (1.0, 2.0):
            m = binary_metrics(pred, gt, spacing, nsd_tolerance=tau)
            assert math.isclose(m["hd95_monai"], MONAI_HD95[2 * i], rel_tol=2e-6), (i, m["hd95_monai"])
            assert math.isclose(m["nsd"], MONAI_NSD[tau][i], rel_tol=2e-6), (i, tau, m["nsd"])
            assert m["hd95_monai"] >= m["hd95"]  # the larger directed percentile is never below the pooled one


@pytest.mark.slow  # importing MONAI takes seconds
def test_monai_hd95_and_nsd_equal_monai_itself():
    """The live comparison, when MONAI is installed (pip install monai)."""
    pytest.importorskip("monai", reason="MONAI not installed: the fixed numbers above stand in for it")
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    for pred, gt, spacing in _monai_cases():
        p = torch.from_numpy(np.stack([~pred, pred])[None].astype(np.float32))
        g = torch.from_numpy(np.stack([~gt, gt])[None].astype(np.float32))
        hd = float(compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=list(spacing)))
        for tau in (0.5, 1.0, 2.0, 3.5):
            nsd = float(compute_surface_dice(p, g, [tau], include_background=False, spacing=list(spacing)))
            m = binary_metrics(pred, gt, spacing, nsd_tolerance=tau)
            assert math.isclose(m["hd95_monai"], hd, rel_tol=1e-6) and math.isclose(m["nsd"], nsd, rel_tol=1e-6)


def test_nsd_tolerance_is_checked_and_reported(tmp_path):
    with pytest.raises(ValueError, match="nsd_tolerance must be a finite distance >= 0"):
        binary_metrics(np.ones((2, 2), bool), np.ones((2, 2), bool), nsd_tolerance=-1)
    m = SegmentationMetrics(num_classes=2, nsd_tolerance=1.5)
    gt = np.zeros((4, 6, 6), int)
    gt[1:3, 1:5, 1:5] = 1
    m.update(np.roll(gt, 1, axis=2), gt, spacing=(2.0, 1.0, 1.0))
    assert m.aggregate()["nsd_tolerance"] == 1.5
    assert "HD95 (MONAI) | NSD (1.5) |" in m.summary_table().splitlines()[0]

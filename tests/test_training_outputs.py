"""What a run writes besides checkpoints: progress.png, val.csv with class names (old numbered columns renamed on
resume), overlays in radiological view with a legend, a TensorBoard overlay at each validation, one JSON under
torchrun."""
import csv
import json
import sys
import warnings

import numpy as np
import pytest

from action.engine.logs import RunLogger, legacy_class_columns
from helpers import ACDC, needs_acdc


@needs_acdc
@pytest.mark.slow
def test_a_smoke_run_writes_progress_png_named_val_columns_and_a_tensorboard_overlay(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from action.cli import main

    images = []
    real = RunLogger.image
    monkeypatch.setattr(RunLogger, "image", lambda self, tag, it, render: images.append((tag, it, render())) or
                        real(self, tag, it, lambda: images[-1][2]))
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--data", ACDC, "--out", str(run), "--iterations", "4",
                 "--val-every", "2", "--val-volumes", "1", "--test-at-end", "false", "--threads", "1"]) == 0
    with open(run / "val.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["iteration", "dice_RV", "dice_Myo", "dice_LV", "mean_dice"] and len(rows) == 2
    png = (run / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(tag, it) for tag, it, _ in images] == [("val/overlay", 2), ("val/overlay", 4)]
    rgb = images[0][2]
    assert rgb is not None and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


def test_progress_png_plots_the_logs_and_a_missing_matplotlib_is_a_warning(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from action.engine import progress_plot

    logger = RunLogger(str(tmp_path), tensorboard=False)
    for it in (1, 2):
        logger.log("train", it, {"loss": 1.0 / it, "ce": 0.5 / it, "lr": 0.01, "s_per_it": 0.1, "pl_weight": 0.2})
    assert not (tmp_path / "progress.png").exists()  # drawn at validations (and on close)
    logger.log("val", 2, {"dice_RV": 0.1, "dice_LV": 0.3, "mean_dice": 0.2})
    assert (tmp_path / "progress.png").stat().st_size > 0
    (tmp_path / "progress.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(progress_plot, "_WARNED", [])
    with pytest.warns(UserWarning, match="matplotlib is not installed .* no progress.png"):
        logger.log("val", 3, {"dice_RV": 0.1, "dice_LV": 0.3, "mean_dice": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        logger.close()
    assert not (tmp_path / "progress.png").exists()


def test_val_csv_with_numbered_class_columns_is_renamed_when_a_resumed_run_logs_names(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text("iteration,dice_c1,dice_c2,mean_dice,student_mean_dice\n10,0.1,0.2,0.15,0.1\n20,0.2,0.3,0.25,0.2\n")
    logger = RunLogger(str(tmp_path), start=10, tensorboard=False)  # resume at 10: the row of 20 is dropped
    logger.log("val", 20, {"dice_RV": 0.5, "dice_LV": 0.6, "mean_dice": 0.55, "student_mean_dice": 0.5})
    rows = path.read_text().splitlines()
    assert rows == ["iteration,dice_RV,dice_LV,mean_dice,student_mean_dice", "10,0.1,0.2,0.15,0.1",
                    "20,0.5,0.6,0.55,0.5"]
    assert legacy_class_columns(["iteration", "teacher_dice_c1"], ["iteration", "teacher_dice_A"])
    assert not legacy_class_columns(["iteration", "dice_c1"], ["iteration", "loss"])
    assert not legacy_class_columns(["iteration", "dice_c1"], ["iteration", "dice_c1", "mean_dice"])
    with pytest.raises(ValueError, match="columns .* differ from this run's"):
        logger.log("val", 30, {"loss": 1.0, "x": 2.0, "y": 3.0, "z": 4.0})


def test_display_slice_turns_every_orientation_to_the_radiological_view():
    from action.engine.overlays import display_slice

    # a slice in RAS axes: rows run along y (P -> A), columns along x (L -> R); the view wants A at the top, R left
    x, y = np.meshgrid(np.arange(4), np.arange(3))  # value encodes (x, y): 10 y + x
    ras = (10 * y + x).astype(float)
    view = display_slice(ras, "RAS")
    assert view[0, 0] == 10 * 2 + 3  # top left: most anterior (y = 2), most right (x = 3)
    assert view[-1, -1] == 0
    lps = ras[::-1, ::-1]  # the same slice in LPS axes (x runs R -> L, y A -> P)
    np.testing.assert_array_equal(display_slice(lps, "LPS"), view)
    s = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(display_slice(s, "ARS"), s.T[::-1, ::-1])  # axial, in-plane axes swapped
    np.testing.assert_array_equal(display_slice(s, "PIR"), s)  # sagittal: superior up, anterior left already
    np.testing.assert_array_equal(display_slice(s, "ASR"), s[::-1, ::-1])
    np.testing.assert_array_equal(display_slice(s, "IPR"), s.T)
    np.testing.assert_array_equal(display_slice(s, "RSA"), s[::-1, ::-1])  # coronal: superior up, right left
    assert display_slice(ras, None) is ras


@needs_acdc
def test_under_torchrun_only_rank_0_prints_the_result(tmp_path, monkeypatch, capsys):
    import action.engine.distributed as dist
    import action.method as method
    from action.cli import main

    class Fake:
        def __init__(self, cfg):
            pass

        def fit(self, **kw):
            return {"iterations": 1, "best_val_dice": 0.5, "best_iteration": 1}

    monkeypatch.setattr(method, "trainer_class", lambda cfg: Fake)
    for rank, printed in ((1, ""), (0, {"iterations": 1, "best_val_dice": 0.5, "best_iteration": 1})):
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        assert main(["train", "--preset", "smoke", "--data", ACDC, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert (json.loads(out) if out else "") == printed


def test_overlays_carry_a_legend_of_the_classes_shown_by_name(tmp_path):
    pytest.importorskip("matplotlib")
    import types

    import torch

    from action.engine.overlays import _figure, save_overlays

    image = torch.randn(4, 12, 10)
    label, pred = torch.zeros(4, 12, 10, dtype=torch.long), torch.zeros(4, 12, 10, dtype=torch.long)
    label[1, 2:6, 2:6], pred[1, 3:7, 2:6], pred[2, 8:10, 1:3] = 1, 1, 3  # class 2 nowhere: not in the legend
    case = types.SimpleNamespace(name="c0", image=image, label=label)
    fig, plt = _figure(case, pred, 2, ("background", "RV", "Myo", "LV"), "RAS")
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["RV", "LV"]
    assert fig.get_suptitle() == "c0 (radiological view)" and len(fig.axes) == 2 * 3
    plt.close(fig)
    fig, plt = _figure(types.SimpleNamespace(name="c1", image=image, label=None), pred, 1, None, None)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["class 1", "class 3"]
    assert fig.get_suptitle() == "c1 (array orientation (no geometry))" and len(fig.axes) == 2
    plt.close(fig)
    assert save_overlays(case, pred, str(tmp_path / "o.png")) == str(tmp_path / "o.png")
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Failure behaviour of the training package (docs/failure-behaviour.md): bad data, bad values and faults give a
clear error naming the file, the option or the iteration, and lose nothing. Each test is named after the
behaviour; every one failed on the code before issue 15 was fixed. About 60 s in all on 2 cores (the three
signal tests run a training subprocess each)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from action.cli import main
from action.config import build_config
from action.data.acdc import read_case
from action.engine import Case, Trainer, evaluate, load_checkpoint
from action.engine.checkpoint import clean_stale_temporaries
from action.engine.logs import dump_json
from action.metrics import SegmentationMetrics
from helpers import ACDC, needs_acdc, smoke_config

h5py = pytest.importorskip("h5py", reason="h5py reads the ACDC HDF5 files (pip install h5py)")


def mini_acdc(root, poison=None, slices=8, volumes=2):
    """An ACDC folder of the first `slices` training slices and `volumes` validation and test volumes of the
    real data (symbolic links), where poison {name: fn(image, label) -> (image, label)} rewrites those cases."""
    names = {}
    for kind, n in (("train_slices", slices), ("val", volumes), ("test", volumes)):
        with open(os.path.join(ACDC, f"{kind}.list")) as fh:
            names[kind] = [line.strip() for line in fh if line.strip()][:n]
        (root / f"{kind}.list").write_text("\n".join(names[kind]) + "\n")
    (root / "data").mkdir()
    for name in sum(names.values(), []):
        source = os.path.join(ACDC, "data", f"{name}.h5")
        if name in (poison or {}):
            with h5py.File(source) as fh:
                image, label = poison[name](fh["image"][()].astype(np.float32), fh["label"][()])
            with h5py.File(root / "data" / f"{name}.h5", "w") as fh:
                fh["image"], fh["label"] = image, label
        else:
            os.symlink(source, root / "data" / f"{name}.h5")
    return names


def nan_pixel(image, label):
    image = image.copy()
    image.flat[image.size // 2] = np.nan
    return image, label


def fractional_labels(image, label):
    return image, label.astype(np.float32) * 0.999  # 3 -> 2.997: truncation would make it 2


def tiny(out, **kw):
    return smoke_config(out, **{"iterations": 2, "checkpoint_every": 1, **kw})


# -- data: checked at load, every file a run touches before iteration 0 ---------------------------------------------
@needs_acdc
def test_float_label_maps_with_integral_values_load_and_fractional_ones_name_the_file(tmp_path):
    names = mini_acdc(tmp_path, slices=2)
    first, second = names["train_slices"]
    with h5py.File(os.path.join(ACDC, "data", f"{first}.h5")) as fh:
        image, label = fh["image"][()], fh["label"][()]
    for name, lab in ((first, label.astype(np.float64)), (second, label.astype(np.float32) + 0.25)):
        os.remove(tmp_path / "data" / f"{name}.h5")
        with h5py.File(tmp_path / "data" / f"{name}.h5", "w") as fh:
            fh["image"], fh["label"] = image, lab
    got = read_case(str(tmp_path), first)[1]
    assert got.dtype == np.int64 and np.array_equal(got, label)
    with pytest.raises(ValueError, match=rf"{second}\.h5 dataset 'label': float label map has \d+ non-integral"):
        read_case(str(tmp_path), second)


@needs_acdc
def test_a_nan_pixel_in_a_training_slice_stops_the_run_at_load_naming_the_file(tmp_path):
    with open(os.path.join(ACDC, "train_slices.list")) as fh:
        bad = [next(fh).strip() for _ in range(3)][2]
    (tmp_path / "acdc").mkdir()
    mini_acdc(tmp_path / "acdc", {bad: nan_pixel})
    with pytest.raises(ValueError, match=rf"{bad}\.h5 dataset 'image': image has 1 non-finite voxel"):
        Trainer(tiny(tmp_path / "run", data=str(tmp_path / "acdc")), progress=False)


@needs_acdc
@pytest.mark.parametrize("split", ["val", "test"])
def test_bad_validation_and_test_volumes_stop_the_run_before_the_first_iteration(tmp_path, split):
    (tmp_path / "acdc").mkdir()
    with open(os.path.join(ACDC, f"{split}.list")) as fh:
        bad = fh.readline().strip()
    mini_acdc(tmp_path / "acdc", {bad: fractional_labels if split == "test" else nan_pixel})
    cfg = tiny(tmp_path / "run", data=str(tmp_path / "acdc"), val_every=1 if split == "val" else 0,
               test_at_end=split == "test")
    what = {"val": "validation", "test": "test"}[split]
    with pytest.raises(ValueError, match=rf"1 of the 2 {what} volumes cannot be used:\n  ACDC case '{bad}': "):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing written


@needs_acdc
def test_num_classes_below_the_data_fails_before_iteration_0_naming_the_file_and_option(tmp_path):
    with pytest.raises(ValueError, match=r"\.h5 dataset 'label': labels must be in \[0, 3\) .*--num-classes"):
        Trainer(tiny(tmp_path, num_classes=3), progress=False)


@pytest.mark.skipif(not os.path.isdir(os.path.join(ACDC, "data")), reason="real ACDC data not found")
def test_nifti_images_with_nan_voxels_and_fractional_label_maps_are_refused_naming_the_file(tmp_path):
    pytest.importorskip("nibabel")
    from action.data.nifti import load_pair, save_nifti
    from action.engine import nifti_cases

    image = np.random.default_rng(0).random((6, 5, 3)).astype(np.float32)
    label = (image > 0.5).astype(np.float32) * 2  # integral floats: accepted
    save_nifti(image, np.eye(4), str(tmp_path / "ok.nii.gz"))
    save_nifti(label, np.eye(4), str(tmp_path / "ok_gt.nii.gz"))
    assert load_pair(str(tmp_path / "ok.nii.gz"), str(tmp_path / "ok_gt.nii.gz"))[1].data.max() == 2
    save_nifti(label * 0.999, np.eye(4), str(tmp_path / "frac_gt.nii.gz"))
    with pytest.raises(ValueError, match=r"frac_gt\.nii\.gz: float label map has \d+ non-integral"):
        load_pair(str(tmp_path / "ok.nii.gz"), str(tmp_path / "frac_gt.nii.gz"))
    image[1, 2, 0] = np.nan
    save_nifti(image, np.eye(4), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: image has 1 non-finite voxel"):
        next(nifti_cases([(str(tmp_path / "nan.nii.gz"), None)]))
    with pytest.raises(ValueError, match=r"ok_gt\.nii\.gz: labels must be in \[0, 2\)"):
        next(nifti_cases([(str(tmp_path / "ok.nii.gz"), str(tmp_path / "ok_gt.nii.gz"))], num_classes=2))


# -- non-finite values in a step: nothing of the step applied, the good state kept ---------------------------------
def _snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"].get(0, {}).items()})


@needs_acdc
def test_non_finite_loss_restores_batchnorm_statistics_and_saves_the_state_before_the_iteration(tmp_path):
    trainer = Trainer(smoke_config(tmp_path), progress=False)
    prepare, seen = trainer.prepare, {}

    def poisoned(batch, g):
        if trainer.iteration == 3:
            seen["before"] = _snapshot(trainer)
            batch["image_l"][0, 0, 5, 5] = float("nan")  # one NaN pixel reaches every BatchNorm of the forward
        return prepare(batch, g)

    trainer.prepare = poisoned
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss term\(s\) \['loss', 'ce', 'dice_loss'\] not "
                       r"finite .*batch files: labelled \['patient.*non-finite prepared views: \['image_l'\]"):
        trainer.fit()
    model, momentum = seen["before"]
    saved = load_checkpoint(str(tmp_path / "last.pt"))
    assert saved["iteration"] == 3
    for k, v in model.items():  # the BatchNorm running statistics the NaN forward moved are put back
        assert torch.equal(trainer.model.state_dict()[k], v) and torch.equal(saved["model"][k], v), k
    assert all(torch.equal(saved["optimizer"]["state"][0][k], v) for k, v in momentum.items())


@needs_acdc
def test_non_finite_gradient_stops_before_the_optimizer_step_and_names_the_parameters(tmp_path):
    trainer = Trainer(smoke_config(tmp_path), progress=False)
    compute, seen = trainer.compute_losses, {}

    def poisoned(views, g):
        if trainer.iteration == 3:
            seen["before"] = _snapshot(trainer)  # before the forward moves the BatchNorm statistics
        out = compute(views, g)
        if trainer.iteration == 3:
            weight = next(trainer.model.parameters())
            out["loss"] = out["loss"] + torch.sqrt(weight.sum() * 0)  # adds 0; its gradient is inf * 0 = NaN
        return out

    trainer.compute_losses = poisoned
    with pytest.raises(FloatingPointError, match=r"iteration 3: gradient not finite in 1 parameter\(s\) \(first: "
                       r"[\w.]+weight\); every loss term was finite"):
        trainer.fit()
    model, momentum = seen["before"]
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in model.items())
    saved = load_checkpoint(str(tmp_path / "last.pt"))
    assert saved["iteration"] == 3 and all(torch.isfinite(v).all() for v in saved["model"].values()
                                           if v.is_floating_point())
    assert all(torch.equal(saved["optimizer"]["state"][0][k], v) for k, v in momentum.items())


# -- the run folder: never overwritten, resumed only as itself --------------------------------------------------------
@needs_acdc
def test_training_into_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    Trainer(tiny(tmp_path), progress=False).fit()
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run \(config\.json, last\.pt, best\.pt, train\.csv\); "
                                         r"continue it with --resume, replace it with --overwrite"):
        Trainer(tiny(tmp_path), progress=False).fit()
    assert (tmp_path / "last.pt").read_bytes() == before
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(tiny(tmp_path, seed=7), progress=False).fit(overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


@needs_acdc
def test_resume_says_when_there_is_nothing_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: nothing to resume: .*last\.pt does not exist"):
        Trainer(tiny(tmp_path), progress=False).fit(resume=True)
    assert not os.path.exists(tmp_path / "train.csv")
    assert main(["train", "--preset", "smoke", "--data", ACDC, "--out", str(tmp_path / "x"), "--resume"]) == 2
    from action.method import run_pipeline

    with pytest.raises(FileNotFoundError, match="no stage of the pipeline in .* has a last.pt"):
        run_pipeline(build_config("smoke", overrides={"stage": "pipeline", "out": str(tmp_path / "p"),
                                                     "unlabelled_batch": 2}), resume=True)


@needs_acdc
def test_resume_refuses_changed_options_unless_forced(tmp_path, capsys):
    Trainer(tiny(tmp_path, iterations=1), progress=False).fit()
    with pytest.raises(ValueError, match=r"options differ from those .*last\.pt was trained with \(iterations: 1 -> "
                                         r"2; lr: 0\.01 -> 0\.02\); .*add --force"):
        Trainer(tiny(tmp_path, lr=0.02), progress=False).fit(resume=True)
    with pytest.raises(ValueError, match=r"world size x accumulate: 1 -> 2"):  # the shard count changes the batches
        Trainer(tiny(tmp_path, accumulate=2), progress=False).fit(resume=True)
    Trainer(tiny(tmp_path, log_every=2, threads=1), progress=False).fit(resume=True, force=True)
    assert "continuing" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 2


@needs_acdc
def test_resume_into_a_different_model_is_a_clear_error(tmp_path):
    Trainer(tiny(tmp_path), progress=False).fit()

    class Other(Trainer):
        def build_model(self):
            return torch.nn.Conv2d(1, 4, 3, padding=1)

    with pytest.raises(ValueError, match=r"holds a different model than this run builds: 2 entries missing from "
                                         r"the checkpoint \(first: weight, bias\)"):
        Other(tiny(tmp_path), progress=False).fit(resume=True)


@needs_acdc
def test_stale_temporary_checkpoints_of_dead_processes_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live = tmp_path / f".last.pt.tmp-{dead}", tmp_path / f".last.pt.tmp-{os.getppid()}"
    stale.write_bytes(b"torn"), live.write_bytes(b"being written")
    Trainer(tiny(tmp_path), progress=False).fit()
    assert not stale.exists() and live.exists()  # a running process's file is left alone
    assert clean_stale_temporaries(str(tmp_path / "nope")) == []


@needs_acdc
def test_resume_reads_a_train_log_with_the_old_dice_column(tmp_path):
    trainer = Trainer(smoke_config(tmp_path, iterations=4, checkpoint_every=2), progress=False)
    after = trainer.after_step

    def crash(t):
        after(t)
        if t == 2:
            raise RuntimeError("simulated crash")

    trainer.after_step = crash
    with pytest.raises(RuntimeError):
        trainer.fit()
    log = tmp_path / "train.csv"
    assert log.read_text().splitlines()[0].split(",")[:4] == ["iteration", "loss", "ce", "dice_loss"]
    log.write_text(log.read_text().replace("dice_loss", "dice", 1))  # a log written before the rename
    Trainer(smoke_config(tmp_path, iterations=4, checkpoint_every=2), progress=False).fit(resume=True)
    with open(log) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4] and all(r["dice_loss"] for r in rows)


# -- signals: SIGTERM and SIGHUP save like Ctrl-C, without a traceback -----------------------------------------------
@pytest.mark.slow
@needs_acdc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_saves_last_pt_and_exits_without_traceback(tmp_path, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "action.cli", "train", "--preset", "smoke", "--data", ACDC,
                             "--out", str(out), "--iterations", "2000", "--checkpoint-every", "1000", "--val-every",
                             "0", "--test-at-end", "false", "--tensorboard", "false", "--threads", "1",
                             "--log-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "train.csv").exists() and len((out / "train.csv").read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    done = load_checkpoint(str(out / "last.pt"))["iteration"]
    assert done >= 3 and f"interrupted ({signum.name}) after iteration {done}: saved" in stdout


# -- outputs: distinct names, true counts, standard JSON, an honest mean row ------------------------------------------
def test_predict_refuses_inputs_that_map_to_one_output_before_writing_anything(tmp_path, capsys):
    pytest.importorskip("nibabel")
    from action.data.nifti import save_nifti

    for name in ("c.nii", "c.nii.gz", "d.nii.gz"):
        save_nifti(np.zeros((4, 4, 2), np.float32), np.eye(4), str(tmp_path / "in" / name))
    assert main(["predict", "--checkpoint", str(tmp_path / "never-read.pt"), "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "1 output name(s) shared by several inputs ('c': " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    cases = [Case("a", torch.zeros(1, 2, 2)), Case("a", torch.zeros(1, 2, 2))]
    with pytest.raises(ValueError, match="two cases are named 'a'"):
        evaluate(lambda c: torch.zeros(1, 2, 2, dtype=torch.long), cases, str(tmp_path / "ev"), 2,
                 save_predictions=True, progress=False)


def test_summary_json_is_standard_json_with_nan_as_null_and_counts_kept(tmp_path):
    gt = torch.zeros(2, 6, 6, dtype=torch.long)
    gt[:, 1:3, 1:3], gt[:, 4:6, 4:6] = 1, 2
    pred = gt.clone()
    pred[pred == 2] = 0  # class 2 missed in every case: its distances are NaN, its Dice 0
    cases = [Case(f"c{i}", gt.float(), gt) for i in range(2)]
    metrics = evaluate(lambda c: pred, cases, str(tmp_path), 3, progress=False)

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["per_class"]["class2"]["hd95"] == [None, None, 2]
    assert summary["mean"]["hd95"] == 0.0 and summary["mean_classes"]["hd95"] == 1
    assert summary["nan_cases"]["hd95"] == 2 and summary["mean_classes"]["dice"] == 2
    mean_row = metrics.summary_table().splitlines()[-1]
    assert "0.0000 (1 of 2 classes; 2 NaN)" in mean_row and mean_row.startswith("| mean | 0.5000 |")
    assert dump_json({"best_val_dice": -float("inf")}) == '{"best_val_dice": null}'


def test_summary_mean_row_counts_nan_cases_it_left_out():
    m = SegmentationMetrics(3)
    gt = np.zeros((4, 4), int)
    gt[0, 0], gt[3, 3] = 1, 2
    m.update(gt, gt)
    pred = gt.copy()
    pred[3, 3] = 0
    m.update(pred, gt)  # class 2's distances NaN in one of two cases
    agg = m.aggregate()
    assert agg["mean_classes"]["hd95"] == 2 and agg["nan_cases"]["hd95"] == 1
    assert m.summary_table().splitlines()[-1].split(" | ")[3] == "0.0000 (1 NaN)"


# -- options: type and range errors name the option and where it came from --------------------------------------------
def test_config_file_and_flag_type_errors_name_the_option_and_the_file(tmp_path, capsys):
    good = tmp_path / "c.yaml"
    good.write_text("lr: 1e-3\n")  # PyYAML reads this as the string '1e-3'
    with pytest.raises(ValueError, match=rf"config lr \(from config file {good}\): expected a finite number, got "
                                         r"'1e-3' \(str\); that is text.*write 1\.0e-4"):
        build_config("smoke", str(good))
    bad = tmp_path / "bad.yaml"
    bad.write_text("size: 64\niterations: [1\n")
    with pytest.raises(ValueError, match=rf"config file {bad}: YAML syntax error at line 3"):
        build_config(file=str(bad))
    broken = tmp_path / "c.json"
    broken.write_text('{"size": 64,}')
    with pytest.raises(ValueError, match=rf"config file {broken}: JSON syntax error at line 1, column 13"):
        build_config(file=str(broken))
    for overrides, message in (({"nesterov": 1}, "config nesterov (from the command line): expected true or false"),
                               ({"augmentation": {"flip_p": "x"}}, "config augmentation.flip_p: expected a finite"),
                               ({"augmentation": {"gamma": [2, 1]}}, "config augmentation.gamma: expected 0 <= low"),
                               ({"momentum": 1.5}, "config momentum: expected in [0, 1), got 1.5"),
                               ({"anco_weight": -1.0}, "config anco_weight: expected >= 0 (a loss weight)"),
                               ({"iterations": True}, "config iterations (from the command line): expected an "
                                                      "integer, got True (bool)"),
                               ({"sise": 64}, "did you mean 'sise' -> 'size'?")):
        with pytest.raises(ValueError) as info:
            build_config("smoke", overrides=overrides)
        assert message in str(info.value), (overrides, str(info.value))
    with pytest.raises(SystemExit):
        main(["train", "--augmentation", "{flip_p: 0.5}"])
    assert "argument --augmentation: expected a JSON object in JSON" in capsys.readouterr().err


def test_cli_takes_no_abbreviations_suggests_close_options_and_shows_one_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--iter", "5"])  # not --iterations
    assert "unrecognized arguments: --iter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--iteratons", "5"])
    assert "(did you mean --iteratons -> --iterations?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evalute"])
    assert "did you mean evalute -> evaluate?" in capsys.readouterr().err
    text = subprocess.run([sys.executable, "-m", "action.cli", "train", "--help"], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200")).stdout
    assert "(default: None)" not in text and "--nesterov {true,false}" in text
    assert not [line for line in text.splitlines() if line.count("default") > 1]

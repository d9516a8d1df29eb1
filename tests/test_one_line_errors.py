"""Tracebacks and vague messages turned into one-line errors (exit 2) naming the file or option, and silent
acceptances refused (issue 27, finding 8; the config-file cases are in test_config_files.py, the environment cases
in test_run_requirements.py, hidden temporaries, save_nifti's temporary and a symlinked test/ in
test_output_paths.py). On the code before the fix each case here was a traceback (KeyError, TypeError, OSError,
LinAlgError, ImageFileError), a message naming no file, or was accepted silently (complex images, a negative
iteration, a poisoned or tampered centre cache): every test fails there."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from action.cli import main
from action.engine import load_checkpoint
from action.engine.checkpoint import save_checkpoint
from helpers import synthetic_acdc, tiny_checkpoint

h5py = pytest.importorskip("h5py", reason="h5py writes the synthetic ACDC folder")
nib = pytest.importorskip("nibabel", reason="nibabel writes the NIfTI files")


def rewrite(path, change) -> str:
    state = load_checkpoint(str(path))
    change(state)
    return save_checkpoint({k: v for k, v in state.items() if k != "format"}, str(path))


def one_line(capsys) -> str:
    """The error line of stderr (progress bars, which end in a carriage return, left out); asserts there is no
    other line."""
    err = capsys.readouterr().err
    lines = [part for part in err.replace("\r", "\n").splitlines() if part.strip()
             and not part.lstrip().startswith(("evaluating", "predicting", "labelled slices", "test volumes"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_checkpoints_with_missing_or_mistyped_entries_or_unknown_options_are_one_line_errors(tmp_path, capsys):
    synthetic_acdc(tmp_path / "acdc")
    cases = {
        "missing model": (lambda s: s.pop("model"), "missing entries ['model']"),
        "mistyped config": (lambda s: s.update(config=7), "wrong entries: config (expected a JSON object (text), "
                                                          "got 7)"),
        "unknown option": (lambda s: s.update(config=json.dumps({**json.loads(s["config"]), "sise": 64})),
                           "its config has options this version does not know (['sise'])"),
        "mistyped option": (lambda s: s.update(config=json.dumps({**json.loads(s["config"]), "size": "32"})),
                            "config size: expected an integer, got '32' (str)"),
    }
    for what, (change, message) in cases.items():
        checkpoint = rewrite(tiny_checkpoint(tmp_path / what / "best.pt", data=str(tmp_path / "acdc")), change)
        assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(tmp_path / "acdc"), "--out",
                     str(tmp_path / "ev"), "--threads", "1"]) == 2, what
        err = one_line(capsys)
        assert f"--checkpoint {checkpoint}: " in err and message in err, (what, err)


@pytest.mark.slow
def test_resume_refuses_a_negative_iteration_and_missing_entries(tmp_path, capsys):
    synthetic_acdc(tmp_path / "acdc")
    common = ["train", "--preset", "smoke", "--data", str(tmp_path / "acdc"), "--size", "32", "--iterations", "2",
              "--val-every", "0", "--test-at-end", "false", "--tensorboard", "false", "--threads", "1", "--out",
              str(tmp_path / "run")]
    assert main([*common, "--iterations", "1"]) == 0
    last = tmp_path / "run" / "last.pt"
    rewrite(last, lambda s: s.update(iteration=-3))
    capsys.readouterr()
    assert main([*common, "--resume", "--force"]) == 2
    assert "wrong entries: iteration (expected an integer >= 0, got -3)" in one_line(capsys)
    rewrite(last, lambda s: (s.update(iteration=1), s.pop("optimizer")))
    assert main([*common, "--resume", "--force"]) == 2
    assert f"--resume {last}: not a usable checkpoint of this package (missing entries ['optimizer'])" in \
        one_line(capsys)


def test_unwritable_outputs_are_one_line_errors_naming_the_path_for_every_command(tmp_path, capsys):
    synthetic_acdc(tmp_path / "acdc")
    checkpoint = tiny_checkpoint(tmp_path / "ck" / "best.pt", data=str(tmp_path / "acdc"))
    (tmp_path / "file").write_text("a file, not a folder")
    blocked = str(tmp_path / "file" / "out")  # every write under it fails: ENOTDIR
    nii = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 3), np.float32), np.eye(4)), str(nii))
    commands = {
        "train": ["train", "--preset", "smoke", "--data", str(tmp_path / "acdc"), "--size", "32", "--iterations", "1",
                  "--val-every", "0", "--test-at-end", "false", "--tensorboard", "false", "--threads", "1"],
        "evaluate": ["evaluate", "--checkpoint", checkpoint, "--data", str(tmp_path / "acdc"), "--threads", "1"],
        "predict": ["predict", "--checkpoint", checkpoint, "--input", str(nii), "--threads", "1"],
        "data": ["data", "convert", "--data", str(tmp_path / "acdc"), "--names", "test", "--threads", "1"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--out", blocked]) == 2, name
        err = one_line(capsys)
        assert err.startswith(f"action {name}: error: {tmp_path / 'file'}"), err
        assert "Not a directory" in err or "File exists" in err, err  # ENOTDIR, or makedirs' EEXIST


FULL_DISK = """import resource, signal, sys
from action.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
for argv in sys.argv[1:]:
    limit, *argv = argv.split("|")
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))  # files of at most `limit` bytes
    print(main(argv), flush=True)
"""


@pytest.mark.slow
def test_a_full_disk_is_a_one_line_error_for_every_command_and_leaves_no_temporary(tmp_path):
    synthetic_acdc(tmp_path / "acdc")
    checkpoint = tiny_checkpoint(tmp_path / "ck" / "best.pt", data=str(tmp_path / "acdc"))
    nii = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 3)).astype(np.float32), np.eye(4)), str(nii))
    out = tmp_path / "out"
    commands = [  # (file size limit, command): train fails at its first checkpoint (torch.save), the others sooner
        (64 << 10, ["train", "--preset", "smoke", "--data", str(tmp_path / "acdc"), "--size", "32", "--iterations",
                    "1", "--val-every", "0", "--test-at-end", "false", "--tensorboard", "false", "--out",
                    str(out / "run")]),
        (1024, ["evaluate", "--checkpoint", checkpoint, "--data", str(tmp_path / "acdc"), "--out", str(out / "ev"),
                "--save-predictions"]),
        (1024, ["predict", "--checkpoint", checkpoint, "--input", str(nii), "--out", str(out / "pred")]),
        (1024, ["data", "convert", "--data", str(tmp_path / "acdc"), "--names", "test", "--out", str(out / "nii")])]
    done = subprocess.run([sys.executable, "-c", FULL_DISK, *("|".join([str(n), *c, "--threads", "1"])
                                                              for n, c in commands)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.stdout.split() == ["2", "2", "2", "2"], done.stdout + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert "Traceback" not in done.stderr and len(errors) == 4, done.stderr[-3000:]
    for line, (_, command) in zip(errors, commands):
        assert line.startswith(f"action {command[0]}: error: ") and str(out) in line, line
        assert "File too large" in line or "is the disk full or read-only" in line, line
    assert "last.pt: writing the checkpoint failed" in errors[0]
    left = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if ".tmp" in f or "staging" in d]
    assert not left and not (out / "nii").exists() and not (out / "run" / "last.pt").exists(), left


@pytest.mark.parametrize("kind", ["group", "compound", "complex", "string"])
def test_hdf5_images_that_are_not_real_number_arrays_are_refused_naming_the_file(tmp_path, capsys, kind):
    from action.data.acdc import read_case

    names = synthetic_acdc(tmp_path / "acdc")
    path = tmp_path / "acdc" / "data" / f"{names['test'][0]}.h5"
    with h5py.File(path, "a") as fh:
        image = fh["image"][()]
        del fh["image"]
        if kind == "group":
            fh.create_group("image")
        elif kind == "compound":
            fh["image"] = np.zeros(image.shape, dtype=[("re", "f4"), ("im", "f4")])
        elif kind == "complex":
            fh["image"] = image.astype(np.complex64) * (1 + 1j)
        else:
            fh["image"] = np.full(image.shape, b"0.5", dtype="S3")
    expected = {"group": "'image' is an HDF5 group, not a dataset", "compound": "dataset 'image' holds compound "
                "values", "complex": "dataset 'image' holds complex values", "string": "dataset 'image' holds string "
                "values"}[kind]
    with pytest.raises(ValueError, match=rf"{path}: {expected}"):
        read_case(str(tmp_path / "acdc"), names["test"][0])


def nnunet_folder(tmp_path) -> str:
    synthetic_acdc(tmp_path / "acdc", slices=3, volumes=2, patients=3)
    assert main(["data", "convert", "--data", str(tmp_path / "acdc"), "--out", str(tmp_path / "nii"), "--threads",
                 "1"]) == 0
    return str(tmp_path / "nii")


def test_a_nifti_layout_with_a_non_nifti_unlabelled_image_or_bad_dataset_json_labels_names_the_file(tmp_path,
                                                                                                      capsys):
    root = nnunet_folder(tmp_path)
    junk = os.path.join(root, "imagesTr", "junk_0000.nii.gz")  # no label map: an unlabelled training image
    with open(junk, "w") as fh:
        fh.write("not an image")
    capsys.readouterr()
    common = ["train", "--preset", "smoke", "--data", root, "--size", "32", "--iterations", "1", "--val-every", "0",
              "--test-at-end", "false", "--tensorboard", "false", "--threads", "1", "--labelled-patients", "1",
              "--out", str(tmp_path / "run")]
    assert main([*common, "--stage", "pretrain-global", "--unlabelled-batch", "2"]) == 2
    assert f"cannot read {junk} as NIfTI (ImageFileError" in one_line(capsys)
    os.remove(junk)
    dataset = json.loads(open(os.path.join(root, "dataset.json")).read())
    with open(os.path.join(root, "dataset.json"), "w") as fh:
        json.dump({**dataset, "labels": {"background": "zero", "RV": "one"}}, fh)
    assert main(common) == 2
    assert f"{os.path.join(root, 'dataset.json')}: label 'background' must have an integer value, got 'zero'" in \
        one_line(capsys)


def test_a_nifti_with_a_nan_affine_is_refused_naming_the_file(tmp_path):
    from action.data.cases import nifti_cases

    path = tmp_path / "nan.nii"
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    image.header.set_sform(np.eye(4), code=1)
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]: nibabel's API will not write a NaN sform
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{path}: the header's affine \(sform/qform\) holds NaN or infinite"):
        next(nifti_cases([(str(path), None)], "RAS"))


def test_a_poisoned_or_tampered_centre_cache_is_recomputed_with_a_line_naming_it(tmp_path, capsys):
    from action.method.plusplus import class_centres, compute_centres

    good = class_centres(3, 8, 0.1, cache_dir=str(tmp_path), steps=200)
    [cache] = [tmp_path / n for n in os.listdir(tmp_path)]
    assert capsys.readouterr().out == ""
    random_units = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    for bad, why in ((torch.full((3, 8), float("nan")), "it holds NaN or infinite values"),
                     (random_units, "not a minimum of the uniformity loss"),
                     (torch.zeros(2, 8), "expected a float tensor of shape (3, 8)")):
        torch.save(bad, cache)
        psi = class_centres(3, 8, 0.1, cache_dir=str(tmp_path), steps=200)
        assert torch.equal(psi, good) and torch.equal(torch.load(cache, weights_only=True), good)
        assert capsys.readouterr().out.startswith(f"ignored the class-centre cache {cache}: {why}")
    assert torch.equal(compute_centres(3, 8, 0.1, 200), good)
    torch.save(good.flip(0), cache)  # another optimum (rows permuted): accepted, as documented
    assert torch.equal(class_centres(3, 8, 0.1, cache_dir=str(tmp_path), steps=200), good.flip(0))

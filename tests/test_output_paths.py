"""No writer leaves its output folder (issue 27, finding 1): case names from list files are checked at load (the
error names the list file and the line), every output path is checked to resolve inside --out, and temporaries are
removed on any error. Each writer is attacked the way the finding did: a list naming `../../victim/x` with
victim/x.h5 present (evaluate --save-predictions, train --test-at-end, data convert), a symbolic link out of --out
(predict). Every test here failed on the code before the fix (the victim folder received files, rc 0)."""
import os
import shutil

import numpy as np
import pytest

from action.cli import main
from action.data.names import case_name_problem, check_case_name, output_path, read_name_list
from helpers import synthetic_acdc, tiny_checkpoint

pytest.importorskip("h5py", reason="h5py writes the synthetic ACDC folders")
pytest.importorskip("nibabel", reason="nibabel writes the predictions")

ESCAPE = "../../victim/x"  # from <root>/data/ to <tmp>/victim/x.h5, and from <out>/predictions/ to <tmp>/victim/


@pytest.fixture
def setup(tmp_path):
    """(acdc root, checkpoint, victim folder holding only x.h5)."""
    root = tmp_path / "acdc"
    names = synthetic_acdc(root)
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.copy(root / "data" / f"{names['test'][0]}.h5", victim / "x.h5")
    return root, tiny_checkpoint(tmp_path / "ck" / "best.pt", data=str(root)), victim


def poison(listing, line: str) -> None:
    listing.write_text(listing.read_text() + line + "\n")


def test_case_names_with_separators_dots_or_control_characters_are_refused():
    for bad in ("", ".", "..", "../x", "a/b", "/abs/x", "a\\b", "x\ny", "x\x00", ".hidden"):
        assert case_name_problem(bad) is not None, bad
    for good in ("patient001_frame01", "la_003", "case 7", "x..y"):
        assert check_case_name(good, "test") == good


def test_a_list_file_entry_is_refused_at_load_naming_the_file_and_line(tmp_path):
    listing = tmp_path / "test.list"
    listing.write_text("patient001_frame01\n\n" + ESCAPE + "\n")
    with pytest.raises(ValueError, match=rf"{listing} line 3: case name '\.\./\.\./victim/x' refused: it holds a "
                                         r"path separator"):
        read_name_list(str(listing))


def test_evaluate_save_predictions_with_a_test_list_escaping_writes_nothing_outside(setup, tmp_path, capsys):
    root, checkpoint, victim = setup
    poison(root / "test.list", ESCAPE)
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(root), "--out", str(out),
                 "--save-predictions", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'test.list'} line 2: case name '{ESCAPE}' refused" in err and err.count("\n") == 1
    assert sorted(os.listdir(victim)) == ["x.h5"]


def test_train_test_at_end_with_a_test_list_escaping_writes_nothing_outside(setup, tmp_path, capsys):
    root, _, victim = setup
    poison(root / "test.list", ESCAPE)
    assert main(["train", "--preset", "smoke", "--data", str(root), "--size", "32", "--iterations", "1",
                 "--val-every", "0", "--test-at-end", "true", "--tensorboard", "false", "--threads", "1",
                 "--out", str(tmp_path / "run")]) == 2
    assert f"{root / 'test.list'} line 2: case name '{ESCAPE}' refused" in capsys.readouterr().err
    assert sorted(os.listdir(victim)) == ["x.h5"]


@pytest.mark.parametrize("source", ["--names file", "val.list"])
def test_data_convert_with_a_list_escaping_writes_nothing_outside(setup, tmp_path, capsys, source):
    root, _, victim = setup
    if source == "val.list":
        poison(root / "val.list", ESCAPE)
        names = ["--names", "all"]
    else:
        listing = tmp_path / "names.list"
        listing.write_text(ESCAPE + "\n")
        names = ["--names", str(listing)]
    out = tmp_path / "nii"
    assert main(["data", "convert", "--data", str(root), *names, "--out", str(out), "--threads", "1"]) == 2
    assert "line " in capsys.readouterr().err
    assert sorted(os.listdir(victim)) == ["x.h5"] and not out.exists()


def test_predict_refuses_an_output_folder_linked_outside_out(setup, tmp_path, capsys):
    from action.data.nifti import save_nifti

    _, checkpoint, victim = setup
    save_nifti(np.random.default_rng(0).random((32, 32, 3)).astype(np.float32), np.eye(4),
               str(tmp_path / "in" / "x.nii.gz"))
    out = tmp_path / "pred"
    out.mkdir()
    os.symlink(victim, out / "predictions")
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(tmp_path / "in"), "--out", str(out),
                 "--overlays", "0", "--threads", "1"]) == 2
    assert f"resolves to {victim}" in capsys.readouterr().err
    assert sorted(os.listdir(victim)) == ["x.h5"]


@pytest.mark.slow
def test_train_overwrite_removes_a_linked_test_folder_and_resume_refuses_one_before_iteration_0(setup, tmp_path,
                                                                                               capsys):
    root, _, victim = setup
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / "test")
    common = ["train", "--preset", "smoke", "--data", str(root), "--size", "32", "--iterations", "1", "--val-every",
              "0", "--tensorboard", "false", "--threads", "1", "--out", str(out)]
    assert main([*common, "--overwrite"]) == 0  # the link is removed, not followed; test/ is written inside
    assert (out / "test").is_dir() and not (out / "test").is_symlink() and sorted(os.listdir(victim)) == ["x.h5"]
    shutil.rmtree(out / "test")
    os.symlink(victim, out / "test")
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2
    assert "outside the output folder" in capsys.readouterr().err
    assert sorted(os.listdir(victim)) == ["x.h5"]


def test_output_path_refuses_climbing_parts_and_links_pointing_out(tmp_path):
    (tmp_path / "out" / "a").mkdir(parents=True)
    assert output_path(str(tmp_path / "out"), "a", "x.png") == str(tmp_path / "out" / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "out" / "up")
    (tmp_path / "out" / "file.csv").symlink_to("/etc/hostname")
    for parts in (("..", "x"), ("/etc/x",), ("up", "x"), ("file.csv",)):
        with pytest.raises(ValueError, match="outside the output folder"):
            output_path(str(tmp_path / "out"), *parts)


def test_save_nifti_removes_its_temporary_on_any_error(tmp_path):
    from action.data.nifti import save_nifti

    (tmp_path / "x.nii.gz").mkdir()  # the rename onto it fails
    with pytest.raises(OSError):
        save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), str(tmp_path / "x.nii.gz"))
    assert os.listdir(tmp_path) == ["x.nii.gz"]


def test_image_folders_skip_hidden_temporaries(setup, tmp_path, capsys):
    from action.data.nifti import save_nifti

    _, checkpoint, _ = setup
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    save_nifti(image, np.eye(4), str(tmp_path / "in" / "a.nii.gz"))
    (tmp_path / "in" / ".tmp-4711-b.nii.gz").write_bytes(b"torn")  # a killed write's leftover
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(tmp_path / "in"), "--out",
                 str(tmp_path / "pred"), "--overlays", "0", "--threads", "1"]) == 0
    assert os.listdir(tmp_path / "pred" / "predictions") == ["a.nii.gz"]

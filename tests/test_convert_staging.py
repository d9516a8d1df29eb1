"""A conversion appears whole or not at all (issue 27, finding 4): `action data convert` writes into a hidden staging
folder renamed into place at the end, so a killed conversion leaves no --out that training could take for a complete
dataset, and the next conversion removes the killed one's staging folder. On the code before the fix the killed
conversion left a partial --out (the test fails there)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from action.cli import main
from helpers import synthetic_acdc

pytest.importorskip("h5py", reason="h5py writes the synthetic ACDC folder")
pytest.importorskip("nibabel", reason="nibabel writes the converted volumes")

# the conversion with every file write slowed down, so that the test kills it half-way, deterministically
SLOW_CONVERT = """import sys, time
import action.data.convert as convert
write = convert.save_nifti
convert.save_nifti = lambda *a, **k: (write(*a, **k), time.sleep(0.3))[0]
from action.cli import main
sys.exit(main(["data", "convert", "--data", sys.argv[1], "--out", sys.argv[2], "--names", "test", "--threads", "1"]))
"""


def written(parent) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(parent) for f in files if f.endswith(".nii.gz")]


@pytest.mark.slow
def test_a_killed_conversion_leaves_no_output_folder_and_the_next_one_completes(tmp_path, capsys):
    synthetic_acdc(tmp_path / "acdc", volumes=6)
    out = tmp_path / "conv" / "nii"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(tmp_path / "acdc"), str(out)],
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and len(written(tmp_path / "conv")) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing a later command could take for a dataset
    [staging] = os.listdir(tmp_path / "conv")
    assert staging == f".nii.staging-{proc.pid}"
    assert main(["train", "--preset", "smoke", "--data", str(out), "--out", str(tmp_path / "run"), "--threads",
                 "1"]) == 2
    capsys.readouterr()
    assert main(["data", "convert", "--data", str(tmp_path / "acdc"), "--out", str(out), "--names", "test",
                 "--threads", "1"]) == 0
    assert f"removed {tmp_path / 'conv' / staging}: the temporary folder of a conversion that was killed" in \
        capsys.readouterr().out
    assert os.listdir(tmp_path / "conv") == ["nii"] and len(os.listdir(out / "imagesTs")) == 6


def test_convert_refuses_a_non_empty_output_folder_and_removes_its_staging_on_error(tmp_path, capsys):
    names = synthetic_acdc(tmp_path / "acdc")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    assert main(["data", "convert", "--data", str(tmp_path / "acdc"), "--out", str(tmp_path / "full"),
                 "--threads", "1"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    os.remove(tmp_path / "acdc" / "data" / f"{names['test'][0]}.h5")  # fails after the training volumes are written
    assert main(["data", "convert", "--data", str(tmp_path / "acdc"), "--out", str(tmp_path / "nii"),
                 "--threads", "1"]) == 2
    assert "file not found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["acdc", "full"]

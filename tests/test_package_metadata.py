"""What the distribution says about itself: one version (`action --version`, action.__version__,
action_kernels.__version__ and the built wheel's metadata all read action_kernels/_version.py) and the PEP 561
py.typed markers of both packages in the wheel (without them type checkers skip the packages' annotations)."""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import action
import action_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_action_version_prints_the_version_both_packages_report():
    out = subprocess.run([sys.executable, "-m", "action.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"action {action_kernels.__version__} (action-kernels)"
    assert action.__version__ == action_kernels.__version__


def test_the_wheel_ships_py_typed_in_both_packages_and_the_packages_version(tmp_path):
    src = tmp_path / "src"  # a copy: a build in the checkout would leave build/ and *.egg-info there
    for name in ("action", "action_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "out"), str(src)],
                           env={**os.environ, "ACTION_KERNELS_BUILD": "none"}, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = (tmp_path / "out").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
    assert {"action/py.typed", "action_kernels/py.typed"} <= names
    assert f"\nVersion: {action_kernels.__version__}\n" in text

"""The build: every .cu compiles for sm_80 and sm_90, CMake builds the same module, nothing links against torch."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import action_kernels
from action_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


def test_sources_exist():
    assert CU_FILES, "no .cu files found under csrc/"


# Every .cu compiling with nvcc for sm_80 and sm_90 is checked by tests/test_kernel_report.py (its report compiles
# each of them for both architectures and fails on an nvcc error), once instead of twice per CI run.


def test_emulation_build_is_installed_and_reports_its_flavour():
    flavours = _extension.flavours()
    assert flavours["cpu"] == "cpu-emulation", flavours["cpu"]


def test_built_modules_do_not_link_against_torch():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    pkg = os.path.dirname(action_kernels.__file__)
    modules = glob.glob(os.path.join(pkg, "_C*.so"))
    assert modules, f"no built modules in {pkg}"
    for so in modules:
        dynamic = subprocess.run([readelf, "-d", so], capture_output=True, text=True).stdout
        deps = [line for line in dynamic.splitlines() if "(NEEDED)" in line or "PATH)" in line]
        assert deps, f"no dynamic dependencies listed for {so}:\n{dynamic}"
        assert not any("torch" in line or "libc10" in line for line in deps), f"{so} links against torch: {deps}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_builds_the_emulation_module(tmp_path):
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), "-DAK_BUILD=cpu", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    built = glob.glob(str(build / "_C_cpu*.so"))
    assert built
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_C_cpu', sys.argv[1]); "
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.flavour())")
    out = subprocess.run([sys.executable, "-c", probe, built[0]], capture_output=True, text=True)
    assert out.stdout.strip() == "cpu-emulation", out.stderr


def test_env_report_names_versions_and_backends():
    # run outside the checkout so the installed package (with its built modules) is the one reported
    out = subprocess.run([sys.executable, "-m", "action_kernels.env_report"], capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    for needle in ("torch ", "kernel build for cpu tensors", "chunked", "triton", "cuda"):
        assert needle in out.stdout

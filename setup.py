"""Builds the kernel extension from csrc/ without torch: raw-pointer launchers bound with pybind11.

ACTION_KERNELS_BUILD selects what is built:
  auto (default)  `_C` with nvcc when nvcc is found (CUDA kernels), plus `_C_cpu`, the host build: the same .cu
                  sources compiled by the host C++ compiler under csrc/emulation.h (the kernels' logic on CPU
                  threads, for tests; with the primitive self-tests of csrc/selftest.cu, which `_C` leaves out)
                  and the native CPU kernels of csrc/cpu/ (used by the chunked CPU path);
                  only `_C_cpu` when there is no nvcc; nothing when there is no C++ compiler either.
  cuda            both, and fail when nvcc is missing.
  cpu             `_C_cpu` only.
  none            nothing: the package still works through its Triton and torch backends.
CUDA_ARCHS (default "80;90") lists the SM architectures for the CUDA flavour. CMakeLists.txt builds the same targets.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
CU_SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
# the primitive self-test kernels (tests/test_cuda_primitives.py) go into the emulation/test module `_C_cpu` only
SELFTEST = os.path.join(CSRC, "selftest.cu")
CUDA_SOURCES = [s for s in CU_SOURCES if s != SELFTEST]
CPU_SOURCES = sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))  # native CPU kernels, host build only
BINDINGS = os.path.join(CSRC, "bindings.cpp")
MODES = ("auto", "cuda", "cpu", "none")


def _say(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\naction_kernels build: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def plan() -> list[str]:
    """Module names to build, from ACTION_KERNELS_BUILD and the compilers found."""
    mode = os.environ.get("ACTION_KERNELS_BUILD", "auto").strip().lower()
    if mode not in MODES:
        raise SystemExit(f"ACTION_KERNELS_BUILD must be one of {MODES}, got {mode!r}")
    if mode == "none":
        _say("ACTION_KERNELS_BUILD=none: no extension (Triton and torch backends only)")
        return []
    cxx, nvcc = find_cxx(), find_nvcc()
    if cxx is None:
        if mode == "auto":
            _say("no C++ compiler found: no extension built (Triton and torch backends only)")
            return []
        raise SystemExit(f"ACTION_KERNELS_BUILD={mode} needs a C++ compiler (g++ or clang++), none found")
    if mode == "cuda" and nvcc is None:
        raise SystemExit("ACTION_KERNELS_BUILD=cuda needs nvcc: set CUDA_HOME or put nvcc on PATH")
    modules = ["_C_cpu"]
    if nvcc is not None and mode in ("auto", "cuda"):
        modules.insert(0, "_C")
    flavours = {"_C": f"CUDA kernels with {nvcc}", "_C_cpu": f"CPU emulation with {cxx}"}
    _say("building " + " and ".join(f"action_kernels.{m} ({flavours[m]})" for m in modules))
    return modules


def _python_includes() -> list[str]:
    import pybind11

    return ["-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"], "-I" + CSRC]


def _run(cmd: list[str]) -> None:
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=HERE)


class BuildKernels(build_ext):
    """Compiles each module with nvcc / the host compiler directly (seconds, no torch, no ninja needed)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.parallel = self.parallel or 2  # the CUDA and emulation modules build side by side

    def build_extension(self, ext: Extension) -> None:
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.abspath(os.path.join(self.build_temp, ext.name.replace(".", "_")))
        os.makedirs(tmp, exist_ok=True)
        module = ext.name.rsplit(".", 1)[1]
        if module == "_C":
            self._build_cuda(module, target, tmp)
        else:
            self._build_emulation(module, target, tmp)

    def _build_emulation(self, module: str, target: str, tmp: str) -> None:
        # -fno-math-errno / -fno-trapping-math let the CPU kernels' exp loops vectorise (results unchanged).
        # One object per source, compiled side by side (the kernel templates make each .cu a long compile).
        flags = [find_cxx(), "-O3", "-std=c++20", "-g0", "-fPIC", "-pthread", "-fvisibility=hidden",
                 "-fno-math-errno", "-fno-trapping-math", "-DAK_EMULATION", f"-DAK_MODULE={module}",
                 *_python_includes()]
        jobs, objs = [], []
        for src in CU_SOURCES + CPU_SOURCES + [BINDINGS]:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            lang = ["-x", "c++"] if src.endswith(".cu") else []
            jobs.append([*flags, *lang, "-c", src, "-o", obj])
            objs.append(obj)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(_run, jobs))
        _run([find_cxx(), "-shared", "-pthread", *objs, "-o", target])

    def _build_cuda(self, module: str, target: str, tmp: str) -> None:
        nvcc = find_nvcc()
        archs = [a.strip() for a in os.environ.get("CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        objs, jobs = [], []
        for src in sorted(CUDA_SOURCES, key=os.path.getsize, reverse=True):  # the long compiles start first
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            objs.append(obj)
            jobs.append([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I" + CSRC, *gencode, "-c", src,
                         "-o", obj])
        bind_obj = os.path.join(tmp, "bindings.o")
        jobs.append([find_cxx(), "-O2", "-std=c++17", "-g0", "-fPIC", "-fvisibility=hidden", f"-DAK_MODULE={module}",
                     *_python_includes(), "-c", BINDINGS, "-o", bind_obj])
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(_run, jobs))
        # nvcc links the CUDA runtime statically by default: the module needs no libcudart at run time.
        _run([nvcc, "-shared", *gencode, *objs, bind_obj, "-o", target])


modules = plan()
setup(
    ext_modules=[Extension(f"action_kernels.{m}", sources=[]) for m in modules],
    cmdclass={"build_ext": BuildKernels},
)

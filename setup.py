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
CUDA_ARCHS (default "80;90") lists the SM architectures for the CUDA flavour. ACTION_KERNELS_BUILD_JOBS (or MAX_JOBS;
default: the CPUs this process may use) caps the compilers running at once: the files compile side by side, the
longest first, and nvcc --threads compiles each file's architectures side by side. `pip install -v .` shows each
compile step's start and finish with the elapsed time. CMakeLists.txt builds the same targets.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass

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
JOBS_VARS = ("ACTION_KERNELS_BUILD_JOBS", "MAX_JOBS")


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


def build_jobs() -> int:
    """How many compilers run at once: ACTION_KERNELS_BUILD_JOBS, else MAX_JOBS (PyTorch extensions' variable), else
    the CPUs this process may use."""
    for name in JOBS_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"{name} must be a positive integer (parallel compile jobs), got {value!r}")
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Step:
    """One compiler run: what the progress lines call it, its command, and its estimated cost, which orders the queue
    (the longest first, so that no long compile starts last)."""

    what: str
    cmd: list[str]
    cost: float = 0.0


def host_cost(src: str) -> float:
    """A host compile's estimated cost, in bytes of source (only the order matters), from the compiles' times on 2
    shared cores: a fixed part worth 3 KB plus the source, and the pybind11 bindings as long as a 40 KB kernel file
    (pybind11's headers; measured 1.4x the 27 KB csrc/soft_contrastive.cu)."""
    return 3000 + os.path.getsize(src) + (40000 if src == BINDINGS else 0)


def nvcc_cost(src: str, targets: int) -> float:
    """An nvcc compile's estimated cost: each target (an SM architecture, or PTX) runs the device compiler over the
    kernel templates, several times a host compile of the same file."""
    return 4 * targets * os.path.getsize(src)


def run_steps(steps: list[Step], jobs: int) -> None:
    """Runs `steps` as subprocesses in their order, `jobs` at once, printing each start and finish with the build's
    elapsed time (and every minute what is still compiling); at the first failure stops the others and raises with
    the failed command."""
    t0, last = time.monotonic(), [time.monotonic()]

    def say(msg: str) -> None:
        print(f"[action_kernels build {time.monotonic() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)
        last[0] = time.monotonic()

    pending, running, n = list(steps), {}, len(steps)
    while pending or running:
        while pending and len(running) < jobs:
            step = pending.pop(0)
            index = n - len(pending)
            say(f"start {index}/{n}: {step.what}")
            running[subprocess.Popen(step.cmd, cwd=HERE)] = (step, index, time.monotonic())
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            step, index, started = running.pop(proc)
            if proc.returncode != 0:
                for other in running:
                    other.terminate()
                for other in running:
                    other.wait()
                raise SystemExit(f"action_kernels build: {step.what} failed (exit status {proc.returncode}):\n"
                                 + " ".join(step.cmd))
            say(f"done  {index}/{n}: {step.what} in {time.monotonic() - started:.1f} s")
        if running and time.monotonic() - last[0] >= 60:
            say("still compiling: " + ", ".join(f"{s.what} ({time.monotonic() - t:.0f} s)"
                                                for s, _, t in running.values()))


class BuildKernels(build_ext):
    """Compiles every module with nvcc / the host compiler directly (no torch, no ninja needed): the object files of
    all modules through one queue, the longest compiles first, build_jobs() at once (nvcc --threads compiles one
    file's architectures side by side: nvcc's host-side passes are serial, so an nvcc run counts as one job), then
    links each module."""

    def build_extensions(self) -> None:
        self.check_extensions_list(self.extensions)
        jobs = build_jobs()
        plans = [self._plan(ext) for ext in self.extensions]
        compiles = sorted((step for steps, _ in plans for step in steps), key=lambda s: -s.cost)
        _say(f"compiling {len(compiles)} files, {jobs} at once (ACTION_KERNELS_BUILD_JOBS "
             f"or MAX_JOBS to change; `pip install -v` shows this progress)")
        run_steps(compiles, jobs)
        run_steps([link for _, link in plans], jobs)

    def build_extension(self, ext: Extension) -> None:
        steps, link = self._plan(ext)
        run_steps(sorted(steps, key=lambda s: -s.cost), build_jobs())
        run_steps([link], 1)

    def _plan(self, ext: Extension) -> tuple[list[Step], Step]:
        """(the compile steps of one module, and its link step)."""
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.abspath(os.path.join(self.build_temp, ext.name.replace(".", "_")))
        os.makedirs(tmp, exist_ok=True)
        module = ext.name.rsplit(".", 1)[1]
        return self._plan_cuda(module, target, tmp) if module == "_C" else self._plan_host(module, target, tmp)

    def _plan_host(self, module: str, target: str, tmp: str) -> tuple[list[Step], Step]:
        # -fno-math-errno / -fno-trapping-math let the CPU kernels' exp loops vectorise (results unchanged).
        flags = [find_cxx(), "-O3", "-std=c++20", "-g0", "-fPIC", "-pthread", "-fvisibility=hidden",
                 "-fno-math-errno", "-fno-trapping-math", "-DAK_EMULATION", f"-DAK_MODULE={module}",
                 *_python_includes()]
        steps, objs = [], []
        for src in CU_SOURCES + CPU_SOURCES + [BINDINGS]:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            lang = ["-x", "c++"] if src.endswith(".cu") else []
            steps.append(Step(f"{module}: {src} (host C++)", [*flags, *lang, "-c", src, "-o", obj],
                              cost=host_cost(src)))
            objs.append(obj)
        return steps, Step(f"{module}: link", [find_cxx(), "-shared", "-pthread", *objs, "-o", target])

    def _plan_cuda(self, module: str, target: str, tmp: str) -> tuple[list[Step], Step]:
        nvcc = find_nvcc()
        archs = [a.strip() for a in os.environ.get("CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        targets = ", ".join([f"sm_{a}" for a in archs] + [f"PTX {archs[-1]}"])
        threads = len(gencode)  # one per target (nvcc >= 11.2 has --threads; sm_90 needs 11.8)
        steps, objs = [], []
        for src in CUDA_SOURCES:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            objs.append(obj)
            steps.append(Step(f"{module}: {src} (nvcc: {targets}; --threads {threads})",
                              [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I" + CSRC, *gencode,
                               f"--threads={threads}", "-c", src, "-o", obj], nvcc_cost(src, len(gencode))))
        bind_obj = os.path.join(tmp, "bindings.o")
        steps.append(Step(f"{module}: {BINDINGS} (host C++)",
                          [find_cxx(), "-O2", "-std=c++17", "-g0", "-fPIC", "-fvisibility=hidden",
                           f"-DAK_MODULE={module}", *_python_includes(), "-c", BINDINGS, "-o", bind_obj],
                          cost=host_cost(BINDINGS)))
        # nvcc links the CUDA runtime statically by default: the module needs no libcudart at run time.
        return steps, Step(f"{module}: link", [nvcc, "-shared", *gencode, *objs, bind_obj, "-o", target])


modules = plan()
setup(
    ext_modules=[Extension(f"action_kernels.{m}", sources=[]) for m in modules],
    cmdclass={"build_ext": BuildKernels},
)

"""The CUDA kernels' launch plans (csrc/launch_plans.h): the configurations the launchers use, read by the static
kernel report through `launch_plans`; every planned kernel name is a real symbol of the nvcc-compiled cubins."""
import glob
import os
import shutil
import subprocess

import pytest

from action_kernels import cuda as ak_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
CXXFILT = shutil.which("c++filt")
SHAPES = [(65536, 65536, 128, 64), (300, 257, 7, 33), (50, 90, 512, 512), (1, 1, 256, 1), (1000, 4096, 64, 600)]
MODES = [("soft_contrastive", m) for m in ("forward", "forward_grad", "key_grad")] + [("hard_negative_topk", "topk")]


def _host():
    mod = ak_cuda.host_module()
    if mod is None:
        pytest.skip("the host build action_kernels._C_cpu is not built")
    return mod


def _symbols(cubin: str) -> set[str]:
    """Demangled names of the kernel entries of one cubin (ELF symbols of type FUNC)."""
    out = subprocess.run(["readelf", "-sW", cubin], capture_output=True, text=True, check=True).stdout
    mangled = [line.split()[-1] for line in out.splitlines() if " FUNC " in line]
    demangled = subprocess.run([CXXFILT], input="\n".join(mangled), capture_output=True, text=True, check=True)
    return set(demangled.stdout.splitlines())


@pytest.fixture(scope="module")
def cubin_symbols(tmp_path_factory):
    if NVCC is None or CXXFILT is None or shutil.which("readelf") is None:
        pytest.skip("needs nvcc, c++filt and readelf")
    out = tmp_path_factory.mktemp("cubins")
    names = set()
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))):
        cubin = out / (os.path.basename(src) + ".cubin")
        cmd = [NVCC, "-O3", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), "-arch=sm_90", "-cubin", src, "-o",
               str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
        names |= _symbols(str(cubin))
    return names


@pytest.mark.parametrize("op,mode", MODES)
def test_every_planned_kernel_is_a_symbol_of_the_compiled_cubins(cubin_symbols, op, mode):
    mod = _host()
    for dtype in ("bf16", "fp16", "fp32"):
        for n, k, d, top in SHAPES:
            for plan in mod.launch_plans(op, mode, dtype, n, k, d, top):
                assert plan["kernel"] in cubin_symbols, (
                    f"{op}/{mode}/{dtype} N={n} K={k} D={d}: planned kernel {plan['kernel']!r} is not in the cubins; "
                    f"they hold {sorted(cubin_symbols)}")


@pytest.mark.parametrize("op,mode", MODES)
def test_launch_plans_are_well_formed(op, mode):
    mod = _host()
    plans = mod.launch_plans(op, mode, "bf16", 65536, 65536, 128, 64)
    assert plans, "a non-empty problem launches at least one kernel"
    for plan in plans:
        assert set(plan) == {"kernel", "grid", "block", "dynamic_smem", "trips"}
        assert plan["grid"] >= 1 and plan["block"] % 32 == 0 and 0 < plan["block"] <= 1024
        assert 0 <= plan["dynamic_smem"] <= 99 * 1024, "a plan must fit every sm_80+ GPU (99 KiB per block on sm_86/89)"
        assert plan["trips"] and all(t >= 1 for t in plan["trips"])
    assert mod.launch_plans(op, mode, "bf16", 0, 65536, 128, 64) == [], "no rows: no launch"


@pytest.mark.parametrize("args,needle", [
    (("soft", "forward", "bf16", 1, 1, 1, 1), "op must be one of"),
    (("soft_contrastive", "topk", "bf16", 1, 1, 1, 1), "mode (for op 'soft_contrastive')"),
    (("hard_negative_topk", "topk", "fp64", 1, 1, 1, 1), "dtype must be one of"),
    (("hard_negative_topk", "topk", "bf16", 1, 1, 0, 1), "D must be >= 1"),
    (("hard_negative_topk", "topk", "bf16", 1, 1, 8, 0), "k must be >= 1"),
])
def test_launch_plans_rejects_bad_arguments_naming_them(args, needle):
    with pytest.raises(ValueError, match=None) as info:
        _host().launch_plans(*args)
    assert needle in str(info.value)

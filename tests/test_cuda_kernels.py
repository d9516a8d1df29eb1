"""The CUDA kernels: launch plans (csrc/launch_plans.h), the compiled cubins of the installed CUDA module, and the
tensor-core kernels run by the CPU emulation through the public ops.

The cubins are read from the built action_kernels._C itself (cuobjdump -xelf, the cuobjdump of the triton wheel):
no compile here, and what is checked is what was installed. Without a CUDA build those tests skip.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import action_kernels as ak
from action_kernels import cuda as ak_cuda
from action_kernels import dispatch
from action_kernels.reference import hard_negative_topk_ref
from action_kernels.testing import assert_close
from helpers import fresh_seed, require

pytestmark = pytest.mark.numerics  # .ci/run runs these again with the AVX2 paths forced

CXXFILT = shutil.which("c++filt")
SHAPES = [(65536, 65536, 128, 64), (300, 257, 7, 33), (50, 90, 512, 512), (1, 1, 256, 1), (1000, 4096, 64, 600)]
MODES = [("soft_contrastive", m) for m in ("forward", "forward_grad", "key_grad")] + [("hard_negative_topk", "topk")]


def _host():
    mod = ak_cuda.host_module()
    if mod is None:
        pytest.skip("the host build action_kernels._C_cpu is not built")
    return mod


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """{arch: {demangled kernel name: {"stack": bytes, "hmma": count}}} of the installed _C module's cubins."""
    modules = glob.glob(os.path.join(os.path.dirname(ak.__file__), "_C.*.so"))
    tool = _cuobjdump()
    if not modules or tool is None or CXXFILT is None:
        pytest.skip("needs the CUDA build action_kernels._C, triton's cuobjdump and c++filt")
    out = tmp_path_factory.mktemp("cubins")
    subprocess.run([tool, "-xelf", "all", modules[0]], cwd=out, check=True, capture_output=True)
    found = {}
    for cubin in sorted(out.glob("*.cubin")):
        arch = re.search(r"\.(sm_\d+)\.cubin$", cubin.name).group(1)
        res = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        stack = dict(re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:(\d+)", res))
        hmma, name = {}, None
        for line in sass.splitlines():
            m = re.search(r"Function : (\S+)", line)
            if m:
                name = m.group(1)
                hmma[name] = 0
            elif name and "HMMA" in line:
                hmma[name] += 1
        names = subprocess.run([CXXFILT], input="\n".join(stack), capture_output=True, text=True).stdout.splitlines()
        for mangled, pretty in zip(stack, names):
            found.setdefault(arch, {})[pretty] = {"stack": int(stack[mangled]), "hmma": hmma.get(mangled, 0)}
    assert set(found) >= {"sm_80", "sm_90"}, f"the module holds cubins for {sorted(found)}"
    return found


@pytest.mark.parametrize("op,mode", MODES)
def test_every_planned_kernel_is_in_the_built_cubins_with_tensor_cores_and_no_stack(cubins, op, mode):
    mod = _host()
    for dtype in ("bf16", "fp16", "fp32"):
        for n, k, d, top in SHAPES:
            for plan in mod.launch_plans(op, mode, dtype, n, k, d, top):
                for arch, kernels in cubins.items():
                    where = f"{op}/{mode}/{dtype} N={n} K={k} D={d} on {arch}: {plan['kernel']}"
                    assert plan["kernel"] in kernels, f"{where} is not in the cubins ({sorted(kernels)})"
                    got = kernels[plan["kernel"]]
                    assert got["hmma"] > 0, f"{where}: no HMMA (tensor-core) instruction"
                    assert got["stack"] == 0, f"{where}: {got['stack']} bytes of stack (spills)"


def test_cuda_module_holds_no_primitive_selftest_kernels(cubins):
    """csrc/selftest.cu builds into the emulation/test module _C_cpu only (setup.py, CMakeLists.txt)."""
    for arch, kernels in cubins.items():
        assert not [name for name in kernels if "selftest" in name], f"{arch}: self-test kernels in _C"


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


# ---- the tensor-core kernels through the public ops, run by the CPU emulation (action_kernels._C_cpu) ----------
# Shapes are ragged (N, K, D multiples of no tile) and cover every feature bucket (64, 128, 256, 512); float64
# references on the same rounded inputs; tolerances from action_kernels.testing.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _soft_case(shape, num_keys, dtype, seed, correlated=True):
    """Student, teacher (correlated with it unless not `correlated`) and keys, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g)
    t = (s if correlated else 0) + 0.7 * torch.randn(shape, generator=g)
    k = torch.randn(num_keys, shape[1], generator=g)
    return s.to(dtype), t.to(dtype), k.to(dtype)


def _soft_run(backend, s, t, k, taus, scale=1.0):
    s = s.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    loss = ak.soft_contrastive_loss(s, t, k, *taus, reduction="none", backend=backend)
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    ((loss * w).sum() * scale).backward()
    return loss.detach(), s.grad, k.grad


def _soft_check(s, t, k, taus, dtype, where, scale=1.0):
    got = _soft_run("cuda", s, t, k, taus, scale)
    ref = _soft_run("torch", s.double(), t.double(), k.double(), taus, scale)
    tau_min = min(taus)
    for name, x, r in zip(("loss", "row grad", "key grad"), got, ref):
        assert_close(f"{name} [{where}]", x.double(), r, dtype, tau_min)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,keys,d", [(70, 83, 7), (45, 130, 100), (33, 40, 200), (21, 29, 300)])
def test_soft_kernels_match_reference_for_every_dtype_bucket_and_temperature_extreme(dtype, n, keys, d):
    require("cuda", dtype=dtype)
    seed = fresh_seed()
    # Both extremes on each side. Not (1, 1): there the KL of unit vectors is ~1e-2, a difference of log-sum-exps
    # near log K, which fp32 rounds to ~5e-5 relative in every backend (chunked alike), above fp32's 2e-5.
    for taus in ((0.01, 0.01), (1.0, 0.01), (0.01, 1.0)):
        s, t, k = _soft_case((n, d), keys, dtype, seed)
        _soft_check(s, t, k, taus, dtype, f"{dtype} N={n} K={keys} D={d} taus={taus} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_kernels_read_channel_first_and_strided_maps_in_place(dtype):
    require("cuda", dtype=dtype)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 24, 5, 7, generator=g).to(dtype)  # (B, D, H, W): the feature stride is H W
    t = torch.randn(2, 24, 5, 14, generator=g).to(dtype)[..., ::2]  # a strided spatial axis
    k = torch.randn(50, 48, generator=g).to(dtype)[:, ::2]  # keys with feature stride 2 (streamed: padded copy)
    _soft_check(s, t, k, (0.1, 0.05), dtype, f"maps {dtype} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_rows_keep_the_masked_key_columns_out_of_the_loss(dtype):
    """Rows of norm ~1e-9 make the folded scale c = rs log2(e) / τ about 1e10, so the mask of the key columns past K
    (-1e30) times c overflowed to -inf for student and teacher alike, and -inf - (-inf) made every row's loss NaN."""
    require("cuda", dtype=dtype)
    seed = fresh_seed()
    s, t, k = _soft_case((37, 24), 45, torch.float32, seed)  # K = 45: a ragged last key tile
    s, t, k = (x * 1e-10 for x in (s, t, k))
    _soft_check(s.to(dtype), t.to(dtype), k.to(dtype), (0.05, 0.01), dtype, f"tiny rows {dtype} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_kernels_three_runs_bitwise_equal(dtype):
    require("cuda", dtype=dtype)
    s, t, k = _soft_case((2, 36, 3, 5), 70, dtype, fresh_seed())
    runs = [_soft_run("cuda", s, t, k, (0.1, 0.01)) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _topk_case(n, num_keys, d, dtype, seed, classes=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g).to(dtype)
    keys = torch.randn(num_keys, d, generator=g).to(dtype)
    ya = torch.randint(0, classes, (n,), generator=g)
    yk = torch.where(torch.rand(num_keys, generator=g) < 0.7, 0, torch.randint(-1, classes, (num_keys,), generator=g))
    return a, ya, keys, yk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,keys,d,k", [(40, 300, 7, 5), (35, 200, 100, 64), (20, 140, 200, 150),
                                        (18, 600, 300, 512)])
def test_topk_kernel_matches_reference_for_every_dtype_and_bucket(dtype, n, keys, d, k):
    require("cuda", dtype=dtype)
    seed = fresh_seed()
    a, ya, kk, yk = _topk_case(n, keys, d, dtype, seed)
    v, i = ak.hard_negative_topk(a, ya, kk, yk, k, backend="cuda")
    v0, i0 = hard_negative_topk_ref(a.double(), ya, kk.double(), yk, k)
    where = f"{dtype} N={n} K={keys} D={d} k={k} seed={seed}"
    assert torch.equal(torch.isfinite(v), torch.isfinite(v0)), f"padding [{where}]"
    fin = torch.isfinite(v0)
    assert (v.double()[fin] - v0[fin]).abs().max().item() <= 2e-6, f"values [{where}]"
    mismatch = (i != i0) & fin
    if mismatch.any():  # the order may differ only among values tied within rounding
        assert bool(((v.double() - v0).abs() <= 2e-6)[mismatch].all()), f"indices beyond ties [{where}]"
    assert torch.equal(i[~fin], torch.full_like(i[~fin], -1)), f"padding indices [{where}]"


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_kernel_three_runs_bitwise_equal_with_many_ties(dtype):
    require("cuda", dtype=dtype)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    # integers in [-100, 100] (exact in bf16 and fp16): every product and sum of a dot product is exact, so the 40
    # copies of a key tie bitwise in the kernel, and the expected order below does not depend on a matmul's
    # rounding at different matrix positions (which differs on AVX2 CPUs)
    a = torch.randint(-100, 101, (30, 16), generator=g).to(dtype)
    distinct = torch.randint(-100, 101, (8, 16), generator=g)
    keys = distinct.to(dtype).repeat(40, 1)  # every key 40 times: ties everywhere
    yk = torch.randint(0, 3, (320,), generator=g)
    ya = torch.randint(0, 3, (30,), generator=g)
    runs = [ak.hard_negative_topk(a, ya, keys, yk, 70, backend="cuda") for _ in range(3)]
    assert all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][1], r[1]) for r in runs[1:])
    v, i = runs[0]
    tied = (v[:, 1:] == v[:, :-1]) & torch.isfinite(v[:, 1:])
    assert tied.any() and bool((i[:, 1:] > i[:, :-1])[tied].all()), "equal values go to the lower index first"
    # the expected order: float64 cosines of the 8 distinct keys (one value per distinct key, shared by its copies),
    # masked, stable-sorted: ties to the lower index; distinct keys closer than fp32 rounding may swap
    cos = torch.nn.functional.normalize(a.double(), dim=1) @ torch.nn.functional.normalize(distinct.double(), dim=1).T
    sim = cos[:, torch.arange(320) % 8].masked_fill(ya[:, None] == yk[None, :], float("-inf"))
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :70]
    v0 = sim.gather(1, order)
    where = f"{dtype} seed={seed}"
    assert (v.double() - v0).abs().max().item() <= 2e-6, f"values [{where}]"
    mismatch = i != order  # allowed only between different keys whose cosines agree within fp32 rounding
    near = ((v.double() - v0).abs() <= 2e-6) & (i % 8 != order % 8)
    assert bool(near[mismatch].all()), f"indices beyond ties [{where}]"


def test_emulated_launches_are_the_launch_plans():
    """The launchers take grid, block and shared memory from launch_plans (the report reads the same)."""
    require("cuda")
    mod = _host()
    s, t, k = _soft_case((50, 100), 90, torch.bfloat16, 1)
    mod.emulated_launches()
    _soft_run("cuda", s, t, k, (0.1, 0.05))
    got = mod.emulated_launches()
    plans = (mod.launch_plans("soft_contrastive", "forward_grad", "bf16", 50, 90, 100)
             + mod.launch_plans("soft_contrastive", "key_grad", "bf16", 50, 90, 100))
    assert [(r["grid"], r["block"], r["dynamic_smem"]) for r in got] == \
        [(p["grid"], p["block"], p["dynamic_smem"]) for p in plans]
    a, ya, kk, yk = _topk_case(40, 70, 33, torch.float32, 2)
    ak.hard_negative_topk(a, ya, kk, yk, 9, backend="cuda")
    got = mod.emulated_launches()
    plan = mod.launch_plans("hard_negative_topk", "topk", "fp32", 40, 70, 33, 9)
    assert [(r["grid"], r["block"], r["dynamic_smem"]) for r in got] == \
        [(p["grid"], p["block"], p["dynamic_smem"]) for p in plan]


def test_features_beyond_the_largest_bucket_are_refused_by_the_registry_and_the_launcher():
    require("cuda")
    x = torch.randn(4, 600)
    with pytest.raises(RuntimeError, match="cuda takes D <= 512"):
        ak.soft_contrastive_loss(x, x, torch.randn(5, 600), backend="cuda")
    with pytest.raises(RuntimeError, match="cuda takes D <= 512"):
        ak.hard_negative_topk(x, torch.zeros(4, dtype=torch.long), torch.randn(5, 600), torch.ones(5, dtype=torch.long),
                              2, backend="cuda")
    ones = torch.ones(4)
    with pytest.raises(NotImplementedError, match="D <= 512"):  # the launcher's last-line check
        dispatch.kernels("hard_negative_topk", "cuda").hard_negative_topk(
            x[None], torch.zeros(4, dtype=torch.long), torch.randn(5, 600), torch.ones(5, dtype=torch.long), ones,
            torch.ones(5), 2, -1)

"""GPU checks (pytest -m cuda; skipped without a CUDA device): every backend on CUDA tensors against the float64
reference, 16-bit inputs included, plus determinism of the fused kernels. Run by tools/gpu/gpu_check.sh."""
import pytest
import torch

import action_kernels as ak
from action_kernels import dispatch
from action_kernels.reference import hard_negative_topk_ref
from action_kernels.testing import assert_close
from helpers import FUSED, make_soft, make_topk, run_soft

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

BACKENDS = FUSED
SHAPES = [((1000, 64), 4099), ((2, 130, 33, 17), 1023), ((2, 64, 5, 12, 13), 515)]


def _need(backend, dtype=torch.float32):
    narrower, by_design = dispatch.REGISTRY[backend].device_dtypes.get("cuda", (None, ""))
    if narrower is not None and dtype not in narrower:
        pytest.skip(f"{backend} takes no {dtype} CUDA tensors by design: {by_design}")
    why = dispatch.unavailable_reason(backend, torch.device("cuda"), dtype)
    if why:
        pytest.fail(f"backend {backend!r} should run on this GPU: {why}")


def _cuda(*xs):
    return [None if x is None else x.cuda().requires_grad_(x.requires_grad) for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,num_keys", SHAPES)
def test_soft_contrastive_on_gpu_matches_reference(backend, dtype, shape, num_keys):
    _need(backend, dtype)
    for taus, weighted in (((0.1, 0.01), True), ((1.0, 0.5), False)):
        s, t, k, w = make_soft(shape, num_keys, dtype, 1234, weighted, keys_grad=True)
        got = run_soft(backend, *_cuda(s, t, k), taus, None if w is None else w.cuda(), "mean")
        ref = run_soft("torch", s.double(), t.double(), k.double(), taus, None if w is None else w.double(), "mean")
        where = f"{backend} {shape} K={num_keys} {dtype} taus={taus}"
        assert_close(f"loss [{where}]", got[0].cpu(), ref[0], dtype, min(taus))
        assert_close(f"student grad [{where}]", got[1].cpu(), ref[1], dtype, min(taus))
        assert_close(f"keys grad [{where}]", got[2].cpu(), ref[2], dtype, min(taus))


@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_fused_soft_contrastive_is_bitwise_deterministic_on_gpu(backend):
    _need(backend, torch.bfloat16)
    s, t, k, w = make_soft((2, 64, 48, 48), 3000, torch.bfloat16, 7, True, True)
    runs = [run_soft(backend, *_cuda(s, t, k), (0.1, 0.01), w.cuda(), "mean") for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 64, 512])
def test_topk_on_gpu_matches_brute_force(backend, dtype, k):
    _need(backend, dtype)
    a, ya, keys, yk = make_topk(3000, 5000, 128, 4, 99, skew=True)
    a, keys = a.to(dtype), keys.to(dtype)  # the reference reads the same (rounded) inputs in float64
    v, i = ak.hard_negative_topk(a.cuda(), ya.cuda(), keys.cuda(), yk.cuda(), k, backend=backend)
    v0, i0 = hard_negative_topk_ref(a.double(), ya, keys.double(), yk, k)
    v, i = v.cpu(), i.cpu()
    assert torch.equal(torch.isfinite(v), torch.isfinite(v0))
    fin = torch.isfinite(v0)
    assert (v[fin].double() - v0[fin]).abs().max() < 1e-5
    mismatch = i != i0
    assert bool(((v.double() - v0).abs() <= 1e-5)[mismatch].all()), "indices differ beyond ties"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_anatomical_contrast_on_gpu_matches_cpu(backend, dtype):
    _need(backend, dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1024, 256, generator=g).to(dtype)
    yq = torch.arange(1024) % 4
    keys = torch.randn(8192, 256, generator=g).to(dtype)
    yk = torch.randint(-1, 4, (8192,), generator=g)
    protos, _ = ak.class_prototypes(keys, yk, 4)
    cpu = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, backend="chunked")
    qg = q.cuda().requires_grad_(True)
    gpu = ak.anatomical_contrast_loss(qg, yq.cuda(), protos.cuda(), keys.cuda(), yk.cuda(), backend=backend)
    gpu.backward()
    # the same rounded inputs on both sides; a 16-bit loss is itself rounded to its dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-2 * max(1.0, abs(cpu.item()))
    assert abs(gpu.item() - cpu.item()) < tol and torch.isfinite(qg.grad).all()

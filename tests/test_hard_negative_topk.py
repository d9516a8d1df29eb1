"""Hard-negative top-k: every backend equals the brute-force reference; padding, ties, ignore labels, gradients."""
import pytest
import torch

import action_kernels as ak
from action_kernels.reference import hard_negative_topk_ref
from action_kernels.testing import assert_allowed
from helpers import FAST_ON_CPU, INTERPRETED_ON_CPU, assert_topk_equal, fresh_seed, make_topk, require

pytestmark = pytest.mark.numerics  # .ci/run runs these again with the AVX2 paths forced


@pytest.mark.parametrize("backend", FAST_ON_CPU)
@pytest.mark.parametrize("n,keys,d,k", [(37, 19, 7, 1), (300, 257, 64, 33), (64, 600, 130, 512), (50, 90, 16, 64)])
def test_topk_matches_brute_force(backend, n, keys, d, k):
    require(backend)
    seed = fresh_seed()
    for skew in (False, True):
        a, ya, kk, yk = make_topk(n, keys, d, 4, seed, skew)
        got = ak.hard_negative_topk(a, ya, kk, yk, k, backend=backend)
        assert_topk_equal(got, hard_negative_topk_ref(a, ya, kk, yk, k), f"{backend} n={n} K={keys} k={k} seed={seed}")


@pytest.mark.parametrize("backend", INTERPRETED_ON_CPU)  # smaller shapes: the interpreter's tl.topk is slow
def test_interpreted_topk_matches_brute_force(backend):
    require(backend)
    seed = fresh_seed()
    for n, keys, d, k in [(20, 100, 16, 8), (24, 150, 33, 40)]:
        a, ya, kk, yk = make_topk(n, keys, d, 3, seed, skew=n == 24)
        got = ak.hard_negative_topk(a, ya, kk, yk, k, backend=backend)
        assert_topk_equal(got, hard_negative_topk_ref(a, ya, kk, yk, k), f"{backend} n={n} k={k} seed={seed}")


@pytest.mark.parametrize("backend", FAST_ON_CPU + ("torch",))
def test_ties_go_to_the_lower_index(backend):
    require(backend)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    yk = torch.tensor([1, 1, 1, 1, 1])
    v, i = ak.hard_negative_topk(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), keys, yk, 4, backend=backend)
    assert i.tolist() == [[0, 2, 3, 4]]  # four keys tie at cosine 1: the lowest indices, in order
    assert torch.allclose(v, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("backend", FAST_ON_CPU + ("torch",))
def test_topk_pads_with_minus_one_when_fewer_candidates_than_k(backend):
    require(backend)
    a, ya, kk, _ = make_topk(10, 12, 8, 3, 0)
    yk = torch.full((12,), -1)
    yk[:3] = 0
    yk[3:5] = 1
    v, i = ak.hard_negative_topk(a, ya, kk, yk, 20, backend=backend)  # k > K
    for row in range(10):
        allowed = {j for j in range(12) if yk[j] not in (-1, ya[row])}
        chosen = set(i[row][i[row] >= 0].tolist())
        assert chosen == allowed
        assert torch.isinf(v[row, len(allowed):]).all() and (i[row, len(allowed):] == -1).all()


@pytest.mark.parametrize("backend", FAST_ON_CPU)
def test_ignored_and_same_class_keys_are_never_selected(backend):
    require(backend)
    a, ya, kk, yk = make_topk(80, 200, 16, 3, fresh_seed())
    _, i = ak.hard_negative_topk(a, ya, kk, yk, 150, backend=backend)
    picked = i >= 0
    labels = yk[i.clamp_min(0)]
    assert not (picked & (labels == -1)).any()
    assert not (picked & (labels == ya[:, None])).any()


@pytest.mark.parametrize("backend", FAST_ON_CPU)
def test_topk_values_gradient_matches_reference(backend):
    require(backend)
    a, ya, kk, yk = make_topk(40, 70, 12, 3, fresh_seed(), maps=True)
    a1, k1 = a.clone().requires_grad_(True), kk.clone().requires_grad_(True)
    a2, k2 = a.double().requires_grad_(True), kk.double().requires_grad_(True)
    v1, i1 = ak.hard_negative_topk(a1, ya, k1, yk, 9, backend=backend)
    v2, i2 = hard_negative_topk_ref(a2, ya, k2, yk, 9)
    assert torch.equal(i1, i2)
    w = torch.rand(v1.shape)
    (torch.where(torch.isfinite(v1), v1, 0) * w).sum().backward()
    (torch.where(torch.isfinite(v2), v2, 0) * w.double()).sum().backward()
    assert_allowed("anchor grad", a1.grad, a2.grad, "topk_grad_fp32")
    assert_allowed("key grad", k1.grad, k2.grad, "topk_grad_fp32")


def test_topk_three_runs_bitwise_equal_and_library_op_checks():
    a, ya, kk, yk = make_topk(45, 60, 10, 3, fresh_seed())
    runs = [ak.hard_negative_topk(a, ya, kk, yk, 7, backend="chunked") for _ in range(3)]
    assert all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][1], r[1]) for r in runs[1:])
    from action_kernels.ops.hard_negative_topk import _topk_op
    torch.library.opcheck(_topk_op, (a.unsqueeze(0).requires_grad_(True), ya, kk, yk, 7, -1, True, "chunked"))


def test_chunked_torch_selection_fallback_matches(monkeypatch):
    from action_kernels.chunked import hard_negative_topk as chunked

    monkeypatch.setattr(chunked, "USE_NATIVE", False)
    a, ya, kk, yk = make_topk(70, 130, 20, 4, fresh_seed(), skew=True)
    assert_topk_equal(ak.hard_negative_topk(a, ya, kk, yk, 16, backend="chunked"),
                       hard_negative_topk_ref(a, ya, kk, yk, 16), "torch fallback")


@pytest.mark.parametrize("k,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_bad_k_is_rejected(k, error):
    a, ya, kk, yk = make_topk(4, 5, 3, 2, 0)
    with pytest.raises(error, match="k must be"):
        ak.hard_negative_topk(a, ya, kk, yk, k)


def test_bad_labels_are_rejected_with_the_argument_name():
    a, ya, kk, yk = make_topk(4, 5, 3, 2, 0)
    with pytest.raises(ValueError, match="anchor_labels must have 4 elements"):
        ak.hard_negative_topk(a, ya[:3], kk, yk, 2)
    with pytest.raises(TypeError, match="key_labels must hold integer class labels"):
        ak.hard_negative_topk(a, ya, kk, yk.float(), 2)


def test_empty_anchors_give_empty_results():
    _, _, kk, yk = make_topk(4, 5, 3, 2, 0)
    v, i = ak.hard_negative_topk(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), kk, yk, 4)
    assert v.shape == (0, 4) and i.shape == (0, 4)


def test_miner_module_matches_functional():
    a, ya, kk, yk = make_topk(30, 40, 8, 3, 1)
    miner = ak.HardNegativeMiner(k=5)
    assert torch.equal(miner(a, ya, kk, yk)[1], ak.hard_negative_topk(a, ya, kk, yk, 5)[1])
    assert "k=5" in repr(miner)


@pytest.mark.parametrize("backend", FAST_ON_CPU)
def test_autograd_functions_equal_the_functionals_values_and_gradients(backend):
    require(backend)
    a, ya, kk, yk = make_topk(30, 50, 8, 3, fresh_seed())
    a1, k1 = a.clone().requires_grad_(True), kk.clone().requires_grad_(True)
    v1, i1 = ak.hard_negative_topk(a1, ya, k1, yk, 6, backend=backend)
    a2, k2 = a.clone().requires_grad_(True), kk.clone().requires_grad_(True)
    v2, i2 = ak.HardNegativeTopkFunction.apply(a2.unsqueeze(0), ya, k2, yk, 6, -1, True, backend)
    assert torch.equal(v1, v2) and torch.equal(i1, i2) and not i2.requires_grad
    w = torch.rand(v1.shape)
    (torch.where(torch.isfinite(v1), v1, 0) * w).sum().backward()
    (torch.where(torch.isfinite(v2), v2, 0) * w).sum().backward()
    assert torch.equal(a1.grad, a2.grad) and torch.equal(k1.grad, k2.grad)
    idx = i1.clamp_min(0)
    a3, k3 = a.clone().requires_grad_(True), kk.clone().requires_grad_(True)
    cos = ak.IndexedCosineFunction.apply(a3.unsqueeze(0), k3, idx, True)
    assert torch.equal(cos, ak.indexed_cosine(a, kk, idx))
    cos.sum().backward()
    assert torch.isfinite(a3.grad).all() and k3.grad.abs().sum() > 0


_PEAK = """
import json, torch
torch.set_num_threads(1)
import action_kernels as ak
def rss(field):
    return int([line for line in open('/proc/self/status') if line.startswith(field)][0].split()[1]) * 1024
g = torch.Generator().manual_seed(0)
a, keys = torch.randn(1024, 128, generator=g), torch.randn(20480, 128, generator=g)
ya, yk = torch.randint(0, 4, (1024,), generator=g), torch.randint(0, 4, (20480,), generator=g)
def run(n, keys_grad):
    a1, k1 = a[:n].clone().requires_grad_(True), keys.clone().requires_grad_(keys_grad)
    ak.hard_negative_topk(a1, ya[:n], k1, yk, 256, backend="chunked")[0].sum().backward()
run(8, True)  # warm-up: libraries, the same paths
peaks = {}
for keys_grad in (False, True):
    open('/proc/self/clear_refs', 'w').write('5')
    base = rss('VmRSS')
    run(1024, keys_grad)
    peaks[str(keys_grad)] = (rss('VmHWM') - base) / 2**20
print(json.dumps(peaks))
"""


def test_chunked_topk_key_gradient_is_row_chunked_like_its_forward():
    """N = 1,024 anchors, K = 20,480 keys (K > 64 k: the sparse key gradient), D = 128, k = 256: the key gradient
    gathered every selected row at once, (N, k, D) twice (+250 MiB over the +68 MiB of the no-key-grad path, and at
    N = 8,192, K = 65,536 +2.4 GB, more than the N x K matrix the path exists to avoid); row-chunked it stays within
    2x of the no-key-grad peak. Peak RSS in a subprocess, freed blocks returned at once (MALLOC_MMAP_THRESHOLD_)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["True"] <= 2 * peaks["False"] and peaks["True"] < 160, peaks


@pytest.mark.parametrize("backend", ("torch",) + FAST_ON_CPU + INTERPRETED_ON_CPU)
def test_topk_with_an_empty_bank_pads_and_differentiates_to_zero(backend):
    # K = 0 with D % 4 != 0 (the cuda launcher refused: the empty keys were not "uniform rows"), and the backward with
    # keys.requires_grad (chunked and cuda scattered into a (c, 0) block)
    require(backend)
    for d in (16, 13):
        a = torch.randn(5, d, requires_grad=True)
        keys = torch.randn(0, d, requires_grad=True)
        values, idx = ak.hard_negative_topk(a, torch.zeros(5, dtype=torch.long), keys, torch.zeros(0, dtype=torch.long),
                                            3, backend=backend)
        assert bool((values == float("-inf")).all()) and bool((idx == -1).all())
        values.masked_fill(torch.isinf(values), 0.0).sum().backward()
        assert torch.equal(a.grad, torch.zeros_like(a)) and keys.grad.shape == (0, d)

"""Behaviour specific to the Triton kernels' designs (TRITON_INTERPRET=1 on CPU): the top-k's prunes, exact-tie
fallback, label renumbering and selection paths; the soft-contrastive kernels' padding and launch capture.

The backend-agnostic checks against the float64 reference are in test_soft_contrastive_backends.py,
test_hard_negative_topk.py and test_anatomical_contrast.py. About 40 s in all.
"""
import pytest
import torch

import action_kernels as ak
from action_kernels.reference import hard_negative_topk_ref
from helpers import assert_topk_equal, require
from helpers import fresh_seed as _seed
from helpers import make_topk as _make

pytestmark = pytest.mark.numerics  # .ci/run runs these again with the AVX2 paths forced


@pytest.fixture
def ttk():
    require("triton")
    from action_kernels.triton import hard_negative_topk
    return hard_negative_topk


def test_topk_stays_exact_through_many_prunes(ttk, monkeypatch):
    # 128 slots a row (96 before a prune) against 700 keys: a row prunes several times
    monkeypatch.setitem(ttk.BUFFERS, 64, (128, 8))
    seed = _seed()
    for skew in (False, True):
        a, ya, kk, yk = _make(70, 700, 40, 4, seed, skew)
        got = ak.hard_negative_topk(a, ya, kk, yk, 20, backend="triton")
        assert_topk_equal(got, hard_negative_topk_ref(a, ya, kk, yk, 20), f"prunes skew={skew} seed={seed}")


def test_topk_stays_exact_when_tiles_overflow_and_run_again(ttk, monkeypatch):
    # keys in increasing similarity to every anchor up to a cut, then dissimilar ones: every key before the cut beats
    # the threshold, so a tile overflows a row's 128 slots every few tiles; its appends must be dropped before the
    # prune and the tile run again. Checked on the scan's own slots (each key at most once, the k best all there)
    # and on the result.
    from action_kernels.triton import _common
    monkeypatch.setitem(ttk.BUFFERS, 64, (128, 8))
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    d, n, m, k = 16, 40, 610, 20
    base = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    a = base + 0.001 * torch.randn(n, d, generator=g)
    side = torch.randn(m, d, generator=g)
    side = torch.nn.functional.normalize(side - (side @ base)[:, None] * base, dim=1)
    ya, yk = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    for cut in (400, 432, 464, 496):
        theta = torch.cat([torch.linspace(3.0, 0.05, cut), torch.empty(m - cut).uniform_(1.6, 3.0, generator=g)])
        keys = torch.cos(theta)[:, None] * base + torch.sin(theta)[:, None] * side
        want = hard_negative_topk_ref(a, ya, keys, yk, k)
        values, indices = torch.empty(n, k), torch.empty(n, k, dtype=torch.int64)
        ra, rk = 1 / a.norm(dim=1), 1 / keys.norm(dim=1)
        scan, select = ttk.topk_launches(a[None], ya, keys, yk, ra, rk, k, -1, values, indices)
        _common.launch(scan)
        buf, cnt = scan.args["Buf"], scan.args["Cnt"]
        assert int(cnt.max()) <= 128, f"cut={cut}: a count past W after the scan: {int(cnt.max())}"
        for i in range(n):
            live = (buf[i, :int(cnt[i])] & 0xFFFFFFFF).tolist()
            assert len(live) == len(set(live)), f"cut={cut} row {i}: a key twice in the slots: {sorted(live)}"
            assert set(want[1][i].tolist()) <= set(live), f"cut={cut} row {i}: a best key missing from the slots"
        _common.launch(select)
        assert_topk_equal((values, indices), want, f"cut={cut} seed={seed}")


def test_topk_exact_ties_beyond_the_buffer_go_to_the_lower_indices(ttk):
    # every key equal: each row's similarities all tie, the bisection cannot separate them, the exact select runs.
    # Ties exact by construction (small integers: every product and sum is exact in fp32 and fp64, in any order, so
    # the ties do not depend on the CPU's matmul kernel), and the expected order by construction too: the first k
    # candidates of each row in index order.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 9, (20, 16), generator=g).float()
    keys = torch.randint(-8, 9, (1, 16), generator=g).float().repeat(400, 1)
    ya, yk = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (400,), generator=g)
    for k in (8,):
        v, i = ak.hard_negative_topk(a, ya, keys, yk, k, backend="triton")
        want = torch.stack([(yk != y).nonzero()[:k, 0] for y in ya])
        assert torch.equal(i, want), f"k={k}: {i[0].tolist()} != {want[0].tolist()}"
        assert bool((v == v[:, :1]).all()), "tied values must be bitwise equal"
        v0, _ = hard_negative_topk_ref(a, ya, keys, yk, k)
        assert torch.allclose(v, v0.float(), atol=2e-6)


def test_topk_labels_outside_int32_are_compared_exactly(ttk):
    g = torch.Generator().manual_seed(1)
    a, keys = torch.randn(30, 24, generator=g), torch.randn(90, 24, generator=g)
    big = 2**40
    ya = big + torch.randint(0, 3, (30,), generator=g)            # big, big + 1, big + 2: distinct as int64,
    yk = big + torch.randint(-1, 3, (90,), generator=g)           # equal after truncation to int32 with 2**40 + x
    yk[::7] = -1
    got = ak.hard_negative_topk(a, ya, keys, yk, 16, ignore_label=-1, backend="triton")
    assert_topk_equal(got, hard_negative_topk_ref(a, ya, keys, yk, 16, ignore_label=-1), "int64 labels")


@pytest.mark.slow
def test_topk_selection_by_tl_topk_matches_the_interpreter_shortcut(ttk, monkeypatch):
    a, ya, kk, yk = _make(16, 100, 24, 3, _seed(), skew=True)
    fast = ak.hard_negative_topk(a, ya, kk, yk, 12, backend="triton")
    monkeypatch.setattr(ttk, "INTERPRETER_SELECT_BY_MAX", False)  # the path the GPU compiles
    sort = ak.hard_negative_topk(a, ya, kk, yk, 12, backend="triton")
    assert torch.equal(fast[1], sort[1]) and torch.equal(fast[0], sort[0])


def test_topk_three_runs_are_bitwise_equal(ttk):
    a, ya, kk, yk = _make(64, 300, 32, 4, _seed(), skew=True)
    runs = [ak.hard_negative_topk(a, ya, kk, yk, 24, backend="triton") for _ in range(3)]
    for v, i in runs[1:]:
        assert torch.equal(v, runs[0][0]) and torch.equal(i, runs[0][1])


def test_topk_above_512_is_refused_with_the_alternatives_named(ttk):
    a, ya, kk, yk = _make(8, 600, 16, 3, 0)
    with pytest.raises(RuntimeError, match="triton takes k <= 512.*use backend=.*'chunked'"):
        ak.hard_negative_topk(a, ya, kk, yk, 513, backend="triton")
    with pytest.raises(NotImplementedError, match="at most 512.*backend='chunked'"):  # the launcher's last-line check
        ttk.hard_negative_topk(a[None], ya, kk, yk, torch.ones(8), torch.ones(600), 513, -1)


def test_dense_labels_are_equal_exactly_where_the_labels_are(ttk):
    ya = torch.tensor([5, -1, 2**40, 7, 5])
    yk = torch.tensor([2**40 + 1, 5, -1, 2**40, 3, 2**40 + 1])
    da, dk = ttk.dense_labels(ya, yk)
    assert da.dtype == dk.dtype == torch.int32
    assert torch.equal(ya[:, None] == yk[None, :], da[:, None] == dk[None, :])


def test_launch_capture_records_the_launchers_decisions_without_running(monkeypatch):
    require("triton")
    from action_kernels.triton import _common
    from action_kernels.triton import soft_contrastive as tsc

    s = torch.empty((1, 1000, 96), device="meta", dtype=torch.bfloat16)
    k = torch.empty((700, 96), device="meta", dtype=torch.bfloat16)
    r = torch.empty(1000, device="meta")
    with _common.capture(90) as launches:
        tsc.soft_contrastive_forward(s, s, k, r, r, torch.empty(700, device="meta"), 10.0, 100.0, True)
    assert [x.name for x in launches] == ["forward", "row_grad"]
    fwd = launches[0]
    assert fwd.args["S"].shape == (1000, 128) and fwd.constexprs["BLOCK_D"] == 128  # D = 96 padded to 128
    cfg = tsc.config("forward", 90, torch.bfloat16, 128)
    assert fwd.constexprs["BLOCK_M"] == cfg["BLOCK_M"] and fwd.constexprs["BLOCK_N"] == cfg["BLOCK_N"]
    assert fwd.args["N"] == 1000 and fwd.args["K"] == 700


def test_soft_contrastive_ragged_feature_size_is_padded_not_misread():
    require("triton")
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 70, 9, generator=g).requires_grad_(True)   # (B, D=70, P) channel-first: padded to 128
    t = torch.randn(2, 70, 9, generator=g)
    k = torch.randn(45, 70, generator=g).requires_grad_(True)
    got = ak.soft_contrastive_loss(s, t, k, 0.1, 0.01, backend="triton")
    got.backward()
    sd, kd = s.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    ref = ak.soft_contrastive_loss_ref(sd, t.double(), kd, 0.1, 0.01)
    ref.backward()
    from action_kernels.testing import assert_close
    assert_close("loss", got.detach(), ref.detach(), torch.float32, 0.01)
    assert_close("student grad", s.grad, sd.grad, torch.float32, 0.01)
    assert_close("keys grad", k.grad, kd.grad, torch.float32, 0.01)

"""Nothing silent in the ops (issue 15): the NaN/Inf policy on every backend, extreme accepted values, value checks
under torch.compile, double backward, and native entry points that fail with a Python exception instead of
reading out of bounds or aborting the process."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import action_kernels as ak
import helpers
from action_kernels import _extension, dispatch
from action_kernels.ops import _normalization
from action_kernels.testing import assert_allowed, assert_close, tolerance

BACKENDS = dispatch.BACKENDS  # torch, chunked, triton (interpreter), cuda (emulation build): all run on CPU here
NAN, INF = float("nan"), float("inf")


def _soft_inputs(seed=0, n=6, k=5, d=8):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d, generator=g)
    return s, s + 0.5 * torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def _soft_rows_and_grads(backend, s, t, k, normalize=True):
    s, k = s.clone().requires_grad_(True), k.clone().requires_grad_(True)
    rows = ak.soft_contrastive_loss(s, t, k, 0.2, 0.1, reduction="none", normalize=normalize, backend=backend)
    (rows * torch.linspace(0.5, 1.5, rows.numel())).sum().backward()
    return rows.detach(), s.grad, k.grad


# -- the NaN/Inf policy, identical on every backend ------------------------------------------------------------
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["student", "teacher", "keys"])
@pytest.mark.parametrize("normalize", [True, False])
def test_soft_loss_nan_policy_is_the_same_on_every_backend(where, value, normalize):
    """A non-finite value in row 2 of student or teacher makes loss row 2 NaN and its student gradient row NaN,
    the key gradient NaN, the other rows exact; one in a key makes everything NaN."""
    s, t, k = _soft_inputs()
    clean = _soft_rows_and_grads("torch", s.double(), t.double(), k.double(), normalize)
    {"student": s, "teacher": t, "keys": k}[where][2, 3] = value
    nan_rows = torch.ones(6, dtype=torch.bool) if where == "keys" else torch.arange(6) == 2
    for backend in BACKENDS:
        helpers.require(backend)
        rows, ds, dk = _soft_rows_and_grads(backend, s, t, k, normalize)
        assert torch.equal(torch.isnan(rows), nan_rows), (backend, rows)
        assert torch.equal(torch.isnan(ds).any(1), nan_rows) and torch.equal(torch.isnan(ds).all(1), nan_rows)
        assert bool(torch.isnan(dk).all()), backend
        good = ~nan_rows
        if good.any():
            # the fp32 kernels' own error on these rows, relative to the largest (the tolerance table's rule)
            assert_close(f"finite loss rows [{backend}]", rows[good], clean[0][good], torch.float32, 0.1)
            assert_close(f"finite student gradient rows [{backend}]", ds[good], clean[1][good], torch.float32, 0.1)


def _topk_inputs():
    g = torch.Generator().manual_seed(1)
    a, keys = torch.randn(8, 6, generator=g), torch.randn(10, 6, generator=g)
    ya = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    yk = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, -1, 1])
    return a, ya, keys, yk


def _topk_run(backend, a, ya, keys, yk, k=4, normalize=True):
    a, keys = a.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    values, idx = ak.hard_negative_topk(a, ya, keys, yk, k, normalize=normalize, backend=backend)
    g = torch.linspace(0.5, 1.5, values.numel()).view(values.shape)
    torch.where(torch.isfinite(values), values * g, values.new_zeros(())).sum().backward()
    return values.detach(), idx, a.grad, keys.grad


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_nan_policy_poisons_exactly_the_rows_that_rank_a_non_finite_key(value, normalize):
    """Key 1 (label 1) is non-finite: rows of labels 0, 2, 3 have it as a candidate and get values NaN, indices -1;
    rows of label 1 do not and are exact; anchor 6 non-finite poisons its own row. Gradients: NaN exactly for the
    poisoned anchors and the non-finite key. The same on every backend."""
    a, ya, keys, yk = _topk_inputs()
    clean = _topk_run("torch", a.double(), ya, keys.double(), yk, normalize=normalize)
    keys[1, 2] = value
    a[6, 0] = value
    poisoned = torch.tensor([True, True, False, False, True, True, True, True])
    for backend in BACKENDS:
        helpers.require(backend)
        values, idx, da, dk = _topk_run(backend, a, ya, keys, yk, normalize=normalize)
        assert torch.equal(torch.isnan(values).all(1), poisoned) and torch.equal(torch.isnan(values).any(1), poisoned)
        assert bool((idx[poisoned] == -1).all()), backend
        assert torch.equal(idx[~poisoned], clean[1][~poisoned]), backend
        assert_allowed(backend, values[~poisoned], clean[0][~poisoned], "topk_values_fp32")
        assert torch.equal(torch.isnan(da).any(1), poisoned) and torch.equal(torch.isnan(da).all(1), poisoned)
        assert torch.equal(torch.isnan(dk).any(1), torch.arange(10) == 1), backend
        assert_allowed(backend, da[~poisoned], clean[2][~poisoned], "topk_grad_fp32")


def test_indexed_cosine_gives_nan_exactly_where_a_non_finite_row_is_read():
    a, keys = torch.randn(4, 5), torch.randn(6, 5)
    idx = torch.tensor([[0, 1, -1], [2, 3, 4], [5, -1, -1], [1, 2, 3]])
    a[0, 1], keys[3, 0] = NAN, INF
    a.requires_grad_(True), keys.requires_grad_(True)
    out = ak.indexed_cosine(a, keys, idx)
    expect = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(torch.isnan(out), expect)
    assert torch.equal(out == -INF, idx < 0)  # padding reads nothing: -inf even beside a non-finite anchor
    torch.where(torch.isfinite(out), out, out.new_zeros(())).sum().backward()
    # rows fed a NaN output (anchors 0, 1, 3) and keys that are non-finite or were read by a NaN row (3; 0, 1)
    assert torch.isnan(a.grad).any(1).tolist() == [True, True, False, True]
    assert torch.isnan(keys.grad).any(1).tolist() == [True, True, False, True, False, False]


def test_class_prototypes_nan_policy_spares_other_classes_and_ignored_rows():
    """A non-finite feature row makes its own class's prototype NaN only; an ignored one (label -1) nothing (it
    used to poison class 0 through its zero weight: 0 * NaN)."""
    features = torch.randn(8, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, -1, -1])
    features[2, 0] = NAN
    features[6, 1] = INF
    protos, present = ak.class_prototypes(features, labels, 3)
    assert torch.isnan(protos).any(1).tolist() == [False, True, False] and present.tolist() == [True, True, True]
    ref, _ = ak.class_prototypes_ref(features, labels, 3)
    assert torch.isnan(ref).any(1).tolist() == [False, True, False]
    assert torch.allclose(protos[[0, 2]], torch.stack([features[:2].mean(0), features[4:6].mean(0)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_anatomical_loss_with_a_non_finite_query_is_nan_for_that_query_only(backend):
    helpers.require(backend)
    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(12, 8, generator=g), torch.randn(30, 8, generator=g)
    yq, yk = torch.arange(12) % 3, torch.arange(30) % 3
    protos, _ = ak.class_prototypes(keys, yk, 3)
    clean = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=5, reduction="none", backend=backend)
    q[4, 0] = NAN
    per_query = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=5, reduction="none",
                                            backend=backend)
    assert torch.isnan(per_query).tolist() == [i == 4 for i in range(12)]
    assert torch.allclose(per_query[torch.arange(12) != 4], clean[torch.arange(12) != 4])
    if backend not in helpers.INTERPRETED_ON_CPU:  # the interpreter's top-k takes ~8 s a call
        assert bool(torch.isnan(ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=5,
                                                            backend=backend)))


def test_class_graph_sampling_refuses_non_finite_prototypes():
    protos = torch.randn(3, 4)
    protos[1, 2] = NAN
    with pytest.raises(ValueError, match="prototypes must be finite, got nan at flat index 6"):
        ak.class_graph_negatives(protos, torch.tensor([0, 1]), torch.tensor([0, 1, 2]), 4, tau=0.5)


# -- extreme accepted values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e20, 3e37])
def test_soft_loss_is_scale_invariant_at_extreme_magnitudes_on_every_backend(scale):
    """Cosine logits do not depend on the inputs' scale: |x| ~ 1e20 and up to 3e37 (squares overflow float32) give
    the x1 answer on every backend, and so does one huge row among normal ones."""
    s, t, k = _soft_inputs(3)
    ref = ak.soft_contrastive_loss_ref(s.double(), t.double(), k.double(), 0.2, 0.1, reduction="none")
    mixed = s.clone()
    mixed[1] *= scale
    for backend in BACKENDS:
        helpers.require(backend)
        for ss, tt, kk in ((s * scale, t * scale, k * scale), (mixed, t, k)):
            rows = ak.soft_contrastive_loss(ss, tt, kk, 0.2, 0.1, reduction="none", backend=backend)
            assert torch.isfinite(rows).all(), (backend, scale, rows)
            assert (rows.double() - ref).abs().max() <= 1e-4 * ref.abs().max(), (backend, scale)


def test_rows_below_the_normalisation_eps_give_the_same_answer_on_every_backend():
    """||x|| < 1e-12 is clamped (x / 1e-12, as F.normalize): not scale invariant there, but the same everywhere."""
    s, t, k = (x * 1e-20 for x in _soft_inputs(8))
    ref = ak.soft_contrastive_loss(s.double(), t.double(), k, 0.2, 0.1, reduction="none", backend="torch")
    for backend in BACKENDS:
        helpers.require(backend)
        rows = ak.soft_contrastive_loss(s, t, k, 0.2, 0.1, reduction="none", backend=backend)
        assert torch.allclose(rows.double(), ref, atol=1e-6), backend


def test_topk_on_inputs_times_1e30_gives_the_x1_answer_on_every_backend():
    """It gave three different answers on three backends (zeros, NaN): the norms overflowed."""
    a, ya, keys, yk = _topk_inputs()
    ref_v, ref_i = ak.hard_negative_topk_ref(a.double(), ya, keys.double(), yk, 4)
    for backend in BACKENDS:
        helpers.require(backend)
        values, idx = ak.hard_negative_topk(a * 1e30, ya, keys * 1e30, yk, 4, backend=backend)
        assert torch.equal(idx, ref_i), backend
        assert_allowed(backend, values, ref_v, "topk_values_fp32")


def test_anatomical_loss_and_prototypes_do_not_overflow_at_extreme_magnitudes():
    g = torch.Generator().manual_seed(4)
    q, keys = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g)
    yq, yk = torch.arange(9) % 3, torch.arange(20) % 3
    protos, _ = ak.class_prototypes(keys, yk, 3)
    ref = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=4, reduction="none")
    big = ak.anatomical_contrast_loss(q * 1e30, yq, protos * 1e30, keys * 1e30, yk, num_negatives=4,
                                      reduction="none")
    assert_allowed("x1e30", big, ref, "anatomical_fp32")
    huge = torch.full((4, 2), 3e38)
    p, _ = ak.class_prototypes(huge, torch.zeros(4, dtype=torch.long), 1)
    assert torch.equal(p, huge[:1])  # the sum 1.2e39 would overflow float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_logits_beyond_float32_are_a_clear_error_on_every_backend(backend):
    """normalize=False with |x| ~ 1e20: the fp32 dot overflows (NaN before); now an error naming the fix."""
    helpers.require(backend)
    s, t, k = _soft_inputs()
    with pytest.raises(ValueError, match=r"with normalize=False the logits student·keys / tau can reach .*"
                                         r"use normalize=True"):
        ak.soft_contrastive_loss(s * 1e20, t * 1e20, k * 1e20, normalize=False, backend=backend)
    a, ya, keys, yk = _topk_inputs()
    with pytest.raises(ValueError, match="hard_negative_topk: with normalize=False the logits anchors·keys"):
        ak.hard_negative_topk(a * 1e30, ya, keys * 1e30, yk, 3, normalize=False, backend=backend)
    rows = ak.soft_contrastive_loss(s * 1e3, t * 1e3, k, normalize=False, backend=backend, reduction="none")
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_smallest_accepted_temperature_gives_finite_reference_answers(backend):
    helpers.require(backend)
    s, t, k = _soft_inputs(5)
    ref = ak.soft_contrastive_loss_ref(s.double(), t.double(), k.double(), 1e-4, 1e-4, reduction="none")
    rows = ak.soft_contrastive_loss(s, t, k, 1e-4, 1e-4, reduction="none", backend=backend)
    assert torch.isfinite(rows).all()
    assert (rows.double() - ref).abs().max() <= tolerance(torch.float32, 1e-4) * ref.abs().max()


# -- value checks under torch.compile --------------------------------------------------------------------------
class _HostSyncs:
    """Counts the ways host code reads tensor values (each a host synchronisation on a GPU) while active."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _calls():
    s, t, k = _soft_inputs()
    w = torch.rand(6)
    q, keys = torch.randn(6, 8), torch.randn(12, 8)
    yq, yk = torch.arange(6) % 3, torch.arange(12) % 3
    protos = torch.randn(3, 8)
    return {
        "soft": lambda: ak.soft_contrastive_loss(s, t, k, weight=w, backend="chunked"),
        "soft normalize=False": lambda: ak.soft_contrastive_loss(s, t, k, weight=w, normalize=False,
                                                                 backend="chunked"),
        "topk": lambda: ak.hard_negative_topk(q, yq, keys, yk, 3, backend="chunked"),
        "anatomical topk": lambda: ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=3,
                                                               backend="chunked"),
        "anatomical class_graph": lambda: ak.anatomical_contrast_loss(q, yq, protos, keys, yk, 0.5, "class_graph", 3),
        "prototypes": lambda: ak.class_prototypes(keys, yk, 3, weight=torch.rand(12)),
        "indexed_cosine": lambda: ak.indexed_cosine(q, keys, torch.zeros(6, 2, dtype=torch.long)),
    }


def test_each_op_call_reads_values_on_the_host_at_most_once_and_never_with_value_checks_off(monkeypatch):
    """The value checks and the rescaling decision each synchronised (7 ms a call at tiny sizes on the AMD machine of
    issue 26, 3.5-4.9x the torch reference): now folded into one read per forward call, none when switched off.
    Counted as on a GPU: no device type's reads are free (FREE_HOST_READS empty)."""
    monkeypatch.setattr(_normalization, "FREE_HOST_READS", ())
    calls = _calls()
    for name, call in calls.items():
        call()  # warm-up
        syncs = _HostSyncs(monkeypatch)
        call()
        assert syncs.count <= 1, f"{name}: {syncs.count} host reads"
        monkeypatch.undo()
        monkeypatch.setattr(_normalization, "FREE_HOST_READS", ())
    previous = ak.set_value_checks(False)
    try:
        for name, call in calls.items():
            syncs = _HostSyncs(monkeypatch)
            call()
            assert syncs.count == 0, f"{name} with value checks off: {syncs.count} host reads"
            monkeypatch.undo()
            monkeypatch.setattr(_normalization, "FREE_HOST_READS", ())
    finally:
        ak.set_value_checks(previous)


def test_value_checks_still_name_the_bad_argument_after_folding():
    s, t, k = _soft_inputs()
    with pytest.raises(ValueError, match="weight must be non-negative and finite, got -1.0 at flat index 0"):
        ak.soft_contrastive_loss(s, t, k, weight=-torch.ones(6), backend="chunked")
    with pytest.raises(ValueError, match="weight must be non-negative and finite, got nan"):
        ak.soft_contrastive_loss(s, t, k, weight=torch.full((6,), NAN))
    q, keys = torch.randn(6, 8), torch.randn(12, 8)
    yk = torch.arange(12) % 3
    protos, _ = ak.class_prototypes(keys, yk, 3)
    for negatives in ("topk", "class_graph"):
        with pytest.raises(ValueError, match=r"query_labels must be in \[0, 3\) \(num_classes = 3\) or "
                                             r"ignore_label=-1, got 7"):
            ak.anatomical_contrast_loss(q, torch.tensor([0, 1, 2, 7, 0, 1]), protos, keys, yk, 0.5, negatives, 3)
    with pytest.raises(ValueError, match=r"indices must be key indices in \[0, K=12\)"):
        ak.indexed_cosine(q, keys, torch.full((6, 2), 12))


def test_compiled_graphs_read_no_values_on_the_host(monkeypatch):
    """Inside torch.compile'd graphs the value checks are skipped (no host sync), and kernel_inputs handles every row
    on the device: the NaN policy still holds."""
    monkeypatch.setattr(_normalization, "FREE_HOST_READS", ())  # counted as on a GPU
    torch._dynamo.reset()
    s, t, k = _soft_inputs()
    soft = torch.compile(lambda s, t, k, w: ak.soft_contrastive_loss(s, t, k, weight=w, reduction="none"),
                         backend="aot_eager", fullgraph=True)
    soft(s, t, k, torch.ones(6))  # compiles
    bad = s.clone()
    bad[2, 0] = NAN
    syncs = _HostSyncs(monkeypatch)
    rows = soft(bad, t, k, torch.ones(6))
    assert syncs.count == 0, syncs.count
    monkeypatch.undo()
    assert torch.isnan(rows[2]) and torch.isfinite(rows[torch.arange(6) != 2]).all()


def test_cpu_calls_with_value_checks_off_take_the_common_path():
    """Reading a CPU tensor drains no stream, so without value checks the rescaling decision is still read there:
    finite rows reach the kernels as they are, with no NaN masking (before: every tensor took the device-side slow
    path, and a tiny soft-loss call with value checks off cost twice one with them). Non-finite rows are still
    zeroed and flagged."""
    x, k = torch.randn(6, 8), torch.randn(5, 8)
    ((x_in, bad_x, _, _), (k_in, bad_k, _, _)), failed, clean = _normalization.kernel_inputs(True, x, k, sync=False)
    assert clean and not failed and x_in is x and k_in is k and not bad_x.any() and not bad_k.any()
    x[2, 1] = NAN
    ((x_in, bad_x, _, _), _), _, clean = _normalization.kernel_inputs(True, x, k, sync=False)
    assert not clean and bad_x.tolist() == [False, False, True, False, False, False]
    assert torch.equal(x_in[2], torch.zeros(8)) and torch.equal(x_in[[0, 1, 3, 4, 5]], x[[0, 1, 3, 4, 5]])
    previous = ak.set_value_checks(False)
    try:
        s, t, keys = _soft_inputs()
        s[1, 0] = NAN
        rows = ak.soft_contrastive_loss(s, t, keys, reduction="none", backend="chunked")
        assert torch.isnan(rows[1]) and torch.isfinite(rows[torch.arange(6) != 1]).all()
    finally:
        ak.set_value_checks(previous)


# -- double backward ---------------------------------------------------------------------------------------------
def test_soft_loss_on_the_torch_backend_passes_gradgradcheck():
    s, t, k = (x.double() for x in _soft_inputs(6, n=4, k=3, d=5))
    s.requires_grad_(True), k.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda s, k: ak.soft_contrastive_loss(s, t, k, 0.5, 0.25, backend="torch"),
                                        (s, k))


@pytest.mark.parametrize("backend", dispatch.FUSED)
def test_fused_soft_loss_gives_exact_first_derivatives_and_refuses_a_second(backend):
    """Second derivatives were silently wrong (Hessian-vector products off by up to 0.5): the fused backward is not
    differentiable; differentiating it now raises with the fix."""
    helpers.require(backend)
    s, t, k = _soft_inputs(7)
    ref = _soft_rows_and_grads("torch", s.double(), t.double(), k.double())
    s, k = s.clone().requires_grad_(True), k.clone().requires_grad_(True)
    rows = ak.soft_contrastive_loss(s, t, k, 0.2, 0.1, reduction="none", backend=backend)
    ds, dk = torch.autograd.grad((rows * torch.linspace(0.5, 1.5, 6)).sum(), (s, k), create_graph=True)
    assert torch.allclose(ds.double(), ref[1], atol=1e-5) and torch.allclose(dk.double(), ref[2], atol=1e-5)
    with pytest.raises(RuntimeError, match=rf"soft_contrastive_loss on backend '{backend}' is once differentiable"
                                           r".*backend='torch'"):
        torch.autograd.grad((ds * ds).sum() + (dk * dk).sum(), (s, k))


@pytest.mark.slow
def test_topk_values_and_indexed_cosine_pass_gradgradcheck_on_the_torch_side_paths():
    a, ya, keys, yk = _topk_inputs()
    a, keys = a.double().requires_grad_(True), keys.double().requires_grad_(True)
    for backend in ("torch", "chunked"):
        assert torch.autograd.gradgradcheck(lambda a, k: ak.hard_negative_topk(a, ya, k, yk, 3, backend=backend)[0],
                                            (a, keys))
    idx = torch.tensor([[0, 3, -1], [1, 2, 9]] * 4)
    assert torch.autograd.gradgradcheck(lambda a, k: ak.indexed_cosine(a, k, idx), (a, keys))
    protos = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, p: ak.anatomical_contrast_loss(a, ya, p, keys.detach(), yk, num_negatives=3, backend="chunked"),
        (a, protos))


@pytest.mark.parametrize("backend", [b for b in dispatch.FUSED if b != "chunked"])
def test_topk_hessian_vector_products_agree_across_backends(backend):
    """The values' backward is one torch gather for every backend (fp64 only on chunked): the same second
    derivative from triton's and cuda's indices."""
    helpers.require(backend)
    a, ya, keys, yk = _topk_inputs()
    v = torch.randn(8, 6)
    out = []
    for name in ("chunked", backend):
        x = a.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ak.hard_negative_topk(x, ya, keys, yk, 3, backend=name)[0].pow(2).sum(), x,
                                   create_graph=True)
        out.append(torch.autograd.grad((g * v).sum(), x)[0])
    assert_allowed(backend, out[1], out[0], "topk_grad_fp32")


def test_anatomical_function_refuses_a_second_derivative_with_the_fix():
    q = torch.randn(6, 4, requires_grad=True)
    keys, yk = torch.randn(9, 4), torch.arange(9) % 3
    protos, _ = ak.class_prototypes(keys, yk, 3)
    (g,) = torch.autograd.grad(ak.AnatomicalContrastLossFunction.apply(q, torch.arange(6) % 3, protos, keys, yk),
                               q, create_graph=True)
    with pytest.raises(RuntimeError, match="AnatomicalContrastLossFunction is once differentiable.*"
                                           "anatomical_contrast_loss"):
        g.sum().backward()


# -- native entry points ------------------------------------------------------------------------------------------
def test_native_buffers_are_checked_before_their_pointers_reach_native_code():
    cpu = torch.device("cpu")
    B = _extension.Buffer
    ok, freed = torch.zeros(4, 8), torch.zeros(4, 8)
    freed.untyped_storage().resize_(64)  # a view whose storage shrank under it
    _extension.check_buffers("op", cpu, a=B(ok, (4, 8), torch.float32), v=B(ok[:, :3], (4, 3), torch.float32,
                                                                           "strided"))
    cases = [
        (B(ok.bfloat16(), (4, 8), torch.float32), r"op: buffer 'a' must be torch.float32 .* got torch.bfloat16"),
        (B(ok, (5, 8), torch.float32), r"op: buffer 'a' must have shape \(5, 8\), got \(4, 8\)"),
        (B(ok.T, (8, 4), torch.float32), r"op: buffer 'a' must be contiguous"),
        (B(freed, (4, 8), torch.float32), r"reaches outside its storage of 64 bytes"),
        (B([1.0], (1,), torch.float32), "must be a torch.Tensor"),
    ]
    for buf, match in cases:
        with pytest.raises(ValueError, match=match):
            _extension.check_buffers("op", cpu, a=buf)
    with pytest.raises(ValueError, match="must be on meta"):
        _extension.check_buffers("op", torch.device("meta"), a=B(ok, (4, 8), torch.float32))


def test_cuda_launchers_check_their_buffers_before_the_kernels_read_them():
    """The CUDA launchers (run here through the emulation build) refuse a buffer that does not match the launch:
    a teacher with fewer rows than the student, an inverse-norm vector one short, labels of another length."""
    helpers.require("cuda")
    from action_kernels.cuda import hard_negative_topk as ctopk
    from action_kernels.cuda import soft_contrastive as csoft
    g = torch.Generator().manual_seed(3)
    s, t, k = torch.randn(1, 12, 16, generator=g), torch.randn(1, 12, 16, generator=g), torch.randn(9, 16, generator=g)
    rs, rk = torch.ones(12), torch.ones(9)
    csoft.soft_contrastive_forward(s, t, k, rs, rs, rk, 5.0, 10.0, True)  # the matching launch runs
    with pytest.raises(ValueError, match="buffer 't' must hold the 12 rows of 's'"):
        csoft.soft_contrastive_forward(s, t[:, :3], k, rs, rs, rk, 5.0, 10.0, True)
    with pytest.raises(ValueError, match=r"soft_contrastive_forward: buffer 'rk' must have shape \(9,\)"):
        csoft.soft_contrastive_forward(s, t, k, rs, rs, rk[:8], 5.0, 10.0, False)
    stats = csoft.soft_contrastive_forward(s, t, k, rs, rs, rk, 5.0, 10.0, False)[:5]
    with pytest.raises(ValueError, match=r"soft_contrastive_key_grad: buffer 'g' must have shape \(12,\)"):
        csoft.soft_contrastive_key_grad(s, t, k, rs, rs, rk, 5.0, 10.0, *stats, torch.ones(11))
    ya, yk = torch.zeros(12, dtype=torch.int64), torch.ones(9, dtype=torch.int64)
    ctopk.hard_negative_topk(s, ya, k, yk, rs, rk, 4, -1)
    with pytest.raises(ValueError, match=r"hard_negative_topk: buffer 'key_labels' must have shape \(9,\)"):
        ctopk.hard_negative_topk(s, ya, k, yk[:5], rs, rk, 4, -1)


_LIMITED = """
import resource, torch
from action_kernels._extension import host_module
mod = host_module()
rows, K, k = 2, {K}, {k}
sim = torch.zeros(rows, K)
ya, yk = torch.zeros(rows, dtype=torch.long), torch.ones(K, dtype=torch.long)
values, indices = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.long)
vm = int([line for line in open('/proc/self/status') if line.startswith('VmSize')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
try:
    mod.hard_negative_topk_rows_cpu(sim.data_ptr(), rows, K, ya.data_ptr(), yk.data_ptr(), -1, k, values.data_ptr(),
                                    indices.data_ptr(), 2)
    print("RESULT ok", int(indices[0, 0]), float(values[0, K]))
except Exception as exc:
    print("RESULT", type(exc).__name__)
"""


def _limited(K: int, k: int) -> subprocess.CompletedProcess:
    if _extension.host_module() is None:
        pytest.skip("the host build _C_cpu is not built")
    script = textwrap.dedent(_LIMITED.format(K=K, k=k))
    # from tests/, not the repository root: `python -c` puts its working directory first on sys.path, and the root's
    # source tree (no compiled modules in a non-editable install, as in CI) would shadow the installed package
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_native_topk_allocation_failure_in_a_worker_thread_is_a_python_exception():
    """An allocation failure inside a std::thread terminated the process (exit 134) with no Python exception, so a
    trainer could not save: each thread's heap of 2^24 entries (128 MiB) does not fit under a 64 MiB margin."""
    out = _limited(1 << 24, 1 << 24)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "RESULT MemoryError" in out.stdout, out.stdout


@pytest.mark.slow
def test_native_topk_reserves_at_most_k_candidates_per_thread_when_k_exceeds_k_keys():
    """k = 2^23 with K = 4 keys: the old reserve(k) took 64 MiB per thread, more than the 64 MiB margin."""
    out = _limited(4, 1 << 23)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "RESULT ok 0 -inf" in out.stdout, out.stdout


@pytest.mark.slow
def test_a_source_tree_that_shadows_the_installed_package_warns_loudly_with_the_fix(tmp_path):
    """`python -m action_kernels.env_report` from the repository root of a non-editable install imported the
    source tree (no compiled modules): 'not built', about 10x slower top-k, no warning."""
    installed = os.path.dirname(os.path.dirname(os.path.abspath(_extension.__file__)))
    if not _extension._built_in(os.path.join(installed, "action_kernels"), "_C_cpu"):
        pytest.skip("the host build _C_cpu is not built in this checkout")
    source = tmp_path / "repo"
    ignore = lambda d, names: [n for n in names if n.endswith((".so", ".pyd")) or n == "__pycache__"]  # noqa: E731
    import shutil

    shutil.copytree(os.path.join(installed, "action_kernels"), source / "action_kernels", ignore=ignore)
    # a non-editable install: the package found on sys.path only (-S: no .pth files, so no editable-install finder)
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([installed, site])}
    out = subprocess.run([sys.executable, "-S", "-m", "action_kernels.env_report"], cwd=source, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "RuntimeWarning" in out.stderr and "shadows the installed package" in text, text[-3000:]
    assert "run from another directory" in text and "pip install --no-build-isolation -e ." in text
    assert _extension.shadowed_install("_C_cpu", str(source / "action_kernels"), [str(source), installed]) \
        == os.path.join(installed, "action_kernels")

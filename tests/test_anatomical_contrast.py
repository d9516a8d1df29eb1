"""Anatomical contrast: prototypes, class-graph sampling statistics, the loss against the reference formula."""
import math

import pytest
import torch

import action_kernels as ak
from action_kernels.reference import anatomical_contrast_loss_ref, class_prototypes_ref
from action_kernels.testing import assert_allowed
from helpers import FUSED, fresh_seed, require

pytestmark = pytest.mark.numerics  # .ci/run runs these again with the AVX2 paths forced


def _problem(Q=60, K=120, D=16, C=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=g, dtype=dtype)
    yq = torch.randint(0, C, (Q,), generator=g)
    keys = torch.randn(K, D, generator=g, dtype=dtype)
    yk = torch.randint(-1, C, (K,), generator=g)
    protos = torch.randn(C, D, generator=g, dtype=dtype)
    return q, yq, protos, keys, yk


def test_class_prototypes_match_reference_for_rows_and_maps():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 8, 5, 6, generator=g)
    labels = torch.randint(-1, 3, (2, 5, 6), generator=g)
    weight = torch.rand(2, 5, 6, generator=g)
    protos, present = ak.class_prototypes(feats, labels, 4, weight=weight)
    ref, ref_present = class_prototypes_ref(feats, labels, 4, weight=weight)
    assert_allowed("prototypes", protos, ref, "prototypes_fp32")
    assert torch.equal(present, ref_present)
    assert not present[3] and torch.equal(protos[3], torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_class_prototypes_count_and_sum_16_bit_rows_beyond_the_dtypes_integer_range(dtype):
    # 11,064 rows of one class: a bf16 count saturates at 256 (fp16: 2,048), which made the prototype 43x the mean
    g = torch.Generator().manual_seed(fresh_seed())
    labels = torch.cat([torch.zeros(11064, dtype=torch.int64), torch.ones(3000, dtype=torch.int64)])
    feats = (torch.randn(labels.numel(), 8, generator=g) * 0.1 + torch.arange(1, 9)).to(dtype)
    protos, present = ak.class_prototypes(feats, labels, 2)
    assert protos.dtype == dtype and present.tolist() == [True, True]
    for c in (0, 1):
        want = feats[labels == c].double().mean(0)
        assert torch.allclose(protos[c].double(), want, rtol=2 ** -7, atol=0), (c, protos[c], want)


def test_rows_that_do_not_count_leave_every_class_mean_alone():
    # an ignored row of 3e38 (and a zero-weight one) among rows of ~1e-6 set the power-of-two scale of every class:
    # the other classes' means were 27% off; in fp16 one 6e4 value in class 0 put class 1 off by 31%
    g = torch.Generator().manual_seed(fresh_seed())
    feats = torch.rand(600, 4, generator=g) * 1e-6 + 1e-6
    labels = torch.arange(600) % 3
    labels[5], labels[7] = -1, 1
    feats[5], feats[7] = 3e38, -3e38
    weight = torch.ones(600)
    weight[7] = 0.0
    protos, _ = ak.class_prototypes(feats, labels, 3, weight=weight)
    ref, _ = class_prototypes_ref(feats.double(), labels, 3, weight=weight.double())
    assert torch.allclose(protos.double(), ref, rtol=1e-5, atol=0), (protos, ref)
    h = torch.rand(4000, 4, generator=g) * 1e-3 + 1e-3
    y = torch.arange(4000) % 2
    h[0] = 6e4
    protos, _ = ak.class_prototypes(h.half(), y, 2)
    ref, _ = class_prototypes_ref(h.half().double(), y, 2)
    assert torch.allclose(protos.double(), ref, rtol=2 ** -10, atol=0), (protos, ref)


def test_class_prototypes_reject_out_of_range_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        ak.class_prototypes(torch.randn(4, 2), torch.tensor([0, 1, 3, 0]), 3)


def test_class_graph_class_frequencies_follow_the_prototype_softmax():
    C, D, tau, n = 4, 8, 0.5, 4000
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(C, D, generator=g)
    yk = torch.arange(400) % C
    yq = torch.zeros(5, dtype=torch.long)  # class-0 queries
    idx = ak.class_graph_negatives(protos, yq, yk, n, tau, generator=g)
    drawn = yk[idx].reshape(-1)
    assert not (drawn == 0).any()  # never the query's own class
    mu = torch.nn.functional.normalize(protos, dim=1)
    logits = mu[0] @ mu.T / tau
    logits[0] = float("-inf")
    expected = torch.softmax(logits, 0)
    total = drawn.numel()
    for c in range(1, C):
        freq = (drawn == c).sum().item() / total
        sigma = math.sqrt(expected[c].item() * (1 - expected[c].item()) / total)
        assert abs(freq - expected[c].item()) < 5 * sigma + 1e-9, (c, freq, expected[c].item())


def test_class_graph_never_picks_ignored_keys_and_pads_when_no_other_class():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(3, 4, generator=g)
    yk = torch.tensor([-1, 0, 0, -1, 1, 1, -1])
    idx = ak.class_graph_negatives(protos, torch.tensor([0, 1, 2]), yk, 50, 0.5, generator=g)
    assert (yk[idx[:2]] != -1).all()
    assert (yk[idx[0]] == 1).all() and (yk[idx[1]] == 0).all()
    assert (idx[2] >= 0).all()  # class 2 has no keys itself, draws from 0 and 1
    only_one = ak.class_graph_negatives(protos, torch.tensor([0]), torch.tensor([0, 0, -1]), 5, 0.5, generator=g)
    assert (only_one == -1).all()


def test_class_graph_is_reproducible_from_the_generator():
    q, yq, protos, keys, yk = _problem()
    a = ak.class_graph_negatives(protos, yq, yk, 30, 0.5, generator=torch.Generator().manual_seed(7))
    b = ak.class_graph_negatives(protos, yq, yk, 30, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ("torch",) + FUSED)
def test_topk_loss_equals_reference_formula_on_the_same_negatives(backend):
    require(backend)
    q, yq, protos, keys, yk = _problem(Q=24, K=100, seed=fresh_seed())
    q1 = q.clone().requires_grad_(True)
    p1, k1 = protos.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    loss = ak.anatomical_contrast_loss(q1, yq, p1, k1, yk, tau=0.5, num_negatives=8, backend=backend)
    loss.backward()
    _, idx = ak.hard_negative_topk(q, yq, keys, yk, 8, backend="torch")
    q2 = q.double().requires_grad_(True)
    p2, k2 = protos.double().requires_grad_(True), keys.double().requires_grad_(True)
    ref = anatomical_contrast_loss_ref(q2, yq, p2, k2, yk, tau=0.5, negatives=idx)
    ref.backward()
    assert_allowed("loss", loss.detach(), ref.detach(), "anatomical_fp32")
    for name, got, want in (("queries", q1.grad, q2.grad), ("prototypes", p1.grad, p2.grad),
                            ("keys", k1.grad, k2.grad)):
        assert_allowed(f"{name} grad", got, want, "anatomical_fp32")


def test_class_graph_and_explicit_indices_modes_equal_the_reference():
    q, yq, protos, keys, yk = _problem(seed=fresh_seed())
    idx = ak.class_graph_negatives(protos, yq, yk, 32, 0.5, generator=torch.Generator().manual_seed(5))
    q1 = q.clone().requires_grad_(True)
    sampled = ak.anatomical_contrast_loss(q1, yq, protos, keys, yk, negatives="class_graph", num_negatives=32,
                                          generator=torch.Generator().manual_seed(5))
    explicit = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, negatives=idx)
    ref = anatomical_contrast_loss_ref(q, yq, protos, keys, yk, negatives=idx)
    assert_allowed("class_graph loss", sampled.detach(), ref, "anatomical_fp32")
    assert_allowed("explicit-index loss", explicit, ref, "anatomical_fp32")
    per_query = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, negatives=idx, reduction="none")
    assert_allowed("per-query loss", per_query,
                   anatomical_contrast_loss_ref(q, yq, protos, keys, yk, negatives=idx, reduction="none"),
                   "anatomical_fp32")
    sampled.backward()
    assert torch.isfinite(q1.grad).all()


def test_gradcheck_float64_through_indexed_negatives():
    q, yq, protos, keys, yk = _problem(Q=6, K=10, D=4, C=3, seed=2, dtype=torch.float64)
    idx = torch.randint(-1, 10, (6, 5), generator=torch.Generator().manual_seed(0))
    q.requires_grad_(True)
    keys.requires_grad_(True)
    fn = lambda q_, k_: ak.anatomical_contrast_loss(q_, yq, protos, k_, yk, negatives=idx)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, keys))


def test_query_without_negatives_has_zero_loss_not_nan():
    q, yq, protos, keys, _ = _problem(Q=8, K=20, C=2, seed=0)
    yk = torch.zeros(20, dtype=torch.long)  # every key is class 0: class-0 queries have no negatives
    per_query = ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=4, reduction="none")
    assert torch.isfinite(per_query).all()
    assert torch.allclose(per_query[yq == 0], torch.zeros(int((yq == 0).sum())))


@pytest.mark.parametrize("labels", [[2, 2, 2, 2], []])
def test_one_or_zero_classes_give_a_zero_loss_that_keeps_the_graph(labels):
    q = torch.randn(len(labels), 6, requires_grad=True)
    protos = torch.randn(3, 6, requires_grad=True)
    loss = ak.anatomical_contrast_loss(q, torch.tensor(labels, dtype=torch.long), protos, torch.randn(9, 6),
                                       torch.tensor([0, 1, 2] * 3), num_negatives=4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_bad_arguments_name_themselves():
    q, yq, protos, keys, yk = _problem()
    with pytest.raises(ValueError, match=r"query_labels must be in \[0, 4\)"):
        ak.anatomical_contrast_loss(q, yq + 4, protos, keys, yk)
    with pytest.raises(ValueError, match="negatives must be"):
        ak.anatomical_contrast_loss(q, yq, protos, keys, yk, negatives="random")
    with pytest.raises(ValueError, match="tau must be"):
        ak.anatomical_contrast_loss(q, yq, protos, keys, yk, tau=0.0)
    with pytest.raises(ValueError, match="prototypes must have the feature size"):
        ak.anatomical_contrast_loss(q, yq, protos[:, :3], keys, yk)


def test_module_form_matches_functional():
    q, yq, protos, keys, yk = _problem()
    module = ak.AnatomicalContrastLoss(tau=0.5, num_negatives=16)
    assert torch.allclose(module(q, yq, protos, keys, yk),
                          ak.anatomical_contrast_loss(q, yq, protos, keys, yk, num_negatives=16))
    assert "num_negatives=16" in repr(module)


@pytest.mark.parametrize("dense_ratio", [0, 10**9])  # always sparse gathers / always dense GEMM blocks
def test_gather_strategies_give_the_same_values_and_gradients(monkeypatch, dense_ratio):
    from action_kernels.ops import hard_negative_topk as ops_topk

    monkeypatch.setattr(ops_topk, "DENSE_RATIO", dense_ratio)
    q, yq, protos, keys, yk = _problem(Q=30, K=80, D=12, seed=fresh_seed())
    idx = torch.randint(-1, 80, (30, 7), generator=torch.Generator().manual_seed(1))
    q1, k1 = q.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    loss = ak.anatomical_contrast_loss(q1, yq, protos, k1, yk, negatives=idx)
    loss.backward()
    q2, k2 = q.double().requires_grad_(True), keys.double().requires_grad_(True)
    ref = anatomical_contrast_loss_ref(q2, yq, protos.double(), k2, yk, negatives=idx)
    ref.backward()
    assert_allowed("loss", loss.detach(), ref.detach(), "anatomical_fp32")
    assert_allowed("queries grad", q1.grad, q2.grad, "anatomical_fp32")
    assert_allowed("keys grad", k1.grad, k2.grad, "anatomical_fp32")


def test_torch_compile_fullgraph_keeps_topk_and_loss_in_one_graph():
    q, yq, protos, keys, yk = _problem(Q=40, K=90, seed=0)
    fn = lambda q_: ak.anatomical_contrast_loss(q_, yq, protos, keys, yk, num_negatives=8)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    q1, q2 = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    eager, graph = fn(q1), compiled(q2)
    eager.backward()
    graph.backward()
    assert torch.allclose(eager, graph) and torch.allclose(q1.grad, q2.grad)


def test_reference_topk_mode_selects_its_own_negatives_and_refuses_class_graph():
    q, yq, protos, keys, yk = _problem(Q=20, K=60, seed=fresh_seed(), dtype=torch.float64)
    _, idx = ak.hard_negative_topk_ref(q, yq, keys, yk, 8)
    assert torch.equal(anatomical_contrast_loss_ref(q, yq, protos, keys, yk, num_negatives=8),
                       anatomical_contrast_loss_ref(q, yq, protos, keys, yk, negatives=idx))
    with pytest.raises(NotImplementedError, match="class_graph_negatives"):
        anatomical_contrast_loss_ref(q, yq, protos, keys, yk, negatives="class_graph")


@pytest.mark.parametrize("negatives", ["topk", "class_graph", "indices"])
def test_autograd_function_equals_the_functional(negatives):
    q, yq, protos, keys, yk = _problem(Q=30, K=70, seed=fresh_seed())
    mode = torch.randint(-1, 70, (30, 6), generator=torch.Generator().manual_seed(3)) if negatives == "indices" \
        else negatives
    results = []
    for fn in (ak.anatomical_contrast_loss, ak.AnatomicalContrastLossFunction.apply):
        q1, p1, k1 = (x.clone().requires_grad_(True) for x in (q, protos, keys))
        loss = fn(q1, yq, p1, k1, yk, 0.5, mode, 6, torch.Generator().manual_seed(9), None, "mean", -1)
        loss.backward()
        results.append((loss.detach(), q1.grad, p1.grad, k1.grad))
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)
    q2 = q.clone().requires_grad_(True)  # only the queries need a gradient (the reference setting)
    ak.AnatomicalContrastLossFunction.apply(q2, yq, protos, keys, yk).backward()
    assert q2.grad is not None and torch.isfinite(q2.grad).all()


@pytest.mark.parametrize("backend", ("torch",) + FUSED)
def test_anatomical_loss_with_an_empty_bank_is_zero_with_zero_gradients(backend):
    require(backend)
    q = torch.randn(6, 8, requires_grad=True)
    keys = torch.randn(0, 8, requires_grad=True)
    no_labels = torch.zeros(0, dtype=torch.long)
    loss = ak.anatomical_contrast_loss(q, torch.arange(6) % 3, torch.randn(3, 8), keys, no_labels, 0.5, "topk", 4,
                                       backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and keys.grad.shape == (0, 8)

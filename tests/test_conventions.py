"""The conventions every op shares (docs/conventions.md): channel-first maps with (B, *S) or MONAI's (B, 1, *S)
labels and masks, nothing resized silently, reduction "mean" / "sum" / "none", the caller's ignore_label, and
the anatomical loss dropping queries whose class has no prototype."""
import pytest
import torch

import action_kernels as ak
from action_kernels.reference import anatomical_contrast_loss_ref, soft_contrastive_loss_ref
from action_kernels.testing import assert_allowed, assert_close
from helpers import FUSED, fresh_seed, require

BACKENDS = ("torch",) + FUSED


def _map_problem(seed, B=2, D=8, S=(3, 5), C=3, K=40, ignore=-1):
    """A query map (B, D, *S), its labels (B, *S) with some ignored pixels, keys (K, D) with labels, prototypes of
    the keys (class C - 1 absent among them: a zero prototype)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, *S, generator=g)
    y = torch.randint(0, C, (B, *S), generator=g)
    y = torch.where(torch.rand(y.shape, generator=g) < 0.2, ignore, y)
    keys = torch.randn(K, D, generator=g)
    yk = torch.randint(0, C - 1, (K,), generator=g)  # no key of class C - 1
    yk = torch.where(torch.rand(K, generator=g) < 0.1, ignore, yk)
    protos, present = ak.class_prototypes(keys, yk, C, ignore_label=ignore)
    assert not present[C - 1]
    return emb, y, keys, yk, protos


def _rows(x):
    return x.movedim(1, -1).reshape(-1, x.shape[1])


# -- maps ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("negatives", ["topk", "class_graph", "indices"])
@pytest.mark.parametrize("label_shape", ["(B, *S)", "(B, 1, *S)"])
def test_anatomical_loss_on_a_map_equals_the_row_form(negatives, label_shape):
    seed = fresh_seed()
    emb, y, keys, yk, protos = _map_problem(seed)
    labels = y if label_shape == "(B, *S)" else y[:, None]
    mode = negatives
    if negatives == "indices":
        mode = torch.randint(-1, keys.shape[0], (y.numel(), 5), generator=torch.Generator().manual_seed(seed))
    out = []
    for q, lab in ((emb, labels), (_rows(emb), y.reshape(-1))):
        q = q.clone().requires_grad_(True)
        per_query = ak.anatomical_contrast_loss(q, lab, protos, keys, yk, num_negatives=5, negatives=mode,
                                                generator=torch.Generator().manual_seed(1), reduction="none")
        loss = ak.anatomical_contrast_loss(q, lab, protos, keys, yk, num_negatives=5, negatives=mode,
                                           generator=torch.Generator().manual_seed(1))
        loss.backward()
        out.append((per_query.detach(), loss.detach(), _rows(q.grad) if q.dim() > 2 else q.grad))
    for name, got, want in zip(("per query", "loss", "queries grad"), *out):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} (seed {seed}): {m}")


def test_anatomical_loss_on_a_3d_map_equals_the_loss_of_its_kept_rows_alone():
    """With top-k negatives a query's loss depends on nothing but itself: the map's mean equals the mean over its
    labelled rows of a present class, passed alone."""
    seed = fresh_seed()
    emb, y, keys, yk, protos = _map_problem(seed, S=(2, 3, 4))
    rows, flat = _rows(emb), y.reshape(-1)
    kept = (flat >= 0) & (flat != 2)
    for reduction in ("mean", "sum"):
        got = ak.anatomical_contrast_loss(emb, y, protos, keys, yk, num_negatives=6, reduction=reduction)
        want = ak.anatomical_contrast_loss(rows[kept], flat[kept], protos, keys, yk, num_negatives=6,
                                           reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_labels_or_weights_off_the_feature_grid_are_errors_naming_both_shapes():
    feats = torch.randn(2, 4, 6, 8)
    keys, yk = torch.randn(10, 4), torch.arange(10) % 3
    protos = torch.randn(3, 4)
    half = torch.zeros(2, 3, 4, dtype=torch.long)
    transposed = torch.zeros(2, 8, 6, dtype=torch.long)  # as many elements as (2, 6, 8): the old check let it pass
    for labels in (half, transposed):
        shape = r"\(2, 4, 6, 8\)\), got " + str(tuple(labels.shape)).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=r"labels must have shape \(96,\) or \(2, 6, 8\) or \(2, 1, 6, 8\) "
                                             r"\(one label per location of features, whose shape is " + shape):
            ak.class_prototypes(feats, labels, 3)
        with pytest.raises(ValueError, match=r"query_labels must have shape .* whose shape is " + shape):
            ak.anatomical_contrast_loss(feats, labels, protos, keys, yk)
        with pytest.raises(ValueError, match=r"anchor_labels must have shape .* whose shape is " + shape):
            ak.hard_negative_topk(feats, labels, keys, yk, 3)
    with pytest.raises(ValueError, match=r"weight must have shape .* whose shape is \(2, 4, 6, 8\)\), got \(2, 1, 3, "
                                         r"4\)"):
        ak.soft_contrastive_loss(feats, feats, keys, weight=torch.ones(2, 1, 3, 4))


# -- MONAI-shaped (B, 1, *S) masks and labels ----------------------------------------------------------------------
def test_b1s_masks_and_labels_are_accepted_wherever_bs_ones_are():
    g = torch.Generator().manual_seed(fresh_seed())
    feats, teacher = torch.randn(2, 6, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    keys, yk = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    y = torch.randint(0, 3, (2, 4, 5), generator=g)
    mask = torch.rand(2, 4, 5, generator=g) > 0.3
    w = torch.rand(2, 4, 5, generator=g)
    assert torch.equal(ak.soft_contrastive_loss(feats, teacher, keys, weight=mask[:, None]),
                       ak.soft_contrastive_loss(feats, teacher, keys, weight=mask))
    pairs = [(ak.class_prototypes(feats, y[:, None], 3, weight=w[:, None]), ak.class_prototypes(feats, y, 3, weight=w)),
             (ak.hard_negative_topk(feats, y[:, None], keys, yk, 4), ak.hard_negative_topk(feats, y, keys, yk, 4))]
    for got, want in pairs:
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    protos, _ = ak.class_prototypes(keys, yk, 3)
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            ak.anatomical_contrast_loss(feats, y[:, None], protos, keys, yk, num_negatives=4, weight=w[:, None],
                                        reduction=reduction),
            ak.anatomical_contrast_loss(feats, y, protos, keys, yk, num_negatives=4, weight=w, reduction=reduction))


def test_anatomical_weights_give_the_per_class_weighted_mean_of_the_reference():
    seed = fresh_seed()
    emb, y, keys, yk, protos = _map_problem(seed, C=4)
    w = torch.rand(y.shape, generator=torch.Generator().manual_seed(seed)) * (y % 2 == 0)
    q1 = emb.double().requires_grad_(True)
    q2 = emb.double().requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        got = ak.anatomical_contrast_loss(q1, y, protos.double(), keys.double(), yk, num_negatives=6, weight=w,
                                          reduction=reduction)
        want = anatomical_contrast_loss_ref(q2, y, protos.double(), keys.double(), yk, num_negatives=6,
                                            weight=w.double(), reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mask = w > 0  # a bool mask is the weight 0 / 1
    torch.testing.assert_close(ak.anatomical_contrast_loss(emb, y, protos, keys, yk, num_negatives=6, weight=mask),
                               ak.anatomical_contrast_loss(emb, y, protos, keys, yk, num_negatives=6,
                                                           weight=mask.float()))


# -- reductions ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_sum_is_the_sum_of_the_per_row_losses_on_every_op_and_backend(backend):
    require(backend)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 8, 3, 4, generator=g), torch.randn(2, 8, 3, 4, generator=g)
    keys, w = torch.randn(20, 8, generator=g), torch.rand(2, 1, 3, 4, generator=g)
    soft = {r: ak.soft_contrastive_loss(s, t, keys, weight=w, reduction=r, backend=backend) for r in ("sum", "none")}
    assert soft["sum"].shape == ()
    torch.testing.assert_close(soft["sum"], soft["none"].sum())
    assert_close(f"soft sum {backend} (seed {seed})", soft["sum"],
                 soft_contrastive_loss_ref(s.double(), t.double(), keys.double(), weight=w.double(), reduction="sum"),
                 torch.float32, 0.1)
    emb, y, kk, yk, protos = _map_problem(seed)
    q = emb.clone().requires_grad_(True)
    anat = {r: ak.anatomical_contrast_loss(q, y, protos, kk, yk, num_negatives=5, backend=backend, reduction=r)
            for r in ("sum", "none")}
    assert anat["sum"].shape == ()
    torch.testing.assert_close(anat["sum"], anat["none"].sum())
    ref = anatomical_contrast_loss_ref(emb.double(), y, protos.double(), kk.double(), yk, num_negatives=5,
                                       reduction="sum")
    assert_allowed(f"anatomical sum (seed {seed})", anat["sum"].detach(), ref, "anatomical_fp32")
    anat["sum"].backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_an_unknown_reduction_is_refused_by_every_loss():
    emb, y, keys, yk, protos = _map_problem(0)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        ak.anatomical_contrast_loss(emb, y, protos, keys, yk, reduction="avg")
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        ak.soft_contrastive_loss(emb, emb, keys, reduction="avg")


# -- absent classes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("negatives", ["topk", "class_graph"])
def test_queries_of_a_class_without_a_prototype_are_dropped_never_compared_with_a_zero_prototype(negatives):
    seed = fresh_seed()
    emb, y, keys, yk, protos = _map_problem(seed)  # class 2 has no key, so a zero prototype
    rows, flat = _rows(emb).requires_grad_(True), y.reshape(-1)
    assert (flat == 2).any()
    kw = dict(num_negatives=5, negatives=negatives)
    per_query = ak.anatomical_contrast_loss(rows, flat, protos, keys, yk, reduction="none",
                                            generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(per_query[flat == 2], torch.zeros(int((flat == 2).sum())))
    assert (per_query[(flat >= 0) & (flat != 2)] > 0).all()
    loss = ak.anatomical_contrast_loss(rows, flat, protos, keys, yk, generator=torch.Generator().manual_seed(3), **kw)
    loss.backward()
    assert torch.equal(rows.grad[flat == 2], torch.zeros_like(rows.grad[flat == 2]))
    # the mean counts the classes that have prototypes only: class 2 would have added (lse(0, ...) - 0) terms
    means = [per_query[flat == c].mean() for c in (0, 1)]
    torch.testing.assert_close(loss.detach(), (means[0] + means[1]) / 2)


# -- the caller's ignore label -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore", [-100, 255])
def test_the_callers_ignore_label_works_in_every_op_that_takes_labels(ignore):
    seed = fresh_seed()
    emb, y, keys, yk, protos = _map_problem(seed, ignore=ignore)
    ref_y, ref_yk = torch.where(y == ignore, -1, y), torch.where(yk == ignore, -1, yk)
    ref_protos, ref_present = ak.class_prototypes(keys, ref_yk, 3)
    assert all(torch.equal(a, b) for a, b in zip((protos, ak.class_prototypes(keys, yk, 3, ignore_label=ignore)[1]),
                                                 (ref_protos, ref_present)))
    torch.testing.assert_close(ak.class_prototypes(emb, y, 3, ignore_label=ignore)[0],
                               ak.class_prototypes(emb, ref_y, 3)[0])
    for a, b in zip(ak.hard_negative_topk(emb, y, keys, yk, 4, ignore_label=ignore),
                    ak.hard_negative_topk(emb, ref_y, keys, ref_yk, 4)):
        assert torch.equal(a, b)
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(ak.anatomical_contrast_loss(emb, y, protos, keys, yk, num_negatives=4, reduction=reduction,
                                                       ignore_label=ignore),
                           ak.anatomical_contrast_loss(emb, ref_y, protos, keys, ref_yk, num_negatives=4,
                                                       reduction=reduction))
    flat = y.reshape(-1)
    idx = ak.class_graph_negatives(protos.nan_to_num(), flat, yk, 6, 0.5, generator=torch.Generator().manual_seed(2),
                                   ignore_label=ignore)
    assert (idx[flat == ignore] == -1).all()
    picked = idx[idx >= 0]
    assert (yk[picked] != ignore).all()

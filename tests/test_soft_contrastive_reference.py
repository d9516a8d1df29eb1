"""The plain-torch reference: the ground truth every backend is compared with."""
import pytest
import torch
import torch.nn.functional as F

from action_kernels import reference
from action_kernels._rows import as_row_view, to_rows
from action_kernels._validation import row_layout
from action_kernels.reference import soft_contrastive_loss_ref
from action_kernels.testing import assert_allowed

pytestmark = pytest.mark.numerics  # .ci/run runs these again with the AVX2 paths forced


def _inputs(n=9, k=6, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype),
            torch.randn(k, d, generator=g, dtype=dtype))


def test_reference_gradcheck_float64_student_and_keys():
    s, t, k = _inputs()
    s.requires_grad_(True)
    k.requires_grad_(True)
    w = torch.rand(s.shape[0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s_, k_: soft_contrastive_loss_ref(s_, t, k_, 0.3, 0.2, weight=w), (s, k))


def test_reference_gradcheck_float64_maps_per_row():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, 2, generator=g, dtype=torch.float64)
    k = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s_, k_: soft_contrastive_loss_ref(s_, t, k_, 0.5, 0.1, reduction="none"),
                                    (s, k))


def test_loss_and_gradient_vanish_when_student_equals_teacher_at_equal_temperatures():
    s, _, k = _inputs()
    s.requires_grad_(True)
    loss = soft_contrastive_loss_ref(s, s.detach().clone(), k, 0.2, 0.2)
    loss.backward()
    assert_allowed("loss", loss.detach(), 0.0, "fp64_identity")
    assert_allowed("grad", s.grad, torch.zeros_like(s.grad), "fp64_identity")


def test_reference_equals_the_original_kl_div_formulation():
    s, t, k = _inputs(n=17, k=11, d=8, seed=3)
    n = lambda x: F.normalize(x, dim=1)  # noqa: E731
    original = F.kl_div(F.log_softmax(n(s) @ n(k).T / 0.1, dim=1), F.softmax(n(t) @ n(k).T / 0.01, dim=1),
                        reduction="batchmean")
    ours = soft_contrastive_loss_ref(s, t, k, 0.1, 0.01)
    assert_allowed("loss", ours, original, "fp64_identity")


def test_map_rows_follow_batch_then_spatial_order_in_the_reference_and_production():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)  # (B, D, P)
    for rows in (to_rows(x), reference._to_rows(x), as_row_view(x, row_layout("x", x)).reshape(-1, 3)):
        assert rows.shape == (8, 3)
        assert torch.equal(rows[5], x[1, :, 1])


def test_weighted_mean_sum_and_none_reductions_agree():
    s, t, k = _inputs(n=8, seed=5)
    w = torch.tensor([0, 1, 2, 0, 1, 1, 3, 0.5], dtype=torch.float64)
    per_row = soft_contrastive_loss_ref(s, t, k, reduction="none")
    unweighted = soft_contrastive_loss_ref(s, t, k, reduction="none", weight=None)
    assert torch.allclose(per_row, unweighted)
    assert torch.allclose(soft_contrastive_loss_ref(s, t, k, weight=w, reduction="none"), per_row * w)
    assert torch.allclose(soft_contrastive_loss_ref(s, t, k, weight=w, reduction="sum"), (per_row * w).sum())
    assert torch.allclose(soft_contrastive_loss_ref(s, t, k, weight=w), (per_row * w).sum() / w.sum())

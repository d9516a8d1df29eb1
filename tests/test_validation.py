"""Bad input is rejected with an error that names the argument, the expectation and what came."""
import pytest
import torch

import action_kernels as ak


def _ok():
    return torch.randn(6, 8), torch.randn(6, 8), torch.randn(5, 8)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(keys=torch.randn(5, 7)), ValueError, r"keys must have the same feature size as student \(D=8\)"),
        (dict(keys=torch.randn(0, 8)), ValueError, "at least one key"),
        (dict(keys=torch.randn(5, 8, 1)), ValueError, r"keys must have shape \(K, D=8\)"),
        (dict(teacher=torch.randn(6, 9)), ValueError, "teacher must have the shape of student"),
        (dict(student=torch.randn(6)), ValueError, r"student must have shape \(N, D\) or \(B, D, \*spatial\)"),
        (dict(student=torch.randn(6, 8).int()), TypeError, "student must be float32"),
        (dict(teacher=torch.randn(6, 8).double()), TypeError, "teacher must have the same dtype as student"),
        (dict(keys=torch.randn(5, 8).half()), TypeError, "keys must have the same dtype as student"),
        (dict(student=[[1.0]]), TypeError, "student must be a torch.Tensor"),
        (dict(tau_student=0.0), ValueError, "tau_student must be a finite temperature > 0"),
        (dict(tau_teacher=-1.0), ValueError, "tau_teacher must be a finite temperature > 0"),
        (dict(tau_teacher=float("nan")), ValueError, "tau_teacher"),
        (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(6,\)"),
        (dict(weight=-torch.ones(6)), ValueError, "weight must be non-negative"),
        (dict(weight=torch.ones(6, dtype=torch.int64)), TypeError, "weight must be a floating point or bool"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="fast"), ValueError, "is not a backend"),
    ],
)
def test_bad_arguments_raise_named_errors(change, error, match):
    s, t, k = _ok()
    args = dict(student=s, teacher=t, keys=k)
    args.update(change)
    with pytest.raises(error, match=match):
        ak.soft_contrastive_loss(**args)


def test_teacher_that_requires_grad_is_rejected_with_the_fix():
    s, t, k = _ok()
    with pytest.raises(ValueError, match=r"teacher must not require grad.*teacher.detach\(\)"):
        ak.soft_contrastive_loss(s, t.requires_grad_(True), k)


def test_map_weight_accepts_per_pixel_and_per_row_shapes():
    s, t = torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4)
    k = torch.randn(5, 8)
    a = ak.soft_contrastive_loss(s, t, k, weight=torch.ones(2, 3, 4))
    b = ak.soft_contrastive_loss(s, t, k, weight=torch.ones(24))
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"\(24,\) or \(2, 3, 4\)"):
        ak.soft_contrastive_loss(s, t, k, weight=torch.ones(2, 4, 3))


def test_non_finite_inputs_propagate_to_the_affected_rows_only():
    s, t, k = _ok()
    s[2, 0] = float("nan")
    rows = ak.soft_contrastive_loss(s, t, k, reduction="none", backend="chunked")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()


def test_class_prototypes_weights_are_checked_like_the_soft_loss_weights():
    features, labels = torch.randn(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must have shape \(18,\) or \(2, 3, 3\) \(one weight per row of "
                                         r"features\)"):
        ak.class_prototypes(features, labels, 2, weight=torch.ones(9, 2))
    with pytest.raises(ValueError, match="weight must be non-negative"):
        ak.class_prototypes(features, labels, 2, weight=-torch.ones(2, 3, 3))
    protos, present = ak.class_prototypes(features, labels, 2, weight=torch.ones(2, 3, 3) > 0)  # a mask is a weight
    assert present.tolist() == [True, False]


def test_indexed_cosine_rejects_bad_indices_by_name():
    a, keys = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"indices must have shape \(4, n\)"):
        ak.indexed_cosine(a, keys, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="indices must be int64"):
        ak.indexed_cosine(a, keys, torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"indices must be < K=6"):
        ak.indexed_cosine(a, keys, torch.full((4, 2), 6))

"""Bad input is rejected with an error that names the argument, the expectation and what came."""
import pytest
import torch

import action_kernels as ak
import helpers


def _ok():
    return torch.randn(6, 8), torch.randn(6, 8), torch.randn(5, 8)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(keys=torch.randn(5, 7)), ValueError, r"keys must have the feature size of student \(D=8\)"),
        (dict(keys=torch.randn(5, 8, 1)), ValueError, r"keys must have shape \(K, D=8\)"),
        (dict(teacher=torch.randn(6, 9)), ValueError, "teacher must have the shape of student"),
        (dict(student=torch.randn(6)), ValueError, r"student must have shape \(N, D\) or \(B, D, \*spatial\)"),
        (dict(student=torch.randn(6, 8).int()), TypeError, "student must be float32"),
        (dict(student=[[1.0]]), TypeError, "student must be a torch.Tensor"),
        (dict(tau_student=0.0), ValueError, "tau_student must be a finite temperature >= 0.0001"),
        (dict(tau_teacher=-1.0), ValueError, "tau_teacher must be a finite temperature >= 0.0001"),
        (dict(tau_student=1e-45), ValueError, "tau_student must be a finite temperature >= 0.0001 .* float32 "
                                              "rounding"),
        (dict(tau_teacher=float("nan")), ValueError, "tau_teacher"),
        (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(6,\)"),
        (dict(weight=-torch.ones(6)), ValueError, "weight must be non-negative"),
        (dict(weight=torch.tensor([1.0, float("nan"), 1, 1, 1, 1])), ValueError,
         "weight must be non-negative and finite, got nan at flat index 1"),
        (dict(weight=torch.full((6,), float("inf"))), ValueError, "weight must be non-negative and finite"),
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
    with pytest.raises(ValueError, match=r"weight must have shape \(18,\) or \(2, 3, 3\) or \(2, 1, 3, 3\) \(one "
                                         r"weight per row of features, whose shape is \(2, 4, 3, 3\)\), got \(9, 2\)"):
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
    with pytest.raises(ValueError, match=r"indices must be key indices in \[0, K=6\) or -1 for padding, got 6"):
        ak.indexed_cosine(a, keys, torch.full((4, 2), 6))
    with pytest.raises(ValueError, match=r"indices must be key indices in \[0, K=6\) or -1 for padding, got -3"):
        ak.indexed_cosine(a, keys, torch.full((4, 2), -3))


def test_indexed_cosine_validates_its_keys_by_name():
    a, idx = torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"keys must have shape \(K, D=3\), got a 1-d tensor"):
        ak.indexed_cosine(a, torch.randn(3), idx)
    with pytest.raises(ValueError, match=r"keys must have the feature size of anchors \(D=3\), got keys of shape "
                                         r"\(6, 5\)"):
        ak.indexed_cosine(a, torch.randn(6, 5), idx)
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        ak.indexed_cosine(a, [[1.0, 2.0, 3.0]], idx)
    with pytest.raises(TypeError, match="keys must be float32"):
        ak.indexed_cosine(a, torch.zeros(6, 3, dtype=torch.long), idx)


def test_class_prototypes_refuses_negative_and_nan_weights():
    features, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for bad in (-1.0, float("nan"), float("inf")):
        w = torch.ones(6)
        w[3] = bad
        with pytest.raises(ValueError, match=f"weight must be non-negative and finite, got {bad} at flat index 3"):
            ak.class_prototypes(features, labels, 3, weight=w)
    protos, _ = ak.class_prototypes(features, labels, 3, weight=torch.ones(6))
    assert torch.isfinite(protos).all()


@pytest.mark.parametrize("change,error,match", [
    (dict(t=torch.randn(1, 3, 8)), ValueError, r"t must have the shape of s \(1, 4000, 8\), got \(1, 3, 8\)"),
    (dict(s=torch.randn(4000, 8)), ValueError, r"s must have shape \(B, P, D\)"),
    (dict(k=torch.randn(5, 7)), ValueError, r"keys must have the feature size of s \(D=8\)"),
    (dict(tau_s=0.0), ValueError, "tau_s must be a finite temperature"),
    (dict(backend="torch"), ValueError, r"backend must be one of \('chunked', 'triton', 'cuda'\)"),
    (dict(backend=None), ValueError, "backend must be one of"),
    (dict(t=torch.randn(1, 4000, 8, requires_grad=True)), ValueError, "teacher must not require grad"),
])
def test_soft_contrastive_function_apply_validates_like_the_functional(change, error, match):
    """The drop-in Function is public: a teacher of 3 rows with a student of 4,000 once read out of bounds."""
    args = dict(s=torch.randn(1, 4000, 8, requires_grad=True), t=torch.randn(1, 4000, 8), k=torch.randn(5, 8),
                tau_s=0.1, tau_t=0.01, normalize=True, backend="chunked")
    args.update(change)
    with pytest.raises(error, match=match):
        ak.SoftContrastiveLossFunction.apply(*args.values())


def test_topk_and_indexed_cosine_functions_validate_like_their_functionals():
    a, keys = torch.randn(1, 6, 4), torch.randn(5, 4)
    ya, yk = torch.zeros(6, dtype=torch.long), torch.ones(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"anchor_labels must have 6 elements"):
        ak.HardNegativeTopkFunction.apply(a, ya[:3], keys, yk, 2, -1, True, "chunked")
    with pytest.raises(ValueError, match=r"key_labels must have 5 elements"):
        ak.HardNegativeTopkFunction.apply(a, ya, keys, yk[:2], 2, -1, True, "chunked")
    with pytest.raises(ValueError, match="k must be >= 1"):
        ak.HardNegativeTopkFunction.apply(a, ya, keys, yk, 0, -1, True, "chunked")
    with pytest.raises(ValueError, match=r"keys must have the feature size of anchors \(D=4\)"):
        ak.HardNegativeTopkFunction.apply(a, ya, torch.randn(5, 3), yk, 2, -1, True, "chunked")
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.HardNegativeTopkFunction.apply(a, ya, keys, yk, 2, -1, True, "fast")
    with pytest.raises(ValueError, match=r"indices must have shape \(6, n\)"):
        ak.IndexedCosineFunction.apply(a, keys, torch.zeros(2, 2, dtype=torch.long), True)
    with pytest.raises(ValueError, match=r"indices must be key indices in \[0, K=5\)"):
        ak.IndexedCosineFunction.apply(a, keys, torch.full((6, 2), 5), True)


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton", "cuda"])
def test_topk_with_an_empty_bank_pads_on_every_backend(backend):
    """K = 0 on the CPU default (chunked) raised ZeroDivisionError where the other backends pad."""
    helpers.require(backend)
    values, idx = ak.hard_negative_topk(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.randn(0, 8),
                                        torch.zeros(0, dtype=torch.long), 3, backend=backend)
    assert values.shape == (4, 3) and bool((values == float("-inf")).all()) and bool((idx == -1).all())

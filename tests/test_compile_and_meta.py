"""Every op under torch.compile(dynamic=True, fullgraph=True) (no graph break: validation, dispatch and the library
ops trace with symbolic sizes and temperatures) and on meta tensors (shapes without data)."""
import pytest
import torch

import action_kernels as ak


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 4, 3, generator=g)
    k = torch.randn(17, 8, generator=g)
    q = torch.randn(12, 8, generator=g)
    return s, torch.randn(2, 8, 4, 3, generator=g), k, q, torch.arange(12) % 3, torch.randint(0, 3, (17,), generator=g)


CALLS = {
    "soft weighted": lambda s, t, k, q, yq, yk: ak.soft_contrastive_loss(s, t, k, 0.2, 0.05,
                                                                        weight=torch.ones(2, 4, 3)),
    "soft torch": lambda s, t, k, q, yq, yk: ak.soft_contrastive_loss(s, t, k, backend="torch"),
    "topk": lambda s, t, k, q, yq, yk: ak.hard_negative_topk(q, yq, k, yk, 4)[0].clamp_min(-2.0).sum(),
    "anatomical": lambda s, t, k, q, yq, yk: ak.anatomical_contrast_loss(
        q, yq, ak.class_prototypes(k, yk, 3)[0].detach(), k, yk, 0.5, "topk", 4),
    "prototypes": lambda s, t, k, q, yq, yk: ak.class_prototypes(q, yq, 3)[0].sum(),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_ops_compile_with_dynamic_shapes_and_fullgraph_to_the_eager_values(name):
    """soft_contrastive_loss and anatomical_contrast_loss graph-broke under dynamic=True (math.isfinite of a symbolic
    temperature, torch.rand(..., generator=None), the torch backend's importlib)."""
    fn = CALLS[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (12, 9):  # a second size: the same graph, sizes symbolic
        s, t, k, q, yq, yk = _inputs()
        q, yq = q[:n], yq[:n]
        eager_in = [x.clone().requires_grad_(x.is_floating_point() and x is not t) for x in (s, t, k, q)]
        graph_in = [x.detach().clone().requires_grad_(x.requires_grad) for x in eager_in]
        eager, graph = fn(*eager_in, yq, yk), compiled(*graph_in, yq, yk)
        eager.backward()
        graph.backward()
        assert torch.allclose(eager, graph, rtol=1e-5, atol=1e-6), (eager, graph)
        for a, b in zip(eager_in, graph_in):
            assert (a.grad is None) == (b.grad is None)
            assert a.grad is None or torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_anatomical_class_graph_compiles_with_dynamic_shapes_and_fullgraph():
    torch._dynamo.reset()
    s, t, k, q, yq, yk = _inputs()
    fn = torch.compile(lambda q: ak.anatomical_contrast_loss(q, yq, torch.randn(3, 8), k, yk, 0.5, "class_graph", 4),
                       dynamic=True, fullgraph=True, backend="aot_eager")
    q = q.requires_grad_(True)
    loss = fn(q)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


def test_ops_run_on_meta_tensors():
    """Meta tensors (shape propagation) failed with "unsupported scalarType": autocast has no meta device type."""
    m = torch.device("meta")
    s, k = torch.empty(2, 8, 4, 3, device=m), torch.empty(17, 8, device=m)
    assert ak.soft_contrastive_loss(s, s, k).shape == ()
    assert ak.soft_contrastive_loss(s, s, k, reduction="none").shape == (24,)
    q, yq = torch.empty(12, 8, device=m), torch.zeros(12, dtype=torch.long, device=m)
    yk = torch.zeros(17, dtype=torch.long, device=m)
    values, idx = ak.hard_negative_topk(q, yq, k, yk, 4)
    assert values.shape == (12, 4) and idx.shape == (12, 4)
    assert ak.class_prototypes(q, yq, 3)[0].shape == (3, 8)

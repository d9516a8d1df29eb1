"""Backend choice: explicit argument, then ACTION_KERNELS_BACKEND, then automatic; loud failures, quiet fallbacks;
the registry (each backend defined once, its kernels implementing the contract, per-op limits)."""
import dataclasses
import inspect
import warnings

import pytest
import torch

import action_kernels as ak
from action_kernels import dispatch


def _args():
    return torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)


def test_auto_on_cpu_picks_the_chunked_path():
    assert dispatch.select("soft_contrastive_loss", None, torch.device("cpu"), torch.float32) == "chunked"


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select("soft_contrastive_loss", None, torch.device("cpu"), torch.float32) == "torch"
    argument_wins = dispatch.select("soft_contrastive_loss", "chunked", torch.device("cpu"), torch.float32)
    assert argument_wins == "chunked"


def test_unknown_backend_in_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "turbo")
    with pytest.raises(ValueError, match="ACTION_KERNELS_BACKEND='turbo' is not a backend"):
        ak.soft_contrastive_loss(*_args())


def test_forced_backend_that_cannot_run_raises_with_the_reason():
    # float64 has no fused kernel: the reason names the dtype and the backends that take it
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: .*float64"):
        ak.soft_contrastive_loss(*(x.double() for x in _args()), backend="triton")


def test_triton_on_cpu_without_interpreter_explains_how_to_enable_it(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_status", lambda: (True, "", False))
    why = dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    assert "need CUDA tensors" in why and "TRITON_INTERPRET=1" in why


def test_cuda_tensors_follow_the_static_estimates_per_op_dtype_and_feature_size(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, dev, dt, op=None, **kw: "")
    cuda, soft, topk = torch.device("cuda"), "soft_contrastive_loss", "hard_negative_topk"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # preferences, not fallbacks: no warning
        assert dispatch.select(soft, None, cuda, torch.float16, D=128) == "triton"
        assert dispatch.select(soft, None, cuda, torch.bfloat16, D=64) == "triton"
        assert dispatch.select(soft, None, cuda, torch.bfloat16, D=256) == "cuda"
        assert dispatch.select(soft, None, cuda, torch.float32, D=64) == "cuda"
        assert dispatch.select(topk, None, cuda, torch.bfloat16, k=64, D=128) == "triton"
        assert dispatch.select(topk, None, cuda, torch.float16, k=16, D=256) == "triton"
        assert dispatch.select(topk, None, cuda, torch.bfloat16, k=65, D=128) == "cuda"   # the k = 512 kernels
        assert dispatch.select(topk, None, cuda, torch.bfloat16, k=64, D=512) == "cuda"
        assert dispatch.select(topk, None, cuda, torch.bfloat16, D=128) == "cuda"          # k unknown
        assert dispatch.select(soft, None, torch.device("cpu"), torch.bfloat16, D=128) == "chunked"
    assert dispatch.AUTO_ORDER["cuda"][:2] == ("cuda", "triton")
    from action_kernels import env_report
    text = "\n".join(env_report.lines())
    assert dispatch.AUTO_ORDER_REASON["cuda"] in text
    assert all(p.why in text for p in dispatch.PREFERENCES.values())


def test_cuda_tensors_fall_back_with_one_warning_when_triton_is_missing(monkeypatch):
    reasons = {"triton": "not importable", "cuda": "", "chunked": ""}
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, dev, dt, op=None, **kw: reasons.get(name, ""))
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="using backend 'cuda' because triton: not importable"):
        assert dispatch.select("soft_contrastive_loss", None, torch.device("cuda"), torch.float16, D=128) == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("soft_contrastive_loss", None, torch.device("cuda"), torch.float16, D=128) == "cuda"


def test_report_lists_every_backend():
    assert set(dispatch.report(torch.device("cpu"))) == set(dispatch.BACKENDS)


@pytest.mark.parametrize("op", tuple(dispatch.OPS))
@pytest.mark.parametrize("backend", dispatch.FUSED)
def test_every_backend_module_implements_the_contract(op, backend):
    if dispatch.unavailable_reason(backend, torch.device("cpu"), torch.float32) and backend == "triton":
        pytest.skip("triton is not importable here")
    if dispatch.REGISTRY[backend].ops is not None and op not in dispatch.REGISTRY[backend].ops:
        pytest.skip(f"{backend} declares no kernels for {op}")
    module = dispatch.kernels(op, backend)
    contract = dispatch.CONTRACTS[op]
    for name, spec in inspect.getmembers(contract, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert hasattr(module, name), f"{module.__name__} lacks {name} of {contract.__name__}"
        want = list(inspect.signature(spec).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(module, name)).parameters) == want, (module.__name__, name)


def test_backend_lists_derive_from_the_registry():
    assert dispatch.BACKENDS == tuple(dispatch.REGISTRY) and "torch" in dispatch.BACKENDS
    assert set(dispatch.FUSED) == {n for n, b in dispatch.REGISTRY.items() if b.package is not None}
    for order in dispatch.AUTO_ORDER.values():
        assert set(order) <= set(dispatch.BACKENDS)


def test_a_per_op_limit_rejects_the_backend_for_that_op_only(monkeypatch):
    limited = dataclasses.replace(dispatch.REGISTRY["chunked"], limits={"hard_negative_topk": {"k": 8}})
    monkeypatch.setattr(dispatch, "REGISTRY", {**dispatch.REGISTRY, "chunked": limited})
    cpu = torch.device("cpu")
    assert limited.supports("hard_negative_topk", cpu, torch.float32, k=8) == ""
    why = limited.supports("hard_negative_topk", cpu, torch.float32, k=9)
    assert why == "chunked takes k <= 8 for hard_negative_topk, got k=9"
    assert limited.supports("soft_contrastive_loss", cpu, torch.float32, k=9) == ""
    a, ya, keys, yk = torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(7, 4), torch.ones(7).long()
    with pytest.raises(RuntimeError, match=r"backend='chunked' cannot run here: chunked takes k <= 8"):
        ak.hard_negative_topk(a, ya, keys, yk, 9, backend="chunked")
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="using backend 'torch' because chunked: chunked takes k <= 8"):
        assert dispatch.select("hard_negative_topk", None, cpu, torch.float32, k=9) == "torch"  # the last resort
    assert ak.hard_negative_topk(a, ya, keys, yk, 9)[1].shape == (5, 9)


def test_a_backend_without_kernels_for_an_op_is_declined_for_it():
    partial = dataclasses.replace(dispatch.REGISTRY["chunked"], ops=("soft_contrastive_loss",))
    cpu = torch.device("cpu")
    assert partial.supports("soft_contrastive_loss", cpu, torch.float32) == ""
    assert partial.supports("hard_negative_topk", cpu, torch.float32) == (
        "chunked has no kernels for hard_negative_topk (it implements soft_contrastive_loss)")


def test_unknown_op_is_an_error_that_lists_the_ops():
    with pytest.raises(ValueError, match="op must be one of"):
        dispatch.unavailable_reason("chunked", torch.device("cpu"), torch.float32, op="softmax")


def test_a_backend_added_to_the_registry_alone_is_dispatched_to(monkeypatch):
    """Adding a backend is one registry entry plus its package: here a copy of the chunked entry under a new name."""
    mirror = dataclasses.replace(dispatch.REGISTRY["chunked"], name="mirror")
    monkeypatch.setattr(dispatch, "REGISTRY", {**dispatch.REGISTRY, "mirror": mirror})
    g = torch.Generator().manual_seed(0)
    s, t, k = torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 6, 3, 4, generator=g), torch.randn(9, 6, generator=g)
    assert torch.equal(ak.soft_contrastive_loss(s, t, k, backend="mirror"),
                       ak.soft_contrastive_loss(s, t, k, backend="chunked"))
    ya, yk = torch.randint(0, 3, (2, 3, 4), generator=g), torch.randint(-1, 3, (9,), generator=g)
    assert torch.equal(ak.hard_negative_topk(s, ya, k, yk, 4, backend="mirror")[1],
                       ak.hard_negative_topk(s, ya, k, yk, 4, backend="chunked")[1])


def test_triton_refuses_fp32_cuda_tensors_with_the_reason_and_auto_picks_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "_triton_device", lambda dev: "")
    triton = dataclasses.replace(dispatch.REGISTRY["triton"], device=lambda dev: "")
    ext = dataclasses.replace(dispatch.REGISTRY["cuda"], device=lambda dev: "")
    monkeypatch.setattr(dispatch, "REGISTRY", {**dispatch.REGISTRY, "triton": triton, "cuda": ext})
    why = dispatch.unavailable_reason("triton", cuda, torch.float32, "soft_contrastive_loss")
    assert "float16 and bfloat16 on cuda tensors" in why and "spill" in why
    assert dispatch.unavailable_reason("triton", cuda, torch.bfloat16, "soft_contrastive_loss") == ""
    # the interpreter on CPU tensors keeps fp32 (the kernels' logic is tested there)
    assert dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32, "soft_contrastive_loss") == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a preference, not a fallback: no warning
        assert dispatch.select("soft_contrastive_loss", None, cuda, torch.float32, D=128) == "cuda"
    with pytest.raises(RuntimeError, match="spill"):
        dispatch.select("soft_contrastive_loss", "triton", cuda, torch.float32)

"""Backend choice: explicit argument, then ACTION_KERNELS_BACKEND, then automatic; loud failures, quiet fallbacks."""
import warnings

import pytest
import torch

import action_kernels as ak
from action_kernels import dispatch


def _args():
    return torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)


def test_auto_on_cpu_picks_the_chunked_path():
    assert dispatch.select("op", None, torch.device("cpu"), torch.float32) == "chunked"


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select("op", None, torch.device("cpu"), torch.float32) == "torch"
    assert dispatch.select("op", "chunked", torch.device("cpu"), torch.float32) == "chunked"  # argument wins


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


def test_cuda_tensors_prefer_triton_while_the_cuda_kernels_have_no_tensor_cores(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, dev, dt: "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("op", None, torch.device("cuda"), torch.float16) == "triton"
    assert "tensor-core" in dispatch.AUTO_ORDER_REASON["cuda"]


def test_cuda_tensors_fall_back_with_one_warning_when_triton_is_missing(monkeypatch):
    reasons = {"triton": "not importable", "cuda": "", "chunked": ""}
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, dev, dt: reasons.get(name, ""))
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="using backend 'cuda' because triton: not importable"):
        assert dispatch.select("op", None, torch.device("cuda"), torch.float16) == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("op", None, torch.device("cuda"), torch.float16) == "cuda"


def test_report_lists_every_backend():
    assert set(dispatch.report(torch.device("cpu"))) == set(dispatch.BACKENDS)

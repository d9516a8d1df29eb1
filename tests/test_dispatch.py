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
    limited = dataclasses.replace(dispatch.REGISTRY["chunked"],
                                  limits={"hard_negative_topk": {"k": dispatch.Limit(8, "a test's limit")}})
    monkeypatch.setattr(dispatch, "REGISTRY", {**dispatch.REGISTRY, "chunked": limited})
    cpu = torch.device("cpu")
    assert limited.supports("hard_negative_topk", cpu, torch.float32, k=8) == ""
    why = limited.supports("hard_negative_topk", cpu, torch.float32, k=9)
    assert why == ("chunked takes k <= 8 for hard_negative_topk, got k=9 (a test's limit); use backend='torch' or "
                   "'triton' or 'cuda'")
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


def _gpu_machine(monkeypatch):
    """The registry as on a machine with a CUDA GPU, Triton and the `_C` build: every backend runs on CUDA tensors,
    the limits stay. No GPU is needed: dispatch decides from the device, dtype and sizes alone."""
    here = {name: dataclasses.replace(b, device=lambda dev: "") for name, b in dispatch.REGISTRY.items()}
    monkeypatch.setattr(dispatch, "REGISTRY", here)
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_call_with_768_features_skips_both_gpu_backends_with_one_warning_naming_their_limits(monkeypatch, dtype):
    _gpu_machine(monkeypatch)
    cuda, soft, topk = torch.device("cuda"), "soft_contrastive_loss", "hard_negative_topk"
    assert dispatch.auto_order(soft, "cuda", dtype, D=768)[0] == ("cuda", "triton", "chunked")
    want = (r"using backend 'chunked' because cuda: cuda takes D <= 512 for {op}, got D=768 \(the CUDA kernels hold "
            r"whole rows in shared memory.*\); use backend='torch' or 'chunked'; triton: triton takes D <= 512 for "
            r"{op}, got D=768 \(the Triton launch tables stop at a 512-wide feature tile.*\)")
    for op, limits in ((soft, {}), (topk, {"k": 64})):
        with pytest.warns(UserWarning, match=want.format(op=op)) as caught:
            assert dispatch.select(op, None, cuda, dtype, D=768, **limits) == "chunked"
        assert len(caught) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason
            assert dispatch.select(op, None, cuda, dtype, D=768, **limits) == "chunked"
            assert dispatch.select(op, None, cuda, dtype, D=512, **limits) in ("cuda", "triton")  # within both
    for name in ("cuda", "triton"):  # forced: raises with the reason and the backends that take it
        with pytest.raises(RuntimeError, match=rf"backend='{name}' cannot run here: {name} takes D <= 512 for "
                                               rf"{soft}, got D=768 \(.*\); use backend='torch' or 'chunked'"):
            dispatch.select(soft, name, cuda, dtype, D=768)


def test_topk_with_k_above_triton_buffers_runs_on_cuda_and_a_forced_triton_says_why(monkeypatch):
    _gpu_machine(monkeypatch)
    cuda, topk = torch.device("cuda"), "hard_negative_topk"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuda is first at k > 64: no fallback, no warning
        assert dispatch.select(topk, None, cuda, torch.bfloat16, k=600, D=128) == "cuda"
    with pytest.raises(RuntimeError, match=r"triton takes k <= 512 for hard_negative_topk, got k=600 \(the Triton "
                                           r"top-k's merge buffers.*\); use backend='torch' or 'chunked' or 'cuda'"):
        dispatch.select(topk, "triton", cuda, torch.bfloat16, k=600, D=128)
    # where Triton is preferred (k <= 64, D <= 256) its limits still apply first
    assert dispatch.unavailable_reason("triton", cuda, torch.bfloat16, topk, k=64, D=256) == ""


def test_registry_limits_are_what_the_kernels_are_built_for():
    """The registry decides; the launchers' last-line checks and the compiled buckets must say the same numbers."""
    from action_kernels.cuda._operands import MAX_FEATURES
    limits = {name: b.limits for name, b in dispatch.REGISTRY.items()}
    assert limits["torch"] == limits["chunked"] == {}
    assert {op: lim["D"].top for op, lim in limits["cuda"].items()} == {op: MAX_FEATURES for op in dispatch.OPS}
    assert "k" not in limits["cuda"]["hard_negative_topk"]  # the CUDA top-k keeps its lists in global memory
    from action_kernels import env_report
    assert "limits of cuda for soft_contrastive_loss: D <= 512 (the CUDA kernels" in "\n".join(env_report.lines())
    from action_kernels import _extension
    mod = _extension.host_module()  # the CUDA kernels' C++ under emulation: the same feature buckets
    if mod is not None:
        mod.launch_plans("hard_negative_topk", "topk", "fp32", 40, 70, MAX_FEATURES, 9)
        with pytest.raises(ValueError, match="D <= 512"):
            mod.launch_plans("hard_negative_topk", "topk", "fp32", 40, 70, MAX_FEATURES + 1, 9)
    if dispatch.triton_status()[0]:
        from action_kernels.triton import hard_negative_topk as ttk
        from action_kernels.triton import soft_contrastive as tsc
        assert limits["triton"]["hard_negative_topk"]["k"].top == ttk.MAX_K == max(ttk.BUFFERS)
        assert limits["triton"]["hard_negative_topk"]["D"].top == max(key[2] for key in ttk.CONFIGS)
        assert limits["triton"]["soft_contrastive_loss"]["D"].top == max(key[3] for key in tsc.CONFIGS)

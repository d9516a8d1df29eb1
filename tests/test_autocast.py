"""Mixed precision (issue 17): every op and backend gives the same answer inside and outside torch.autocast, a
16-bit student with an fp32 bank is accepted (promoted), and a stage-iii run with `--amp on` trains.

Under CPU bf16 autocast the chunked path's GEMMs used to return bf16 blocks that the native kernel read as fp32
(garbage values, then a segfault); the ops now switch autocast off inside and compute in their inputs' dtype."""
import os
import subprocess
import sys

import pytest
import torch

import action_kernels as ak
import helpers
from action_kernels import dispatch

BACKENDS = dispatch.BACKENDS
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16 student, fp32 bank": (torch.bfloat16, torch.float32)}


AMP = {"device": "cpu", "dtype": torch.bfloat16}  # what _autocast turns on (the CUDA test changes it)


def _autocast(enabled: bool):
    return torch.autocast(AMP["device"], dtype=AMP["dtype"], enabled=enabled)


def _soft(backend, s, t, k, autocast=False):
    s, k = s.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    with _autocast(autocast):
        loss = ak.soft_contrastive_loss(s, t, k, 0.1, 0.05, reduction="none", backend=backend)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device)).sum().backward()
    return loss.detach(), s.grad, k.grad


def _topk(backend, a, ya, keys, yk, autocast=False):
    a, keys = a.detach().clone().requires_grad_(True), keys.detach().clone().requires_grad_(True)
    with _autocast(autocast):
        values, idx = ak.hard_negative_topk(a, ya, keys, yk, 5, backend=backend)
    torch.where(torch.isfinite(values), values, values.new_zeros(())).sum().backward()
    return values.detach(), idx, a.grad, keys.grad


def _anatomical(backend, q, yq, keys, yk, autocast=False):
    q = q.detach().clone().requires_grad_(True)
    with _autocast(autocast):
        protos, _ = ak.class_prototypes(keys.float(), yk, 3)
        loss = ak.anatomical_contrast_loss(q, yq, protos.to(keys.dtype), keys, yk, num_negatives=6, backend=backend)
        cos = ak.indexed_cosine(q.detach(), keys, torch.arange(q.shape[0] * 3, device=q.device).view(-1, 3)
                                % keys.shape[0])
        draws = ak.class_graph_negatives(protos, yq, yk, 4, 0.5,
                                         generator=torch.Generator(q.device).manual_seed(0))
    loss.backward()
    return loss.detach(), q.grad, protos, cos, draws


def _same(label, inside, outside):
    for i, (x, y) in enumerate(zip(inside, outside)):
        assert x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()), f"{label}: output {i} differs"


def _check_every_op(backend, dtypes, device):
    row_dtype, bank_dtype = DTYPES[dtypes]
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 16, 3, 4, generator=g)
    t = (s + 0.5 * torch.randn(s.shape, generator=g)).to(device, row_dtype)
    s, k = s.to(device, row_dtype), torch.randn(21, 16, generator=g).to(device, bank_dtype)
    outside, inside = _soft(backend, s, t, k), _soft(backend, s, t, k, autocast=True)
    _same(f"soft {backend} {dtypes}", inside, outside)
    assert outside[1].dtype == row_dtype and outside[2].dtype == bank_dtype
    ya = (torch.arange(24).view(2, 3, 4) % 3).to(device)
    yk = (torch.arange(21) % 4 - 1).to(device)
    outside, inside = _topk(backend, s, ya, k, yk), _topk(backend, s, ya, k, yk, autocast=True)
    _same(f"topk {backend} {dtypes}", inside, outside)
    q, yq = s[0].flatten(1).T.contiguous(), (torch.arange(12) % 3).to(device)
    outside = _anatomical(backend, q, yq, k, yk.clamp_min(0))
    inside = _anatomical(backend, q, yq, k, yk.clamp_min(0), autocast=True)
    _same(f"anatomical {backend} {dtypes}", inside, outside)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_gives_the_same_answer_inside_and_outside_cpu_bf16_autocast(backend, dtypes):
    """Forward under autocast, backward after it (as the trainer does; torch advises against backward inside
    autocast): values, indices and gradients bit for bit equal to the same inputs without autocast."""
    helpers.require(backend)
    if backend in helpers.INTERPRETED_ON_CPU and dtypes != "bf16 student, fp32 bank":
        pytest.skip("Triton's interpreter takes ~10 s per top-k call: it runs the mixed case only (~25 s)")
    _check_every_op(backend, dtypes, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_gives_the_same_answer_inside_and_outside_cuda_autocast(backend, dtypes, amp, monkeypatch):
    """The same on CUDA tensors under bf16 and fp16 autocast (pytest -m cuda, on a lent GPU)."""
    why = dispatch.unavailable_reason(backend, torch.device("cuda"), DTYPES[dtypes][0])
    if why:
        pytest.fail(f"backend {backend!r} should run on this GPU: {why}")
    monkeypatch.setitem(AMP, "device", "cuda")
    monkeypatch.setitem(AMP, "dtype", amp)
    _check_every_op(backend, dtypes, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bf16_student_with_an_fp32_bank_runs_in_fp32_exactly(backend):
    """Under autocast the student comes out of the network in bf16 while the bank stays fp32: that raised a dtype
    TypeError. Promotion to fp32 is exact, so the answer is the fp32 one on the upcast student, bit for bit."""
    helpers.require(backend)
    g = torch.Generator().manual_seed(12)
    s, k = torch.randn(20, 8, generator=g).bfloat16(), torch.randn(9, 8, generator=g)
    t = s.float() + 0.1
    mixed = _soft(backend, s, t, k)
    upcast = _soft(backend, s.float(), t, k)
    assert torch.equal(mixed[0], upcast[0]) and torch.equal(mixed[2], upcast[2])
    assert mixed[1].dtype == torch.bfloat16 and torch.equal(mixed[1], upcast[1].bfloat16())


def test_drop_in_functions_promote_mixed_dtypes_like_the_functionals():
    s, k = torch.randn(1, 10, 8).bfloat16().requires_grad_(True), torch.randn(6, 8)
    rows = ak.SoftContrastiveLossFunction.apply(s, s.detach().float(), k, 0.1, 0.05, True, "chunked")
    rows.sum().backward()
    ref = ak.soft_contrastive_loss(s.detach().float()[0], s.detach().float()[0], k, 0.1, 0.05, reduction="none",
                                   backend="chunked")
    assert torch.equal(rows, ref) and s.grad.dtype == torch.bfloat16


@helpers.needs_acdc
def test_finetune_stage_trains_with_amp_on(tmp_path):
    """`action train --stage finetune --amp on` died with SIGSEGV in _C_cpu (a bf16 similarity block read as fp32).
    About 10 s: 3 iterations at 64x64 with the anatomical contrast on."""
    out = tmp_path / "amp"
    cmd = [sys.executable, "-m", "action.cli", "train", "--preset", "smoke", "--stage", "finetune", "--amp", "on",
           "--data", helpers.ACDC, "--out", str(out), "--iterations", "3", "--val-every", "3", "--val-volumes", "1",
           "--test-at-end", "false", "--threads", "1", "--unlabelled-batch", "2", "--log-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    rows = (out / "train.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    values = dict(zip(header, last))
    assert int(values["iteration"]) == 3 and all(float(values[k]) == float(values[k]) for k in ("loss", "anco"))
    assert float(values["anco"]) > 0  # the anatomical contrast (top-k on the native CPU path) ran

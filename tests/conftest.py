"""Test setup: Triton's interpreter for CPU tensors when torch sees no CUDA device (it must be set before triton is
imported; on a GPU the kernels run compiled), backend discovery, and small Triton tiles for the interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from action_kernels import dispatch  # noqa: E402

FUSED = ("chunked", "triton", "cuda")


def available(backend: str, device: str = "cpu", dtype=torch.float32) -> bool:
    return dispatch.unavailable_reason(backend, torch.device(device), dtype) == ""


def require(backend: str, device: str = "cpu", dtype=torch.float32) -> None:
    why = dispatch.unavailable_reason(backend, torch.device(device), dtype)
    if why:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {why}")


@pytest.fixture(autouse=True)
def _small_triton_tiles():
    """The interpreter's cost grows with block iterations: 32-wide tiles keep ragged tests fast (and cover the
    masked tail tiles). Only the interpreter reads these; compiled runs use the launchers' tables."""
    try:
        from action_kernels.triton import hard_negative_topk as ttk
        from action_kernels.triton import soft_contrastive as tsc
    except Exception:  # triton absent: those tests skip themselves
        yield
        return
    saved = [(d, dict(d)) for d in (tsc.INTERPRETER_BLOCKS, ttk.INTERPRETER_BLOCKS)]
    tsc.INTERPRETER_BLOCKS.update(BLOCK_M=32, BLOCK_N=32)
    yield
    for d, old in saved:
        d.clear()
        d.update(old)

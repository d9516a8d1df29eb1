"""Test setup: Triton's interpreter for CPU tensors (must be set before triton is imported), backend discovery."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    """The interpreter's cost grows with block iterations: 32-wide tiles keep ragged tests fast."""
    try:
        from action_kernels.triton import soft_contrastive as tsc
    except Exception:  # triton absent: those tests skip themselves
        yield
        return
    saved = dict(tsc.BLOCKS)
    tsc.BLOCKS.update(BLOCK_M=32, BLOCK_N=32)
    yield
    tsc.BLOCKS.clear()
    tsc.BLOCKS.update(saved)

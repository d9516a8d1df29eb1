"""Test setup: Triton's interpreter for CPU tensors (must be set before triton is imported). Shared helpers of the
test files (backend lists from the registry, input makers, data locations) are in helpers.py."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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

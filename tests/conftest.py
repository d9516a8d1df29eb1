"""Test setup: Triton's interpreter for CPU tensors when torch sees no CUDA device (it must be set before triton is
imported; on a GPU the kernels run compiled), and small Triton tiles for the interpreter. Shared helpers of the
test files (backend lists from the registry, input makers, data locations) are in helpers.py. The checkout's root goes
at the end of sys.path, for the tests of tools/."""
import os
import sys

import torch

# The developer tools (tools/: the kernel report, the GPU harnesses) are not installed: their tests import them from
# this checkout. Appended, not prepended, so that `action_kernels` and `action` still resolve to the installed
# packages (a non-editable install's source tree has no compiled modules).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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

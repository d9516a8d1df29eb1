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


# -- the run's closing lines: slow tests left out, and every skip grouped by kind with its reasons -------------------
# Self-contained (a reason's kind is read from its text), so that it merges beside any other change to this file.
SKIP_KINDS = (
    ("missing data", ("data not found", "fixtures not found", "reads the ACDC data", "shared/data")),
    ("no GPU or CUDA build", ("CUDA device", "GPU", "CUDA build", "nvcc", "cuobjdump")),
)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ").strip()


def _skip_kind(reason: str) -> str:
    return next((kind for kind, needles in SKIP_KINDS if any(n.lower() in reason.lower() for n in needles)),
                "other reasons")


def _shorten(reason: str, width: int = 90) -> str:
    return reason if len(reason) <= width else reason[:width - 3] + "..."


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line of tests deselected as slow (when they were) and, last, one line of skips: how many for missing data,
    for a missing GPU or CUDA build, for other reasons, each with its most frequent reasons."""
    if config.option.collectonly:
        return
    # -k deselects too: count only the slow-marked items
    deselected = len([item for item in terminalreporter.stats.get("deselected", [])
                      if hasattr(item, "get_closest_marker") and item.get_closest_marker("slow")])
    if deselected and "not slow" in (config.getoption("markexpr", "") or ""):
        terminalreporter.write_line(f"slow tests left out: {deselected} deselected by -m {config.option.markexpr!r} "
                                    f"(the full suite: pytest -m \"slow or not slow\"; docs/testing.md)")
    by_kind: dict[str, dict[str, int]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        reasons = by_kind.setdefault(_skip_kind(reason), {})
        reasons[reason] = reasons.get(reason, 0) + 1
    if not by_kind:
        terminalreporter.write_line("skipped: none")
        return
    order = [kind for kind, _ in SKIP_KINDS] + ["other reasons"]
    parts = []
    for kind in sorted(by_kind, key=order.index):
        reasons = sorted(by_kind[kind].items(), key=lambda item: (-item[1], item[0]))
        shown = "; ".join(f"{n} x {_shorten(r)}" for r, n in reasons[:3])
        more = f"; and {len(reasons) - 3} more reasons (pytest -rs lists them)" if len(reasons) > 3 else ""
        parts.append(f"{sum(by_kind[kind].values())} for {kind} ({shown}{more})")
    total = sum(sum(r.values()) for r in by_kind.values())
    terminalreporter.write_line(f"skipped: {total} tests: " + ", ".join(parts))

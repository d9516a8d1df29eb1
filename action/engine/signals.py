"""Stopping a run by a signal: SIGINT (Ctrl-C), SIGTERM (a scheduler) and SIGHUP (a closed terminal) are recorded
while the loop runs (stop_signals); the trainer finishes the current iteration, saves last.pt and raises
Interrupted (the command line exits with 128 + signum). A second signal stops at once, without saving."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal (Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP) after saving
    last.pt; signum is the signal (the command line exits with 128 + signum)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def interrupted(signum: int, iteration: int, saved: str) -> Interrupted:
    """The Interrupted a run raises after saving `saved` at the boundary after `iteration`."""
    return Interrupted(signum, f"interrupted ({signal.Signals(signum).name}) after iteration {iteration}: saved "
                               f"{saved}; continue with --resume")


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Yields a list that records the STOP_SIGNALS received inside the block (the loop saves and stops at the next
    iteration boundary when it is not empty); a second signal raises KeyboardInterrupt at once. The previous
    handlers are put back on leaving. Off the main thread, where Python cannot install handlers, nothing is
    caught."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped without saving this "
                                    f"iteration; last.pt holds the last checkpoint")
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

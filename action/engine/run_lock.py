"""One run per folder: an exclusive lock on `<out>/.action-run.lock`, taken before anything in the run folder is read
or deleted and held until the run ends.

The lock is flock(2) on that file (fcntl.flock, LOCK_EX | LOCK_NB): the kernel releases it when the holder's file
descriptor closes, so a process that is killed (SIGKILL included) or crashes never leaves a stale lock. The holder
writes its pid into the file; a second process is refused at once (no waiting) with a one-line error naming that
pid. The holder removes the file before releasing (a process that opened the removed file finds it replaced and
tries again), and removes the run folder when it created it and left it empty. Within one process the lock is
re-entrant (the pipeline holds its folder while each stage holds its own). flock is advisory and needs a
filesystem that supports it (local disks do; some network filesystems do not).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

LOCK_NAME = ".action-run.lock"
_held: dict[str, int] = {}  # realpath of a locked folder -> how many run_lock blocks of this process hold it


class RunFolderInUse(ValueError):
    """Another process holds the run folder's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown: it is starting"


def _acquire(out: str) -> tuple[int, str, bool]:
    """(locked file descriptor, lock path, whether this call created `out`)."""
    path = os.path.join(out, LOCK_NAME)
    while True:
        created = not os.path.isdir(out)
        os.makedirs(out, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was removed meanwhile by a holder that created it: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderInUse(f"--out {out} is in use by another run ({holder} holds {path}); wait for it to "
                                 f"end or stop it, or choose another --out") from None
        try:  # the file locked must still be the one at `path` (a releasing holder removes it)
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd, path, created
        os.close(fd)


@contextlib.contextmanager
def run_lock(out: str, enabled: bool = True) -> Iterator[None]:
    """Holds `out`'s run lock inside the block (creating `out` when needed); RunFolderInUse (a ValueError naming the
    holder's pid) when another process holds it. enabled=False (ranks other than 0 of a distributed run): no-op."""
    if not enabled:
        yield
        return
    key = os.path.realpath(out)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd, path, created = _acquire(out)
    _held[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out)  # only when empty

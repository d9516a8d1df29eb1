"""Writing a whole folder so that it appears complete or not at all: staged_folder writes into a hidden temporary
folder beside the destination (`.<name>.staging-<pid>`) and renames it into place when everything is written; on any
error the temporary folder is removed, and one a killed process left behind is removed by the next writer of that
destination (its process no longer runs). A reader therefore never sees a half-written folder: `action data convert`
killed or out of disk space leaves no destination at all, only a hidden temporary that the next conversion clears.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator


def process_running(pid: int) -> bool:
    """Whether a process of this id runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_pattern(destination: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(os.path.basename(destination))}\.staging-(\d+)$")


def remove_stale_staging(destination: str) -> list[str]:
    """Removes the temporary folders of `destination` that killed writers left (their process no longer runs);
    returns their paths."""
    parent = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(parent):
        return []
    pattern, removed = _staging_pattern(destination), []
    for name in sorted(os.listdir(parent)):
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not process_running(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


@contextlib.contextmanager
def staged_folder(destination: str, option: str = "--out") -> Iterator[str]:
    """Yields a temporary folder to write `destination`'s contents into; on leaving without an error it is renamed
    to `destination` (which must not exist, or be an empty folder: checked first, a ValueError naming `option`);
    on an error it is removed. Stale temporaries of `destination` are removed first."""
    destination = os.path.abspath(destination)
    if os.path.lexists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise ValueError(f"{option} {destination} exists and is not an empty folder; choose a new folder (or remove "
                         f"it): a conversion is written whole, never into or over other files")
    for stale in remove_stale_staging(destination):
        print(f"removed {stale}: the temporary folder of a conversion that was killed before it finished",
              flush=True)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(destination)}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    try:
        yield staging
        os.replace(staging, destination)  # atomic; replaces an empty destination folder
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)

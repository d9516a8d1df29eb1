"""Bounded reads: before a reader allocates the arrays a file declares (checkpoint storages, HDF5 datasets, NIfTI
images), the declared size is checked against what the file can hold and against a cap, so a small crafted or
corrupt file that declares 10 GB is refused in one line instead of driving the process out of memory.

    what the file can hold   stored data: its own size; deflate-compressed data (gzip, zlib, HDF5's gzip filter):
                             DEFLATE_RATIO times its size, the most deflate can expand (258 bytes from a 2-bit code);
                             files up to FLOOR bytes declared are always allowed
    the cap                  READ_LIMIT_GB (4 GB) per file, or $ACTION_READ_LIMIT_GB for real volumes larger than that

check_declared raises a ValueError naming the file, its size, the declared size and the limit, and the variable to
raise the cap.
"""
from __future__ import annotations

import os

DEFLATE_RATIO = 1032
FLOOR = 64 << 20
READ_LIMIT_GB = 4.0
ENV_VAR = "ACTION_READ_LIMIT_GB"


def size_text(n: float) -> str:
    """Bytes as a short human size: 512 B, 4.0 kB, 8.3 MB, 10.7 GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def read_cap() -> int:
    """The cap in bytes: $ACTION_READ_LIMIT_GB (a number of GB > 0) when set, else READ_LIMIT_GB."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return int(READ_LIMIT_GB * 1e9)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"${ENV_VAR}: expected a number of GB > 0, got {text!r}")
    return int(value * 1e9)


def check_declared(path: str, declared: int, what: str, ratio: float = 1.0) -> None:
    """ValueError when `declared` bytes (of `what`, e.g. "dataset 'image' (50000, 50000) float32") exceed what the
    file at `path` can hold (ratio x its size, at least FLOOR; ratio 1 for stored data, DEFLATE_RATIO for deflated)
    or the cap (read_cap)."""
    size = os.path.getsize(path)
    holds, cap = max(FLOOR, int(ratio * size)), read_cap()
    if declared <= min(holds, cap):
        return
    if declared > holds:
        how = "its stored data" if ratio == 1 else f"{ratio:g} x its size: the most deflate expands"
        why = f"more than the file can hold ({how}): a crafted or corrupt file"
    else:
        why = f"above the read limit of {size_text(cap)} (set ${ENV_VAR} to a number of GB to read larger volumes)"
    raise ValueError(f"{path} ({size_text(size)}): {what} declares {size_text(declared)}, {why}; refused before "
                     f"reading")


def check_zip_archive(path: str) -> None:
    """A checkpoint file checked before torch.load reads it: a zip archive (the format torch.save writes) whose
    entries are stored uncompressed (torch.save compresses none: a deflated entry can declare 1000 times its size)
    and declare no more than the file holds and the cap allow. ValueError naming the file otherwise."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"cannot load checkpoint {path}: not a zip archive, the format torch.save writes "
                         f"({exc})") from None
    packed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ValueError(f"{path} ({size_text(os.path.getsize(path))}): entry {packed[0].filename!r} is compressed "
                         f"and declares {size_text(packed[0].file_size)}; torch.save stores every entry uncompressed, "
                         f"so this is not a checkpoint torch wrote; refused before reading")
    check_declared(path, sum(e.file_size for e in entries), f"{len(entries)} archive entries")

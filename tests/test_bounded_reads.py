"""Bounded reads (issue 27, finding 5): a small file declaring 10 GB (a checkpoint with one deflated storage, an HDF5
dataset never written, a NIfTI header) is refused in one line naming the file and the sizes before anything is
allocated, checked under a memory cap (RLIMIT_AS: the process may grow by 1 GiB). On the code before the fix each of
the three reads tried to allocate the declared size (the test fails there: MemoryError / an unrelated message)."""
import gzip
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from action.data.limits import ENV_VAR, check_declared
from action.engine.checkpoint import FORMAT

h5py = pytest.importorskip("h5py", reason="h5py writes the HDF5 file")
nib = pytest.importorskip("nibabel", reason="nibabel writes the NIfTI header")

TEN_GB = 10 << 30


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of `size` zero bytes (size a multiple of 16 MiB), about size / 1000 bytes long: one
    full-flushed block of 16 MiB repeated, then an empty final block."""
    block = 16 << 20
    piece = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = piece.compress(bytes(block)) + piece.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15)
    return data * (size // block) + end.flush()


def write_zip(path, entries) -> None:
    """A zip archive of (name, data, method (0 stored, 8 deflated), declared size) entries, zip64 where a declared
    size needs it (a CRC of 0: the readers under test must refuse before they read any entry)."""
    body, central = bytearray(), bytearray()
    for name, data, method, size in entries:
        wide = size >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(data)) if wide else b""
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if wide else (len(data), size)
        offset, raw = len(body), name.encode()
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0x21, 0, *sizes, len(raw), len(extra))
        body += raw + extra + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0x21, 0, *sizes, len(raw),
                               len(extra), 0, 0, 0, 0, offset) + raw + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    with open(path, "wb") as fh:
        fh.write(bytes(body) + bytes(central) + end)


def checkpoint_bomb(path) -> None:
    """A checkpoint (torch.save's archive of {"format", "model": {"w": 4 floats}}) whose storage entry is replaced by
    a deflated one declaring 10 GiB."""
    import zipfile

    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(4)}}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        entries = [(e.filename, archive.read(e.filename), 0, e.file_size) for e in archive.infolist()]
    storage = next(i for i, e in enumerate(entries) if "/data/" in e[0])
    entries[storage] = (entries[storage][0], deflated_zeros(TEN_GB), 8, TEN_GB)
    write_zip(path, entries)


def hdf5_bomb(root) -> None:
    """An ACDC case data/big.h5 whose datasets (chunked, gzip) are declared 50000 x 50000 and never written."""
    os.makedirs(os.path.join(root, "data"))
    with h5py.File(os.path.join(root, "data", "big.h5"), "w") as fh:
        for key, dtype in (("image", "f4"), ("label", "u1")):
            fh.create_dataset(key, shape=(50000, 50000), dtype=dtype, chunks=(1000, 1000), compression="gzip")


def nifti_bomb(path) -> None:
    """A .nii.gz whose header declares 2048 x 2048 x 640 float32 (10.7 GB) followed by 4 kB of zeros."""
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 640))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    raw = header.binaryblock + b"\0" * (int(header["vox_offset"]) - len(header.binaryblock)) + bytes(4096)
    with gzip.open(path, "wb") as fh:
        fh.write(raw)


CAPPED = """import resource, sys
import h5py, nibabel, numpy, torch
from action.data.acdc import read_case
from action.data.nifti import load_nifti
from action.engine import load_checkpoint
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))  # grow by 1 GiB at most
for kind, read in (("checkpoint", lambda: load_checkpoint(sys.argv[1])),
                   ("hdf5", lambda: read_case(sys.argv[2], "big")),
                   ("nifti", lambda: load_nifti(sys.argv[3])), ("real", lambda: load_nifti(sys.argv[4]))):
    try:
        read()
        print(kind, "read")
    except BaseException as exc:
        print(kind, type(exc).__name__, str(exc).replace(chr(10), " ")[:600])
"""


@pytest.mark.slow
def test_small_files_declaring_10_gb_are_refused_before_allocating_under_a_memory_cap(tmp_path):
    from action.data.nifti import save_nifti

    checkpoint_bomb(tmp_path / "bomb.pt")
    hdf5_bomb(tmp_path / "acdc")
    nifti_bomb(tmp_path / "bomb.nii.gz")
    save_nifti(np.random.default_rng(0).random((256, 256, 16)).astype(np.float32), np.eye(4),
               str(tmp_path / "real.nii.gz"))  # 4 MB of voxels: read as before
    assert os.path.getsize(tmp_path / "bomb.pt") < 12e6 and os.path.getsize(tmp_path / "acdc/data/big.h5") < 2e4
    done = subprocess.run([sys.executable, "-c", CAPPED, str(tmp_path / "bomb.pt"), str(tmp_path / "acdc"),
                           str(tmp_path / "bomb.nii.gz"), str(tmp_path / "real.nii.gz")], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"checkpoint", "hdf5", "nifti", "real"}, done.stdout + done.stderr[-2000:]
    assert lines["checkpoint"].startswith(f"ValueError {tmp_path / 'bomb.pt'} (")
    assert "entry 'archive/data/0' is compressed and declares 10.7 GB" in lines["checkpoint"]
    assert lines["hdf5"].startswith(f"ValueError {tmp_path / 'acdc/data/big.h5'} (")
    assert "dataset(s) 'image' (50000, 50000) float32, 'label' (50000, 50000) uint8 declares 12.5 GB, more than " \
           "the file can hold" in lines["hdf5"]
    assert lines["nifti"].startswith(f"ValueError {tmp_path / 'bomb.nii.gz'} (")
    assert "image (2048, 2048, 640) float32 declares 10.7 GB, more than the file can hold" in lines["nifti"]
    assert lines["real"] == "read"


def test_the_read_cap_refuses_a_volume_above_it_and_its_variable_raises_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1000))
    check_declared(str(small), 60 << 20, "x")  # a small file may declare up to FLOOR (64 MiB)
    with pytest.raises(ValueError, match=r"small\.bin \(1\.0 kB\): x declares 70\.0 MB, more than the file can hold"):
        check_declared(str(small), 70_000_000, "x")
    large = tmp_path / "large.bin"
    with open(large, "wb") as fh:
        fh.truncate(6_000_000_000)  # sparse: 6 GB declared by its size, nothing on disk
    with pytest.raises(ValueError, match=r"declares 5\.0 GB, above the read limit of 4\.0 GB \(set "
                                         r"\$ACTION_READ_LIMIT_GB"):
        check_declared(str(large), 5_000_000_000, "x")
    monkeypatch.setenv(ENV_VAR, "8")
    check_declared(str(large), 5_000_000_000, "x")
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=r"\$ACTION_READ_LIMIT_GB: expected a number of GB > 0, got 'lots'"):
        check_declared(str(large), 5_000_000_000, "x")

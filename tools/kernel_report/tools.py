"""Finding the tools the report needs, with the reason when one is missing (the report then skips that part)."""
from __future__ import annotations

import os
import shutil


def triton_status() -> tuple[str | None, str]:
    """(triton version, '') or (None, why not)."""
    try:
        import triton
        from triton.compiler import ASTSource  # noqa: F401  (ahead-of-time compilation needs this API)
    except Exception as exc:
        return None, f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    return triton.__version__, ""


def cuobjdump() -> tuple[str | None, str]:
    """cuobjdump: the one inside the triton wheel, else CUDA_HOME/bin or PATH."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled, ""
    except Exception:
        pass
    for cand in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if cand and os.access(cand, os.X_OK):
            return cand, ""
    return None, ("cuobjdump not found (it ships inside the triton wheel under triton/backends/nvidia/bin, and "
                  "with the CUDA toolkit); install triton or set CUDA_HOME")


def nvcc() -> tuple[str | None, str]:
    for cand in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.access(cand, os.X_OK):
            return cand, ""
    return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA kernels are not compiled"


def demangler() -> tuple[str | None, str]:
    """cu++filt from the toolkit, else c++filt (both demangle the Itanium names nvcc emits)."""
    nv, _ = nvcc()
    cands = [os.path.join(os.path.dirname(os.path.realpath(nv)), "cu++filt")] if nv else []
    cands += [shutil.which("cu++filt"), shutil.which("c++filt")]
    for cand in cands:
        if cand and os.access(cand, os.X_OK):
            return cand, ""
    return None, "neither cu++filt nor c++filt found: CUDA kernel names stay mangled"


def csrc_dir() -> tuple[str | None, str]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "csrc")
    if os.path.isdir(path):
        return path, ""
    return None, f"{path} not found: the CUDA sources ship with the repository, not with an installed wheel"

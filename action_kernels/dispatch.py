"""The backend registry, the backend contract, and the one place that chooses a backend (and says why not others).

Every backend is defined once, in REGISTRY: its name, the package holding its kernels (one module per op, named by
OPS), the dtypes it takes, whether it can run on a device, how it runs on CPU tensors, and its per-op limits. The
op files, tests and benchmarks read their backend lists from here.

Order of choice: the explicit `backend=` argument, then the ACTION_KERNELS_BACKEND environment variable, then
automatic (auto_order): on CUDA tensors the CUDA extension, then Triton, then the chunked torch path, except where
PREFERENCES picks Triton first for an op, dtype, feature size and top-k k (the kernel report's static estimates; the
reasons are in AUTO_ORDER_REASON and PREFERENCES, printed by env_report); on CPU the chunked torch path. A backend
cannot run a call whose dtype, device or size it does not take: the sizes are its `limits` (D, k per op), data in
the registry, read by Backend.supports like the rest. A forced backend that cannot run raises with every reason; an
automatic choice that skips the device's first preference warns once per (op, device type, reason).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Protocol

import torch

from action_kernels import _extension

# op -> the stem of its files: action_kernels/<backend>/<stem>.py, ops/<stem>.py, tests/test_<stem>*.py
OPS: Mapping[str, str] = MappingProxyType({
    "soft_contrastive_loss": "soft_contrastive",
    "hard_negative_topk": "hard_negative_topk",
})
ENV_VAR = "ACTION_KERNELS_BACKEND"
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set = set()


# -- the backend contract: what ops/ calls in action_kernels/<backend>/<stem>.py ----------------------------------
class SoftContrastiveKernels(Protocol):
    """Kernels of soft_contrastive_loss. Rows arrive raw with inverse norms (ŝ = rs ⊙ s, t̂ = rt ⊙ t, k̂ = rk ⊙ k);
    outputs are fp32 (fp64 for fp64 inputs, where the backend takes them)."""

    def soft_contrastive_forward(self, s: torch.Tensor, t: torch.Tensor, k: torch.Tensor, rs: torch.Tensor,
                                 rt: torch.Tensor, rk: torch.Tensor, inv_tau_s: float, inv_tau_t: float,
                                 with_grad: bool) -> tuple[torch.Tensor, ...]:
        """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) -> loss (N,), lse_s (N,), lse_t (N,),
        pivot (N,) int32, pivot_r (N,), and ds0 (N, D) = dL/dŝ per unit upstream gradient when with_grad, else an
        empty (0,) tensor. pivot_i: the index of row i's largest teacher logit (the first among ties); pivot_r_i:
        (log p - log q)_i,pivot - loss_i, accumulated without cancellation (docs/kernels.md, op 1); a backend whose
        key gradient recomputes them returns -1 and 0."""

    def soft_contrastive_key_grad(self, s: torch.Tensor, t: torch.Tensor, k: torch.Tensor, rs: torch.Tensor,
                                  rt: torch.Tensor, rk: torch.Tensor, inv_tau_s: float, inv_tau_t: float,
                                  loss: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, pivot: torch.Tensor,
                                  pivot_r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The forward's inputs, its loss, lse_s, lse_t, pivot, pivot_r (N,) and the upstream g (N,) -> dL/dk̂
        (K, D)."""


class HardNegativeTopkKernels(Protocol):
    """Kernel of hard_negative_topk: â = ra ⊙ a, k̂ = rk ⊙ k; candidates of row i are the keys whose label differs
    from row i's and from ignore_label."""

    def hard_negative_topk(self, anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor,
                           key_labels: torch.Tensor, ra: torch.Tensor, rk: torch.Tensor, k: int,
                           ignore_label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """anchors: (B, P, D) view, keys: (K, D), ra (N,), rk (K,), labels int64 (N,), (K,) -> values (N, k) fp32
        (fp64 for fp64) descending, indices (N, k) int64, ties to the lower index, padded with (-inf, -1)."""


CONTRACTS: Mapping[str, type] = MappingProxyType({
    "soft_contrastive_loss": SoftContrastiveKernels,
    "hard_negative_topk": HardNegativeTopkKernels,
})


# -- whether a backend can run on a device -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str, bool]:
    """(importable, reason if not, interpreter mode)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401  (a broken install fails here, not at first kernel launch)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`", interpret
    return True, "", interpret


def _anywhere(device: torch.device) -> str:
    return ""


def _triton_device(device: torch.device) -> str:
    ok, why, interpret = triton_status()
    if not ok:
        return why
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return ""
    return (f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for CPU "
            f"tensors), got {device.type} tensors")


def _extension_device(device: torch.device) -> str:
    ok, why = _extension.device_supported(device)
    return "" if ok else why


# -- the registry --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    """The largest value of one argument (D, k) that a backend's kernels take for an op, and why."""

    top: int
    why: str = ""


@dataclass(frozen=True)
class Backend:
    """One backend. package: where its kernels live (package.<OPS[op]>, implementing CONTRACTS[op]); None for the
    torch backend, which runs the op's materialising reference (reference.<op>_ref) with the functional's
    arguments. dtypes: None for any. device: '' or why it cannot run on tensors of a device. cpu: how it runs on
    CPU tensors: "native", "emulated" (the CUDA kernels' logic on host threads) or "interpreted" (Triton's
    interpreter), the last two for tests only. limits: {op: {argument: Limit}}, e.g. {"hard_negative_topk":
    {"k": Limit(512, why)}}, on every device (the emulation and the interpreter keep the GPU's limits, so that a CPU
    test sees what a GPU run would); automatic dispatch skips a backend whose limit a call exceeds.
    ops: the ops it has kernels for (None: every op of OPS). device_dtypes: {device type: (dtypes, why)} where the
    backend takes fewer dtypes on one device type than `dtypes` says."""

    name: str
    package: str | None
    dtypes: tuple[torch.dtype, ...] | None
    device: Callable[[torch.device], str]
    cpu: str
    limits: Mapping[str, Mapping[str, Limit]] = field(default_factory=dict)
    ops: tuple[str, ...] | None = None
    device_dtypes: Mapping[str, tuple[tuple[torch.dtype, ...], str]] = field(default_factory=dict)

    def supports(self, op: str | None, device: torch.device, dtype: torch.dtype, **limits: int) -> str:
        """'' when this backend can run `op` (None: any op) on tensors of this device and dtype with these
        arguments (limits such as k=64, D=128), else why not."""
        if op is not None and op not in OPS:
            raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
        if op is not None and self.ops is not None and op not in self.ops:
            return f"{self.name} has no kernels for {op} (it implements {', '.join(self.ops)})"
        if self.dtypes is not None and dtype not in self.dtypes:
            others = [b.name for b in REGISTRY.values() if b.dtypes is None or dtype in b.dtypes]
            hint = f"; use backend={' or '.join(repr(o) for o in others)}" if others else ""
            return f"{self.name} supports {dtype_names(self.dtypes)}, got {dtype}{hint}"
        why = self.device(device)
        if why:
            return why
        narrower, why = self.device_dtypes.get(device.type, (None, ""))
        if narrower is not None and dtype not in narrower:
            return f"{self.name} takes {dtype_names(narrower)} on {device.type} tensors, got {dtype}: {why}"
        for arg, value in limits.items():
            if not self.within(op, arg, value):
                limit = self.limits[op][arg]
                others = [b.name for b in REGISTRY.values() if b.name != self.name and b.within(op, arg, value)]
                hint = f"; use backend={' or '.join(repr(o) for o in others)}" if others else ""
                why = f" ({limit.why})" if limit.why else ""
                return f"{self.name} takes {arg} <= {limit.top} for {op}, got {arg}={value}{why}{hint}"
        return ""

    def within(self, op: str | None, arg: str, value: int | None) -> bool:
        """Whether `value` of argument `arg` (D, k) is within this backend's limit for `op` (None: any op; no limit
        or an unknown value: True)."""
        limit = self.limits.get(op, {}).get(arg) if op is not None else None
        return limit is None or value is None or value <= limit.top

    def kernels(self, op: str):
        """The module implementing CONTRACTS[op] for this backend (imported on first use)."""
        if self.package is None:
            raise ValueError(f"backend {self.name!r} has no kernels: it runs the reference of {op}")
        return importlib.import_module(f"{self.package}.{OPS[op]}")


def dtype_names(dtypes) -> str:
    """(torch.float16, torch.bfloat16) -> "float16 and bfloat16" (how messages and env_report name dtypes)."""
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# Why Triton takes no fp32 CUDA tensors (the kernel report measures it: docs/kernel-report.md,
# `--dtypes fp32`): its fp32 path (tf32x3 on tensor cores) holds the split operands in registers, and every fp32
# launch-table entry but one spills to local memory on sm_80 and sm_90, several beyond a block's shared memory.
TRITON_FP32_WHY = ("Triton's fp32 (tf32x3) kernels spill to local memory at every tile the kernel report tried, "
                   "some beyond a block's shared memory (docs/known-limits.md)")
TRITON_FP32_REASON = (f"{TRITON_FP32_WHY}; fp32 CUDA tensors run on the cuda backend, or cast them to "
                      f"bfloat16/float16 for Triton")
# The fused GPU kernels' size limits (tests/test_dispatch.py holds them equal to what the launchers and csrc/ are
# built for; the launchers keep a last-line check). The chunked and torch paths take any D and k.
CUDA_D = Limit(512, "the CUDA kernels hold whole rows in shared memory and are instantiated for the feature buckets "
                    "64, 128, 256 and 512, csrc/tc_tiles.cuh feature_bucket")
TRITON_D = Limit(512, "the Triton launch tables stop at a 512-wide feature tile: wider tiles and their accumulators "
                      "do not fit registers and shared memory")
TRITON_K = Limit(512, "the Triton top-k's merge buffers keep at most 512 candidates a row")
REGISTRY: Mapping[str, Backend] = MappingProxyType({b.name: b for b in (
    Backend("torch", None, None, _anywhere, "native"),
    Backend("chunked", "action_kernels.chunked", FUSED_DTYPES + (torch.float64,), _anywhere, "native"),
    Backend("triton", "action_kernels.triton", FUSED_DTYPES, _triton_device, "interpreted",
            limits={"soft_contrastive_loss": {"D": TRITON_D}, "hard_negative_topk": {"D": TRITON_D, "k": TRITON_K}},
            device_dtypes={"cuda": ((torch.float16, torch.bfloat16), TRITON_FP32_REASON)}),
    Backend("cuda", "action_kernels.cuda", FUSED_DTYPES, _extension_device, "emulated",
            limits={"soft_contrastive_loss": {"D": CUDA_D}, "hard_negative_topk": {"D": CUDA_D}}),
)})
BACKENDS = tuple(REGISTRY)  # names
FUSED = tuple(name for name, b in REGISTRY.items() if b.package is not None)  # backends with kernels of their own
# Automatic order by device type (any other device type: chunked); the torch reference is the last resort.
# On CUDA tensors the order follows the kernel report's static ESTIMATES (sm_90, N = K = 65,536; the table per op,
# dtype and D is in docs/cuda_kernels.md), until a GPU run in benchmarks/RESULTS.md measures otherwise.
AUTO_ORDER: Mapping[str, tuple[str, ...]] = MappingProxyType({"cuda": ("cuda", "triton", "chunked"),
                                                              "cpu": ("chunked",)})
AUTO_ORDER_REASON: Mapping[str, str] = MappingProxyType({
    "cuda": ("cuda before triton: by the kernel report's static estimates (docs/cuda_kernels.md) the CUDA "
             "tensor-core kernels are faster for top-k with k > 64 and the anatomical top-k at every dtype "
             "(1.7-7x), for top-k at D > 256, for the soft loss at D > 128 (1.35-1.9x at 16-bit D >= 256) and in "
             "fp32 (Triton takes no fp32 CUDA tensors)"),
    "cpu": "the chunked path's native CPU kernels (triton and cuda run on CPU only interpreted or emulated, for tests)",
})


@dataclass(frozen=True)
class Preference:
    """Another automatic order for one op and dtype on one device type, for feature sizes D <= max_D (and, when
    max_k is set, k <= max_k)."""

    order: tuple[str, ...]
    max_D: int
    why: str
    max_k: int | None = None


PREFERENCES: Mapping[tuple[str, str, torch.dtype], Preference] = MappingProxyType({
    ("cuda", "soft_contrastive_loss", torch.bfloat16): Preference(
        ("triton", "cuda", "chunked"), 128,
        "triton for the bf16 soft loss at D <= 128: estimated 2% faster (forward + backward at D = 128, "
        "N = K = 65,536: triton 13.79 ms, cuda 14.09 ms; both with issue 26's pivot branch counted on every tile)"),
    ("cuda", "soft_contrastive_loss", torch.float16): Preference(
        ("triton", "cuda", "chunked"), 128,
        "triton for the fp16 soft loss at D <= 128: estimated 6-20% faster (forward + backward at D = 128, "
        "N = K = 65,536: triton 15.48 ms, cuda 16.49 ms; both with issue 26's pivot branch counted on every tile)"),
    ("cuda", "hard_negative_topk", torch.bfloat16): Preference(
        ("triton", "cuda", "chunked"), 256,
        "triton for the bf16 top-k at k <= 64, D <= 256: estimated 8-23% faster (N = K = 65,536, k = 64: "
        "D = 128 triton 2.08 ms, cuda 2.66 ms; D = 256 3.42 and 4.33 ms)", max_k=64),
    ("cuda", "hard_negative_topk", torch.float16): Preference(
        ("triton", "cuda", "chunked"), 256,
        "triton for the fp16 top-k at k <= 64, D <= 256: estimated 8-23% faster (N = K = 65,536, k = 64: "
        "D = 128 triton 2.06 ms, cuda 2.66 ms; D = 256 3.42 and 4.33 ms)", max_k=64),
})


def auto_order(op: str | None, device_type: str, dtype: torch.dtype, D: int | None = None,
               k: int | None = None) -> tuple[tuple[str, ...], str]:
    """The automatic order of backends for `op` (None: any op) on tensors of this device type and dtype with
    feature size D and, for the top-k, k (None: unknown, the device's order), and why."""
    pref = PREFERENCES.get((device_type, op, dtype))
    if (pref is not None and D is not None and D <= pref.max_D
            and (pref.max_k is None or (k is not None and k <= pref.max_k))):
        return pref.order, pref.why
    return AUTO_ORDER.get(device_type, ("chunked",)), AUTO_ORDER_REASON.get(device_type, "")


# -- choosing --------------------------------------------------------------------------------------------------------
def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, op: str | None = None,
                       **limits: int) -> str:
    """'' when `backend` can run `op` (None: any op) on tensors of this device and dtype, else why not."""
    if backend not in REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return REGISTRY[backend].supports(op, device, dtype, **limits)


def select(op: str | None, backend: str | None, device: torch.device, dtype: torch.dtype, **limits: int) -> str:
    """Returns the backend that will run `op` for tensors of this device and dtype (and these limits)."""
    label = op or "action_kernels"
    requested, source = backend, "backend="
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR].strip().lower(), f"{ENV_VAR}="
    if requested is not None and requested != "auto":
        if requested not in REGISTRY:
            raise ValueError(f"{source}{requested!r} is not a backend; expected one of {BACKENDS} or 'auto'")
        why = unavailable_reason(requested, device, dtype, op, **limits)
        if why:
            raise RuntimeError(f"{label}: {source}{requested!r} cannot run here: {why}")
        return requested
    rejected = []
    for name in auto_order(op, device.type, dtype, limits.get("D"), limits.get("k"))[0]:
        why = unavailable_reason(name, device, dtype, op, **limits)
        if not why:
            if rejected:
                _warn_once(label, device.type, name, rejected)
            return name
        rejected.append(f"{name}: {why}")
    _warn_once(label, device.type, "torch", rejected)
    return "torch"


def kernels(op: str, backend: str):
    """The module of `backend` implementing CONTRACTS[op] (see Backend.kernels)."""
    if backend not in REGISTRY or REGISTRY[backend].package is None:
        raise ValueError(f"{op}: backend must be one of {FUSED} (the backends with kernels), got {backend!r}")
    return REGISTRY[backend].kernels(op)


def reference(op: str):
    """The materialising reference of `op`, reference.<op>_ref, which the torch backend runs with the functional's
    arguments. This is the only way production code reaches reference.py (the ground truth shares no helper with
    the paths it checks)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    # imported once (the package's __init__ does): torch.compile cannot trace importlib, so the imported module is
    # looked up first
    module = sys.modules.get("action_kernels.reference") or importlib.import_module("action_kernels.reference")
    return getattr(module, f"{op}_ref")


def _warn_once(op: str, device_type: str, chosen: str, rejected: list[str]) -> None:
    key = (op, device_type, chosen, tuple(rejected))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"{op} on {device_type}: using backend {chosen!r} because " + "; ".join(rejected), stacklevel=3)


def report(device: torch.device, dtype: torch.dtype = torch.float32, op: str | None = None) -> dict[str, str]:
    """{backend: '' if available else the reason} for tensors of this device and dtype."""
    return {name: unavailable_reason(name, device, dtype, op) for name in BACKENDS}

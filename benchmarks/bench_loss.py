"""The main job: every implementation of the soft-label contrastive loss side by side, time and memory.

    python benchmarks/bench_loss.py                       # CPU defaults: N=16384, K=8192, D=128, fp32
    python benchmarks/bench_loss.py --sizes 65536,65536,128 --dtype bf16 --device cuda

Providers (all on identical inputs, in one process, order rotated every repeat):
  naive    the reference code's style: F.normalize, two N x K logit matrices, kl_div(log_softmax, softmax)
  compile  torch.compile of naive (compile time reported separately)
  chunked  action_kernels, memory-bounded CPU/GPU path
  triton   action_kernels, fused Triton kernels (CUDA tensors)
  cuda     action_kernels, fused CUDA kernels (CUDA tensors)
Each provider first passes a correctness gate (loss and student gradient against a float64 reference at a reduced
size). Time: forward, backward and total, median and range over repeats. Memory: peak extra bytes of one forward +
backward, measured in a fresh subprocess per provider (CPU: peak RSS with MALLOC_MMAP_THRESHOLD_=65536 so freed
blocks return to the OS; CUDA: torch.cuda.max_memory_allocated). Results: a table, and CSV + JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import action_kernels as ak
from action_kernels import dispatch
from action_kernels.testing import rel_error, tolerance

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALL_PROVIDERS = ("naive", "compile", "chunked", "triton", "cuda")
DEFAULT_PROVIDERS = {"cpu": ("naive", "compile", "chunked"), "cuda": ALL_PROVIDERS}
MATERIALISED = {"naive": 5.0, "compile": 3.0}  # N x K fp32 matrices alive at the peak (measured on CPU: 4.9, 2.6)
TAU_S, TAU_T = 0.1, 0.01
GATE_ROWS, GATE_KEYS = 2048, 1024


@dataclass
class Result:
    provider: str
    N: int
    K: int
    D: int
    dtype: str
    device: str
    gate_error: float | None = None
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    total_ms: float | None = None
    total_min_ms: float | None = None
    total_max_ms: float | None = None
    compile_s: float | None = None
    peak_extra_mib: float | None = None
    gflops: float | None = None
    note: str = ""
    samples_ms: list = field(default_factory=list)


def naive_loss(s, t, k, tau_s=TAU_S, tau_t=TAU_T):
    """The reference code's formulation: materialises the logits, softmax, log-softmax and KL terms."""
    s, t, k = F.normalize(s, dim=1), F.normalize(t, dim=1), F.normalize(k, dim=1)
    return F.kl_div(F.log_softmax(s @ k.T / tau_s, dim=1), F.softmax(t @ k.T / tau_t, dim=1), reduction="batchmean")


_compiled = {}


def provider_fn(name: str):
    if name == "naive":
        return naive_loss
    if name == "compile":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(naive_loss, dynamic=False)
        return _compiled["fn"]
    return lambda s, t, k: ak.soft_contrastive_loss(s, t, k, TAU_S, TAU_T, backend=name)


def skip_reason(name: str, device: torch.device, dtype: torch.dtype, N: int, K: int) -> str:
    if name in ("chunked", "triton", "cuda"):
        why = dispatch.unavailable_reason(name, device, dtype)
        if why:
            return why
        if device.type == "cpu" and name in ("triton", "cuda"):
            return f"{name} on CPU runs only in the test interpreter/emulation (orders of magnitude slower)"
    if name == "compile" and device.type == "cpu" and dtype != torch.float32:
        return "compile of 16-bit matmuls on CPU is not a realistic baseline"
    need = MATERIALISED.get(name, 0.0) * N * K * 4
    free = _free_bytes(device)
    if need > 0.8 * free:
        return f"predicted to need {need / 2**30:.1f} GiB for its N x K matrices, {free / 2**30:.1f} GiB free"
    return ""


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return float(info["MemAvailable"].split()[0]) * 1024


def make_inputs(N, K, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(N, D, generator=g)
    t = s + 0.7 * torch.randn(N, D, generator=g)
    k = torch.randn(K, D, generator=g)
    return (s.to(device=device, dtype=dtype).requires_grad_(True), t.to(device=device, dtype=dtype),
            k.to(device=device, dtype=dtype))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn, s, t, k, device) -> tuple[float, float]:
    s.grad = None
    _sync(device)
    t0 = time.perf_counter()
    loss = fn(s, t, k)
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def gate(name, D, dtype, device) -> float:
    """Relative error (max over loss and student gradient) against float64 at a reduced size."""
    s, t, k = make_inputs(GATE_ROWS, GATE_KEYS, D, dtype, device, seed=1)
    loss = provider_fn(name)(s, t, k)
    loss.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = naive_loss(s64, t.double(), k.double())
    ref.backward()
    return max(rel_error(loss.detach(), ref.detach()), rel_error(s.grad, s64.grad))


def measure_memory(name, N, K, D, dtype_name, device) -> float | None:
    """Peak extra MiB of one forward + backward, in a fresh subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", name, "--sizes", f"{N},{K},{D}",
           "--dtype", dtype_name, "--device", str(device)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  memory run of {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def child_memory(name, N, K, D, dtype, device) -> None:
    s, t, k = make_inputs(N, K, D, dtype, device)
    fn = provider_fn(name)
    if name == "compile":
        run_once(fn, s, t, k, device)  # compile at this exact shape first: compilation is not the op's memory
    else:
        run_once(fn, *make_inputs(64, 32, D, dtype, device), device)  # load libraries, build caches
    s.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_once(fn, s, t, k, device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _rss_field("VmRSS")
        run_once(fn, s, t, k, device)
        peak = _rss_field("VmHWM") - base
    print(json.dumps({"peak_extra_mib": peak / 2**20}))


def bench_size(N, K, D, dtype_name, device, providers, repeats, memory) -> list[Result]:
    dtype = DTYPES[dtype_name]
    results = {p: Result(p, N, K, D, dtype_name, str(device)) for p in providers}
    active = []
    for p in providers:
        why = skip_reason(p, device, dtype, N, K)
        if why:
            results[p].note = "skipped: " + why
            continue
        err = gate(p, D, dtype, device)
        results[p].gate_error = err
        tol = tolerance(dtype, min(TAU_S, TAU_T))
        if err > tol:
            results[p].note = f"FAILED correctness gate: error {err:.2e} > {tol:.1e}; not timed"
            continue
        active.append(p)
    s, t, k = make_inputs(N, K, D, dtype, device)
    for p in active:  # warm-up: compile at this shape (timed separately); the others ran in the gate already
        if p == "compile":
            t0 = time.perf_counter()
            run_once(provider_fn(p), s, t, k, device)
            results[p].compile_s = time.perf_counter() - t0
    samples = {p: [] for p in active}
    for r in range(repeats):
        order = active[r % len(active):] + active[:r % len(active)] if active else []
        for p in order:
            samples[p].append(run_once(provider_fn(p), s, t, k, device))
    flops = 3 * 2.0 * N * K * D  # two logit GEMMs and one gradient GEMM
    for p in active:
        res = results[p]
        fwd, bwd = [x[0] for x in samples[p]], [x[1] for x in samples[p]]
        tot = [a + b for a, b in samples[p]]
        res.fwd_ms, res.bwd_ms, res.total_ms = statistics.median(fwd), statistics.median(bwd), statistics.median(tot)
        res.total_min_ms, res.total_max_ms, res.samples_ms = min(tot), max(tot), tot
        res.gflops = flops / (res.total_ms * 1e-3) / 1e9
        if memory:
            res.peak_extra_mib = measure_memory(p, N, K, D, dtype_name, device)
    return [results[p] for p in providers]


def format_table(rows: list[Result]) -> str:
    base = {(r.N, r.K, r.D, r.dtype): r for r in rows if r.provider == "naive" and r.total_ms}
    head = (f"{'provider':9s} {'N':>7s} {'K':>7s} {'D':>4s} {'dtype':5s} {'fwd ms':>9s} {'bwd ms':>9s} "
            f"{'total ms (min-max)':>24s} {'speedup':>8s} {'peak MiB':>9s} {'mem vs naive':>12s} {'gate err':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        key = (r.N, r.K, r.D, r.dtype)
        if r.total_ms is None:
            lines.append(f"{r.provider:9s} {r.N:7d} {r.K:7d} {r.D:4d} {r.dtype:5s}  {r.note}")
            continue
        ref = base.get(key)
        speed = f"{ref.total_ms / r.total_ms:7.2f}x" if ref else "      -"
        mem = f"{r.peak_extra_mib:9.1f}" if r.peak_extra_mib is not None else "        -"
        ratio = (f"1/{ref.peak_extra_mib / r.peak_extra_mib:.1f}" if ref and ref.peak_extra_mib and r.peak_extra_mib
                 else "-")
        rng = f"{r.total_ms:9.1f} ({r.total_min_ms:.0f}-{r.total_max_ms:.0f})"
        lines.append(f"{r.provider:9s} {r.N:7d} {r.K:7d} {r.D:4d} {r.dtype:5s} {r.fwd_ms:9.1f} {r.bwd_ms:9.1f} "
                     f"{rng:>24s} {speed:>8s} {mem} {ratio:>12s} {r.gate_error:9.1e}")
        if r.compile_s is not None:
            lines[-1] += f"   (compile + first run {r.compile_s:.1f} s)"
    return "\n".join(lines)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit or "unknown", "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "action_kernels": ak.__version__,
           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()}
    ok, _, _ = dispatch.triton_status()
    if ok:
        import triton
        env["triton"] = triton.__version__
    return env


def write_outputs(rows: list[Result], out_dir: str, env: dict) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(out_dir, f"bench_loss-{stamp}.json")
    with open(json_path, "w") as fh:
        json.dump({"environment": env, "results": [asdict(r) for r in rows]}, fh, indent=1)
    csv_path = os.path.join(out_dir, "bench_loss.csv")
    new = not os.path.exists(csv_path)
    cols = [c for c in asdict(rows[0]) if c != "samples_ms"]
    with open(csv_path, "a") as fh:
        if new:
            fh.write(",".join(["date", "commit", "torch"] + cols) + "\n")
        for r in rows:
            d = asdict(r)
            vals = [env["date"], env["commit"], env["torch"]] + ["" if d[c] is None else str(d[c]) for c in cols]
            fh.write(",".join(v.replace(",", ";") for v in vals) + "\n")
    return csv_path, json_path


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(";"):
        parts = item.strip().split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise SystemExit(f"--sizes takes N,K,D triples separated by ';' (e.g. 16384,8192,128), got {item!r}")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default=None, help="N,K,D triples separated by ';' (default: 16384,8192,128 on CPU; "
                                                  "65536,4096,128;65536,65536,128;65536,16384,512 on CUDA)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help=f"comma list from {','.join(ALL_PROVIDERS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider memory subprocesses")
    ap.add_argument("--out", default="bench_results", help="folder for CSV and JSON results")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    default_sizes = "16384,8192,128" if device.type == "cpu" else "65536,4096,128;65536,65536,128;65536,16384,512"
    sizes = parse_sizes(args.sizes or default_sizes)
    if args.child_memory:
        child_memory(args.child_memory, *sizes[0], DTYPES[dtype_name], device)
        return 0
    providers = tuple(args.providers.split(",")) if args.providers else DEFAULT_PROVIDERS[device.type]
    unknown = [p for p in providers if p not in ALL_PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {ALL_PROVIDERS}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")

    env = environment()
    print(f"soft_contrastive_loss benchmark on {device} ({env['device_name']}, {env['threads']} threads), "
          f"torch {env['torch']}, commit {env['commit']}; tau_s={TAU_S}, tau_t={TAU_T}", flush=True)
    rows = []
    for i, (N, K, D) in enumerate(sizes, 1):
        print(f"[{i}/{len(sizes)}] N={N} K={K} D={D} {dtype_name}: gate, warm-up, {args.repeats} repeats"
              f"{'' if args.no_memory else ', memory'} ...", flush=True)
        rows += bench_size(N, K, D, dtype_name, device, providers, args.repeats, not args.no_memory)
    print()
    print(format_table(rows))
    csv_path, json_path = write_outputs(rows, args.out, env)
    print(f"\nspeedup and memory are relative to naive at the same size; gate err: relative error of loss and "
          f"student gradient vs float64 at N={GATE_ROWS}, K={GATE_KEYS}.\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

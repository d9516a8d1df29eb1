"""The main job: every implementation of each op side by side, time and memory.

    python benchmarks/bench_loss.py                              # quick CPU run, all three ops (about a minute)
    python benchmarks/bench_loss.py --preset targets             # the kernel issues' target sizes (~3-4 min on CPU)
    python benchmarks/bench_loss.py --preset tiny                # per-call overhead at small sizes (chunked against
                                                                 # naive, anatomical against backend="torch")
    python benchmarks/bench_loss.py --ops soft --sizes 65536,65536,128 --dtype bf16 --device cuda

Ops (benchmarks/workloads.py): soft (soft_contrastive_loss), topk (hard_negative_topk), anatomical
(anatomical_contrast_loss at the reference setting). Providers per op, on identical inputs in one process, order
rotated every repeat:
  naive        the reference code's style (materialising; for anatomical also its Python-loop sampling)
  compile      torch.compile of naive (soft only; compile time reported separately)
  class_graph  anatomical only: the reference sampling, vectorised (action_kernels)
  chunked      action_kernels, memory-bounded path (the CPU default)
  triton/cuda  action_kernels, fused kernels (CUDA tensors)
Each provider first passes a correctness gate against float64 at a reduced size. Time: forward, backward and total,
median and range over repeats. Memory: peak extra bytes of one call (CPU: peak RSS in a fresh subprocess per
provider, with MALLOC_MMAP_THRESHOLD_=65536 so freed blocks return to the OS; CUDA: max_memory_allocated). On a GPU
the run also measures two ceilings (a large bf16 GEMM, a device copy) and reports each row against the GEMM floor.
Results: a table, and CSV + JSON under --out.
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

import action_kernels as ak
from action_kernels import dispatch
from action_kernels.testing import tolerance

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import PRESETS, WORKLOADS  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# environment variables that force the CPU code paths (docs: ../shared/docs/environment.md), printed when set
FORCING_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE", "MKL_DEBUG_CPU_TYPE")
# on CPU tensors these run only in Triton's interpreter or the emulation build (for tests), not at speed
CPU_SKIP = tuple(name for name, b in dispatch.REGISTRY.items() if b.cpu != "native")


@dataclass
class Result:
    op: str
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


_compiled = {}


def provider_fn(work, name: str):
    if name == "naive":
        return work.naive
    if name == "compile":
        if work.name not in _compiled:
            _compiled[work.name] = torch.compile(work.naive, dynamic=False)
        return _compiled[work.name]
    return work.ours(name)


def skip_reason(work, name: str, device: torch.device, dtype: torch.dtype, size) -> str:
    if name in dispatch.FUSED:
        why = dispatch.unavailable_reason(name, device, dtype)
        if why:
            return why
        if device.type == "cpu" and name in CPU_SKIP:
            return f"{name} on CPU runs only in the test interpreter/emulation (orders of magnitude slower)"
    if name == "compile" and device.type == "cpu" and dtype != torch.float32:
        return "compile of 16-bit matmuls on CPU is not a realistic baseline"
    rows, keys = work.rows_keys(size)
    need = work.materialised.get(name, 0.0) * rows * keys * 4
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = ["wall"]  # --clock: cpu (this process's CPU time) for tiny calls on a shared CPU, where preemption
# dominates wall-clock times; its threads' CPU time, so use it with one thread (OMP_NUM_THREADS=1)


def run_once(work, fn, inputs, device) -> tuple[float, float]:
    """One call (and its backward, for losses): (forward ms, backward ms) on the --clock."""
    clock = CLOCKS[CLOCK[0]]
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x.grad = None
    _sync(device)
    t0 = clock()
    out = fn(*inputs)
    _sync(device)
    t1 = clock()
    if work.backward:
        out.backward()
        _sync(device)
    return (t1 - t0) * 1e3, (clock() - t1) * 1e3


def measure_memory(work, names, size, dtype_name, device) -> dict[str, float | None]:
    """Peak extra MiB of one call (forward + backward for losses) per provider: on CUDA in this process (the caching
    allocator's peak counter is exact), on CPU in one fresh subprocess for all providers of this size (peak RSS,
    reset before each provider; see child_memory)."""
    if not names:
        return {}
    if device.type == "cuda":
        inputs = work.make_inputs(size, DTYPES[dtype_name], device)
        peaks = {}
        for name in names:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            run_once(work, provider_fn(work, name), inputs, device)
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return peaks
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", ",".join(names), "--ops", work.name,
           "--sizes", ",".join(map(str, size)), "--dtype", dtype_name, "--device", str(device)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  memory run of {','.join(names)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def child_memory(work, names, size, dtype, device) -> None:
    """CPU: peak extra RSS of one call per provider, printed as one JSON dict (runs in the subprocess of
    measure_memory). Each provider is warmed up first (libraries, caches; compile at this exact shape, since
    compilation is not the op's memory), then the peak RSS is reset to the current RSS (clear_refs 5) and one call
    measured; with MALLOC_MMAP_THRESHOLD_ set, what an earlier provider freed has gone back to the OS."""
    inputs = work.make_inputs(size, dtype, device)
    peaks = {}
    for name in names:
        fn = provider_fn(work, name)
        if name == "compile":
            run_once(work, fn, inputs, device)
        else:
            small = (min(size[0], 64), min(size[1], 128), size[2])
            run_once(work, fn, work.make_inputs(small, dtype, device), device)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _rss_field("VmRSS")
        run_once(work, fn, inputs, device)
        peaks[name] = (_rss_field("VmHWM") - base) / 2**20
    print(json.dumps(peaks))


def bench_size(work, size, dtype_name, device, providers, repeats, memory) -> list[Result]:
    dtype = DTYPES[dtype_name]
    results = {p: Result(work.name, p, *size, dtype_name, str(device)) for p in providers}
    active = []
    for p in providers:
        why = skip_reason(work, p, device, dtype, size)
        if why:
            results[p].note = "skipped: " + why
            continue
        err = work.gate(p, provider_fn(work, p), size, dtype, device)
        results[p].gate_error = err
        tol = tolerance(dtype, 0.01)
        if not err <= tol:
            results[p].note = f"FAILED correctness gate: error {err:.2e} > {tol:.1e}; not timed"
            continue
        active.append(p)
    inputs = work.make_inputs(size, dtype, device)
    for p in active:  # warm-up: compile at this shape (timed separately); the others ran in the gate already
        if p == "compile":
            t0 = time.perf_counter()
            run_once(work, provider_fn(work, p), inputs, device)
            results[p].compile_s = time.perf_counter() - t0
    samples = {p: [] for p in active}
    for r in range(repeats):
        order = active[r % len(active):] + active[:r % len(active)] if active else []
        for p in order:
            samples[p].append(run_once(work, provider_fn(work, p), inputs, device))
    for p in active:
        res = results[p]
        fwd, bwd = [x[0] for x in samples[p]], [x[1] for x in samples[p]]
        tot = [a + b for a, b in samples[p]]
        res.fwd_ms, res.bwd_ms, res.total_ms = statistics.median(fwd), statistics.median(bwd), statistics.median(tot)
        res.total_min_ms, res.total_max_ms, res.samples_ms = min(tot), max(tot), tot
        res.gflops = work.flops(size) / (res.total_ms * 1e-3) / 1e9
    if memory:
        for p, mib in measure_memory(work, active, size, dtype_name, device).items():
            results[p].peak_extra_mib = mib
    return [results[p] for p in providers]


def format_table(rows: list[Result]) -> str:
    """Speedup and memory against naive at the same size (against the torch backend where naive did not run)."""
    base = {(r.op, r.N, r.K, r.D, r.dtype): r for r in rows if r.provider == "torch" and r.total_ms}
    base.update({(r.op, r.N, r.K, r.D, r.dtype): r for r in rows if r.provider == "naive" and r.total_ms})
    head = (f"{'op':10s} {'provider':11s} {'N':>7s} {'K':>7s} {'D':>4s} {'dtype':5s} {'fwd ms':>9s} {'bwd ms':>9s} "
            f"{'total ms (min-max)':>24s} {'speedup':>8s} {'peak MiB':>9s} {'mem vs naive':>12s} {'gate err':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        key = (r.op, r.N, r.K, r.D, r.dtype)
        if r.total_ms is None:
            lines.append(f"{r.op:10s} {r.provider:11s} {r.N:7d} {r.K:7d} {r.D:4d} {r.dtype:5s}  {r.note}")
            continue
        ref = base.get(key)
        speed = f"{ref.total_ms / r.total_ms:7.2f}x" if ref else "      -"
        mem = f"{r.peak_extra_mib:9.1f}" if r.peak_extra_mib is not None else "        -"
        ratio = (f"1/{ref.peak_extra_mib / r.peak_extra_mib:.1f}" if ref and ref.peak_extra_mib and r.peak_extra_mib
                 else "-")
        p = 2 if r.total_ms < 10 else 1  # tiny calls: two decimals
        rng = f"{r.total_ms:9.{p}f} ({r.total_min_ms:.{p}f}-{r.total_max_ms:.{p}f})"
        lines.append(f"{r.op:10s} {r.provider:11s} {r.N:7d} {r.K:7d} {r.D:4d} {r.dtype:5s} {r.fwd_ms:9.{p}f} "
                     f"{r.bwd_ms:9.{p}f} {rng:>24s} {speed:>8s} {mem} {ratio:>12s} {r.gate_error:9.1e}")
        if r.compile_s is not None:
            lines[-1] += f"   (compile + first run {r.compile_s:.1f} s)"
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ceilings(device: torch.device) -> dict:
    """Measured in this run on a GPU: a large bf16 GEMM (TFLOP/s) and a device-to-device copy (TB/s, read + write)."""
    if device.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def timed(fn, reps=10):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps * 1e-3

    gemm = 2.0 * 8192**3 / timed(lambda: a @ a) / 1e12
    copy = 2.0 * src.numel() / timed(lambda: dst.copy_(src)) / 1e12
    return {"gemm_bf16_tflops": gemm, "copy_tbps": copy}


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit or "unknown", "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "action_kernels": ak.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "forced": " ".join(f"{v}={os.environ[v]}" for v in FORCING_VARS if os.environ.get(v)),
           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()}
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


def provider_colours(rows: list[Result]) -> dict[str, str]:
    """One colour per provider for every panel of the plot (tab10, providers in order of first appearance over all
    ops), so a provider keeps its colour from one op's panel to the next."""
    palette = [f"C{i}" for i in range(10)]
    return {p: palette[i % len(palette)] for i, p in enumerate(dict.fromkeys(r.provider for r in rows))}


def write_plot(rows: list[Result], path: str) -> str | None:
    """PNG: per op, total time and peak extra memory of each provider against the number of keys K (each
    provider in its provider_colours colour on every panel)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = [op for op in dict.fromkeys(r.op for r in rows) if any(r.op == op and r.total_ms for r in rows)]
    if not ops:
        return None
    colours = provider_colours(rows)
    fig, axes = plt.subplots(2, len(ops), figsize=(4.2 * len(ops), 6.5), squeeze=False)
    for col, op in enumerate(ops):
        for provider in dict.fromkeys(r.provider for r in rows if r.op == op):
            pts = sorted((r.K, r.total_ms, r.peak_extra_mib) for r in rows
                         if r.op == op and r.provider == provider and r.total_ms)
            if not pts:
                continue
            ks = [p[0] for p in pts]
            axes[0][col].plot(ks, [p[1] for p in pts], "o-", label=provider, color=colours[provider])
            if all(p[2] is not None for p in pts):
                axes[1][col].plot(ks, [p[2] for p in pts], "o-", label=provider, color=colours[provider])
        first = next(r for r in rows if r.op == op)
        axes[0][col].set_title(f"{op} ({first.dtype}, {first.device})")
        axes[0][col].set_ylabel("forward + backward ms" if WORKLOADS[op].backward else "forward ms")
        axes[1][col].set_ylabel("peak extra MiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("keys K")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # the memory panel is empty under --no-memory
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    ap.add_argument("--ops", default=",".join(WORKLOADS), help=f"comma list from {','.join(WORKLOADS)}")
    ap.add_argument("--sizes", default=None, help="N,K,D triples separated by ';' (default: the preset's sizes per op "
                                                  "and device; see benchmarks/workloads.py)")
    ap.add_argument("--preset", default=None, choices=PRESETS,
                    help="quick: small sizes with a sweep over K (the CPU default, about a minute);\n"
                         "targets: the sizes the kernel issues set goals at (the CUDA default; on CPU N16384 K8192 "
                         "D128 soft,\nN=K=16384 topk, 4x256 queries K16384 D512 anatomical: ~3-4 minutes);\n"
                         "tiny: per-call overhead at small sizes, 60 repeats (soft and topk against naive, "
                         "anatomical against backend='torch')")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help="comma list (default: every provider of each op that runs)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (tiny preset: 60)")
    ap.add_argument("--clock", default=None, choices=tuple(CLOCKS),
                    help="wall (default) or cpu: this process's CPU time (the tiny preset's default on CPU: on a "
                         "shared machine preemption dominates a millisecond call's wall time)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider memory subprocesses")
    ap.add_argument("--out", default="bench_results", help="folder for CSV and JSON results")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--ops: unknown {unknown}; choose from {tuple(WORKLOADS)}")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    sizes = parse_sizes(args.sizes) if args.sizes else None
    if args.child_memory:
        work = WORKLOADS[ops[0]]
        child_memory(work, args.child_memory.split(","), sizes[0], DTYPES[dtype_name], device)
        return 0
    preset = args.preset or ("quick" if device.type == "cpu" else "targets")
    if args.repeats is None:
        args.repeats = 60 if preset == "tiny" and not sizes else 3
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    wanted = tuple(args.providers.split(",")) if args.providers else None
    known = {p for w in WORKLOADS.values() for p in w.providers}
    if wanted and set(wanted) - known:
        raise SystemExit(f"--providers: unknown {sorted(set(wanted) - known)}; choose from {sorted(known)}")

    env = environment()
    env.update(ceilings(device))
    print(f"action_kernels benchmark ({'--sizes' if sizes else 'preset ' + preset}) on {device} "
          f"({env['device_name']}, {env['threads']} threads), torch {env['torch']}, commit {env['commit']}", flush=True)
    if device.type == "cpu":
        print(f"CPU capability: {env['cpu_capability']} (torch's kernels)"
              + (f"; forced: {env['forced']}" if env["forced"] else ""), flush=True)
    tiny = preset == "tiny" and not sizes
    CLOCK[0] = args.clock or ("cpu" if tiny and device.type == "cpu" else "wall")
    if CLOCK[0] == "cpu":
        print(f"clock: this process's CPU time ({env['threads']} threads)", flush=True)
    memory = not args.no_memory and not tiny  # a tiny call's memory is allocator noise
    plan = [(WORKLOADS[o], size) for o in ops for size in (sizes or WORKLOADS[o].default_sizes(device, preset))]
    rows = []
    for i, (work, size) in enumerate(plan, 1):
        default = work.tiny_providers if tiny else work.providers
        providers = [p for p in default if wanted is None or p in wanted]
        print(f"[{i}/{len(plan)}] {work.name}: {work.describe(size)} {dtype_name}: gate, {args.repeats} repeats"
              f"{', memory' if memory else ''} ...", flush=True)
        rows += bench_size(work, size, dtype_name, device, providers, args.repeats, memory)
    print()
    print(format_table(rows))
    if "gemm_bf16_tflops" in env:
        print(f"\nceilings measured in this run: bf16 GEMM {env['gemm_bf16_tflops']:.0f} TFLOP/s, "
              f"device copy {env['copy_tbps']:.2f} TB/s")
        for r in rows:
            if r.total_ms:
                floor_ms = WORKLOADS[r.op].floor_flops((r.N, r.K, r.D)) / (env["gemm_bf16_tflops"] * 1e12) * 1e3
                print(f"  {r.op:10s} {r.provider:11s} N={r.N} K={r.K} D={r.D}: {r.total_ms / floor_ms:6.2f}x the "
                      f"GEMM floor ({floor_ms:.2f} ms), {r.gflops / 1e3 / env['gemm_bf16_tflops'] * 100:5.1f}% of "
                      f"GEMM peak")
    csv_path, json_path = write_outputs(rows, args.out, env)
    png = write_plot(rows, json_path[:-len(".json")] + ".png")
    print(f"\nplot: {png}" if png else "\nplot: skipped (pip install matplotlib)")
    print(f"\nspeedup and memory are relative to naive at the same size (the torch backend where naive did not "
          f"run); 'total' is forward + backward for the losses and forward for topk; gate err: relative error vs "
          f"float64 at a reduced size.\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

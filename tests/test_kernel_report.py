"""The static kernel report in CI: every kernel configuration the launchers can choose at D <= 256, compiled ahead of
time for sm_80 and sm_90 (no GPU needed), has no local memory and issues tensor-core instructions; the CUDA kernels
are held to tests/kernel_known_limits.json. Plus unit tests of the report's parts (SASS loops, the estimate, launch
plans).

The compile step runs once per session (each distinct configuration compiles once, in parallel); Triton caches
compiles under ~/.triton, outside the CI venv, so a warm cache makes it seconds.
"""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from tools.kernel_report import cuda_aot, estimate, matrix, sass, tools
from tools.kernel_report.devices import device

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN_LIMITS = os.path.join(HERE, "kernel_known_limits.json")
ARCHS = (80, 90)
# the bar holds for D <= 256; D = 512 is in docs/known-limits.md with its measured spill bytes (the full
# report, `--dims 64,128,256,512`, prints it)
DIMS = (64, 128, 256)
# fp16 and bf16 share the launch tables (keyed by "16" / "32" bits) but not the machine code: the mma input type,
# and the fp16 key gradient's range scale, change what ptxas allocates (fp16 forwards spilled on sm_90 where bf16's
# did not, issue 26), so both compile. fp32 CUDA tensors never reach Triton (dispatch.TRITON_FP32_REASON: its tf32x3
# kernels spill), so the launchers cannot choose an fp32 config on a GPU
DTYPES = ("bf16", "fp16")


def _need_tools():
    for finder in (tools.triton_status, tools.cuobjdump, tools.nvcc):
        found, why = finder()
        if found is None:
            pytest.skip(f"the kernel report needs {finder.__name__}: {why}")


@pytest.fixture(scope="session")
def report(tmp_path_factory):
    """The report of every op x dtype x D x mode at D in DIMS, for sm_80 and sm_90 (one subprocess)."""
    _need_tools()
    out = tmp_path_factory.mktemp("kernel_report")
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "tools.kernel_report", "--arch", ",".join(f"sm_{a}" for a in ARCHS),
           "--dims", ",".join(map(str, DIMS)), "--dtypes", ",".join(DTYPES), "--json", str(out / "report.json"),
           "--dump-cubins", str(out / "cubins"),
           "--jobs", str(max(2, os.cpu_count() or 2))]
    # from the repository root: `python -m` then imports the source tree, whose csrc/ the CUDA section compiles (an
    # installed wheel has no csrc/)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=os.path.dirname(HERE))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "report.json") as f:
        data = json.load(f)
    data["_stdout"], data["_dir"] = done.stdout, str(out)
    return data


def _triton_kernels(report):
    for row in report["triton"]["rows"]:
        for k in row["kernels"]:
            yield row, k


def _where(row, k):
    tiles = ", ".join(f"{n}={v}" for n, v in k.get("tiles", {}).items())
    return (f"{row['op']} {row['mode']} k={row['k']} {row['dtype']} D={row['D']} sm_{row['arch']}: kernel "
            f"{k.get('kernel')} ({tiles}, {k.get('num_warps')} warps, {k.get('num_stages')} stages)")


@pytest.mark.slow
def test_every_triton_config_compiles_without_local_memory(report):
    assert not report["triton"]["skipped"], report["triton"]["skipped"]
    bad = []
    for row, k in _triton_kernels(report):
        if "error" in k:
            bad.append(f"{_where(row, k)} failed to compile: {k['error']}")
        elif k["stack"] or k["ldl"] or k["stl"]:
            bad.append(f"{_where(row, k)}: {k['registers']} registers, {k['stack']} B stack, "
                       f"LDL/STL {k['ldl']}/{k['stl']}")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_every_triton_config_can_launch(report):
    bad = [f"{_where(row, k)}: {k['occupancy']['limited_by']}" for row, k in _triton_kernels(report)
           if "error" not in k and k["occupancy"]["ctas_per_sm"] < 1]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_every_triton_kernel_with_a_dot_uses_tensor_cores(report):
    bad = [f"{_where(row, k)}: no HGMMA/HMMA (FFMA {k['ffma']})" for row, k in _triton_kernels(report)
           if "error" not in k and k["dot"] and k["tensor_instructions"] == 0]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_report_covers_every_op_dtype_dim_and_mode(report):
    seen = {(r["arch"], r["op"], r["mode"], r["dtype"], r["D"], r["k"]) for r in report["triton"]["rows"]}
    want = {(a, e.op, e.mode, e.dtype, e.D, e.k) for a in ARCHS for e in matrix.entries(dtypes=DTYPES, dims=DIMS)}
    assert want <= seen, f"missing: {sorted(want - seen)[:5]}"
    assert all(r["estimate_ms"] and r["floor_ms"] > 0 for r in report["triton"]["rows"])


@pytest.mark.slow
def test_dumped_cubins_are_the_ones_reported(report):
    cubins = os.path.join(report["_dir"], "cubins")
    with open(os.path.join(cubins, "manifest.json")) as f:
        manifest = json.load(f)["files"]
    cuobjdump = tools.cuobjdump()[0]
    name, entry = next((n, e) for n, e in manifest.items() if e["backend"] == "triton" and e["uses"])
    usage = sass.resource_usage(cuobjdump, os.path.join(cubins, name))[entry["kernel"]]
    assert usage["registers"] == entry["numbers"]["registers"] and usage["stack"] == entry["numbers"]["stack"]
    use = entry["uses"][0]
    assert {"op", "dtype", "D", "mode", "launch", "estimate_ms", "mode_floor_ms"} <= set(use)
    assert "ESTIMATE" in report["_stdout"] and "estimate" in json.dumps(manifest).lower()


def _cuda_violations(k):
    v = []
    if k["stack"] or k["ldl"] or k["stl"]:
        v.append("local memory")
    if k["tensor_instructions"] == 0:
        v.append("no tensor-core instructions")
    return v


@pytest.mark.slow
def test_cuda_kernels_meet_the_bar_or_their_known_limits_entry(report):
    assert not report["cuda"]["skipped"], report["cuda"]["skipped"]
    with open(KNOWN_LIMITS) as f:
        limits = {(e["kernel"], e["arch"]): e for e in json.load(f)["cuda"]}
    seen, bad = set(), []
    for k in report["cuda"]["kernels"]:
        if "error" in k:
            bad.append(f"{k['source']} sm_{k['arch']}: nvcc failed: {k['error'][:300]}")
            continue
        key = (k["short_name"], k["arch"])
        numbers = (f"{k['registers']} registers, {k['stack']} B stack, LDL/STL {k['ldl']}/{k['stl']}, "
                   f"{k['tensor_instructions']} tensor-core instructions, {k['ffma']} FFMA")
        entry = limits.get(key)
        violations = _cuda_violations(k)
        if not violations:
            if entry:
                bad.append(f"{key[0]} sm_{key[1]} now meets the bar ({numbers}): remove its entry from "
                           f"{KNOWN_LIMITS}")
            continue
        seen.add(key)
        if entry is None:
            bad.append(f"{key[0]} sm_{key[1]}: {', '.join(violations)} ({numbers}) and no known-limits entry")
            continue
        worse = [n for n in ("stack", "ldl", "stl") if k[n] > entry[n]]
        if k["tensor_instructions"] < entry["tensor_instructions"]:
            worse.append("tensor_instructions")
        if worse:
            bad.append(f"{key[0]} sm_{key[1]} got worse than its known-limits entry in {worse}: {numbers}")
    stale = [f"{n} sm_{a}" for (n, a) in limits if (n, a) not in seen and not any(
        b.startswith(f"{n} sm_{a} now") for b in bad)]
    if stale:
        bad.append(f"known-limits entries for kernels that no longer exist: {stale}")
    assert not bad, "\n".join(bad)


def test_known_limits_hold_no_triton_entry():
    with open(KNOWN_LIMITS) as f:
        data = json.load(f)
    assert set(data) <= {"cuda", "note"} and all(e.get("reason") for e in data["cuda"])


# --- the report's parts, without compiling -------------------------------------------------------------------
def _ins(addr, op, operands="", guarded=False):
    return sass.Instr(addr, op, operands, guarded)


def test_loops_are_natural_loops_of_the_control_flow_graph():
    # entry; outer loop 0x10..0x60 holding inner loop 0x20..0x40; an idle BRA-to-self after EXIT
    code = [_ins(0x00, "MOV"), _ins(0x10, "IADD3"), _ins(0x20, "HGMMA.64x64x16.F32.BF16", "R0, gdesc[UR4], R0"),
            _ins(0x30, "FFMA"), _ins(0x40, "BRA", "0x20", True), _ins(0x50, "FADD"), _ins(0x60, "BRA", "0x10", True),
            _ins(0x70, "EXIT"), _ins(0x80, "BRA", "0x80")]
    loops = sass.loops(code)
    assert [[code[i].addr for i in body] for body in loops] == [[0x10, 0x20, 0x30, 0x40, 0x50, 0x60],
                                                               [0x20, 0x30, 0x40]]


def test_estimate_counts_each_instruction_by_its_innermost_loop():
    code = [_ins(0x00, "MOV"), _ins(0x10, "FFMA"), _ins(0x20, "BRA", "0x10", True), _ins(0x30, "EXIT")]
    dev = device(90)
    est = estimate.estimate(dev, code, [1000], grid=dev.sms, num_warps=4, dram_bytes=0)
    # per CTA: FFMA 1000 runs x 4 warps x 32 lanes on 128 FMA lanes; issue (1 + 2000 + 1) x 4 warps on 4 a clock
    clk = dev.clock_ghz * 1e6
    assert est["pipes_ms"]["fma"] == pytest.approx(1000 * 4 * 32 / dev.fma_lanes / clk)
    assert est["pipes_ms"]["issue"] == pytest.approx((2 + 2000) * 4 / dev.issue_warps / clk)
    assert est["bound"] == "issue"


def test_branch_regions_count_at_the_plans_rate_or_not_behind_a_zero_trip_loop():
    # loop 0x10..0xc0: a vote-skipped append (0x30..0x40 behind the BRA at 0x20), a fallback (0x60..0x90 behind
    # the BRA at 0x50, holding the 0-trip loop 0x70..0x80), a plain guarded branch over an FADD (0xa0 -> 0xb0)
    code = [_ins(0x00, "MOV"), _ins(0x10, "FSETP"), _ins(0x20, "BRA", "0x50", True), _ins(0x30, "ATOMG"),
            _ins(0x40, "STG"), _ins(0x50, "BRA", "0xa0", True), _ins(0x60, "IADD3"), _ins(0x70, "LOP3"),
            _ins(0x80, "BRA", "0x70", True), _ins(0x90, "SEL"), _ins(0xa0, "BRA", "0xc0", True), _ins(0xb0, "FADD"),
            _ins(0xc0, "BRA", "0x10", True), _ins(0xd0, "EXIT")]
    loops = sass.loops(code)
    regions = estimate.branch_regions(code, loops, [100, 0], {"ATOMG": 0.25})
    by_addr = {code[i].addr: r for i, r in regions.items()}
    assert by_addr == {0x30: ("ATOMG", 0.25), 0x40: ("ATOMG", 0.25), 0x60: ("a 0-trip loop", 0.0),
                       0x70: ("a 0-trip loop", 0.0), 0x80: ("a 0-trip loop", 0.0), 0x90: ("a 0-trip loop", 0.0)}
    dev = device(90)
    est = estimate.estimate(dev, code, [100, 0], grid=dev.sms, num_warps=4, dram_bytes=0,
                            branch_rates={"ATOMG": 0.25})
    clk = dev.clock_ghz * 1e6
    # issue: MOV + EXIT once; FSETP, 4 BRA, FADD 100 times; ATOMG, STG 25 times; the fallback never
    assert est["pipes_ms"]["issue"] == pytest.approx((2 + 6 * 100 + 2 * 25) * 4 / dev.issue_warps / clk)
    assert "counted at rate 0.250" in est["note"] and "0-trip loop" in est["note"]
    plain = estimate.estimate(dev, code, [100, 0], grid=dev.sms, num_warps=4, dram_bytes=0)
    # without rates only the 0-trip rule applies: ATOMG and STG count 100 times
    assert plain["pipes_ms"]["issue"] == pytest.approx((2 + 8 * 100) * 4 / dev.issue_warps / clk)


def test_topk_model_follows_the_kernels_overflow_rule():
    from tools.kernel_report.topk_model import simulate
    few = simulate(128, 64, 64, 64, 256)  # two tiles fit in 256 slots: no prune, every lane group appends
    assert few["merges"] == 0 and few["tiles"] == 2 and few["append_rate"] > 0.9
    runs = {W: simulate(8192, 64, 64, 64, W) for W in (128, 256, 512)}
    for W, r in runs.items():  # each prune runs its tile again; a tail tile is padded
        assert r["tiles"] == 8192 // 64 + r["merges"], (W, r)
        assert 0 < r["append_rate"] < 1
    assert runs[128]["merges"] > runs[256]["merges"] > runs[512]["merges"] >= 1
    ragged = simulate(8192 + 5, 64, 64, 64, 256)
    assert ragged["tiles"] == 8192 // 64 + 1 + ragged["merges"]


def test_launch_model_derives_trips_and_branch_rates_from_the_captured_launch():
    """The launchers record only what they run; the report derives the estimate's inputs from that record."""
    pytest.importorskip("triton")
    from action_kernels.triton import _common
    from tools.kernel_report import launch_model
    from tools.kernel_report.topk_model import simulate

    N, K, k = 4096, 8192, 64
    with _common.capture(90) as launches:
        matrix.call_launcher(matrix.Entry("hard_negative_topk", "topk", "bf16", 128, N, K, k))
    scan, select = launches
    c = scan.constexprs
    sim = simulate(K, k, c["BLOCK_M"], c["BLOCK_N"], c["W"])
    got = launch_model.model(scan)
    assert got.trips == [sim["merges"] + 1, sim["tiles"], sim["merges"] * (c["BLOCK_M"] // c["MERGE_ROWS"]), 0]
    assert got.branch_rates == {"ATOMG": sim["append_rate"]} and got.notes == {"merges": sim["merges"]}
    assert got.dram_bytes == float(sum(scan.args[n].numel() * scan.args[n].element_size() for n in ("A", "Kp")))
    assert launch_model.model(select).trips == []
    with _common.capture(90) as launches:
        matrix.call_launcher(matrix.Entry("soft_contrastive", "forward_grad", "bf16", 128, N, K))
        matrix.call_launcher(matrix.Entry("soft_contrastive", "key_grad", "bf16", 128, N, K))
    for launch in launches:
        blocks = (K // launch.constexprs["BLOCK_N"]) if launch.name != "key_grad" else N // launch.constexprs["BLOCK_M"]
        assert launch_model.model(launch).trips == [blocks], launch.name
    unknown = _common.Launch("soft_contrastive", "backward2", None, (1,), {}, {}, 4, 1)
    with pytest.raises(ValueError, match="no launch model for the soft_contrastive kernel 'backward2'"):
        launch_model.model(unknown)


def test_tensor_work_comes_from_the_instruction_shapes():
    kind, flops, smem = sass.mma_work(_ins(0, "HGMMA.64x128x16.F32.BF16", "R24, gdesc[UR4], R24"))
    assert (kind, flops, smem) == ("16", 2 * 64 * 128 * 16, (128 + 64) * 16 * 2)
    assert sass.mma_work(_ins(0, "HGMMA.64x64x8.F32.TF32", "R24, R8, gdesc[UR4], R24"))[::2] == ("tf32", 64 * 8 * 4)
    assert sass.mma_work(_ins(0, "HMMA.16816.F32.BF16", "R0, R4, R8, R0")) == ("16", 2 * 16 * 8 * 16, 0)
    assert sass.mma_work(_ins(0, "FFMA", "R0, R1, R2, R3")) is None


def test_occupancy_names_the_limiting_resource():
    dev = device(90)
    assert estimate.occupancy(dev, 255, 4, 0)["limited_by"] == "registers"
    assert estimate.occupancy(dev, 32, 4, 200 * 1024)["ctas_per_sm"] == 1
    assert estimate.occupancy(dev, 32, 4, 240 * 1024)["ctas_per_sm"] == 0


def test_floor_is_gemm_equivalents_at_the_published_peak():
    dev = device(90)
    assert estimate.floor_ms(dev, 1, 65536, 65536, 128) == pytest.approx(2 * 65536**2 * 128 / 989.4e12 * 1e3)


def _reuse_the_reports_cubins(report, monkeypatch):
    """cuda_aot's nvcc runs copy the cubins the report fixture compiled from the same csrc/ instead (a second
    compile of every .cu takes about a minute on 2 cores); every other command runs as usual."""
    compiled, run = os.path.join(report["_dir"], "cubins"), subprocess.run

    def nvcc_or_run(cmd, **kw):
        if "-cubin" not in cmd:
            return run(cmd, **kw)
        out = cmd[cmd.index("-o") + 1]
        shutil.copyfile(os.path.join(compiled, os.path.basename(out)), out)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cuda_aot, "subprocess", types.SimpleNamespace(run=nvcc_or_run))


@pytest.mark.slow
def test_cuda_estimates_use_the_extensions_launch_plan(report, monkeypatch, tmp_path):
    """The consumer side of launch_plans(op, mode, dtype, N, K, D, k) with a fake plan naming a real kernel."""
    _need_tools()
    _reuse_the_reports_cubins(report, monkeypatch)
    real = {}
    # this checkout's csrc/ (CI installs the package without it)
    monkeypatch.setattr(tools, "csrc_dir", lambda: (os.path.join(os.path.dirname(HERE), "csrc"), ""))
    monkeypatch.setattr(cuda_aot, "launch_plans_fn", lambda: None)
    entry = matrix.Entry("soft_contrastive", "forward", "bf16", 128, 4096, 4096)
    from tools.kernel_report import report as rep
    plain = cuda_aot.section([entry], [90], str(tmp_path), rep.cubin_numbers)
    assert plain["rows"][0]["note"] == cuda_aot.NO_PLAN and plain["rows"][0]["estimate_ms"] is None
    name = next(k["name"] for k in plain["kernels"] if "forward_kernel" in k["name"])

    def fake(op, mode, dtype, N, K, D, k):
        real["args"] = (op, mode, dtype, N, K, D, k)
        return [{"kernel": name, "grid": N // 32, "block": 128, "dynamic_smem": 0, "trips": [K // 32]}]

    monkeypatch.setattr(cuda_aot, "launch_plans_fn", lambda: fake)
    sec = cuda_aot.section([entry], [90], str(tmp_path), rep.cubin_numbers)
    row = sec["rows"][0]
    assert real["args"] == ("soft_contrastive", "forward", "bf16", 4096, 4096, 128, 0)
    assert row["estimate_ms"] > 0 and row["kernels"][0]["occupancy"]["ctas_per_sm"] >= 1
    assert row["ratio"] == pytest.approx(row["estimate_ms"] / row["floor_ms"])


def test_missing_tools_are_reported_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(tools, "nvcc", lambda: (None, "nvcc not found (test)"))
    from tools.kernel_report import report as rep
    sec = cuda_aot.section([], [90], str(tmp_path), rep.cubin_numbers)
    assert sec["skipped"] == "nvcc not found (test)"
    monkeypatch.setattr(tools, "triton_status", lambda: (None, "triton is not importable (test)"))
    assert rep.triton_section([], [90], str(tmp_path), 1)["skipped"] == "triton is not importable (test)"

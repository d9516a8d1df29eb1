"""The GPU check cannot misfire: its rehearsal runs every step on this CPU, and the interpreter stays off on a GPU.

The dry run takes 64-82 s on 2 shared cores (a kernel-report compile, the GPU tests skipping, a tiny benchmark, the gloo
part of ddp_check with nibabel unimportable, about 16 s of it), so the first real run of tools/gpu/gpu_check.sh on
a lent GPU is not its first run; the budget test takes about 8 s.
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu", "gpu_check.sh")
STEPS = ("build", "kernel_report", "gpu_tests", "bench_soft", "bench_topk", "ddp")
FILES = {"summary.md", "steps.log", "env.txt", "kernel_report.json", "kernel_report.txt", "tests.log",
         "bench_results.tar.gz", "ddp.log"}


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_every_file(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | 0 |" in summary, f"step {step} did not pass:\n{summary}"
    # the device tool returns at most 8 files from $OUT
    assert {p.name for p in tmp_path.iterdir()} == FILES
    report = json.loads((tmp_path / "kernel_report.json").read_text())
    assert report["triton"]["rows"] and all(r["estimate_ms"] for r in report["triton"]["rows"])
    with tarfile.open(tmp_path / "bench_results.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith(".csv") for n in names) and any(n.endswith(".json") for n in names)
    # the short table comes last, with the benchmark rows and the report's estimates
    assert done.stdout.rstrip().endswith((tmp_path / "summary.md").read_text().rstrip().splitlines()[-1])
    assert "DRY RUN" in summary and "soft       chunked" in summary and "| bf16 |" in summary
    # the multi-process check's gloo part ran (nibabel unimportable, as on the lent machine) and agreed
    ddp = (tmp_path / "ddp.log").read_text()
    assert '"complete": true' in ddp and "nibabel" in ddp
    assert any(line.startswith("gloo-2ranks ") and line.split()[3] == "True" for line in summary.splitlines())


def test_gpu_check_cuts_step_limits_to_its_budget_and_still_writes_the_table(tmp_path):
    # a 2 s budget (x4 in the rehearsal): the build step gets at most 8 s, every step after the budget is spent is
    # not run and says so, and the short table still comes last
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", PYTHON=sys.executable, GPU_CHECK_BUDGET_S="2")
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    summary = (tmp_path / "summary.md").read_text()
    assert "of 480 (budget) |" in summary.splitlines()[2], summary  # the build row: limit cut from 120 x 4
    for step in STEPS[2:]:
        assert f"| {step} | not run (budget spent) |" in summary, summary
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


def test_gpu_check_turns_the_interpreter_off_and_rejects_unknown_arguments():
    assert "export TRITON_INTERPRET=0" in open(SCRIPT).read()
    done = subprocess.run(["bash", SCRIPT, "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr


def _interpret_after_conftest(cuda: bool) -> str:
    code = ("import os, sys, torch; os.environ.pop('TRITON_INTERPRET', None); "
            f"torch.cuda.is_available = lambda: {cuda}; sys.path.insert(0, 'tests'); import conftest; "
            "print(os.environ.get('TRITON_INTERPRET', 'unset'))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout.strip()


def test_conftest_sets_the_triton_interpreter_only_without_a_cuda_device():
    assert _interpret_after_conftest(False) == "1"
    assert _interpret_after_conftest(True) == "unset"

"""The GPU training check: the supervised baseline and the ACTION pipeline on ACDC (3 labelled patients, 256x256)
in a few minutes of a lent GPU, scored on the 40 test volumes with the CPU results' BatchNorm protocol
(benchmarks/RESULTS.md).

    bash tools/gpu/gpu_train.sh [--budget 300]     # on a lent GPU (the device tool; docs/gpu-check.md)
    bash tools/gpu/gpu_train.sh --dry-run          # the whole script on a CPU at tiny sizes (what CI runs)

Steps, each writing its result under --out ($OUT on the device machine) as soon as it finishes:
  1. data   the compact ACDC copy (tools/gpu/gpu_data.py; prepared before the call and carried, or a tiny one in
            the dry run) and the check that what the call carries stays under the 64 MiB limit
  2. probe  a subprocess builds each stage's trainer from exactly the command-line options of the runs below,
            times training steps after warm-up, one validation, the BatchNorm re-estimation and the test
            evaluation of a few volumes (if a stage fails on the chosen kernel backend, the probe runs again on
            the chunked backend and the runs use that; the failure is reported)
  3. plan   iterations per run from the probe's times and the budget left: supervised and ACTION get the same
            training time; ACTION's three stages split theirs in the proportions of the action-cpu preset
  4. runs   `python -m action.cli train --preset acdc-cpu ...` and `... --preset action-cpu ...` (the CLI, as a
            user runs it), each at --size 256, selected on validation and tested at the end on BatchNorm statistics
            re-estimated on 50 seeded batches of 16 clean unlabelled slices (--bn-recalibrate 50 with the
            unlabelled slices loaded: the same numbers `action evaluate --bn-recalibrate 50 --bn-source unlabelled`
            gives; the dry run checks that it does)
  5. table  the summary and, last, the per-class test table (also results.md, ready for benchmarks/RESULTS.md)
Files under --out (the device tool returns at most 8): gpu_train.log, plan.json, supervised.json, action.json,
results.md, runs.tar.gz (logs, CSVs, summaries and overlays of both runs; no checkpoints).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools", "gpu"))
sys.path.insert(0, REPO)

import gpu_data  # noqa: E402

from action.config import PIPELINE, TRAINED_STAGES  # noqa: E402

KINDS = TRAINED_STAGES
CLASS_ORDER = ("RV", "Myo", "LV")


@dataclasses.dataclass
class Settings:
    """One place for what differs between the real check and its dry run."""

    device: str = "cuda"
    amp: str = "on"  # bf16 autocast on the GPU
    size: int = 256
    bn_batches: int = 50  # --bn-recalibrate: the CPU results' protocol
    budget_s: float = 300.0  # wall time of the whole script (the device call's timeout_s should leave room above)
    warm_steps: int = 3  # probe: steps before timing (cuDNN, Triton compilation)
    probe_steps: int = 10
    test_probe_volumes: int = 4
    validations: int = 2  # per supervised run and per ACTION stage iii (stage ii validates at the same interval)
    min_iterations: int = 20
    max_iterations: int | None = None  # a cap per stage (dry run)
    margin_fraction: float = 0.08  # of the budget left, against the probe's variance
    margin_s: float = 15.0
    probe_limit_fraction: float = 0.35  # of the budget, for the first probe on a fused backend: then chunked
    backend: str = "triton"  # ACTION_KERNELS_BACKEND for the runs: the GPU's fused path
    threads: int | None = None  # torch CPU threads of the runs (None: torch's choice)
    dry_run: bool = False


# the dry run: every step at tiny sizes; one torch thread per process (on a CPU shared with other jobs, two
# spinning threads made a 32x32 step 0.2-0.3 s with one thread and up to 9 s with two, measured here); a budget
# so large that no step times out (the plan is still computed, then capped at max_iterations)
DRY = {"device": "cpu", "amp": "off", "size": 32, "bn_batches": 1, "budget_s": 1800.0, "warm_steps": 1,
       "probe_steps": 1, "test_probe_volumes": 1, "validations": 1, "min_iterations": 2, "max_iterations": 2,
       "margin_fraction": 0.0, "margin_s": 0.0, "backend": "auto", "threads": 1, "dry_run": True}
DRY_DATA = {"unlabelled": 8, "val": 1, "test": 2}  # the dry run's tiny copy


class Log:
    """print() to stdout and to <out>/gpu_train.log, flushed at once (a killed call still returns the file); the
    file's lines carry the seconds since the script started."""

    def __init__(self, path: str, start: float):
        self.fh = open(path, "a", buffering=1)
        self.start = start

    def __call__(self, *parts):
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        stamp = f"[{time.perf_counter() - self.start:6.1f} s] "
        self.fh.write("".join(stamp + line + "\n" for line in text.splitlines() or [""]))


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh, indent=1, default=str)
    os.replace(tmp, path)


# -- the runs' command lines: the probe builds its trainers from these very lists ---------------------------------
def common_options(s: Settings, data: str, out: str) -> list[str]:
    return ["--size", str(s.size), "--device", s.device, "--amp", s.amp, "--bn-recalibrate", str(s.bn_batches),
            "--tensorboard", "false", "--data", data, "--out", out, "--log-every", "10"] + \
        (["--threads", str(s.threads)] if s.threads else [])


def supervised_argv(s: Settings, data: str, out: str, iterations: int) -> list[str]:
    """The acdc-cpu baseline at --size; --unlabelled-batch 4 only loads the unlabelled slices (a supervised step
    draws none) so that validation and test re-estimate BatchNorm on them, as the CPU results' comparison does."""
    every = max(1, math.ceil(iterations / s.validations))
    return ["train", "--preset", "acdc-cpu", *common_options(s, data, out), "--iterations", str(iterations),
            "--unlabelled-batch", "4", "--val-every", str(every), "--checkpoint-every", str(iterations),
            "--test-at-end", "false"]


def evaluate_argv(s: Settings, checkpoint: str, out: str, overlays: int = 3) -> list[str]:
    """The CPU results' test of a checkpoint on the fair BatchNorm protocol (statistics re-estimated on the unlabelled
    slices whatever the stage); 3 overlays as the in-training test writes."""
    return ["evaluate", "--checkpoint", checkpoint, "--bn-recalibrate", str(s.bn_batches), "--bn-source",
            "unlabelled", "--device", s.device, "--out", out, "--overlays", str(overlays)]


def action_argv(s: Settings, data: str, out: str, stage_iterations: dict) -> list[str]:
    """The action-cpu pipeline (distillation weights 0.1) at --size with the stage iii recipe (the defaults chosen
    by benchmarks/ssl_protocol.py: Dice + CE on confident pseudo-labels, a strong unlabelled view, cutmix on every
    deranged pair, no ramp-up), with the plan's stage iterations; validation every 1/validations of stage iii
    (stage i never validates)."""
    every = max(1, math.ceil(stage_iterations["finetune"] / s.validations))
    return ["train", "--preset", "action-cpu", *common_options(s, data, out), "--stage-iterations",
            json.dumps(stage_iterations), "--val-every", str(every),
            "--checkpoint-every", str(max(stage_iterations.values()))]


def config_from_argv(argv: list[str]):
    """The TrainConfig `action train <argv>` runs (the CLI's own parser and precedence)."""
    from action.cli import build_parser
    from action.config import TrainConfig, build_config

    args = build_parser().parse_args(argv)
    return build_config(args.preset, args.config, {f.name: getattr(args, f.name)
                                                   for f in dataclasses.fields(TrainConfig)})


def stage_config(cfg, stage: str):
    """A pipeline stage's config as run_pipeline derives it (the fields that shape a step), for timing. Stage iii
    is timed with weak_threshold 0: every unlabelled pixel is then a valid candidate of the hard-negative top-k,
    the most selection work a step can have (a randomly initialised teacher is confident about few pixels, a
    trained one about most, so the probe would otherwise time a cheaper step than the run's)."""
    cfg = dataclasses.replace(cfg, stage=stage, iterations=cfg.stage_iterations[stage], init=None,
                              nesterov=cfg.nesterov or stage == "finetune", test_at_end=False)
    return dataclasses.replace(cfg, weak_threshold=0.0) if stage == "finetune" else cfg


# -- probe (runs in its own process, as the runs do) --------------------------------------------------------------
def probe(spec: dict) -> dict:
    """Times, for the configs of `spec` (supervised and ACTION argv lists), the data load, each stage's steps (the
    first one and the median after warm-up), a validation, the BatchNorm re-estimation, and the evaluation of a
    few test volumes; a stage that raises is reported with its error instead."""
    import traceback

    t0 = time.perf_counter()
    import torch

    from action.data.training import SliceData
    from action.engine import evaluate
    from action.engine.device import resolve_device
    from action.engine.evaluate import acdc_cases, save_overlays
    from action.engine.inference import volume_predictor
    from action.method import trainer_class
    from action_kernels import dispatch

    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def chosen(op):  # which backend the runs' fused ops get (a forced one that cannot run says why)
        try:
            return dispatch.select(op, None, device, torch.bfloat16 if spec["amp"] == "on" else torch.float32)
        except (RuntimeError, ValueError) as exc:
            return f"cannot run: {exc}"

    out = {"import_s": time.perf_counter() - t0, "torch": torch.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "kernel_backend": {op: chosen(op) for op in ("soft_contrastive_loss", "hard_negative_topk")},
           "backend_env": os.environ.get(dispatch.ENV_VAR, ""), "kinds": {}}
    sup_cfg = config_from_argv(spec["supervised"])
    act_cfg = config_from_argv(spec["action"])
    t = time.perf_counter()
    data = SliceData(sup_cfg, need_unlabelled=True, progress=False)
    out["load_s"] = time.perf_counter() - t
    out["slices"] = {"labelled": len(data.images), "unlabelled": len(data.unlabelled)}
    for kind in KINDS:
        cfg = sup_cfg if kind == "supervised" else stage_config(act_cfg, kind)
        cls = trainer_class(cfg)
        shared = type(f"Probe{cls.__name__}", (cls,), {"build_data": lambda self: data})
        rec: dict = {}
        try:
            t = time.perf_counter()
            trainer = shared(cfg, progress=False)
            trainer.model.train()
            sync()
            rec["build_s"] = time.perf_counter() - t
            times = []
            for it in range(spec["warm_steps"] + spec["probe_steps"]):
                t = time.perf_counter()
                trainer.step(it)
                sync()
                times.append(time.perf_counter() - t)
            rec.update(first_s=times[0], step_s=statistics.median(times[spec["warm_steps"]:]),
                       steps=times)
            if kind == "supervised":
                t = time.perf_counter()
                trainer.validate()
                sync()
                out["val_s"] = time.perf_counter() - t
                t = time.perf_counter()
                net = trainer.evaluated(trainer.eval_model())
                sync()
                out["bn_s"] = time.perf_counter() - t
                names = data.test_names[:spec["test_probe_volumes"]]
                predict = volume_predictor(net.eval(), cfg, device)
                t = time.perf_counter()
                evaluate(predict, acdc_cases(cfg.data, names), None,
                         cfg.num_classes, progress=False)
                out["test_volume_s"] = (time.perf_counter() - t) / len(names)
                case = next(acdc_cases(cfg.data, names[:1]))
                t = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    save_overlays(case, predict(case), os.path.join(tmp, "o.png"))
                out["overlay_s"] = time.perf_counter() - t
                out["test_volumes"] = len(data.test_names)
            if device.type == "cuda":
                rec["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            del trainer
        except Exception as exc:  # noqa: BLE001  (reported: the caller decides, knowing which stage failed)
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()[-4000:]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["kinds"][kind] = rec
        if spec.get("result"):  # what finished so far survives a timeout of this process
            write_json(spec["result"], out)
    out["total_s"] = time.perf_counter() - t0
    return out


# -- plan -----------------------------------------------------------------------------------------------------------
def plan_runs(s: Settings, pr: dict, budget_left: float) -> dict:
    """Iterations for both runs from the probe `pr` so that both fit in `budget_left` seconds with the margin.

    Costs besides the training steps: a process start per run (the probe's import time), per stage a data load, a
    trainer build and its first step's extra time (compilation), the validations (at most `validations` in the
    supervised run and in stage iii, stage ii at stage iii's interval), and a test (BatchNorm re-estimation, every
    test volume, three overlays). The supervised test runs beside ACTION's training, so the predicted end is the
    later of the two. Supervised and ACTION then get the same training time, ACTION's split over its stages in the
    action-cpu preset's proportions; a stage below min_iterations is raised to it (out of the margin). Raises
    ValueError when even that does not fit the budget."""
    from action.config import PRESETS

    k = pr["kinds"]
    share = PRESETS["action-cpu"]["stage_iterations"]
    stages = list(share)
    fixed_stage = {kind: pr["load_s"] + k[kind]["build_s"] + max(0.0, k[kind]["first_s"] - k[kind]["step_s"])
                   for kind in KINDS}
    test_s = pr["bn_s"] + pr["test_volume_s"] * pr["test_volumes"] + 3 * pr["overlay_s"]
    val_ii = math.ceil(s.validations * share["pretrain-local"] / share["finetune"]) + 1
    sup_fixed = pr["import_s"] + fixed_stage["supervised"] + s.validations * pr["val_s"]
    sup_test = pr["import_s"] + pr["load_s"] + test_s  # `action evaluate` loads the slices it re-estimates on
    act_fixed = pr["import_s"] + sum(fixed_stage[st] for st in stages) + (s.validations + val_ii) * pr["val_s"] + test_s
    margin = s.margin_fraction * budget_left + s.margin_s
    # ACTION's run outlasts the supervised test beside it whenever it trains for at least sup_test - act_fixed
    train_s = (budget_left - margin - sup_fixed - act_fixed) / 2
    per_unit = sum(share[st] * k[st]["step_s"] for st in stages)  # seconds of one unit of the proportions

    def clamp(n):  # at least min_iterations per stage, even where that costs part of the margin
        n = max(int(n), s.min_iterations)
        return min(n, s.max_iterations) if s.max_iterations else n

    sup_iters = clamp(max(train_s, 0) / k["supervised"]["step_s"])
    stage_iters = {st: clamp(max(train_s, 0) / per_unit * share[st]) for st in stages}
    predicted = {"supervised": sup_fixed + sup_iters * k["supervised"]["step_s"],
                 "action": act_fixed + sum(stage_iters[st] * k[st]["step_s"] for st in stages),
                 "supervised_test": sup_test}
    predicted["total"] = predicted["supervised"] + max(predicted["action"], sup_test)
    if predicted["total"] > budget_left and not s.max_iterations:
        raise ValueError(f"budget: {budget_left:.0f} s left cannot fit {s.min_iterations} iterations per stage: "
                         f"fixed costs {sup_fixed:.0f} s (supervised) + {act_fixed:.0f} s (ACTION) and the "
                         f"shortest runs predict {predicted['total']:.0f} s; give a larger --budget or fewer "
                         f"--validations")
    return {"budget_left_s": budget_left, "margin_s": margin, "train_s_per_method": train_s,
            "supervised_iterations": sup_iters, "stage_iterations": stage_iters,
            "fixed_s": {"supervised": sup_fixed, "action": act_fixed}, "test_s": test_s, "predicted_s": predicted,
            "capped": bool(s.max_iterations)}


# -- runs -----------------------------------------------------------------------------------------------------------
def child_env(s: Settings, extra_path: list[str], backend: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TQDM_MININTERVAL"] = "30"  # the runs' logs stay short; the numbers are in their CSVs
    if backend == "auto":
        env.pop("ACTION_KERNELS_BACKEND", None)
    else:
        env["ACTION_KERNELS_BACKEND"] = backend
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)  # also `action evaluate`, which has no --threads
    if not s.dry_run:
        env["TRITON_INTERPRET"] = "0"  # never the interpreter on the GPU
    return env


class Child:
    """`python <argv>` started at once in its own process group, output to log_path; wait() kills the group at
    its timeout."""

    def __init__(self, argv: list[str], log_path: str, env: dict):
        self.t0 = time.perf_counter()
        self.fh = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *argv], stdout=self.fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO, start_new_session=True)

    def wait(self, timeout: float) -> dict:
        try:
            rc, timed_out = self.proc.wait(timeout=max(timeout, 1.0)), False
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            rc, timed_out = self.proc.returncode, True
        self.fh.close()
        return {"rc": rc, "timed_out": timed_out, "wall_s": time.perf_counter() - self.t0,
                "status": "timed out" if timed_out else ("failed" if rc else "ok")}


def read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def collect(run_dir: str) -> dict:
    """What one stage's folder says: iterations, median seconds per iteration, validation curve, test summary."""
    train, val = read_csv(os.path.join(run_dir, "train.csv")), read_csv(os.path.join(run_dir, "val.csv"))
    out = {"iterations": int(train[-1]["iteration"]) if train else 0,
           "s_per_it": statistics.median(float(r["s_per_it"]) for r in train) if train else None,
           "last_loss": float(train[-1]["loss"]) if train else None,
           "val": [(int(r["iteration"]), float(r["mean_dice"])) for r in val]}
    if out["val"]:
        best = max(out["val"], key=lambda v: v[1])
        out["best_val"] = {"iteration": best[0], "mean_dice": best[1]}
    summary = os.path.join(run_dir, "test", "summary.json")
    if os.path.isfile(summary):
        with open(summary) as fh:
            out["test"] = json.load(fh)
    return out


def pack(tar_path: str, runs_dir: str) -> None:
    """The small files of every run (logs, CSVs, configs, test summaries, overlays; no checkpoints) in one archive."""
    tmp = tar_path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for root, _, files in os.walk(runs_dir):
            for name in sorted(files):
                if name.endswith((".log", ".csv", ".json", ".md", ".png")):
                    path = os.path.join(root, name)
                    tar.add(path, arcname=os.path.relpath(path, runs_dir))
    os.replace(tmp, tar_path)


# -- table ----------------------------------------------------------------------------------------------------------
def _cell(stats, key, digits):
    mean, std, nan = stats[key]
    return (f"{mean:.{digits}f} ± {std:.{digits}f}" if key == "dice" else f"{mean:.{digits}f}") + \
        (f" ({nan} NaN)" if nan else "")


def tables(header: str, runs: dict) -> tuple[str, str]:
    """(summary table, per-class test table) in Markdown; a run without a test result shows why."""
    lines = [header, "", ("| method | iterations | process wall s | s/it (median) | best val Dice (it) | test Dice | "
                          "Jaccard | HD95 | ASD |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        test = r.get("test")
        stages = r.get("stages", {})
        iters = " + ".join(str(stages[s]["iterations"]) for s in stages) if stages else str(r.get("iterations", 0))
        spi = " / ".join(f"{stages[s]['s_per_it']:.3f}" for s in stages if stages[s].get("s_per_it")) if stages \
            else (f"{r['s_per_it']:.3f}" if r.get("s_per_it") else "-")
        best = r.get("best_val")
        cells = [name, iters, f"{r.get('wall_s', 0):.0f}", spi,
                 f"{best['mean_dice']:.4f} ({best['iteration']})" if best else "-"]
        if test:
            cells += [f"{test['mean'][k]:.4f}" for k in ("dice", "jaccard", "hd95", "asd")]
        else:
            cells += [r.get("status", "no test result"), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    per = ["| class | " + " | ".join(f"{n} {m}" for n in runs for m in ("Dice", "Jaccard", "HD95", "ASD")) + " |",
           "|---|" + "---|" * (4 * len(runs))]
    for cls in CLASS_ORDER:
        row = [cls]
        for r in runs.values():
            stats = r.get("test", {}).get("per_class", {}).get(cls)
            row += [_cell(stats, k, 4 if k in ("dice", "jaccard") else 2) for k in ("dice", "jaccard", "hd95", "asd")] \
                if stats else ["-"] * 4
        per.append("| " + " | ".join(row) + " |")
    row = ["mean"]
    for r in runs.values():
        m = r.get("test", {}).get("mean")
        row += [f"{m[k]:.4f}" for k in ("dice", "jaccard", "hd95", "asd")] if m else ["-"] * 4
    per.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), "\n".join(per)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, check=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git on this machine: fill in the commit the call was made from)"


# -- main -----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, a tiny data copy (CI)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole script (default 300; the "
                    "device call's timeout_s should be about a minute more)")
    ap.add_argument("--data", default=os.path.join(REPO, "gpu_data", "acdc"), help="the compact ACDC copy")
    ap.add_argument("--source", default=gpu_data.DEFAULT_SOURCE, help="dry run: the ACDC folder to copy from")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "bench_results", "gpu_train"))
    ap.add_argument("--runs", default=None, help="scratch folder for the run folders (default: a temporary one)")
    ap.add_argument("--backend", default=None, help="ACTION_KERNELS_BACKEND of the runs (default: triton on the "
                    "GPU, the automatic choice in the dry run); chunked is the fallback when a stage fails")
    ap.add_argument("--validations", type=int, default=None)
    ap.add_argument("--probe-limit", type=float, default=None, help="seconds for the first probe on a fused "
                    "backend before falling back to chunked (default: 35%% of the budget)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run the probe of this spec file
    args = ap.parse_args(argv)
    if args.probe:
        with open(args.probe) as fh:
            spec = json.load(fh)
        write_json(spec["result"], probe(spec))
        return 0

    s = Settings(**DRY) if args.dry_run else Settings()
    for name, value in (("budget_s", args.budget), ("backend", args.backend), ("validations", args.validations)):
        if value is not None:
            setattr(s, name, value)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_train.log"), start)
    runs_dir = args.runs or tempfile.mkdtemp(prefix="gpu_train_runs_")
    os.makedirs(runs_dir, exist_ok=True)
    deadline = start + s.budget_s
    state: dict = {"settings": dataclasses.asdict(s), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "out": args.out, "runs_dir": runs_dir}
    plan_path = os.path.join(args.out, "plan.json")
    log(f"== GPU training check{' (dry run)' if s.dry_run else ''}: budget {s.budget_s:.0f} s, commit "
        f"{state['commit']}, results in {args.out}")

    # 1. data
    extra_path = []
    if s.dry_run:
        data = os.path.join(runs_dir, "acdc-tiny")
        gpu_data.prepare(args.source, data, **DRY_DATA, log=log)
        # the lent machine has no nibabel: the training and evaluation path must not import it
        block = os.path.join(runs_dir, "no_nibabel")
        os.makedirs(os.path.join(block, "nibabel"), exist_ok=True)
        with open(os.path.join(block, "nibabel", "__init__.py"), "w") as fh:
            fh.write("raise ImportError('nibabel is not installed on the lent GPU machine (gpu_train --dry-run)')\n")
        extra_path.append(block)
        state["nibabel_blocked"] = True
        carry = [os.path.relpath(data, REPO)] if not os.path.relpath(data, REPO).startswith(os.pardir) else []
        size = gpu_data.carried_size(REPO, carry)
        size["note"] = "dry run: the tiny copy lives outside the repository" if not carry else ""
    else:
        data = args.data
        gpu_data.load_manifest(data)  # a missing or unfinished copy fails here, saying how to prepare it
        rel = os.path.relpath(os.path.abspath(data), REPO)
        if rel.startswith(os.pardir):
            raise SystemExit(f"--data {data} is outside the checkout {REPO}: a device call would not carry it")
        size = gpu_data.carried_size(REPO, [rel.split(os.sep)[0]])
    manifest = gpu_data.load_manifest(data)
    state["data"] = {"path": data, "manifest": manifest}
    state["carried"] = size
    log(f"data: {manifest['counts']} of {manifest['source_counts']} (left out: {manifest['left_out']}), images "
        f"{manifest['encoding']['image']['dtype']} (max error {manifest['image_max_abs_error']:.1e})")
    log(gpu_data.describe_size(size) + (f"; {size['note']}" if size.get("note") else ""))
    if not s.dry_run and manifest["counts"]["test"] != manifest["source_counts"]["test"]:
        raise SystemExit(f"--data {data}: holds {manifest['counts']['test']} test volumes, the evaluation needs all "
                         f"{manifest['source_counts']['test']}; prepare it again without --test")
    if size["exact"] and not size["under_limit"]:
        log("the working tree and the data exceed what a device call carries: prepare a smaller copy "
            "(python tools/gpu/gpu_data.py prepare --target-mib 56)")
        write_json(plan_path, state)
        return 1
    write_json(plan_path, state)

    # 2. probe
    backend = s.backend

    def run_probe(backend_name):
        spec = {"device": s.device, "amp": s.amp, "warm_steps": s.warm_steps, "probe_steps": s.probe_steps,
                "test_probe_volumes": s.test_probe_volumes,
                "supervised": supervised_argv(s, data, os.path.join(runs_dir, "probe"), 1000),
                "action": action_argv(s, data, os.path.join(runs_dir, "probe"),
                                      dict.fromkeys(PIPELINE, 1000)),
                "result": os.path.join(runs_dir, f"probe-{backend_name}.json")}
        spec_path = os.path.join(runs_dir, f"probe-{backend_name}-spec.json")
        write_json(spec_path, spec)
        # a fused backend gets a share of the budget: a kernel that compiles for minutes (a wide tl.topk can) must
        # leave time for the chunked fallback; the chunked probe, the last resort, gets what is left
        limit = deadline - time.perf_counter()
        if backend_name != "chunked":
            limit = min(limit, (args.probe_limit or s.probe_limit_fraction * s.budget_s))
        res = Child([os.path.abspath(__file__), "--probe", spec_path],
                    os.path.join(runs_dir, f"probe-{backend_name}.log"),
                    child_env(s, extra_path, backend_name)).wait(limit)
        with open(os.path.join(runs_dir, f"probe-{backend_name}.log")) as fh:
            tail = fh.read()[-3000:]
        if not os.path.isfile(spec["result"]) or (res["rc"] != 0 and not res["timed_out"]):
            raise SystemExit(f"probe failed (rc {res['rc']}, timed out {res['timed_out']}):\n{tail}")
        with open(spec["result"]) as fh:
            out = json.load(fh)
        out["process_wall_s"] = res["wall_s"]
        if res["timed_out"]:  # the first stage without a result is the one that ran out of time
            for kind in KINDS:
                if kind not in out["kinds"]:
                    out["kinds"][kind] = {"error": f"probe timed out after {res['wall_s']:.0f} s (limit "
                                          f"{limit:.0f} s) in or before this stage", "traceback": tail}
        return out

    log(f"== probe (backend {backend})")
    pr = run_probe(backend)
    failed = {k: v["error"] for k, v in pr["kinds"].items() if "error" in v}
    if failed.get("supervised"):
        log(pr["kinds"]["supervised"]["traceback"])
        raise SystemExit(f"probe: the supervised step failed ({failed['supervised']}): not a kernel backend issue")
    if failed:
        state["backend_failure"] = {"backend": backend, "errors": failed,
                                    "tracebacks": {k: pr["kinds"][k]["traceback"] for k in failed}}
        log(f"probe: stages {sorted(failed)} failed on backend {backend}: {failed}; probing again on chunked")
        write_json(plan_path, {**state, "probe_failed": pr})
        backend = "chunked"
        pr = run_probe(backend)
        again = {k: v["error"] for k, v in pr["kinds"].items() if "error" in v}
        if again:
            write_json(plan_path, {**state, "probe": pr})
            raise SystemExit(f"probe: stages failed on the chunked backend as well: {again}")
    state["backend"] = backend
    state["probe"] = pr
    log(f"probe: {pr['device_name']}, torch {pr['torch']}, kernels {pr['kernel_backend']}, import "
        f"{pr['import_s']:.1f} s, data load {pr['load_s']:.1f} s, validation {pr['val_s']:.2f} s, BN re-estimation "
        f"{pr['bn_s']:.2f} s, test {pr['test_volume_s']:.2f} s/volume; probe process {pr['process_wall_s']:.1f} s")
    for kind in KINDS:
        k = pr["kinds"][kind]
        log(f"  {kind:16s} step {k['step_s'] * 1e3:8.1f} ms (first {k['first_s']:.2f} s, build {k['build_s']:.2f} s"
            + (f", peak {k['max_memory_gib']:.2f} GiB" if "max_memory_gib" in k else "") + ")")

    # 3. plan
    left = deadline - time.perf_counter()
    try:
        plan = plan_runs(s, pr, left)
    except ValueError as exc:
        state["plan_error"] = str(exc)
        write_json(plan_path, state)
        log(str(exc))
        return 1
    state["plan"] = plan
    write_json(plan_path, state)
    log(f"plan: {plan['train_s_per_method']:.0f} s of training per method: supervised "
        f"{plan['supervised_iterations']} iterations, ACTION {plan['stage_iterations']} (predicted "
        f"{plan['predicted_s']['supervised']:.0f} + {plan['predicted_s']['action']:.0f} s of {left:.0f} s left)"
        + (" [capped: dry run]" if plan["capped"] else ""))

    # 4. runs
    env = child_env(s, extra_path, backend)
    results: dict = {}
    sup_dir = os.path.join(runs_dir, "supervised")
    sup_argv = supervised_argv(s, data, sup_dir, plan["supervised_iterations"])
    log("== supervised: action " + " ".join(sup_argv))
    # the supervised run must leave ACTION its predicted time (plus the table's few seconds)
    res = Child(["-m", "action.cli", *sup_argv], os.path.join(runs_dir, "supervised.log"), env).wait(
        deadline - time.perf_counter() - plan["predicted_s"]["action"] - 5)
    sup = {**collect(sup_dir), "train": res, "argv": sup_argv, "wall_s": res["wall_s"]}
    sup["status"] = res["status"]
    results["supervised"] = sup
    write_json(os.path.join(args.out, "supervised.json"), sup)
    log(f"supervised: training {res['status']} in {res['wall_s']:.0f} s (predicted "
        f"{plan['predicted_s']['supervised']:.0f}); best val {sup.get('best_val')}")
    # its test, the CPU results' command, runs beside ACTION's training (mostly CPU work: the surface distances)
    sup_eval = None
    if os.path.isfile(os.path.join(sup_dir, "best.pt")):
        ev_argv = evaluate_argv(s, os.path.join(sup_dir, "best.pt"), os.path.join(sup_dir, "test"))
        log("   supervised test, beside ACTION: action " + " ".join(ev_argv))
        sup_eval = Child(["-m", "action.cli", *ev_argv], os.path.join(runs_dir, "supervised-test.log"), env)
        sup["evaluate_argv"] = ev_argv

    left = deadline - time.perf_counter() - 5
    stage_iters = dict(plan["stage_iterations"])
    if left < plan["predicted_s"]["action"]:  # the supervised run overran: shrink ACTION's training, and say so
        scale = max(0.0, (left - plan["fixed_s"]["action"]) /
                    (plan["predicted_s"]["action"] - plan["fixed_s"]["action"]))
        stage_iters = {st: max(1, int(n * scale)) for st, n in stage_iters.items()}
        state["action_shortened"] = {"planned": plan["stage_iterations"], "run": stage_iters, "left_s": left}
        log(f"ACTION shortened to {stage_iters}: {left:.0f} s left, {plan['predicted_s']['action']:.0f} planned")
    act_dir = os.path.join(runs_dir, "action")
    act_argv = action_argv(s, data, act_dir, stage_iters)
    log("== ACTION: action " + " ".join(act_argv))
    res = Child(["-m", "action.cli", *act_argv], os.path.join(runs_dir, "action.log"), env).wait(
        deadline - time.perf_counter() - 3)
    stages = {st: collect(os.path.join(act_dir, st)) for st in stage_iters}
    act = {**stages["finetune"], "train": res, "argv": act_argv, "stages": stages, "wall_s": res["wall_s"],
           "status": res["status"] if res["status"] != "ok" or "test" in stages["finetune"] else "no test"}
    results["ACTION"] = act
    write_json(os.path.join(args.out, "action.json"), act)
    log(f"ACTION: {act['status']} in {res['wall_s']:.0f} s (predicted {plan['predicted_s']['action']:.0f}), test "
        f"Dice {act['test']['mean']['dice']:.4f}" if "test" in act else f"ACTION: {act['status']}")

    if sup_eval is not None:
        ev = sup_eval.wait(deadline - time.perf_counter() - 2)
        sup["evaluate"] = ev
        sup.update({k: v for k, v in collect(sup_dir).items() if k == "test"})
        if ev["status"] != "ok" or "test" not in sup:
            sup["status"] = f"test {ev['status']}"
        write_json(os.path.join(args.out, "supervised.json"), sup)
        log(f"supervised: test {ev['status']} in {ev['wall_s']:.0f} s"
            + (f", test Dice {sup['test']['mean']['dice']:.4f}" if "test" in sup else ""))
    elif sup["status"] == "ok":
        sup["status"] = "no best.pt"

    if s.dry_run and "test" in act:  # ACTION's in-training test is the CPU results' `action evaluate` protocol
        ev_dir = os.path.join(runs_dir, "action-evaluate")
        ev_argv = evaluate_argv(s, os.path.join(act_dir, "finetune", "best.pt"), ev_dir, overlays=0)
        ev = Child(["-m", "action.cli", *ev_argv], os.path.join(runs_dir, "action-evaluate.log"), env).wait(
            deadline - time.perf_counter())
        with contextlib.suppress(FileNotFoundError):
            with open(os.path.join(ev_dir, "summary.json")) as fh:
                dice = json.load(fh)["mean"]["dice"]
            state["evaluate_crosscheck"] = {"argv": ev_argv, "status": ev["status"], "dice": dice,
                                            "in_training_dice": act["test"]["mean"]["dice"],
                                            "equal": dice == act["test"]["mean"]["dice"]}
            log(f"cross-check: action evaluate of ACTION's best.pt gives test Dice {dice:.6f}, its in-training "
                f"test {act['test']['mean']['dice']:.6f}")

    # 5. table
    pack(os.path.join(args.out, "runs.tar.gz"), runs_dir)
    state["total_s"] = time.perf_counter() - start
    write_json(plan_path, state)
    m = manifest["counts"]
    fallback = (f" (after {state['backend_failure']['backend']} failed: {state['backend_failure']['errors']})"
                if "backend_failure" in state else "")
    header = (f"GPU training check{' (DRY RUN: CPU, tiny sizes, not a result)' if s.dry_run else ''}, "
              f"{state['date']}, commit {state['commit']}, {pr['device_name']}, torch {pr['torch']}, kernels "
              f"{pr['kernel_backend']}{fallback}. "
              f"ACDC, {m['labelled']} labelled slices (3 patients), {m['unlabelled']} of "
              f"{manifest['source_counts']['unlabelled']} unlabelled slices (compact copy, float16 images), "
              f"{s.size}x{s.size}, amp {s.amp}; best.pt selected on {m['val']} val volumes and tested on {m['test']} "
              f"test volumes, both with BatchNorm re-estimated on {s.bn_batches} seeded batches of 16 clean "
              f"unlabelled slices; {s.budget_s:.0f} s budget, script {state['total_s']:.0f} s.")
    summary, per_class = tables(header, results)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(summary + "\n\n" + per_class + "\n")
    log("== results")
    log(summary)
    log("")
    log(per_class)
    return 0 if sup["status"] == act["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

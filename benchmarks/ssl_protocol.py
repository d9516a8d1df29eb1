"""The semi-supervised protocol: does ACTION's stage iii (and the whole pipeline) beat supervised training on the same
budget? One command, seeded, resumable, two single-thread training processes at a time.

    python benchmarks/ssl_protocol.py                       # 3 seeds, about two hours on 2 CPU cores
    python benchmarks/ssl_protocol.py --dry-run             # every job on tiny sizes (CI: about a minute)

Per seed s (ACDC, 3 labelled patients, 64x64, labelled batch 8, unlabelled batch 4, SGD 0.01 poly):
  warmup          supervised from scratch, --warmup iterations (the checkpoint every continuation starts from)
  sup             supervised continuation: --iterations more from warmup
  iii-today       stage iii from warmup with the flags of the finetune-cpu preset before the recipe (pixel mask at
                  0.97, ramp-up 100, CE only, weak unlabelled view, cutmix p 0.5 with random partners)
  iii-recipe      stage iii from warmup with the recipe (RECIPE: now the defaults)
  iii-plusplus    ACTION++'s stage iii (the recipe + SAACL + the temperature scheduler) from warmup
  pipeline        stages i, ii, iii from scratch (--pipeline iterations; distillation weights DISTILL, iii with
                  the recipe)
  scratch         supervised from scratch for the pipeline's total iterations
and, for the first seed only, stage ii twice from the pipeline's stage i (teacher_bn running vs batch), validated on
the 20 validation volumes: the EMA teacher's validation Dice before and after its BatchNorm fix.
Every arm's final model (no validation-based selection) is tested on the 40 test volumes with BatchNorm statistics
re-estimated on 50 seeded batches of clean unlabelled slices (the same batches for every arm of a seed: the README's
protocol); the supervised arms also with the labelled slices only. Gains are paired by seed: arm - sup (or
pipeline - scratch) in Dice points, with the per-volume win count.

Output (--out, default runs/ssl-protocol): <seed>/<job>/ (each run and its test folders), logs/<job>.log,
results.json and results.md, rewritten as each job ends. A job whose result exists is not rerun, so a stopped
protocol continues where it stopped (training resumes from its last.pt).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.environ.get("ACTION_ACDC", os.path.join(HERE, "..", "..", "shared", "data", "acdc"))

# stage iii as the finetune-cpu preset ran it before the recipe (every option written out: defaults move)
TODAY = {"unsup_loss": "ce", "unsup_mask": "pixel", "pseudo_threshold": 0.97, "unsup_rampup": 100,
         "unlabelled_view": "weak", "cutmix_p": 0.5, "cutmix_pairing": "random", "cutmix_area": [0.1, 0.5]}
# the recipe this protocol chose (action.config defaults since; written out so the protocol stays what it was)
RECIPE = {"unsup_loss": "ce+dice", "unsup_mask": "image", "pseudo_threshold": 0.95, "unsup_rampup": 0,
          "unlabelled_view": "strong", "cutmix_p": 1.0, "cutmix_pairing": "derangement", "cutmix_area": [0.1, 0.5]}
PLUSPLUS = {"plusplus": True, "ats": True}
# stages i-ii's distillation weights in the pipeline arm: the reference's 1.0 lost to scratch on every seed at this
# budget (-5.5 +- 2.0 points); 0.1 is what the CPU presets use since (benchmarks/RESULTS.md, the protocol section)
DISTILL = {"global_weight": 0.1, "local_weight": 0.1}
CLASSES = ("RV", "Myo", "LV")


@dataclass
class Job:
    name: str                 # "<seed>/<job>"
    argv: list                # the command
    after: list = field(default_factory=list)   # jobs that must have finished
    done_file: str = ""       # exists when the job finished
    weight: float = 1.0       # rough cost, for ordering (longest first)


def flags(options: dict) -> list[str]:
    """{"unsup_loss": "ce", ...} -> ["--unsup-loss", "ce", ...] (lists and dicts as JSON, booleans as true/false)."""
    out = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


class Protocol:
    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.out)
        self.python = sys.executable
        dry = args.dry_run
        self.size = 32 if dry else args.size
        self.common = {"data": os.path.abspath(args.data), "size": self.size, "labelled_patients": 3,
                       "threads": 1, "val_every": 0, "test_at_end": False, "tensorboard": False,
                       "checkpoint_every": 2 if dry else 100, "log_every": 1 if dry else 10, "labelled_batch": 8,
                       **({"max_train_slices": 8, "labelled_batch": 2, "val_volumes": 2} if dry else {})}
        self.unlabelled = 2 if dry else 4
        self.warmup, self.iterations = (2, 2) if dry else (args.warmup, args.iterations)
        self.stages = [1, 1, 2] if dry else [int(v) for v in args.pipeline.split(",")]
        self.bn_batches = 2 if dry else 50
        self.test_volumes = 2 if dry else None
        self.recipe = {**RECIPE, **args.recipe}

    # -- commands --------------------------------------------------------------------------------------------------
    def train(self, seed: int, job: str, options: dict, after=(), weight=1.0) -> Job:
        out = os.path.join(self.out, str(seed), job)
        argv = [self.python, "-m", "action.cli", "train", *flags({**self.common, **options, "seed": seed,
                                                                   "out": out}), "--resume", "auto"]
        return Job(f"{seed}/{job}", argv, list(after), os.path.join(out, "best.pt"), weight)

    def evaluate(self, seed: int, job: str, source: str, checkpoint: str, after, tag: str) -> Job:
        out = os.path.join(self.out, str(seed), job, f"test-{tag}")
        argv = [self.python, "-m", "action.cli", "evaluate", "--checkpoint", checkpoint, "--out", out,
                "--bn-recalibrate", str(self.bn_batches), "--bn-source", source, "--overlays", "0"]
        if self.test_volumes:
            argv += ["--max-volumes", str(self.test_volumes)]
        return Job(f"{seed}/{job}/test-{tag}", argv, list(after), os.path.join(out, "summary.json"), 0.3)

    def jobs(self) -> list[Job]:
        out: list[Job] = []
        T, u = self.iterations, self.unlabelled
        g, loc, fin = self.stages
        for k, seed in enumerate(self.args.seeds):
            warm = self.train(seed, "warmup", {"stage": "supervised", "iterations": self.warmup}, weight=2)
            init = os.path.join(self.out, str(seed), "warmup", "best.pt")
            semi = {"stage": "finetune", "iterations": T, "unlabelled_batch": u, "init": init}
            arms = {
                "sup": self.train(seed, "sup", {"stage": "supervised", "iterations": T, "init": init},
                                  [warm.name], 1),
                "iii-today": self.train(seed, "iii-today", {**semi, **TODAY}, [warm.name], 3),
                "iii-recipe": self.train(seed, "iii-recipe", {**semi, **self.recipe}, [warm.name], 3),
                "iii-plusplus": self.train(seed, "iii-plusplus", {**semi, **self.recipe, **PLUSPLUS}, [warm.name],
                                           4),
                "pipeline": self.train(seed, "pipeline", {
                    "stage": "pipeline", "unlabelled_batch": u, **DISTILL, **self.recipe,
                    "stage_iterations": {"pretrain-global": g, "pretrain-local": loc, "finetune": fin}}, weight=8),
                "scratch": self.train(seed, "scratch", {"stage": "supervised", "iterations": g + loc + fin},
                                      weight=3),
            }
            out.append(warm)
            for name, job in arms.items():
                if name not in self.args.arms:
                    continue
                out.append(job)
                best = job.done_file if name != "pipeline" else os.path.join(os.path.dirname(job.done_file),
                                                                               "finetune", "best.pt")
                if name == "pipeline":
                    job.done_file = best
                out.append(self.evaluate(seed, name, "unlabelled", best, [job.name], "unlabelled"))
                if name in ("sup", "scratch"):
                    out.append(self.evaluate(seed, name, "run", best, [job.name], "labelled"))
            out.append(self.evaluate(seed, "warmup", "unlabelled", init, [warm.name], "unlabelled"))
            if k == 0 and "pipeline" in self.args.arms and not self.args.no_teacher_check:
                stage_i = os.path.join(self.out, str(seed), "pipeline", "pretrain-global", "best.pt")
                for bn in ("running", "batch"):
                    out.append(self.train(seed, f"teacher-{bn}", {
                        "stage": "pretrain-local", "iterations": loc, "unlabelled_batch": u, "init": stage_i,
                        "teacher_bn": bn, "val_every": max(1, loc // 3)}, [f"{seed}/pipeline"], 4))
        return out

    # -- running ---------------------------------------------------------------------------------------------------
    def run(self) -> int:
        jobs = self.jobs()
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        timing_path = os.path.join(self.out, "timing.json")
        timing = json.load(open(timing_path)) if os.path.isfile(timing_path) else {}
        done = {j.name for j in jobs if os.path.isfile(j.done_file)}
        failed: set[str] = set()
        running: dict[str, tuple] = {}
        start = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if done:
            print(f"resuming: {len(done)} of {len(jobs)} jobs already done", flush=True)
        self.report(timing)
        while True:
            for name, (proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                job = next(j for j in jobs if j.name == name)
                ok = proc.returncode == 0 and os.path.isfile(job.done_file)
                (done if ok else failed).add(name)
                timing[name] = round(time.time() - t0, 1)
                json.dump(timing, open(timing_path, "w"), indent=1)
                print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {name} in {timing[name]:.0f} s"
                      + ("" if ok else f" (rc {proc.returncode}; see logs/{name.replace('/', '_')}.log)"),
                      flush=True)
                self.report(timing)
            blocked = blocked_names(jobs, failed)
            ready = [j for j in jobs if j.name not in done | failed | set(running) | blocked
                     and all(a in done for a in j.after)]
            ready.sort(key=lambda j: -j.weight)
            while ready and len(running) < self.args.workers:
                job = ready.pop(0)
                log = open(os.path.join(self.out, "logs", job.name.replace("/", "_") + ".log"), "w")
                log.write("$ " + shlex.join(job.argv) + "\n")
                log.flush()
                running[job.name] = (subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env),
                                     time.time(), log)
                print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)
            if not running:
                break
            time.sleep(0.5 if self.args.dry_run else 5)
        timing["total"] = round(time.time() - start, 1)
        json.dump(timing, open(timing_path, "w"), indent=1)
        self.report(timing)
        left = [j.name for j in jobs if j.name not in done]
        print(f"protocol: {len(done)} of {len(jobs)} jobs done in {timing['total']:.0f} s this call; "
              f"results in {os.path.join(self.out, 'results.md')}" + (f"; not done: {left}" if left else ""),
              flush=True)
        return 1 if left else 0

    # -- results ---------------------------------------------------------------------------------------------------
    def scores(self, seed: int, job: str, tag: str):
        """{case: mean Dice over RV/Myo/LV} of one test folder, or None when it has not run."""
        path = os.path.join(self.out, str(seed), job, f"test-{tag}", "metrics.csv")
        if not os.path.isfile(path):
            return None
        with open(path, newline="") as fh:
            return {row["case"]: sum(float(row[f"{c}/dice"]) for c in CLASSES) / len(CLASSES)
                    for row in csv.DictReader(fh)}

    def report(self, timing: dict) -> None:
        seeds = self.args.seeds
        rows, results = [], {"seeds": seeds, "size": self.size, "warmup": self.warmup, "recipe": self.recipe,
                             "iterations": self.iterations, "pipeline": self.stages, "arms": {}, "timing": timing}
        for job, tag, base in (("warmup", "unlabelled", None), ("sup", "unlabelled", None),
                               ("iii-today", "unlabelled", "sup"), ("iii-recipe", "unlabelled", "sup"),
                               ("iii-plusplus", "unlabelled", "sup"), ("scratch", "unlabelled", None),
                               ("pipeline", "unlabelled", "scratch"), ("sup", "labelled", None),
                               ("scratch", "labelled", None)):
            per_seed = {}
            for seed in seeds:
                mine = self.scores(seed, job, tag)
                if mine is None:
                    continue
                entry = {"dice": statistics.fmean(mine.values())}
                ref = self.scores(seed, base, "unlabelled") if base else None
                if ref is not None:
                    common = sorted(set(mine) & set(ref))
                    entry["gain"] = 100 * (entry["dice"] - statistics.fmean(ref.values()))
                    entry["wins"] = sum(mine[c] > ref[c] for c in common)
                    entry["volumes"] = len(common)
                per_seed[seed] = entry
            results["arms"][f"{job}/{tag}"] = per_seed
            if not per_seed:
                continue
            cells = []
            for seed in seeds:
                e = per_seed.get(seed)
                cells.append("" if e is None else f"{e['dice']:.3f}" + (
                    f" ({e['gain']:+.1f}, {e['wins']}/{e['volumes']})" if "gain" in e else ""))
            gains = [e["gain"] for e in per_seed.values() if "gain" in e]
            summary = (f"{statistics.fmean(gains):+.1f} ± {statistics.stdev(gains):.1f}" if len(gains) > 1
                       else (f"{gains[0]:+.1f}" if gains else ""))
            dices = [e["dice"] for e in per_seed.values()]
            mean = f"{statistics.fmean(dices):.3f}" + (f" ± {statistics.stdev(dices):.3f}" if len(dices) > 1 else "")
            label = f"{job}" + (" (BN on labelled slices)" if tag == "labelled" else "")
            rows.append(f"| {label} | " + " | ".join(cells) + f" | {mean} | {summary} |")
        teacher = self.teacher_table()
        results["teacher_check"] = teacher
        distill = {**DISTILL, **{k: v for k, v in self.recipe.items() if k in DISTILL}}
        lines = [f"# Semi-supervised protocol ({'dry run, ' if self.args.dry_run else ''}{self.size}x{self.size}, "
                 f"3 labelled patients, warm-up {self.warmup}, arms +{self.iterations}, pipeline "
                 f"{'+'.join(map(str, self.stages))})", "",
                 f"Recipe: `{json.dumps(self.recipe)}`; pipeline stages i-ii: `{json.dumps(distill)}`", "",
                 "Test mean Dice (RV, Myo, LV) on the test volumes, BatchNorm re-estimated on clean unlabelled "
                 "slices; in brackets the gain in Dice points over sup (pipeline: over scratch) and the volumes "
                 "it wins.", "",
                 "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | gain mean ± std |",
                 "|---|" + "---|" * (len(seeds) + 2), *rows, ""]
        if teacher:
            lines += ["Stage ii's EMA teacher and student, validation mean Dice (as trained, no re-estimation), "
                      f"seed {seeds[0]}:", "", "| teacher_bn | iteration | student | teacher |", "|---|---|---|---|"]
            lines += [f"| {r['teacher_bn']} | {r['iteration']} | {r['student']:.3f} | {r['teacher']:.3f} |"
                      for r in teacher] + [""]
        lines += ["Wall time per job (s): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(timing.items())), ""]
        with open(os.path.join(self.out, "results.md"), "w") as fh:
            fh.write("\n".join(lines))
        with open(os.path.join(self.out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)

    def teacher_table(self) -> list[dict]:
        rows = []
        for bn in ("running", "batch"):
            path = os.path.join(self.out, str(self.args.seeds[0]), f"teacher-{bn}", "val.csv")
            if not os.path.isfile(path):
                continue
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    rows.append({"teacher_bn": bn, "iteration": int(row["iteration"]),
                                 "student": float(row["student_mean_dice"]),
                                 "teacher": float(row["teacher_mean_dice"])})
        return rows


def blocked_names(jobs: list[Job], failed: set[str]) -> set[str]:
    """Every job that depends, directly or not, on a failed one."""
    blocked, changed = set(failed), True
    while changed:
        changed = False
        for j in jobs:
            if j.name not in blocked and any(a in blocked for a in j.after):
                blocked.add(j.name)
                changed = True
    return blocked - failed


ARMS = ("sup", "iii-today", "iii-recipe", "iii-plusplus", "pipeline", "scratch")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="ACDC HDF5 folder (default $ACTION_ACDC, else "
                                                        "../shared/data/acdc beside the checkout)")
    p.add_argument("--out", default="runs/ssl-protocol", help="protocol folder (default runs/ssl-protocol)")
    p.add_argument("--seeds", default="1337,2,3", help="comma-separated seeds (default 1337,2,3)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    p.add_argument("--size", type=int, default=64, help="training size (default 64)")
    p.add_argument("--warmup", type=int, default=1000, help="supervised warm-up iterations (default 1000)")
    p.add_argument("--iterations", type=int, default=300, help="iterations of every arm after the warm-up "
                                                               "(default 300)")
    p.add_argument("--pipeline", default="100,900,300", help="stages i,ii,iii iterations of the pipeline arm "
                                                             "(default 100,900,300: the warm-up + arm total)")
    p.add_argument("--workers", type=int, default=2, help="training processes at a time, one thread each "
                                                          "(default 2)")
    p.add_argument("--recipe", type=json.loads, default={}, help="JSON object of options overriding the recipe "
                                                                 "(and the pipeline's DISTILL weights) in every "
                                                                 "semi-supervised arm (exploration; default: RECIPE)")
    p.add_argument("--no-teacher-check", action="store_true", help="skip the stage ii teacher BatchNorm check")
    p.add_argument("--dry-run", action="store_true", help="every job on tiny sizes (32x32, 2 iterations, 8 "
                                                          "slices, 2 test volumes): checks the protocol runs")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    if "pipeline" in args.arms and "scratch" not in args.arms:
        args.arms.append("scratch")
    if not os.path.isdir(os.path.join(args.data, "data")):
        p.error(f"--data {args.data}: not an ACDC HDF5 folder (no data/ inside); set ACTION_ACDC or pass --data")
    if args.dry_run and args.out == "runs/ssl-protocol":
        args.out = "runs/ssl-protocol-dry"
    stages = args.pipeline.split(",")
    if len(stages) != 3 or not all(s.strip().isdigit() and int(s) > 0 for s in stages):
        p.error(f"--pipeline: expected three positive iteration counts 'i,ii,iii', got {args.pipeline!r}")
    return Protocol(args).run()


if __name__ == "__main__":
    sys.exit(main())

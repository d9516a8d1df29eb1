"""The run-folder policy, decided before anything is written: a folder holding a run (RUN_FILES) is refused unless
the run resumes (--resume, or --resume auto when last.pt exists) or is overwritten (only that run's files are
deleted); temporary checkpoint files a killed write left behind are removed. A resumed run must have the options
its checkpoint was trained with (check_resumable), or be forced."""
from __future__ import annotations

import os
import shutil

from action.config import resume_differences
from action.engine import distributed as dist_utils
from action.engine.checkpoint import clean_stale_temporaries

# what a finished or interrupted run leaves in its folder: a folder holding any of these holds a run
RUN_FILES = ("config.json", "last.pt", "best.pt", "train.csv", "val.csv", "tensorboard", "test")


def run_files(folder: str) -> list[str]:
    """The RUN_FILES present in `folder` (none when it does not exist)."""
    return [n for n in RUN_FILES if os.path.lexists(os.path.join(folder, n))]


def prepare_run_folder(out: str, resume: bool | str = False, overwrite: bool = False, rank: int = 0) -> bool:
    """Decides whether the run in `out` resumes (returns True) or starts afresh, and removes stale temporary
    checkpoint files there. resume=True needs <out>/last.pt (else FileNotFoundError: nothing to resume);
    resume="auto" resumes when last.pt exists and starts afresh otherwise (one command line for a job that a
    scheduler may restart); a fresh start into a folder that holds a run (RUN_FILES) is refused unless
    overwrite=True, which deletes that run's files (only those). Only rank 0 deletes; every rank returns the same."""
    last = os.path.join(out, "last.pt")
    if rank == 0:
        for stale in clean_stale_temporaries(out):
            print(f"removed {stale}: a checkpoint write that was killed before it finished", flush=True)
    if resume == "auto":
        resume = os.path.isfile(last)
        # a run stopped before its first checkpoint holds nothing to resume: its logs are replaced
        overwrite = overwrite or not any(os.path.isfile(os.path.join(out, n)) for n in ("last.pt", "best.pt"))
    elif resume not in (True, False):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume:
        if not os.path.isfile(last):
            found = run_files(out)
            raise FileNotFoundError(f"--resume: nothing to resume: {last} does not exist ("
                                    + (f"{out} holds {found}" if found else f"{out} holds no run") +
                                    "); check --out, or start a new run without --resume")
        return True
    existing = run_files(out)
    if existing and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(existing)}); continue it with --resume, "
                         f"replace it with --overwrite, or choose another --out")
    if existing and rank == 0:
        for name in existing:
            target = os.path.join(out, name)
            # a symbolic link is removed, never followed (the folder it points to is not the run's)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
        print(f"--overwrite: removed {', '.join(existing)} from {out}", flush=True)
    dist_utils.barrier()
    return False


def check_resumable(state: dict, cfg, stage: str, shards: int, path: str, force: bool = False, rank: int = 0) -> None:
    """Whether checkpoint `state` (read from `path`) may be continued by this run (stage, config cfg, shards =
    world size x accumulate): the same stage, and the same options apart from those that change no computed value
    (RESUME_NEUTRAL in action.config: location, device, logging, bookkeeping; accumulate may change with the number
    of ranks as long as the shard count stays); otherwise a ValueError lists the differences (force=True: resume
    with them, printed by rank 0)."""
    if state.get("stage") != stage:
        raise ValueError(f"--resume: {path} is a {state.get('stage')!r} checkpoint, this run is {stage!r}")
    changed = resume_differences(state.get("config", "{}"), cfg)
    if state.get("shards", shards) != shards:  # the computation depends on the shard count, not how it splits
        changed["world size x accumulate"] = (state["shards"], shards)
    if not changed:
        return
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if not force:
        raise ValueError(f"--resume: this run's options differ from those {path} was trained with ({listed}); "
                         f"rerun with the same options, add --force to resume with the changes (the run is then no "
                         f"longer the one an uninterrupted run would have been), or start a new run in another --out")
    if rank == 0:
        print(f"--resume --force: continuing {path} with changed options: {listed}", flush=True)

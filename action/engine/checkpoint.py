"""Checkpoints that survive a kill and cannot run code when loaded.

save_checkpoint writes to a temporary file in the target folder, flushes and fsyncs it, then renames it over the
target (os.replace is atomic on POSIX): a kill at any moment leaves either the previous checkpoint or the new
one, never a truncated file. load_checkpoint uses torch.load(weights_only=True): only tensors, numbers, strings
and containers of them are accepted, so a checkpoint from an untrusted source cannot execute code. Everything the
trainer stores is of those types (the config is stored as a JSON string).

A write killed between its start and the rename leaves `.<name>.tmp-<pid>`; clean_stale_temporaries removes those
of processes that no longer run (the trainer calls it at start). check_same_model compares a checkpoint's model
entries with a model's before loading (a clear error instead of load_state_dict's traceback).

Reading weights back: teacher_weights (the EMA teacher a checkpoint holds), eval_weights (the network its run
validated) and align_keys (a checkpoint's names onto a model's: with or without the ACTION stages' "net." prefix).
"""
from __future__ import annotations

import errno
import os
import re

import torch

from action.data.limits import check_zip_archive
from action.data.staging import process_running

FORMAT = "action-checkpoint/1"
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def save_checkpoint(state: dict, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full or read-only disk: torch.save reports a short write as RuntimeError
        if isinstance(exc, OSError) and exc.filename:
            raise
        raise OSError(getattr(exc, "errno", None) or errno.EIO, f"writing the checkpoint failed "
                      f"({str(exc).splitlines()[0][:160]}): is the disk full or read-only?", path) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def clean_stale_temporaries(folder: str) -> list[str]:
    """Removes the temporary files (`.<name>.tmp-<pid>`) that save_checkpoint writes in `folder` and a killed
    process left behind: those whose process no longer runs. Returns the removed paths."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY.match(name)
        if match and int(match.group(1)) != os.getpid() and not process_running(int(match.group(1))):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
            except FileNotFoundError:  # removed meanwhile by another cleaner
                continue
            removed.append(path)
    return removed


def check_same_model(weights: dict, target: dict, path: str) -> None:
    """Raises ValueError naming what differs when a checkpoint's model entries (`weights`) cannot load into a
    model whose state_dict is `target` (entries missing, unexpected, or of another shape)."""
    missing = [k for k in target if k not in weights]
    unexpected = [k for k in weights if k not in target]
    shapes = [f"{k} {tuple(weights[k].shape)} (model: {tuple(target[k].shape)})" for k in target
              if k in weights and tuple(weights[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (first: {', '.join(v[:3])})" for what, v in
                 (("entries missing from the checkpoint", missing), ("entries the model does not have", unexpected),
                  ("entries of another shape", shapes)) if v]
        raise ValueError(f"{path} holds a different model than this run builds: {'; '.join(parts)}; resume with the "
                         f"options the checkpoint was trained with (its config.json), or start a new run")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    check_zip_archive(path)  # bounded: no entry may declare more than the file holds (action.data.limits)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or objects outside the safe set
        raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {type(exc).__name__}: "
                         f"{str(exc)[:300]}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an action checkpoint (format {FORMAT!r} expected, got "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state


def teacher_weights(state: dict) -> dict:
    """The EMA teacher a checkpoint of an ACTION stage holds, under the student's names (its keys "module.<name>"
    as "<name>": the network "net.*" and the heads the teacher keeps); {} when the checkpoint has no teacher."""
    teacher = state.get("extra", {}).get("teacher") or {}
    return {k[len("module."):]: v for k, v in teacher.items() if k.startswith("module.")}


def eval_weights(state: dict) -> dict:
    """The weights a checkpoint's run validates and tests: the student's (state["model"]); for a run with
    eval_teacher, the student's with every entry the EMA teacher tracks replaced by the teacher's (its keys
    "module.<name>" as "<name>": the network "net.*" and the heads the teacher keeps); and where best.pt kept the
    BatchNorm-re-estimated network its validation scored ("eval_model", bn_recalibrate), that network's."""
    import json

    weights = state["model"]
    if json.loads(state.get("config", "{}")).get("eval_teacher"):
        weights = {**weights, **teacher_weights(state)}
    if "eval_model" in state:
        prefix = "net." if any(k.startswith("net.") for k in weights) else ""
        weights = {**weights, **{prefix + k: v for k, v in state["eval_model"].items()}}
    return weights


def align_keys(weights: dict, target: dict) -> dict:
    """Maps a checkpoint's weights onto a model's names: a plain network's keys gain the "net." prefix of the
    ACTION stages' ModuleDict and lose it the other way. Keys the model does not have are dropped; a shape
    mismatch is an error."""
    if any(k.startswith("net.") for k in target) and not any(k.startswith("net.") for k in weights):
        weights = {"net." + k: v for k, v in weights.items()}
    elif not any(k.startswith("net.") for k in target) and any(k.startswith("net.") for k in weights):
        weights = {k[4:]: v for k, v in weights.items() if k.startswith("net.")}
    out = {k: v for k, v in weights.items() if k in target}
    bad = [k for k, v in out.items() if tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        raise ValueError(f"checkpoint tensors {bad[:3]} have shapes {[tuple(out[k].shape) for k in bad[:3]]}, the "
                         f"model expects {[tuple(target[k].shape) for k in bad[:3]]}")
    return out

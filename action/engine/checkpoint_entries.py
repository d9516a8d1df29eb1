"""What a checkpoint must hold to be used, checked before it is: missing or mistyped entries, a negative iteration
and config options this version does not know are one-line errors naming the file and the entries (instead of a
KeyError or TypeError traceback, or a run resumed at iteration -3).

    inference (evaluate, predict, --init)   model (names -> tensors), config (a JSON object of known options)
    --resume                                 also stage, iteration >= 0, optimizer, scheduler, scaler, extra (mappings),
                                             best (a number), best_iteration >= -1
"""
from __future__ import annotations

import json
import math
from dataclasses import fields

import torch

from action.config import TrainConfig, check_type
from action.config_file import bounded_repr


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# entry -> (what it must be, the check)
INFERENCE = {
    "model": ("a mapping of names to tensors",
              lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                    for k, t in v.items())),
    "config": ("a JSON object (text)", lambda v: isinstance(v, str)),
}
RESUME = {
    "stage": ("a stage name", lambda v: isinstance(v, str)),
    "iteration": ("an integer >= 0", lambda v: _whole(v, 0)),
    "optimizer": ("a mapping", lambda v: isinstance(v, dict)),
    "scheduler": ("a mapping", lambda v: isinstance(v, dict)),
    "scaler": ("a mapping", lambda v: isinstance(v, dict)),
    "extra": ("a mapping", lambda v: isinstance(v, dict)),
    "best": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)),
    "best_iteration": ("an integer >= -1", lambda v: _whole(v, -1)),
}


def check_entries(state: dict, path: str, resume: bool = False, option: str = "--checkpoint") -> None:
    """ValueError naming `option`, `path` and every missing or mistyped entry when `state` cannot be used for
    inference (or, with resume, to continue its run)."""
    wanted = {**INFERENCE, **(RESUME if resume else {})}
    missing = [k for k in wanted if k not in state]
    wrong = [f"{k} (expected {what}, got {bounded_repr(state[k]) if not isinstance(state[k], dict) else 'a mapping'})"
             for k, (what, ok) in wanted.items() if k in state and not ok(state[k])]
    if missing or wrong:
        parts = ([f"missing entries {missing}"] if missing else []) + ([f"wrong entries: {'; '.join(wrong)}"]
                                                                       if wrong else [])
        raise ValueError(f"{option} {path}: not a usable checkpoint of this package ({'; '.join(parts)}); use a "
                         f"checkpoint written by action train (last.pt or best.pt)")


def checkpoint_config(state: dict, path: str, option: str = "--checkpoint") -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (options it predates take their defaults), after check_entries:
    options this version does not know, values of the wrong type or out of range are a ValueError naming the file."""
    check_entries(state, path, option=option)
    try:
        values = json.loads(state["config"])
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"{option} {path}: its config entry is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{option} {path}: its config entry is not a JSON object")
    known = {f.name: str(f.type) for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{option} {path}: its config has options this version does not know "
                         f"({bounded_repr(unknown)}): written by another version of action; use that version")
    try:
        return TrainConfig(**{k: check_type(k, v, known[k]) for k, v in values.items()}).validate()
    except ValueError as exc:
        raise ValueError(f"{option} {path}: {exc}") from None

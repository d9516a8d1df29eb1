"""Reading a config file (JSON, or YAML for .yaml / .yml) safely, and showing config values in error messages with
bounded work.

A config file is a few lines of options; load_file refuses what could make reading it or reporting on it
unbounded, or silently wrong, each in one line naming the file (and the line where the parser knows it): a file
above MAX_BYTES; text that is not UTF-8 (a UTF-16 file, say); YAML aliases (`*name`: a 0.6 kB file of nested
aliases expands to billions of elements in any message that prints the value); duplicate keys (the later one
silently won); nesting deeper than MAX_DEPTH (Python's parsers recurse); numbers the parser cannot read (an
integer of more than 4300 digits). bounded_repr shows any value in at most about 200 characters, visiting a bounded
part of it.
"""
from __future__ import annotations

import json
import os
import reprlib

MAX_BYTES = 1 << 20
MAX_DEPTH = 32

_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict, _short.maxset = 3, 6, 6, 6, 6
_short.maxstring, _short.maxlong, _short.maxother = 80, 40, 80


def bounded_repr(value) -> str:
    """repr(value) cut to a bounded size (at most 6 items per container, 3 levels, 80 characters per string),
    computed by visiting only that much of the value; a number too long for repr is described instead."""
    try:
        text = _short.repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        return f"<{type(value).__name__} of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= 240 else text[:237] + "..."


def _depth(value, limit: int) -> int:
    """The nesting depth of lists and dicts in value, counting no further than limit + 1 (iterative)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            if level > limit:
                return level
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _yaml_loader():
    """A safe YAML loader (no object construction, as yaml.safe_load) that refuses aliases and duplicate keys with
    a ValueError naming the line and column."""
    import yaml

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    class ConfigLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ValueError(f"YAML alias *{bounded_repr(event.anchor)[1:-1]} at {at(event.start_mark)} refused: "
                                 f"config files take no aliases (write the value out)")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ValueError(f"duplicate key {bounded_repr(key)} at {at(key_node.start_mark)} (the later "
                                     f"value would silently win): give each option once")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return ConfigLoader


def _unique_pairs(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {bounded_repr(key)} (the later value would silently win): give each "
                             f"option once")
        seen.add(key)
    return dict(pairs)


def load_file(path: str) -> dict:
    """A JSON or YAML (.yaml, .yml) config file -> its mapping; every refusal (module docstring) and syntax error
    names the file, and the line where the parser knows it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise ValueError(f"config file {path}: {size} bytes; a config file of options is a few kB (at most "
                         f"{MAX_BYTES})")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start}; UTF-16?): save it "
                         f"as UTF-8") from None
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        data = _parse_yaml(text) if yaml_file else json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise ValueError(f"config file {path}: nested deeper than the parser can follow; config values nest at "
                         f"most {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {path}: JSON syntax error at line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg} (a .yaml / .yml name is read as YAML)") from None
    except ValueError as exc:  # YAML syntax, a refused alias or duplicate key, an integer beyond the digit limit
        message = str(exc)
        if "integer string conversion" in message:
            message = "a number of more than 4300 digits; no option takes that"
        raise ValueError(f"config file {path}: {message[:300]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values, got "
                         f"{type(data).__name__}")
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"config file {path}: values nested deeper than {MAX_DEPTH} levels; no option takes that")
    return data


def _parse_yaml(text: str):
    """YAML text -> its value (_yaml_loader); a YAML syntax error becomes a ValueError with its line and column."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"YAML syntax error{at}: {problem}") from None

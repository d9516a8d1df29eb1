"""Case names and the paths built from them: the one rule for what a case name may be, and the check that every
output path stays inside its output folder.

A case name comes from a list file (val.list, test.list, train_slices.list, `--cases`, `--names`) or a file name,
and becomes part of output paths (`predictions/<name>.nii.gz`, `overlays/<name>.png`, `imagesTs/<name>_0000.nii.gz`)
and input paths (`data/<name>.h5`). check_case_name refuses a name that could leave its folder or hide in it: empty,
`.` or `..`, a path separator (`/`, `\\`; an absolute path has one), a control character, or a leading `.`.
read_name_list applies it to every line of a list file, naming the file and the line. output_path joins parts under
an output folder and refuses a path that resolves (symbolic links followed) outside it.
"""
from __future__ import annotations

import os

_SEPARATORS = {"/", "\\", os.sep, *(filter(None, [os.altsep]))}


def case_name_problem(name: str) -> str | None:
    """Why `name` cannot be a case name (it would write or read outside its folder, or be hidden there), or None."""
    if not isinstance(name, str) or not name:
        return "an empty name"
    if name in (".", ".."):
        return f"{name!r} names a folder, not a case"
    if any(c in _SEPARATORS for c in name):
        return "it holds a path separator (a case name is a file name, never a path)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    if name.startswith("."):
        return "it starts with '.' (a hidden file)"
    return None


def check_case_name(name: str, where: str) -> str:
    """name -> name, or ValueError naming `where` it came from ("test.list line 3", "--cases") and why it is
    refused."""
    problem = case_name_problem(name)
    if problem is not None:
        raise ValueError(f"{where}: case name {name[:80]!r} refused: {problem}; list case names only (e.g. "
                         f"patient001_frame01)")
    return name


def read_name_list(path: str) -> list[str]:
    """The case names of a list file, one per line (blank lines skipped, surrounding whitespace stripped), each
    checked (check_case_name; the error names the file and the line). A file that is not UTF-8 text is an error
    naming it."""
    names = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a list file holds one case "
                         f"name per line") from exc
    for number, line in enumerate(lines, 1):
        if line.strip():
            names.append(check_case_name(line.strip(), f"{path} line {number}"))
    return names


def check_names(names: list[str], where: str) -> list[str]:
    """Every name of `names` checked (check_case_name), the error naming `where` they came from."""
    return [check_case_name(n, where) for n in names]


def inside(folder: str, path: str) -> bool:
    """Whether `path` resolves (symbolic links followed, for the parts that exist) to `folder` or below it."""
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def output_path(folder: str, *parts: str) -> str:
    """os.path.join(folder, *parts), refused (ValueError naming both) when it resolves outside `folder`: a part that
    is absolute or climbs with `..`, or a symbolic link in the way that points elsewhere."""
    path = os.path.join(folder, *parts)
    if any(os.path.isabs(p) or ".." in p.replace("\\", "/").split("/") for p in parts) or not inside(folder, path):
        raise ValueError(f"output {path} resolves to {os.path.realpath(path)}, outside the output folder {folder} "
                         f"({os.path.realpath(folder)}); nothing is written outside it: remove the symbolic link or "
                         f"rename the case")
    return path

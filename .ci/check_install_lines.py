"""CI: the README's install lines resolve on a fresh machine, against the public package index only.

Reads the `pip install` commands of the README's Quick start code blocks and asks pip's resolver (a dry run, with
this machine's local wheel folders and pip configuration switched off) whether they can be installed together:

every command of every line together in one resolution (a set that resolves as a whole resolves line by line
too), with dependencies: this is where a pin that contradicts torch's own requirements (the public torch 2.13.0
requires triton==3.7.1) fails.

Nothing is installed; pip downloads what it needs to read metadata (about 40 s here). Exit status 1 with pip's
error when a line does not resolve.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_WITHOUT_VALUE = {"-q", "--quiet", "-U", "--upgrade", "--no-build-isolation", "-v"}


def quick_start_commands(readme: str) -> list[list[str]]:
    """The argument lists of each `pip install` in the README's Quick start bash blocks (comments skipped)."""
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    if not blocks:
        raise SystemExit("README.md: no ```bash block in the Quick start section")
    commands = []
    for line in "\n".join(blocks).splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                commands.append([w for w in words[2:] if w not in FLAGS_WITHOUT_VALUE and w != "-e"])
    if not commands:
        raise SystemExit("README.md: the Quick start block has no `pip install` line")
    return commands


def dry_run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                                                            "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no local wheel folders, mirrors or constraint files: the public index only
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", *args]
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")]
        print("\n".join(errors[-40:]), file=sys.stderr)
        raise SystemExit(f"README install line does not resolve against the public index: {' '.join(args)}")


def main() -> None:
    with open(os.path.join(ROOT, "README.md")) as fh:
        commands = quick_start_commands(fh.read())
    if any(a.startswith(("--index-url", "--extra-index-url", "-i", "--find-links", "-f")) for c in commands for a in c):
        raise SystemExit("README.md: a Quick start line names its own index; this check covers the public index only")
    union = list(dict.fromkeys(a for args in commands for a in args))
    # extras of one project on several lines (".[bench]", ".[dev]") become one requirement with all the extras
    local = [a for a in union if a.startswith(".[")]
    if len(local) > 1:
        extras = sorted({e for a in local for e in a[2:-1].split(",")})
        union = [a for a in union if a not in local] + [f".[{','.join(extras)}]"]
    dry_run(union)
    print(f"install lines resolve against the public index: {len(commands)} pip install command(s)")


if __name__ == "__main__":
    main()

"""Every ```python block of README.md and docs/*.md runs as pasted: each in a fresh namespace, in an empty temporary
working directory, on the small data it creates itself.

Blocks that read the ACDC data name it through $ACTION_ACDC (as the `action` command does); they run with it set
to the data folder and skip with the reason when the data is absent. A block that genuinely cannot run on a CPU
(it needs CUDA) is skipped only when the doc says so in visible text on the line before its fence: a line holding
"not run by tests/test_docs.py" and the reason, e.g. `*Needs a CUDA GPU: not run by tests/test_docs.py.*`.
"""
import dataclasses
import os
import pathlib
import re

import pytest

from helpers import ACDC

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "not run by tests/test_docs.py"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclasses.dataclass(frozen=True)
class Block:
    where: str      # "docs/api.md:12": the file and the line of the opening fence
    code: str
    skip: str       # the doc's stated reason not to run it, or ""


def blocks_of(text: str, name: str) -> list[Block]:
    """The ```python blocks of one Markdown text, each with its fence's line and the skip reason stated before it."""
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append(Block(f"{name}:{line}", m.group(1), before.strip(" *_") if SKIP_MARK in before else ""))
    return out


def run_block(block: Block) -> dict:
    """Executes the block in a fresh namespace (the caller sets the working directory); returns the namespace."""
    namespace = {"__name__": "__docs__"}
    exec(compile(block.code, block.where, "exec"), namespace)
    return namespace


ALL = [b for path in DOCS for b in blocks_of(path.read_text(), str(path.relative_to(ROOT)))]


def test_the_docs_hold_python_blocks_and_each_one_is_collected():
    readme = [b for b in ALL if b.where.startswith("README.md:")]
    assert readme, "README.md has no ```python block"
    for path in DOCS:
        assert len([b for b in ALL if b.where.startswith(f"{path.relative_to(ROOT)}:")]) == \
            len(re.findall(r"^```python", path.read_text(), re.M)), f"{path}: a ```python fence the extractor missed"


def test_a_block_that_fails_fails_the_run_and_names_its_place():
    bad = blocks_of("text\n\n```python\nx = 1\nraise ValueError('from the doc')\n```\n", "docs/x.md")[0]
    with pytest.raises(ValueError, match="from the doc") as info:
        run_block(bad)
    assert "docs/x.md:3" in {t.tb_frame.f_code.co_filename for t in _walk(info.tb)}  # tracebacks name the doc


def test_no_block_reads_data_through_a_path_relative_to_one_folder():
    relative = [b.where for b in ALL if re.search(r"""["']\.\./""", b.code)]
    assert not relative, f"blocks with a '../' path (name the data through $ACTION_ACDC instead): {relative}"


def test_the_skip_marker_is_read_from_the_line_before_the_fence():
    text = ("*Needs a CUDA GPU: not run by tests/test_docs.py.*\n```python\nimport torch\n```\n\n"
            "Plain text.\n```python\nx = 1\n```\n")
    marked, plain = blocks_of(text, "d.md")
    assert marked.skip == "Needs a CUDA GPU: not run by tests/test_docs.py." and plain.skip == ""
    assert (marked.where, plain.where) == ("d.md:2", "d.md:7")


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.parametrize("block", ALL, ids=[b.where for b in ALL])
def test_doc_block_runs_as_pasted(block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    if "ACTION_ACDC" in block.code:
        if not os.path.isdir(os.path.join(ACDC, "data")):
            pytest.skip(f"{block.where} reads the ACDC data: not found at {ACDC} (CI provides ../shared/data/acdc)")
        monkeypatch.setenv("ACTION_ACDC", os.path.abspath(ACDC))
    monkeypatch.chdir(tmp_path)
    run_block(block)


def test_ci_runs_the_readme_full_suite_command_and_the_readme_names_the_fast_one():
    """README.md's Testing section names two commands, the fast default and the full suite; .ci/run runs the full
    suite's exactly, so the two cannot drift apart."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## Testing\n" in readme, "README.md needs a ## Testing section naming both test commands"
    testing = readme.split("\n## Testing\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"`([^`]*pytest[^`]*)`", testing)
    full = [c for c in commands if '-m "slow or not slow"' in c]
    fast = [c for c in commands if " -m " not in c]
    assert len(full) == 1 and fast, f"README.md's Testing section: one full-suite and a fast command, got {commands}"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert full[0] in ci, f".ci/run must run the README's full-suite command as a line of its own: {full[0]!r}"

"""Config files read with bounded work and no silent surprises (issue 27, finding 6 and the config cases of finding 8):
a YAML alias bomb is refused at its first alias, under a time and memory cap (on the code before the fix `action
train` hung past 3 GB building the range-check message: the test fails there at its time cap); duplicate keys,
UTF-16 text, deep nesting and 5,000-digit integers are one-line errors naming the file (before the fix: accepted
silently, or a traceback / a message naming no file); a value's repr in any message is bounded."""
import os
import resource
import subprocess
import sys

import pytest

from action.cli import main
from action.config import build_config
from action.config_file import bounded_repr


def alias_bomb(levels: int = 9) -> str:
    """A 0.6 kB YAML `stage_iterations` value of nested aliases: 9 levels of 9 copies, 9^9 = 387 million elements
    expanded (the range check of stage_iterations fails, and its message printed the expanded value)."""
    rows = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "size: 64\nstage_iterations: {finetune: [" + ", ".join(rows) + "]}\n"


def cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_at_its_first_alias_under_a_time_and_memory_cap(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 700
    try:
        done = subprocess.run([sys.executable, "-m", "action.cli", "train", "--config", str(bomb), "--out",
                               str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                              preexec_fn=cap_memory, env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail("action train did not finish reading a 0.6 kB config file in 120 s")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"action train: error: config file {bomb}: YAML alias *l0 at line 2, column 69 refused: "
                           f"config files take no aliases (write the value out)\n")


def test_duplicate_keys_utf16_deep_nesting_and_huge_integers_name_the_file(tmp_path, capsys):
    cases = {
        "dup.yaml": ("lr: 0.1\nsize: 64\nlr: 0.2\n", "duplicate key 'lr' at line 3, column 1"),
        "dup.json": ('{"lr": 0.1, "lr": 0.2}', "duplicate key 'lr'"),
        "wide.yaml": ("lr: 0.1\n".encode("utf-16"), "not UTF-8 text (invalid start byte at byte 0; UTF-16?)"),
        "deep.json": ("{\"patch\": " + "[" * 100000 + "]" * 100000 + "}", "nested deeper than the parser can "
                                                                          "follow"),
        "deep.yaml": ("patch: " + "[" * 50 + "]" * 50 + "\n", "values nested deeper than 32 levels"),
        "digits.json": ('{"iterations": ' + "9" * 5000 + "}", "a number of more than 4300 digits"),
        "digits.yaml": ("iterations: " + "9" * 5000 + "\n", "a number of more than 4300 digits"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"action train: error: config file {path}: ") and message in err, (name, err)
        assert err.count("\n") == 1 and len(err) < 400, (name, err)
    assert not (tmp_path / "run").exists()


def test_error_messages_show_a_bounded_repr_of_any_value(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("cutmix_area: [" + ", ".join(["[1, 2, 3]"] * 3000) + "]\n")
    with pytest.raises(ValueError) as info:
        build_config(file=str(big))
    assert str(info.value).startswith("config cutmix_area: expected") and len(str(info.value)) < 400
    assert bounded_repr(10 ** 5000) == "<int of about 5000 digits>"
    assert len(bounded_repr("x" * 10 ** 6)) < 100 and len(bounded_repr({i: [i] * 100 for i in range(1000)})) < 240

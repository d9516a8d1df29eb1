"""torch.distributed on CPU (gloo): a 2-process run trains a few steps, gathers its banks, and agrees with one
process computing the same shards (accumulate=2); rank 0 alone writes; the checkpoint resumes in one process."""
import csv
import os
import socket
import subprocess
import sys

import pytest

from action.engine import load_checkpoint
from action_kernels.testing import assert_allowed
from helpers import ACDC, SMALL, needs_acdc

SCRIPT = """
import sys
from action.config import build_config
from action.method import STAGE_TRAINERS
overrides = dict({small!r}, out=sys.argv[1], stage="pretrain-local", iterations=4, checkpoint_every=4,
                 labelled_batch=2, unlabelled_batch=2, accumulate=int(sys.argv[2]))
STAGE_TRAINERS["pretrain-local"](build_config("smoke", overrides=overrides), progress=False).fit(resume="auto")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(path):
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


@needs_acdc
def test_two_gloo_processes_match_one_process_with_the_same_shards(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(small=SMALL))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, str(script), str(single), "2"], check=True, capture_output=True, env=env)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script), str(multi), "1"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = rows(single / "train.csv"), rows(multi / "train.csv")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "sup", "global", "local"):
            assert_allowed(f"{key} {ra} {rb}", rb[key], ra[key], "ranks_losses")
    ca, cb = load_checkpoint(str(single / "last.pt")), load_checkpoint(str(multi / "last.pt"))
    for key, value in ca["model"].items():
        assert_allowed(key, cb["model"][key], value, "ranks_weights")
    banks_a, banks_b = ca["extra"]["banks"], cb["extra"]["banks"]
    assert int(banks_b["local.filled"]) == int(banks_a["local.filled"]) > 0  # both shards' rows gathered
    assert_allowed("local bank", banks_b["local.bank"], banks_a["local.bank"], "ranks_weights")
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))  # rank 1 wrote nothing extra
    # the 2-rank checkpoint resumes in one process (a different world size, the same global batches)
    longer = SCRIPT.format(small=SMALL).replace("iterations=4", "iterations=6").replace(  # a changed option: force
        'resume="auto"', 'resume="auto", force=True')
    more = subprocess.run([sys.executable, "-c", longer, str(multi), "2"], capture_output=True, text=True, env=env)
    assert more.returncode == 0, more.stderr[-2000:]
    assert len(rows(multi / "train.csv")) == 6


def test_batches_must_split_evenly(tmp_path):
    from action.config import build_config
    from action.engine import Trainer


    cfg = build_config("smoke", overrides={"data": ACDC, "out": str(tmp_path), "labelled_batch": 3,
                                           "accumulate": 2})
    with pytest.raises(ValueError, match="labelled_batch=3 must be divisible by world size x accumulate = 2"):
        Trainer(cfg, progress=False)

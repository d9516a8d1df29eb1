"""torch.distributed on CPU (gloo), DistributedDataParallel over the trained networks: a 2-process run trains a few
steps, gathers its banks, and agrees with one process computing the same shards (accumulate=2); so does a stage
that leaves parameters unused, with accumulation inside each rank (no_sync); rank 0 alone writes; the checkpoint
resumes in one process. SyncBatchNorm is refused on CPU with the reason."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from action.engine import load_checkpoint
from action_kernels.testing import assert_allowed
from helpers import ACDC, SMALL, free_port, needs_acdc

SCRIPT = """
import sys
from action.config import build_config
from action.method import STAGE_TRAINERS
stage = sys.argv[3] if len(sys.argv) > 3 else "pretrain-local"
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 2
overrides = dict({small!r}, out=sys.argv[1], stage=stage, iterations=4, checkpoint_every=4,
                 labelled_batch=batch, unlabelled_batch=batch, accumulate=int(sys.argv[2]))
STAGE_TRAINERS[stage](build_config("smoke", overrides=overrides), progress=False).fit(resume="auto")
"""


def rows(path):
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


@pytest.mark.slow
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
    for key, value in ca["extra"]["teacher"].items():  # the batch-statistics teacher's BatchNorm statistics too
        if value.is_floating_point():
            assert_allowed(f"teacher {key}", cb["extra"]["teacher"][key], value, "ranks_weights")
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


@pytest.mark.slow
@needs_acdc
def test_ranks_accumulating_with_unused_parameters_match_one_process(tmp_path):
    """pretrain-global uses the bottleneck, not the decoder (DDP's unused parameters keep no gradient, as in one
    process: no weight decay on them), and each rank accumulates two shards (no_sync on the first). With the
    eval-mode teacher (teacher_bn running) the global loss stays at rounding noise (the student starts as its
    teacher), so four steps' weights compare tightly; a batch-statistics teacher makes it O(1) at tau_t = 0.01,
    and its sharp softmax turns the gradient reductions' rounding (weights within 8e-7 after 3 steps) into 1.7e-2
    at step 4: the other test compares that teacher over ranks."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(small={**SMALL, "teacher_bn": "running"}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, str(script), str(single), "4", "pretrain-global", "4"], check=True,
                   capture_output=True, env=env)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script), str(multi), "2", "pretrain-global", "4"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(rows(multi / "train.csv")) == len(rows(single / "train.csv")) == 4
    # the weights carry the comparison: the global loss itself is rounding noise here (about 1e-6: the student
    # starts as its teacher), below the losses' allowance
    ca, cb = load_checkpoint(str(single / "last.pt")), load_checkpoint(str(multi / "last.pt"))
    for key, value in ca["model"].items():
        assert_allowed(key, cb["model"][key], value, "ranks_weights")
    decoder = [k for k in ca["model"] if k.startswith("net.decoder.") and k.endswith("weight")]
    init = initial_weights(tmp_path)
    assert decoder and all(torch.equal(ca["model"][k], init[k]) for k in decoder)  # untouched: no gradient


def initial_weights(tmp_path):
    """The initial weights of the pretrain-global model of SCRIPT's config (same seed)."""
    from action.config import build_config
    from action.method import STAGE_TRAINERS

    cfg = build_config("smoke", overrides=dict(SMALL, out=str(tmp_path / "init"), stage="pretrain-global",
                                               labelled_batch=4, unlabelled_batch=4))
    return {k: v.clone() for k, v in STAGE_TRAINERS["pretrain-global"](cfg, progress=False).model.state_dict().items()}


def test_sync_batchnorm_is_refused_on_cpu_with_the_reason():
    from action.engine import distributed

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="sync_bn: torch's SyncBatchNorm runs on CUDA tensors only"):
        distributed.wrap(net, lambda views, g: {}, torch.device("cpu"), sync_bn=True)
    assert isinstance(net[1], torch.nn.BatchNorm2d)  # refused before touching the model


def test_batches_must_split_evenly(tmp_path):
    from action.config import build_config
    from action.engine import Trainer


    cfg = build_config("smoke", overrides={"data": ACDC, "out": str(tmp_path), "labelled_batch": 3,
                                           "accumulate": 2})
    with pytest.raises(ValueError, match="labelled_batch=3 must be divisible by world size x accumulate = 2"):
        Trainer(cfg, progress=False)

"""One run per folder (issue 27, finding 2): a second training into an --out that another process trains into is
refused at once in one line naming the holder's pid, before it reads or deletes anything there; the kernel releases
the lock when the holder is killed. On the code before the fix the second process trained into the same folder, rc 0
(both tests fail there)."""
import inspect
import os
import signal
import subprocess
import sys
import time

import pytest

from action.cli import main
from action.engine import load_checkpoint
from action.engine.run_lock import LOCK_NAME, run_lock
from helpers import ACDC, needs_acdc, synthetic_acdc

# run_lock.py loaded by its path: the stdlib only, so the holder starts in a fraction of a second (no torch import)
HOLD = f"""import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", {inspect.getfile(run_lock.__wrapped__)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(out) -> subprocess.Popen:
    """A process holding `out`'s run lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_training_into_a_locked_folder_is_refused_naming_the_holder_and_a_kill_releases_it(tmp_path,
                                                                                                   capsys):
    pytest.importorskip("h5py")
    synthetic_acdc(tmp_path / "acdc")
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.csv").write_text("iteration,loss\n1,0.5\n")  # the holder's log: --resume auto would replace it
    holder = hold(out)
    try:
        assert main(["train", "--preset", "smoke", "--data", str(tmp_path / "acdc"), "--size", "32", "--iterations",
                     "1", "--val-every", "0", "--test-at-end", "false", "--tensorboard", "false", "--threads", "1",
                     "--out", str(out), "--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"action train: error: --out {out} is in use by another run (pid {holder.pid} holds "
                       f"{out / LOCK_NAME}); wait for it to end or stop it, or choose another --out")
        assert (out / "train.csv").read_text() == "iteration,loss\n1,0.5\n"  # nothing read, nothing deleted
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(str(out)):  # the kernel released the killed holder's lock
        with run_lock(str(out)):  # re-entrant within a process
            pass
        other = subprocess.run([sys.executable, "-c", HOLD, str(out)], capture_output=True, text=True, timeout=120)
        assert other.returncode == 1 and f"RunFolderInUse: --out {out} is in use by another run (pid {os.getpid()}" \
            in other.stderr  # this process's lock refuses another process
    assert not (out / LOCK_NAME).exists()


def test_run_lock_removes_a_folder_it_created_and_left_empty(tmp_path):
    with run_lock(str(tmp_path / "new")):
        assert (tmp_path / "new" / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / "new").exists()


@needs_acdc
@pytest.mark.slow
def test_two_concurrent_trainings_with_resume_auto_one_runs_the_other_is_refused_and_resume_after_kill(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "action.cli", "train", "--preset", "smoke", "--data", ACDC, "--out", str(out),
               "--iterations", "2000", "--checkpoint-every", "2", "--val-every", "0", "--test-at-end", "false",
               "--tensorboard", "false", "--threads", "1", "--log-every", "1", "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "last.pt").exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"action train: error: --out {out} is in use by another run (pid {first.pid} holds {out / LOCK_NAME}); "
            f"wait for it to end or stop it, or choose another --out")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = load_checkpoint(str(out / "last.pt"))["iteration"]
    at = command.index("--iterations") + 1
    third = subprocess.run(command[:at] + [str(done + 2)] + command[at + 1:] + ["--force"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at iteration {done}" in third.stdout
    with open(out / "train.csv") as fh:
        iterations = [int(line.split(",")[0]) for line in list(fh)[1:]]
    assert iterations == list(range(1, done + 3))  # one run's rows, in order: none interleaved, none lost

"""Configuration checks that know what a stage needs (issue 27, finding 7 and the environment cases of finding 8):
stage iii without unlabelled images, a kernel backend or a distributed backend that cannot run here, SyncBatchNorm
without CUDA ranks: each refused in one line (exit 2) before any data is read. On the code before the fix they died
after loading the data with a traceback (KeyError: 'image_u'; RuntimeError from the forced backend at the first
step; torch.cuda's AssertionError for nccl) or were accepted (sync_bn in one process): every test fails there."""
import pytest

from action.cli import main
from helpers import synthetic_acdc

pytest.importorskip("h5py", reason="h5py writes the synthetic ACDC folder")


@pytest.fixture
def train(tmp_path, capsys):
    """main(["train", ...]) on a synthetic ACDC folder -> (exit status, stderr); asserts nothing was loaded."""
    synthetic_acdc(tmp_path / "acdc", slices=2, patients=3)

    def run(*extra):
        status = main(["train", "--preset", "smoke", "--data", str(tmp_path / "acdc"), "--size", "32", "--iterations",
                       "1", "--val-every", "0", "--test-at-end", "false", "--tensorboard", "false", "--threads", "1",
                       "--labelled-patients", "2", "--out", str(tmp_path / "run"), *extra])
        err = capsys.readouterr().err
        assert "labelled slices" not in err  # refused before the data was read
        return status, err

    return run


@pytest.mark.parametrize("stage", ["finetune", "pipeline"])
def test_stage_iii_without_an_unlabelled_batch_is_refused_in_one_line_before_loading_data(train, stage):
    status, err = train("--stage", stage)
    assert status == 2 and err == (f"action train: error: config unlabelled_batch: expected >= 1 for stage {stage} "
                                   f"(stage iii trains on pseudo-labels of unlabelled images: pass --unlabelled-batch "
                                   f"N), got 0\n")


def test_a_forced_kernel_backend_that_cannot_run_here_is_refused_naming_the_variable(train, monkeypatch):
    from action_kernels import dispatch

    monkeypatch.setenv("ACTION_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a machine without CUDA outside the tests
    dispatch.triton_status.cache_clear()
    try:
        status, err = train("--stage", "pretrain-global", "--unlabelled-batch", "2")
    finally:
        dispatch.triton_status.cache_clear()
    assert status == 2 and err.startswith("action train: error: $ACTION_KERNELS_BACKEND='triton' cannot run on cpu: "
                                          "triton kernels need CUDA tensors") and err.count("\n") == 1
    monkeypatch.setenv("ACTION_KERNELS_BACKEND", "tirton")
    status, err = train("--stage", "pretrain-global")
    assert status == 2 and "$ACTION_KERNELS_BACKEND='tirton' is not a backend" in err


def test_a_distributed_backend_that_cannot_run_here_is_refused_before_joining_a_group(train, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACTION_DIST_BACKEND", "nccl")
    status, err = train()
    assert status == 2 and err == ("action train: error: $ACTION_DIST_BACKEND='nccl' needs CUDA devices, this run is "
                                   "on cpu: use gloo (or unset it)\n")
    monkeypatch.setenv("ACTION_DIST_BACKEND", "glo")
    status, err = train()
    assert status == 2 and "$ACTION_DIST_BACKEND='glo' is not a torch.distributed backend" in err


def test_sync_bn_without_cuda_ranks_is_refused(train):
    status, err = train("--sync-bn", "true")
    assert status == 2 and err == ("action train: error: config sync_bn: SyncBatchNorm needs CUDA and several ranks "
                                   "under torchrun; this run has 1 process(es) on cpu: drop --sync-bn\n")

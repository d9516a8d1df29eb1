"""No silent NaN model (issue 27, finding 3): a checkpoint with a non-finite tensor is refused by evaluate, predict,
--init and --resume with the tensors' names, and a model whose outputs are non-finite (finite weights that overflow)
is refused by evaluate and predict naming the case. On the code before the fix evaluate printed a table of Dice 0 and
predict wrote all-background volumes, rc 0, and --init / --resume trained on (every test here fails there)."""
import numpy as np
import pytest
import torch

from action.cli import main
from action.engine import load_checkpoint
from action.engine.checkpoint import save_checkpoint
from helpers import synthetic_acdc, tiny_checkpoint

pytest.importorskip("h5py", reason="h5py writes the synthetic ACDC folder")
pytest.importorskip("nibabel", reason="nibabel writes the inputs")


def poisoned(path, change) -> str:
    """Rewrites checkpoint `path` with change(state) applied."""
    state = load_checkpoint(str(path))
    change(state)
    return save_checkpoint({k: v for k, v in state.items() if k != "format"}, str(path))


def nan_weight(state):
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() == 4)
    state["model"][name][0, 0, 0, 0] = float("nan")
    return name


def overflowing(state):
    """Finite weights whose logits overflow to inf: the last convolution scaled to near float32's maximum."""
    name = [k for k, v in state["model"].items() if k.endswith(".weight") and v.dim() == 4][-1]
    state["model"][name].fill_(3e38)


@pytest.fixture
def data(tmp_path):
    synthetic_acdc(tmp_path / "acdc")
    from action.data.nifti import save_nifti

    save_nifti(np.random.default_rng(0).random((32, 32, 3)).astype(np.float32), np.eye(4),
               str(tmp_path / "in" / "x.nii.gz"))
    return tmp_path


def test_evaluate_and_predict_refuse_a_checkpoint_with_a_nan_weight_naming_it(data, capsys):
    checkpoint = tiny_checkpoint(data / "ck" / "best.pt", data=str(data / "acdc"))
    name = []
    poisoned(checkpoint, lambda s: name.append(nan_weight(s)))
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(data / "acdc"), "--out", str(data / "ev"),
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {checkpoint}: 1 tensor(s) hold NaN or infinite values ({name[0]})" in err
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(data / "in"), "--out", str(data / "pred"),
                 "--threads", "1"]) == 2
    assert f"({name[0]})" in capsys.readouterr().err and not (data / "pred" / "predictions").exists()


def test_evaluate_and_predict_refuse_a_model_whose_outputs_overflow_naming_the_case(data, capsys):
    checkpoint = tiny_checkpoint(data / "ck" / "best.pt", data=str(data / "acdc"))
    poisoned(checkpoint, overflowing)
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(data / "acdc"), "--out", str(data / "ev"),
                 "--threads", "1", "--overlays", "0"]) == 2
    assert "case 'patient200_frame01': --checkpoint" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(data / "in"), "--out", str(data / "pred"),
                 "--threads", "1", "--overlays", "0"]) == 2
    err = capsys.readouterr().err
    assert "case 'x': " in err and "NaN or infinite value(s) for a finite input" in err
    assert not (data / "pred" / "predictions").exists()


@pytest.mark.slow
def test_init_and_resume_refuse_a_checkpoint_with_non_finite_tensors_naming_them(data, capsys):
    common = ["train", "--preset", "smoke", "--data", str(data / "acdc"), "--size", "32", "--iterations", "1",
              "--val-every", "0", "--test-at-end", "false", "--tensorboard", "false", "--threads", "1"]
    assert main([*common, "--out", str(data / "run")]) == 0
    last = data / "run" / "last.pt"
    name = []
    poisoned(last, lambda s: name.append(nan_weight(s)))
    assert main([*common, "--out", str(data / "run2"), "--init", str(last)]) == 2
    assert f"--init {last}: 1 tensor(s) hold NaN or infinite values ({name[0]})" in capsys.readouterr().err

    def momentum(state):
        state["optimizer"]["state"][0]["momentum_buffer"][:] = float("inf")

    poisoned(last, momentum)
    assert main([*common, "--out", str(data / "run"), "--resume", "--iterations", "2", "--force"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {last}: 2 tensor(s) hold NaN or infinite values (model.{name[0]}, " \
           f"optimizer.state.0.momentum_buffer)" in err
    kept = load_checkpoint(str(last))  # nothing trained on, nothing overwritten
    assert kept["iteration"] == 1 and torch.isnan(kept["model"][name[0]]).any()

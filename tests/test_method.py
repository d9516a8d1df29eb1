"""The ACTION stages: loss pieces and their edge cases, each stage lowering its loss on a fixed batch of real ACDC
slices, determinism, the pipeline's hand-over, and exact resume (banks and EMA included) after a SIGKILL."""
import csv
import subprocess
import sys

import pytest
import torch

from action.engine import load_checkpoint
from action.engine.evaluate import acdc_cases
from action.engine.inference import predict_slices, recalibrate_batchnorm
from action.method import (
    STAGE_TRAINERS,
    anatomical_term,
    pseudo_label_loss,
    run_pipeline,
    sample_hard_queries,
    teacher_bank,
)
from action.models import UNet2D
from helpers import ACDC, SMALL, kill_after_checkpoint, needs_acdc, stage_config


def test_teacher_bank_wraps_in_order():
    bank = teacher_bank(4, 2)
    assert bank.keys().shape == (0, 2)
    bank.push(torch.arange(6.0).view(3, 2))
    bank.push(torch.arange(6.0, 12.0).view(3, 2))
    assert bank.keys()[:, 0].tolist() == [8.0, 10.0, 4.0, 6.0] and int(bank.filled) == 4
    bank.push(torch.arange(20.0).view(10, 2))  # more rows than the bank: the last 4 survive
    assert sorted(bank.keys()[:, 0].tolist()) == [12.0, 14.0, 16.0, 18.0]


def test_pseudo_label_loss_weights_and_empty_cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, 4, 4), generator=g)
    conf = torch.zeros(2, 4, 4)
    conf[0, :2] = 0.99  # image 0: half its pixels confident; image 1: none
    ce = torch.nn.functional.cross_entropy(logits, pseudo, reduction="none")
    expected = (ce[0] * 0.5).sum() / (ce > 0).sum()
    torch.testing.assert_close(pseudo_label_loss(logits, pseudo, conf, 0.97), expected)
    none = pseudo_label_loss(logits, pseudo, torch.zeros(2, 4, 4), 0.97)
    none.backward()
    assert none.item() == 0.0 and logits.grad is not None  # no confident pixel: a zero that keeps the graph
    assert pseudo_label_loss(logits, torch.full_like(pseudo, 255), conf, 0.97).item() == 0.0


def test_pseudo_label_loss_pixel_mask_counts_only_confident_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 3, generator=g, requires_grad=True)  # ragged spatial size
    pseudo = torch.randint(0, 3, (2, 5, 3), generator=g)
    conf = torch.rand(2, 5, 3, generator=g)
    pseudo[1, 0] = 255  # cutout: ignored even where confident
    conf[1, 0] = 1.0
    ce = torch.nn.functional.cross_entropy(logits, pseudo.clamp_max(2), reduction="none")
    keep = (conf >= 0.5) & (pseudo != 255)
    expected = ce[keep].mean()
    got = pseudo_label_loss(logits, pseudo, conf, 0.5, mask="pixel")
    torch.testing.assert_close(got, expected)
    got.backward()
    grad = logits.grad.permute(0, 2, 3, 1)
    assert torch.all(grad[~keep] == 0) and torch.all(grad[keep].abs().sum(-1) > 0)  # unconfident pixels push nothing
    none = pseudo_label_loss(logits, pseudo, torch.zeros_like(conf), 0.5, mask="pixel")
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="mask must be 'image' or 'pixel', got 'pixels'"):
        pseudo_label_loss(logits, pseudo, conf, 0.5, mask="pixels")


def test_hard_queries_are_hard_balanced_and_seeded():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, -1, 2])
    probs = torch.full((8, 3), 0.5)
    probs[1, 0] = 0.99  # easy: never a query
    probs[5, 2] = 0.99
    idx = sample_hard_queries(labels, probs, 3, 50, 0.97, g)
    assert idx.numel() == 150
    assert set(idx.tolist()) <= {0, 2, 3, 4, 7}
    assert torch.bincount(labels[idx], minlength=3).tolist() == [50, 50, 50]
    again = sample_hard_queries(labels, probs, 3, 50, 0.97, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    probs[:] = 1.0
    assert sample_hard_queries(labels, probs, 3, 50, 0.97, g).numel() == 0


@pytest.mark.parametrize("negatives", ["topk", "class_graph"])
def test_anatomical_term_is_defined_in_degenerate_batches(negatives):
    g = torch.Generator().manual_seed(0)
    rep = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    probs = torch.full((2, 3, 4, 4), 1 / 3)
    kw = dict(per_class=8, strong_threshold=0.97, tau=0.5, negatives=negatives, num_negatives=4, generator=g)
    loss = anatomical_term(rep, labels, probs, 3, **kw)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and rep.grad.abs().sum() > 0
    for case in (torch.zeros_like(labels), torch.full_like(labels, -1)):  # one class only; nothing valid
        rep.grad = None
        zero = anatomical_term(rep, case, probs, 3, **kw)
        zero.backward()
        assert zero.item() == 0.0 and rep.grad is not None
    confident = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()  # no hard query
    assert anatomical_term(rep, labels, confident, 3, **kw).item() == 0.0


@needs_acdc
@pytest.mark.parametrize("stage", ["pretrain-global", "pretrain-local", "finetune"])
def test_each_stage_lowers_its_loss_on_a_fixed_batch(tmp_path, stage):
    trainer = STAGE_TRAINERS[stage](stage_config(tmp_path, stage, size=32, lr=0.05,
                                                 augmentation={"affine_p": 0, "intensity_p": 0, "blur_p": 0,
                                                               "noise_p": 0, "flip_p": 0, "rot90": False},
                                                 cutmix_p=0.0, strong_threshold=1.0, weak_threshold=0.0),
                                    progress=False)
    if stage != "finetune":
        # distillation needs a student that differs from its teacher (an exact copy at the start) and spread-out
        # anchors (a fresh network embeds every image in nearly one direction): re-draw the predictor, fill the
        # banks with random anchors, then keep teacher and banks fixed
        torch.manual_seed(1)
        for m in trainer.model["pred"].modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for bank in trainer.banks.values():
            bank.push(torch.randn(bank.bank.shape))
    batch = trainer.batch(0)
    seen = []
    for it in range(12):
        trainer._deferred = []  # bank updates are not applied: teacher and banks stay fixed
        losses = trainer.batch_losses(batch, torch.Generator().manual_seed(0))
        trainer.optimizer.zero_grad()
        losses["loss"].backward()
        trainer.optimizer.step()
        if stage == "finetune":
            trainer.after_step(it)  # the EMA teacher follows (its pseudo-labels are part of the objective)
        seen.append(float(losses["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(seen)))
    assert max(seen[-3:]) < 0.9 * seen[0], seen


@needs_acdc
def test_a_step_is_deterministic_given_the_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = STAGE_TRAINERS["finetune"](stage_config(tmp_path / name, "finetune", iterations=3), progress=False)
        trainer.fit()
        with open(tmp_path / name / "train.csv") as fh:
            runs.append([r for r in csv.DictReader(fh)])
    assert [(r["loss"], r["anco"]) for r in runs[0]] == [(r["loss"], r["anco"]) for r in runs[1]]


@needs_acdc
def test_pipeline_hands_each_stage_the_previous_weights(tmp_path):
    cfg = stage_config(tmp_path, "pipeline", stage_iterations={"pretrain-global": 2, "pretrain-local": 2,
                                                               "finetune": 2})
    results = run_pipeline(cfg, progress=False)
    assert list(results) == ["pretrain-global", "pretrain-local", "finetune"]
    local_last = load_checkpoint(str(tmp_path / "pretrain-local" / "last.pt"))
    ft_cfg = stage_config(tmp_path / "check", "finetune", init=str(tmp_path / "pretrain-local" / "last.pt"))
    ft = STAGE_TRAINERS["finetune"](ft_cfg, progress=False)
    for k, v in ft.model["net"].state_dict().items():
        assert torch.equal(v, local_last["model"]["net." + k]), k
    for k, v in ft.teacher.module["net"].state_dict().items():  # teacher starts as the pre-trained student
        assert torch.equal(v, local_last["model"]["net." + k]), k
    again = run_pipeline(cfg, resume=True, progress=False)  # finished stages are skipped
    assert all(r == {"skipped": True} for r in again.values())


@pytest.mark.slow
@needs_acdc
def test_finetune_resume_after_sigkill_restores_banks_ema_and_losses(tmp_path):
    def script(out):
        return ("from action.config import build_config; from action.method import STAGE_TRAINERS; "
                f"cfg = build_config('smoke', overrides={{**{SMALL!r}, 'out': {str(out)!r}, "
                "'stage': 'pretrain-local', 'iterations': 16, 'checkpoint_every': 3}); "
                "STAGE_TRAINERS['pretrain-local'](cfg, progress=False).fit(resume='auto')")

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", script(ref)], check=True, capture_output=True)
    stopped = kill_after_checkpoint(script(killed), killed / "last.pt", 6)
    assert 6 <= stopped < 16
    subprocess.run([sys.executable, "-c", script(killed)], check=True, capture_output=True)

    def rows(out):
        with open(out / "train.csv") as fh:
            return {int(r["iteration"]): (r["loss"], r["global"], r["local"]) for r in csv.DictReader(fh)}

    got, want = rows(killed), rows(ref)
    assert sorted(got) == list(range(1, 17))
    assert all(got[i] == want[i] for i in range(stopped + 1, 17)), (got, want)


@needs_acdc
def test_eval_teacher_validates_and_tests_the_ema_network(tmp_path):
    from action.cli import _predictor_from_checkpoint
    from action.engine.checkpoint import eval_weights

    cfg = stage_config(tmp_path, "finetune", iterations=2, eval_teacher=True, val_every=2, val_volumes=1)
    trainer = STAGE_TRAINERS["finetune"](cfg, progress=False)
    assert trainer.eval_model() is trainer.teacher.module["net"]
    trainer.fit()
    with open(tmp_path / "val.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["mean_dice"] == row["teacher_mean_dice"] and "student_mean_dice" in row
    state = load_checkpoint(str(tmp_path / "best.pt"))
    weights = eval_weights(state)
    teacher = trainer.teacher.module["net"].state_dict()
    assert set(weights) >= {"net." + k for k in teacher}
    assert any(not torch.equal(weights["net." + k], state["model"]["net." + k]) for k in teacher)  # EMA != student
    predict, loaded_cfg = _predictor_from_checkpoint(str(tmp_path / "best.pt"), "cpu")
    assert loaded_cfg.eval_teacher
    case = next(iter(acdc_cases(ACDC, trainer.data.val_names[:1])))
    ref = UNet2D(1, 4)
    ref.load_state_dict({k[len("module.net."):]: v for k, v in state["extra"]["teacher"].items()
                         if k.startswith("module.net.")})
    assert torch.equal(predict(case), predict_slices(ref.eval(), case.image, (cfg.size, cfg.size)))


def test_recalibrate_batchnorm_averages_batch_statistics_on_a_copy():
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Dropout(0.5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(4, 1, 7, 5, generator=g) * (i + 1) + i for i in range(3)]
    out = recalibrate_batchnorm(net, batches)
    feats = [net[0](x).detach() for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = out[1]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert not out.training and not bn.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the original is untouched
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_batchnorm(net, [])


@needs_acdc
def test_bn_recalibrate_scores_and_keeps_the_reestimated_network(tmp_path):
    from action.engine.checkpoint import eval_weights

    cfg = stage_config(tmp_path, "finetune", iterations=2, bn_recalibrate=3, val_every=2, val_volumes=1)
    trainer = STAGE_TRAINERS["finetune"](cfg, progress=False)
    trainer.fit()
    state = load_checkpoint(str(tmp_path / "best.pt"))
    kept = state["eval_model"]
    student = {k[len("net."):]: v for k, v in state["model"].items() if k.startswith("net.")}
    assert set(kept) == set(student)
    changed = {k for k in kept if not torch.equal(kept[k], student[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert all(torch.equal(eval_weights(state)["net." + k], v) for k, v in kept.items())
    again = trainer.evaluated(trainer.model["net"])  # seeded batches: the same statistics every time
    assert all(torch.equal(again.state_dict()[k], v) for k, v in kept.items())
    assert "eval_model" not in load_checkpoint(str(tmp_path / "last.pt"))
    # `action evaluate|predict --teacher`: the EMA teacher's network of any stage checkpoint
    from action.cli import _predictor_from_checkpoint

    last = load_checkpoint(str(tmp_path / "last.pt"))
    predict_t, _ = _predictor_from_checkpoint(str(tmp_path / "last.pt"), "cpu", teacher=True)
    ref = UNet2D(1, 4)
    ref.load_state_dict({k[len("module.net."):]: v for k, v in last["extra"]["teacher"].items()
                         if k.startswith("module.net.")})
    case = next(iter(acdc_cases(ACDC, trainer.data.val_names[:1])))
    assert torch.equal(predict_t(case), predict_slices(ref.eval(), case.image, (cfg.size, cfg.size)))


def test_batch_statistics_normalises_with_the_batch_and_restores_the_module():
    import copy

    from action.models.ema import batch_statistics

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).eval()
    net[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 1, 9, 7)
    reference = copy.deepcopy(net)
    reference[1].train()  # batch statistics, dropout still off
    with batch_statistics(net):
        inside = net(x)
        assert net[1].training and not net[2].training
    torch.testing.assert_close(inside, reference(x))
    assert not torch.allclose(inside, net(x))  # outside: the running statistics again
    assert not net[1].training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_every_stage_of_the_config_has_the_trainer_registered_under_its_name():
    from action.config import PIPELINE, STAGES, TRAINED_STAGES, build_config
    from action.method import trainer_class

    assert tuple(s for s in STAGE_TRAINERS if "+" not in s) == TRAINED_STAGES
    assert STAGES == (*TRAINED_STAGES, "pipeline") and set(PIPELINE) < set(TRAINED_STAGES)
    assert all(cls.stage == key.split("+")[0] for key, cls in STAGE_TRAINERS.items())
    for stage in TRAINED_STAGES:  # stage iii refuses a config without unlabelled images
        assert trainer_class(build_config(overrides={"stage": stage, "unlabelled_batch": 4})) is STAGE_TRAINERS[stage]
    assert trainer_class(build_config(overrides={"stage": "finetune", "plusplus": True, "unlabelled_batch": 4})
                         ).__name__ == "PlusPlusFinetuner"
    assert list(build_config().stage_iterations) == list(PIPELINE)

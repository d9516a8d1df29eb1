"""Stage iii's recipe options (issue 22): the pseudo-label loss forms and their foreground part, the diagnostics and
the audit (which never reaches a loss), the strong unlabelled view, cutmix partners, the teachers' own BatchNorm
statistics, any number of labelled patients, and the seeded protocol's dry run."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from action.data.augment import cutmix, partners
from action.engine.losses import dice_loss
from action.method import STAGE_TRAINERS
from action.method.losses import pseudo_label_diagnostics, pseudo_label_terms
from helpers import ACDC, needs_acdc, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(seed, shape=(3, 4, 7, 5)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, requires_grad=True)
    pseudo = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    conf = torch.rand(shape[0], *shape[2:], generator=g)
    pseudo[0, 0] = 255  # a cutout row: ignored everywhere
    return logits, pseudo, conf


def test_pseudo_label_dice_counts_only_confident_pixels():
    logits, pseudo, conf = _batch(0)
    got = pseudo_label_terms(logits, pseudo, conf, 0.6, loss="dice")
    target = torch.where((conf >= 0.6) & (pseudo != 255), pseudo, torch.full_like(pseudo, 255))
    per_class = dice_loss(logits.softmax(1), target, 255, per_class=True)
    torch.testing.assert_close(got["loss"], per_class.mean())
    torch.testing.assert_close(got["foreground"], per_class[1:].sum() / 4)
    got["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pseudo_label_ce_plus_dice_is_half_of_each():
    logits, pseudo, conf = _batch(1)
    both = pseudo_label_terms(logits, pseudo, conf, 0.5, mask="pixel", loss="ce+dice")
    ce = pseudo_label_terms(logits, pseudo, conf, 0.5, mask="pixel", loss="ce")
    dice = pseudo_label_terms(logits, pseudo, conf, 0.5, loss="dice")
    for key in ("loss", "foreground"):
        torch.testing.assert_close(both[key], 0.5 * (ce[key] + dice[key]))


@pytest.mark.parametrize("mask", ["image", "pixel"])
def test_pseudo_label_ce_foreground_part_is_the_share_of_foreground_pixels(mask):
    logits, pseudo, conf = _batch(2)
    got = pseudo_label_terms(logits, pseudo, conf, 0.5, mask=mask)
    background = pseudo_label_terms(logits, pseudo.masked_fill(pseudo > 0, 0), conf, 0.5, mask=mask)
    assert 0 < got["foreground"].item() < got["loss"].item()
    assert background["foreground"].item() == 0.0
    foreground = pseudo_label_terms(logits, pseudo.clamp_min(1).masked_fill(pseudo == 255, 255), conf, 0.5, mask=mask)
    torch.testing.assert_close(foreground["foreground"], foreground["loss"])


def test_pseudo_label_dice_without_confident_pixels_is_a_graph_keeping_zero():
    logits, pseudo, conf = _batch(3)
    zero = pseudo_label_terms(logits, pseudo, conf * 0, 0.9, loss="ce+dice")
    zero["loss"].backward()
    assert zero["loss"].item() == 0.0 and logits.grad is not None


def test_pseudo_label_loss_rejects_unknown_forms():
    logits, pseudo, conf = _batch(4)
    with pytest.raises(ValueError, match="loss must be"):
        pseudo_label_terms(logits, pseudo, conf, 0.5, loss="focal")
    with pytest.raises(ValueError, match="mask must be"):
        pseudo_label_terms(logits, pseudo, conf, 0.5, mask="box")


def test_pseudo_label_diagnostics_count_confident_pixels_per_class():
    pseudo = torch.tensor([[[0, 0, 1, 2]], [[1, 1, 255, 0]]])
    conf = torch.tensor([[[0.99, 0.5, 0.99, 0.2]], [[0.99, 0.1, 0.99, 0.99]]])
    d = {k: v.item() for k, v in pseudo_label_diagnostics(pseudo, conf, 0.95, 3).items()}
    assert d["pl_confident"] == pytest.approx(4 / 7)
    assert d["pl_confident_c0"] == pytest.approx(2 / 3)
    assert d["pl_confident_c1"] == pytest.approx(2 / 3)
    assert d["pl_confident_c2"] == 0.0
    assert d["pl_weight"] == pytest.approx((2 / 4 + 2 / 3) / 2)


@pytest.mark.parametrize("batch", [2, 3, 5, 8])
def test_derangement_cutmix_never_pairs_a_sample_with_itself(batch):
    for seed in range(20):
        partner = partners(batch, torch.Generator().manual_seed(seed), "cpu", "derangement")
        assert sorted(partner.tolist()) == list(range(batch))  # a permutation
        assert (partner != torch.arange(batch)).all()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(partners(batch, g, "cpu"), torch.randperm(batch, generator=torch.Generator().manual_seed(0)))


def test_cutmix_with_every_pair_mixes_every_sample_from_another():
    image = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    label = torch.arange(4).view(4, 1, 1).expand(4, 16, 16).contiguous()
    mixed, mixed_label, _, mask, perm = cutmix(image, label, generator=torch.Generator().manual_seed(3), p=1.0,
                                               pairing="derangement")
    for b in range(4):
        assert mask[b].any() and (perm[b] != b)
        assert torch.equal(mixed[b, 0][mask[b]], torch.full_like(mixed[b, 0][mask[b]], float(perm[b])))
        assert torch.equal(mixed_label[b][mask[b]], torch.full_like(mixed_label[b][mask[b]], int(perm[b])))


@needs_acdc
def test_acdc_takes_any_number_of_labelled_patients():
    from action.data.acdc import AcdcLayout, patient_of

    layout = AcdcLayout(ACDC)
    names = layout.train_slices
    for n, expected in ((1, 23), (3, 68), (7, 136)):  # the reference mapping
        labelled, unlabelled = layout.split(labelled_patients=n)
        assert labelled == names[:expected] and unlabelled == names[expected:]
    labelled, unlabelled = layout.split(labelled_patients=2)
    first_two = list(dict.fromkeys(patient_of(n) for n in names))[:2]
    assert {patient_of(n) for n in labelled} == set(first_two)
    assert not {patient_of(n) for n in unlabelled} & set(first_two)
    assert len(labelled) + len(unlabelled) == len(names)
    with pytest.raises(ValueError, match="at least one must stay unlabelled"):
        layout.split(labelled_patients=70)


@needs_acdc
def test_strong_view_perturbs_only_the_students_unlabelled_images(tmp_path):
    views = {}
    for view in ("weak", "strong"):
        trainer = STAGE_TRAINERS["finetune"](stage_config(tmp_path / view, "finetune", cutmix_p=0.0,
                                                          unlabelled_view=view), progress=False)
        views[view] = trainer.prepare(trainer.batch(0), torch.Generator().manual_seed(5))
    for key in ("image_l", "label_l", "pseudo_u", "conf_u"):
        assert torch.equal(views["weak"][key], views["strong"][key]), key
    assert not torch.equal(views["weak"]["image_u"], views["strong"]["image_u"])


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@needs_acdc
def test_stage_iii_logs_pseudo_label_diagnostics_and_the_audit_reaches_no_loss(tmp_path):
    runs = {}
    for audit in (False, True):
        out = tmp_path / str(audit)
        cfg = stage_config(out, "finetune", iterations=3, unsup_loss="ce+dice", unlabelled_view="strong",
                           cutmix_p=1.0, cutmix_pairing="derangement", pseudo_threshold=0.5,
                           audit_pseudo_labels=audit)
        trainer = STAGE_TRAINERS["finetune"](cfg, progress=False)
        trainer.fit()
        runs[audit] = (_rows(out / "train.csv"), trainer.model.state_dict())
    plain, audited = runs[False][0], runs[True][0]
    diagnostics = ["pl_confident", "pl_confident_c0", "pl_confident_c3", "pl_weight", "pl_fg_share"]
    assert set(diagnostics) <= set(plain[0]) and not any(k.startswith("audit_") for k in plain[0])
    assert {"audit_dice_c1", "audit_dice_c3", "audit_confident_accuracy", "audit_confident_recall_c2"} <= set(
        audited[0])
    for a, b in zip(plain, audited):  # bitwise: the ground truth changes nothing the run computes
        assert [a[k] for k in ("loss", "sup", "unsup", "anco", *diagnostics)] == \
               [b[k] for k in ("loss", "sup", "unsup", "anco", *diagnostics)]
    for key, value in runs[False][1].items():
        assert torch.equal(value, runs[True][1][key]), key
    assert all(0.0 <= float(r[k]) <= 1.0 for r in audited for k in r if k.startswith(("audit_", "pl_")))


def test_ema_teacher_averages_batchnorm_statistics_like_its_weights():
    from action.models import EMATeacher

    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    teacher = EMATeacher(student, 0.9, buffers="ema")
    before = teacher.module[1].running_mean.clone()
    student[1].running_mean.fill_(1.0)
    student[1].num_batches_tracked.fill_(7)
    teacher.update(student, 5)  # alpha = min(0.9, 1 - 1/6)
    alpha = min(0.9, 1 - 1 / 6)
    torch.testing.assert_close(teacher.module[1].running_mean, alpha * before + (1 - alpha) * 1.0)
    assert int(teacher.module[1].num_batches_tracked) == 7  # integer buffers are copied
    with pytest.raises(ValueError, match="buffers must be"):
        EMATeacher(student, 0.9, buffers="own")


@needs_acdc
def test_batch_teacher_keeps_running_statistics_of_its_own(tmp_path):
    stats = {}
    for bn in ("running", "batch"):
        trainer = STAGE_TRAINERS["pretrain-local"](stage_config(tmp_path / bn, "pretrain-local", iterations=3,
                                                                teacher_bn=bn), progress=False)
        trainer.fit()
        student = trainer.model["net"].state_dict()
        teacher = trainer.teacher.module["net"].state_dict()
        stats[bn] = [torch.equal(student[k], teacher[k]) for k in student if k.endswith("running_mean")]
    assert all(stats["running"])  # copied from the student at every update
    assert not any(stats["batch"])  # an EMA of the student's, lagging with the teacher's weights


@needs_acdc
def test_audit_needs_ground_truth_of_the_unlabelled_images(tmp_path):
    from action.config import build_config

    with pytest.raises(ValueError, match="audit_pseudo_labels"):
        build_config("smoke", overrides={"data": ACDC, "out": str(tmp_path), "dims": 3, "audit_pseudo_labels": True})


@pytest.mark.slow
@pytest.mark.slow
@needs_acdc
def test_ssl_protocol_dry_run_runs_every_arm_and_writes_the_table(tmp_path):
    out = tmp_path / "protocol"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ssl_protocol.py"), "--dry-run",
                           "--seeds", "1", "--data", ACDC, "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    for arm in ("| sup |", "| iii-today |", "| iii-recipe |", "| iii-plusplus |", "| pipeline |", "| scratch |",
                "| sup (BN on labelled slices) |", "| running | 1 |", "| batch | 1 |"):
        assert arm in table, arm
    assert (out / "1" / "iii-recipe" / "train.csv").read_text().startswith("iteration,loss,sup,unsup,anco,pl_")


def test_resuming_a_run_from_before_the_recipe_lists_the_changed_behaviour():
    import json

    from action.config import TrainConfig, resume_differences

    old = json.loads(TrainConfig().to_json())
    for key in ("unsup_loss", "pseudo_threshold", "unlabelled_view", "strong_augmentation", "cutmix_pairing",
                "cutmix_area", "audit_pseudo_labels"):
        del old[key]  # a checkpoint written before these options existed
    changed = resume_differences(json.dumps(old), TrainConfig())
    assert changed["unsup_loss"] == ("ce", "ce+dice") and changed["unlabelled_view"] == ("weak", "strong")
    assert changed["pseudo_threshold"] == (None, 0.95) and changed["cutmix_pairing"] == ("random", "derangement")
    assert "cutmix_area" not in changed and "audit_pseudo_labels" not in changed

"""The three ACTION stages and ACTION++'s fine-tuning as Trainer variants (docs/method.md sections 6 and 7), their
registry, and the pipeline that runs the stages in order.

    pretrain-global (i)   L_global                      all images, labels unused
    pretrain-local  (ii)  L_sup + L_global + L_local    labelled + unlabelled
    finetune        (iii) L_sup + L_unsup + 0.01 L_anco labelled + unlabelled
    finetune, ACTION++    + 0.01 L_saacl                (--plusplus: the registered variant "finetune+plusplus")

Views: one geometric augmentation per image shared by student and teacher (so maps stay pixel-aligned for the
local loss), independent photometric augmentation per view. Teachers are EMA copies (of the network and of the
heads whose outputs they provide), updated once per iteration under no_grad; with teacher_bn "batch" (the default)
every teacher forward normalises with its batch's statistics and the teacher's running statistics (for its
eval-mode validation) are an EMA of the student's, with "running" it runs in eval mode on statistics copied from the
student.
Banks are FIFO buffers pushed after the optimizer step. Each stage initialises from the previous stage's checkpoint
(--init); fine-tuning initialises student and teacher from the pre-trained student.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import NamedTuple

import torch
from torch import nn

from action.config import PIPELINE, TrainConfig
from action.data.augment import STRONG_PHOTOMETRIC, Augment, AugmentConfig, cutmix
from action.engine.checkpoint import load_checkpoint
from action.engine.losses import supervised_loss
from action.engine.trainer import Trainer
from action.method.losses import (
    anatomical_term,
    distillation_loss,
    pseudo_label_audit,
    pseudo_label_diagnostics,
    pseudo_label_terms,
    sample_hard_queries,
    teacher_bank,
)
from action.method.plusplus import SaaclState, ats_temperature, class_centres, saacl_loss
from action.models import EMATeacher, PredictorHead, ProjectionHead, RepresentationHead, build_network
from action.models.ema import batch_statistics


def rows_of(maps: torch.Tensor) -> torch.Tensor:
    """(B, D, *S) channel-first maps -> (B * prod(S), D) rows, one per location, in (b, *s) order."""
    return maps.movedim(1, -1).reshape(-1, maps.shape[1])


class _TeacherStage(Trainer):
    """Shared machinery: a ModuleDict student {"net": UNet2D or UNet3D, heads...}, an EMA teacher of
    `teacher_keys`, banks fed through defer/apply_deferred (after the optimizer step, every shard's rows in global
    order)."""

    uses_unlabelled = True
    teacher_keys: tuple[str, ...] = ("net",)

    def build_model(self) -> nn.Module:
        net = build_network(self.cfg)
        # the heads' input widths, read off the network: bottleneck channels, decoder channels coarse to fine
        self.bottleneck, self.decoder = net.channels[-1], net.channels[3::-1]
        return nn.ModuleDict({"net": net, **self.build_heads()})

    def build_heads(self) -> dict:
        return {}

    def setup(self) -> None:
        self.teacher = EMATeacher(self._teacher_source(), self.cfg.ema_decay,
                                  buffers="copy" if self.cfg.teacher_bn == "running" else "ema").to(self.device)
        self.banks = nn.ModuleDict(self.build_banks()).to(self.device)

    def teacher_statistics(self):
        """The context of every teacher forward: with teacher_bn "batch", BatchNorm on the batch's statistics (the
        teacher's running statistics, an EMA of the student's, serve its eval-mode validation only); with
        "running", nothing (eval mode on statistics copied from the student)."""
        if self.cfg.teacher_bn == "batch":
            return batch_statistics(self.teacher.module)
        return contextlib.nullcontext()

    def build_banks(self) -> dict:
        return {}

    def _teacher_source(self) -> nn.ModuleDict:
        return nn.ModuleDict({k: self.model[k] for k in self.teacher_keys})

    def eval_model(self) -> nn.Module:
        return self.teacher.module["net"] if self.cfg.eval_teacher else self.model["net"]

    def validate(self) -> dict:
        """The eval model's scores (best.pt follows its mean_dice) and both networks' mean Dice, for the curves."""
        nets = {"student": self.evaluated(self.model["net"]), "teacher": self.evaluated(self.teacher.module["net"])}
        scores = {k: self.score_val(v) for k, v in nets.items()}
        chosen = "teacher" if self.cfg.eval_teacher else "student"
        self._eval_state = nets[chosen].state_dict() if self.cfg.bn_recalibrate else None
        return {**scores[chosen], "student_mean_dice": scores["student"]["mean_dice"],
                "teacher_mean_dice": scores["teacher"]["mean_dice"]}

    def temperature(self, target: str, default: float) -> float:
        """A contrastive temperature at the current iteration: ATS (cosine) when on for `target`, else fixed."""
        cfg = self.cfg
        if cfg.ats and target in cfg.ats_targets.split(","):
            return ats_temperature(self.iteration, cfg.ats_period or cfg.iterations, cfg.tau_min, cfg.tau_max)
        return default

    def apply_deferred(self, name: str, tensors: tuple) -> None:
        self.banks[name].push(*tensors)

    def after_step(self, iteration: int) -> None:
        self.teacher.update(self._teacher_source(), iteration)

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "banks": self.banks.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.banks.load_state_dict(state["banks"])


class GlobalPretrainer(_TeacherStage):
    """Stage i: z_s = pred(proj(pool(bottleneck_s))) against z_t = proj_t(pool(bottleneck_t)) over a FIFO bank
    of past z_t (soft_contrastive_loss, tau_s / tau_t)."""

    stage = "pretrain-global"
    teacher_keys = ("net", "proj")

    def build_heads(self) -> dict:
        d = self.cfg.global_dim
        return {"proj": ProjectionHead(self.bottleneck, d, d), "pred": PredictorHead(d, d)}

    def build_banks(self) -> dict:
        return {"global": teacher_bank(self.cfg.global_bank, self.cfg.global_dim)}

    def prepare(self, batch, generator):
        """Two views per image: one geometric augmentation shared (maps stay pixel-aligned), photometric per view."""
        aug = self.augment
        x_l, y_l, _ = aug.geometric(batch["image_l"], batch["label_l"], generator=generator)
        views = {"label_l": y_l}
        parts = [("l", x_l)] + ([("u", aug.geometric(batch["image_u"], generator=generator)[0])]
                                if "image_u" in batch else [])
        for part, x in parts:
            views[f"student_{part}"] = aug.photometric(x, generator=generator)[0]
            views[f"teacher_{part}"] = aug.photometric(x, generator=generator)[0]
        return views

    @staticmethod
    def _both(views, who):
        return torch.cat([views[k] for k in (f"{who}_l", f"{who}_u") if k in views])

    def distill_global(self, bott_s, bott_t):
        with torch.no_grad(), self.teacher_statistics():
            z_t = self.teacher.module["proj"](bott_t)
        z_s = self.model["pred"](self.model["proj"](bott_s))
        self.defer("global", z_t)
        return distillation_loss(z_s, z_t, self.banks["global"], self.temperature("global", self.cfg.tau_student),
                                 self.cfg.tau_teacher)

    def compute_losses(self, views, generator):
        _, _, bott_s = self.model["net"](self._both(views, "student"), return_features=True)
        with torch.no_grad(), self.teacher_statistics():
            _, _, bott_t = self.teacher.module["net"](self._both(views, "teacher"), return_features=True)
        loss = self.distill_global(bott_s, bott_t)
        return {"loss": self.cfg.global_weight * loss, "global": loss}


class LocalPretrainer(GlobalPretrainer):
    """Stage ii: L_sup on the labelled part + L_global + L_local, the local term on a local_grid x local_grid map of
    per-location embeddings (RepresentationHead over the decoder features) against a FIFO bank of teacher ones."""

    stage = "pretrain-local"
    teacher_keys = ("net", "proj", "local")

    def build_heads(self) -> dict:
        return {**super().build_heads(), "local": RepresentationHead(self.decoder, self.cfg.local_dim,
                                                                     dims=self.cfg.dims)}

    def build_banks(self) -> dict:
        return {**super().build_banks(), "local": teacher_bank(self.cfg.local_bank, self.cfg.local_dim)}

    def local_grid_shape(self, spatial) -> tuple[int, ...]:
        """The local embedding map's size: local_grid x local_grid in-plane; in 3D the depth scaled alike (at
        least 1): a 16 x 96 x 96 patch with local_grid 16 -> 2 x 16 x 16."""
        n = self.cfg.local_grid
        return (n, n) if len(spatial) == 2 else (max(1, spatial[0] * n // spatial[-1]), n, n)

    def compute_losses(self, views, generator):
        cfg = self.cfg
        y_l = views["label_l"]
        # one student pass gives the logits (supervised part) and the features (both distillation terms)
        logits, feats_s, bott_s = self.model["net"](self._both(views, "student"), return_features=True)
        grid = self.local_grid_shape(views["label_l"].shape[1:])
        with torch.no_grad(), self.teacher_statistics():
            _, feats_t, bott_t = self.teacher.module["net"](self._both(views, "teacher"), return_features=True)
            local_t = self.teacher.module["local"](feats_t, size=grid)
        glob = self.distill_global(bott_s, bott_t)
        local_s = self.model["local"](feats_s, size=grid)
        local = distillation_loss(local_s, local_t, self.banks["local"], self.temperature("local", cfg.tau_student),
                                  cfg.tau_teacher)
        sup = supervised_loss(logits[:len(y_l)], y_l, self.augment.config.ignore_index)
        rows = rows_of(local_t)
        pick = torch.randperm(rows.shape[0], generator=generator, device=generator.device)[:cfg.local_push]
        self.defer("local", rows[pick.to(rows.device)])
        loss = sup["sup"] + cfg.global_weight * glob + cfg.local_weight * local
        return {"loss": loss, "sup": sup["sup"], "global": glob, "local": local}


class StudentPass(NamedTuple):
    """What one stage-iii student pass gives the loss terms: logits (B_l + B_u, C, *S) and decoder features of
    [labelled; unlabelled] views, the anatomical-contrast grid's labels (B_l + B_u, *s) (-1: not valid) and its
    size s."""

    logits: torch.Tensor
    feats: list
    grid_labels: torch.Tensor
    grid: tuple


class Finetuner(_TeacherStage):
    """Stage iii: L_sup + unsup_weight L_unsup (teacher pseudo-labels, augmented jointly with their confidences,
    cutmix) + anco_weight L_anco (anatomical contrast on a representation map at size / rep_stride). Variants add
    terms through more_losses (ACTION++: PlusPlusFinetuner). BatchNorm as in the ReCo code this stage follows: the
    teacher labels the clean unlabelled batch with that batch's statistics (teacher_bn "batch"), the student sees
    labelled and unlabelled images in separate forwards (split_bn); with running statistics and one mixed forward
    the loop collapsed on this project's CPU runs (benchmarks/RESULTS.md). The pseudo-label loss (unsup_loss, on pixels
    whose confidence >= pseudo_threshold), the student's unlabelled view (unlabelled_view "strong": a strong
    photometric pass after the joint augmentation) and cutmix (cutmix_p, cutmix_pairing, cutmix_area) are options;
    every log step records what the pseudo-labels give (pseudo_label_diagnostics; with audit_pseudo_labels, their
    Dice against the unlabelled images' ground truth, which reaches no loss)."""

    stage = "finetune"

    def build_heads(self) -> dict:
        return {"rep": RepresentationHead(self.decoder, self.cfg.rep_dim, dims=self.cfg.dims)}

    def setup(self) -> None:
        super().setup()
        cfg = self.cfg
        self.pseudo_threshold = cfg.strong_threshold if cfg.pseudo_threshold is None else cfg.pseudo_threshold
        strong = {**STRONG_PHOTOMETRIC, **cfg.strong_augmentation,
                  "ignore_index": self.augment.config.ignore_index}
        self.strong = Augment(AugmentConfig(**strong)) if cfg.unlabelled_view == "strong" else None

    def batch(self, t: int) -> dict:
        """The trainer's batch; with audit_pseudo_labels also the unlabelled slices' ground truth ("truth_u"), which
        prepare turns into logged numbers and drops (it never reaches a view or a loss)."""
        out = super().batch(t)
        if self.cfg.audit_pseudo_labels and "image_u" in out:
            out["truth_u"] = self.data.unlabelled_truth[self.sampler.batch(t)[1]].to(self.device)
        return out

    def prepare(self, batch, generator):
        """Teacher pseudo-labels and confidences of the un-augmented unlabelled images, then one augmentation
        applied jointly to images, labels, pseudo-labels and confidences, the strong view's photometric pass on the
        unlabelled images (unlabelled_view "strong"), then cutmix among unlabelled images."""
        cfg, aug = self.cfg, self.augment
        truth = batch.pop("truth_u", None)
        net_t = self.teacher.module["net"]
        with torch.no_grad(), self.teacher_statistics():
            p_u = net_t(batch["image_u"]).float().softmax(1)
            conf_u, y_u = p_u.max(1)
        audit = {} if truth is None else pseudo_label_audit(y_u, conf_u, truth, self.pseudo_threshold,
                                                              cfg.num_classes)
        x_l, y_l, _ = aug(batch["image_l"], batch["label_l"], generator=generator)
        x_u, y_u, conf_u = aug(batch["image_u"], y_u, conf_u, generator=generator)
        if self.strong is not None:
            x_u, y_u, conf_u = self.strong.photometric(x_u, y_u, conf_u, generator=generator)
        if cfg.cutmix_p > 0:
            x_u, y_u, conf_u, _, _ = cutmix(x_u, y_u, conf_u, generator=generator, p=cfg.cutmix_p,
                                            area=tuple(cfg.cutmix_area), pairing=cfg.cutmix_pairing)
        return {"image_l": x_l, "label_l": y_l, "image_u": x_u, "pseudo_u": y_u, "conf_u": conf_u, "audit": audit}

    def unsup_weight(self) -> float:
        """unsup_weight, ramped up as exp(-5 (1 - t/R)^2) over the first R = unsup_rampup iterations (the
        mean-teacher ramp: early pseudo-labels of an undertrained teacher count little)."""
        cfg = self.cfg
        if cfg.unsup_rampup <= 0 or self.iteration >= cfg.unsup_rampup:
            return cfg.unsup_weight
        return cfg.unsup_weight * math.exp(-5.0 * (1.0 - self.iteration / cfg.unsup_rampup) ** 2)

    def grid_targets(self, views, logits):
        """Labels (-1: not valid) and detached probabilities at the centres of the grid cells of rep_stride pixels
        along every spatial axis: labelled pixels, and unlabelled ones whose teacher confidence >= weak_threshold."""
        cfg, ignore = self.cfg, self.augment.config.ignore_index
        s = cfg.rep_stride
        centres = (slice(s // 2, None, s),) * (logits.dim() - 2)
        y_u = torch.where(views["conf_u"] >= cfg.weak_threshold, views["pseudo_u"],
                          torch.full_like(views["pseudo_u"], ignore))
        y_small = torch.cat([views["label_l"], y_u])[(slice(None), *centres)]
        y_small = torch.where(y_small == ignore, torch.full_like(y_small, -1), y_small)
        probs = logits.detach().float().softmax(1)[(slice(None), slice(None), *centres)]
        return y_small, probs

    def student_forward(self, x_l, x_u):
        """Logits and decoder features of [x_l; x_u]: two forwards with split_bn (each BatchNorm normalises
        labelled and unlabelled images with their own statistics), else one mixed forward."""
        net = self.model["net"]
        if not self.cfg.split_bn:
            logits, feats, _ = net(torch.cat([x_l, x_u]), return_features=True)
            return logits, feats
        (logits_l, feats_l, _), (logits_u, feats_u, _) = (net(x, return_features=True) for x in (x_l, x_u))
        return torch.cat([logits_l, logits_u]), [torch.cat(f) for f in zip(feats_l, feats_u)]

    def compute_losses(self, views, generator):
        cfg, ignore = self.cfg, self.augment.config.ignore_index
        x_l = views["image_l"]
        B = x_l.shape[0]
        logits, feats = self.student_forward(x_l, views["image_u"])
        sup = supervised_loss(logits[:B], views["label_l"], ignore)
        pseudo = pseudo_label_terms(logits[B:], views["pseudo_u"], views["conf_u"], self.pseudo_threshold, ignore,
                                    cfg.unsup_mask, cfg.unsup_loss)
        unsup = pseudo["loss"]
        small = tuple(n // cfg.rep_stride for n in x_l.shape[2:])
        rep = self.model["rep"](feats, size=small)
        y_small, probs = self.grid_targets(views, logits)
        anco = anatomical_term(rep, y_small, probs, cfg.num_classes, per_class=cfg.queries_per_class,
                               strong_threshold=cfg.strong_threshold, tau=self.temperature("anco", cfg.anco_tau),
                               negatives=cfg.negatives, num_negatives=cfg.num_negatives, generator=generator)
        loss = sup["sup"] + self.unsup_weight() * unsup + cfg.anco_weight * anco
        out = {"loss": loss, "sup": sup["sup"], "unsup": unsup, "anco": anco}
        out = self.more_losses(out, views, StudentPass(logits, feats, y_small, small), generator)
        return {**out, **self.diagnostics(views, pseudo)}

    def diagnostics(self, views: dict, pseudo: dict) -> dict:
        """What this step's pseudo-labels gave (logged, detached): pseudo_label_diagnostics of the student's
        unlabelled view, the foreground share of the pseudo-label loss (pl_fg_share) and the audit's numbers."""
        cfg = self.cfg
        out = pseudo_label_diagnostics(views["pseudo_u"], views["conf_u"], self.pseudo_threshold, cfg.num_classes,
                                       self.augment.config.ignore_index)
        total = pseudo["loss"].detach()
        out["pl_fg_share"] = torch.where(total > 0, pseudo["foreground"].detach() / total.clamp_min(1e-30),
                                         torch.zeros_like(total))
        return {**out, **{k: torch.tensor(v) for k, v in views.get("audit", {}).items()}}

    def more_losses(self, out: dict, views: dict, student: StudentPass, generator: torch.Generator) -> dict:
        """Hook for variants: further terms from this step's student pass, added to out["loss"] and logged under
        their names; returns out. The plain stage adds none."""
        return out


class PlusPlusFinetuner(Finetuner):
    """ACTION++'s fine-tuning (docs/method.md section 7): stage iii + saacl_weight L_saacl on labelled grid pixels
    (a student "saacl" head against a queue of teacher "saacl" features, class centres assigned by the Hungarian
    algorithm); its temperatures follow ATS when cfg.ats. The same stage as Finetuner ("finetune": checkpoints,
    --init and --resume are interchangeable in name), registered as "finetune+plusplus"."""

    teacher_keys = ("net", "saacl")

    def build_heads(self) -> dict:
        return {**super().build_heads(), "saacl": RepresentationHead(self.decoder, self.cfg.saacl_dim,
                                                                     dims=self.cfg.dims)}

    def build_banks(self) -> dict:
        cfg = self.cfg
        centres = class_centres(cfg.num_classes, cfg.saacl_dim, cfg.tau_min)
        return {"saacl": SaaclState(cfg.num_classes, cfg.saacl_dim, cfg.saacl_queue, centres, cfg.saacl_eta)}

    def apply_deferred(self, name: str, tensors: tuple) -> None:
        if name == "saacl_queue":
            self.banks["saacl"].push(*tensors)
        elif name == "saacl_means":
            self.banks["saacl"].update_means(*tensors)
        else:
            super().apply_deferred(name, tensors)

    def more_losses(self, out: dict, views: dict, student: StudentPass, generator: torch.Generator) -> dict:
        x_l = views["image_l"]
        saacl = self.saacl_term(student.feats, x_l, student.grid_labels[:x_l.shape[0]], student.grid, generator)
        out["loss"] = out["loss"] + self.cfg.saacl_weight * saacl
        out["saacl"] = saacl
        return out

    def saacl_term(self, feats, view_l, y_small_l, small, generator):
        """L_saacl on the labelled images' grid pixels (queries sampled per class); defers the running-mean update
        and the queue push of the teacher's features of the same pixels."""
        cfg = self.cfg
        B = view_l.shape[0]
        emb = self.model["saacl"]([f[:B] for f in feats], size=small)
        rows = rows_of(emb)
        y = y_small_l.reshape(-1)
        with torch.no_grad(), self.teacher_statistics():
            _, feats_t, _ = self.teacher.module["net"](view_l, return_features=True)
            rows_t = rows_of(self.teacher.module["saacl"](feats_t, size=small))
        state = self.banks["saacl"]
        q = sample_hard_queries(y, torch.zeros(y.numel(), cfg.num_classes, device=y.device), cfg.num_classes,
                                cfg.queries_per_class, 1.0, generator)  # every valid pixel is a candidate
        loss = saacl_loss(rows[q], y[q], state.queue, state.queue_labels, state.centres, state.assignment(),
                          self.temperature("saacl", cfg.saacl_tau), cfg.lambda_a)
        keep = torch.nonzero(y >= 0)[:, 0]
        self.defer("saacl_means", rows[keep], y[keep])
        pick = keep[torch.randperm(keep.numel(), generator=generator, device=generator.device)[:cfg.saacl_push]
                    .to(keep.device)]
        self.defer("saacl_queue", rows_t[pick], y[pick])
        return loss


# stage -> Trainer class; "<stage>+<variant>" -> a variant of that stage, chosen by the config switch of its name
STAGE_TRAINERS = {**{cls.stage: cls for cls in (Trainer, GlobalPretrainer, LocalPretrainer, Finetuner)},
                  f"{PlusPlusFinetuner.stage}+plusplus": PlusPlusFinetuner}  # keys: action.config.TRAINED_STAGES
VARIANTS = ("plusplus",)  # config switches (bool fields of TrainConfig) that select a registered variant


def trainer_class(cfg: TrainConfig) -> type[Trainer]:
    """The Trainer class of cfg.stage, or of its registered variant when the variant's switch is on (cfg.plusplus:
    "finetune+plusplus"; a stage without that variant ignores the switch)."""
    if cfg.stage not in STAGE_TRAINERS:
        stages = sorted(s for s in STAGE_TRAINERS if "+" not in s)
        raise ValueError(f"stage {cfg.stage!r} has no trainer; choose from {stages}")
    for variant in VARIANTS:
        key = f"{cfg.stage}+{variant}"
        if getattr(cfg, variant) and key in STAGE_TRAINERS:
            return STAGE_TRAINERS[key]
    return STAGE_TRAINERS[cfg.stage]


def run_pipeline(cfg: TrainConfig, resume: bool | str = False, progress: bool = True, overwrite: bool = False,
                 force: bool = False) -> dict:
    """Stages i, ii, iii in order into <out>/<stage>/, each initialised from the previous stage's best.pt (its best
    validated eval weights: the EMA teacher's with eval_teacher; the last model when it did not validate; the first
    stage from cfg.init when given). With resume, a finished stage (last.pt at its final iteration) is skipped,
    an interrupted one continues and a later one starts (resume=True with no stage's last.pt at all is an error:
    nothing to resume). overwrite and force go to every stage's fit. Returns {stage: fit result}."""
    lasts = [os.path.join(cfg.out, stage, "last.pt") for stage in PIPELINE]
    if resume is True and not any(os.path.isfile(p) for p in lasts):
        raise FileNotFoundError(f"--resume: nothing to resume: no stage of the pipeline in {cfg.out} has a last.pt "
                                f"({', '.join(lasts)}); check --out, or start a new run without --resume")
    results, init = {}, cfg.init
    for stage in PIPELINE:
        iterations = cfg.stage_iterations[stage]
        sub = dataclasses.replace(cfg, stage=stage, out=os.path.join(cfg.out, stage), iterations=iterations,
                                  init=init, test_at_end=cfg.test_at_end and stage == PIPELINE[-1],
                                  nesterov=cfg.nesterov or stage == "finetune",  # the reference's stage iii
                                  val_every=0 if stage == "pretrain-global" else cfg.val_every)
        last = os.path.join(sub.out, "last.pt")
        if resume and os.path.isfile(last) and load_checkpoint(last)["iteration"] >= iterations:
            print(f"pipeline: {stage} already finished ({last}); skipping", flush=True)
            results[stage] = {"skipped": True}
        else:
            print(f"pipeline: stage {stage}, {iterations} iterations -> {sub.out}", flush=True)
            results[stage] = trainer_class(sub)(sub, progress=progress).fit(
                resume="auto" if resume else False, overwrite=overwrite, force=force)
        best = os.path.join(sub.out, "best.pt")  # the last model when the stage did not validate
        init = best if os.path.isfile(best) else last
    return results

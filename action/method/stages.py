"""The three ACTION stages as Trainer variants (method.md section 6), and the pipeline that runs them in order.

    pretrain-global (i)   L_global                      all images, labels unused
    pretrain-local  (ii)  L_sup + L_global + L_local    labelled + unlabelled
    finetune        (iii) L_sup + L_unsup + 0.01 L_anco labelled + unlabelled

Views: one geometric augmentation per image shared by student and teacher (so maps stay pixel-aligned for the
local loss), independent photometric augmentation per view. Teachers are EMA copies (of the network and of the
heads whose outputs they provide), updated once per iteration under no_grad, always in eval mode. Banks are FIFO
buffers pushed after the optimizer step. Each stage initialises from the previous stage's checkpoint (--init);
fine-tuning initialises student and teacher from the pre-trained student.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from action.config import PIPELINE, TrainConfig
from action.data.augment import cutmix
from action.engine.checkpoint import load_checkpoint
from action.engine.losses import supervised_loss
from action.engine.trainer import Trainer
from action.method.losses import (FifoBank, anatomical_term, distillation_loss, pseudo_label_loss,
                                  sample_hard_queries)
from action.method.plusplus import SaaclState, ats_temperature, class_centres, saacl_loss
from action.models import EMATeacher, PredictorHead, ProjectionHead, RepresentationHead, UNet2D
from action.models.unet import CHANNELS

BOTTLENECK = CHANNELS[-1]  # 256 channels into the projection head
DECODER = CHANNELS[3::-1]  # (128, 64, 32, 16): the decoder features, coarse to fine


class _TeacherStage(Trainer):
    """Shared machinery: a ModuleDict student {"net": UNet2D, heads...}, an EMA teacher of `teacher_keys`."""

    uses_unlabelled = True
    teacher_keys: tuple[str, ...] = ("net",)

    def build_model(self) -> nn.Module:
        return nn.ModuleDict({"net": UNet2D(1, self.cfg.num_classes), **self.build_heads()})

    def build_heads(self) -> dict:
        return {}

    def setup(self) -> None:
        self.teacher = EMATeacher(self._teacher_source(), self.cfg.ema_decay).to(self.device)
        self.banks = nn.ModuleDict(self.build_banks()).to(self.device)
        self._pending = {}

    def build_banks(self) -> dict:
        return {}

    def _teacher_source(self) -> nn.ModuleDict:
        return nn.ModuleDict({k: self.model[k] for k in self.teacher_keys})

    def eval_model(self) -> nn.Module:
        return self.model["net"]

    def temperature(self, target: str, default: float) -> float:
        """A contrastive temperature at the current iteration: ATS (cosine) when on for `target`, else fixed."""
        cfg = self.cfg
        if cfg.ats and target in cfg.ats_targets.split(","):
            return ats_temperature(self.iteration, cfg.ats_period or cfg.iterations, cfg.tau_min, cfg.tau_max)
        return default

    def after_step(self, iteration: int) -> None:
        self.teacher.update(self._teacher_source(), iteration)
        for name, rows in self._pending.items():
            self.banks[name].push(rows)
        self._pending = {}

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "banks": self.banks.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.banks.load_state_dict(state["banks"])

    def views(self, batch: dict, generator: torch.Generator):
        """-> (student view, teacher view, labels of the labelled part): geometry shared, photometry per view."""
        aug = self.augment
        x_l, y_l, _ = aug.geometric(batch["image_l"], batch["label_l"], generator=generator)
        x_u = aug.geometric(batch["image_u"], generator=generator)[0] if "image_u" in batch else x_l[:0]
        x = torch.cat([x_l, x_u])
        return aug.photometric(x, generator=generator)[0], aug.photometric(x, generator=generator)[0], y_l


class GlobalPretrainer(_TeacherStage):
    """Stage i: z_s = pred(proj(pool(bottleneck_s))) against z_t = proj_t(pool(bottleneck_t)) over a FIFO bank
    of past z_t (soft_contrastive_loss, tau_s / tau_t)."""

    stage = "pretrain-global"
    teacher_keys = ("net", "proj")

    def build_heads(self) -> dict:
        d = self.cfg.global_dim
        return {"proj": ProjectionHead(BOTTLENECK, d, d), "pred": PredictorHead(d, d)}

    def build_banks(self) -> dict:
        return {"global": FifoBank(self.cfg.global_bank, self.cfg.global_dim)}

    def global_terms(self, view_s, view_t):
        _, feats_s, bott_s = self.model["net"](view_s, return_features=True)
        with torch.no_grad():
            _, feats_t, bott_t = self.teacher.module["net"](view_t, return_features=True)
            z_t = self.teacher.module["proj"](bott_t)
        z_s = self.model["pred"](self.model["proj"](bott_s))
        loss = distillation_loss(z_s, z_t, self.banks["global"], self.temperature("global", self.cfg.tau_student),
                                 self.cfg.tau_teacher)
        self._pending["global"] = z_t
        return loss, feats_s, feats_t

    def training_step(self, batch, generator):
        view_s, view_t, _ = self.views(batch, generator)
        loss, _, _ = self.global_terms(view_s, view_t)
        return {"loss": self.cfg.global_weight * loss, "global": loss}


class LocalPretrainer(GlobalPretrainer):
    """Stage ii: L_sup on the labelled part + L_global + L_local, the local term on a local_grid x local_grid map of
    per-location embeddings (RepresentationHead over the decoder features) against a FIFO bank of teacher ones."""

    stage = "pretrain-local"
    teacher_keys = ("net", "proj", "local")

    def build_heads(self) -> dict:
        return {**super().build_heads(),
                "local": RepresentationHead(DECODER, self.cfg.local_dim, dims=2)}

    def build_banks(self) -> dict:
        return {**super().build_banks(), "local": FifoBank(self.cfg.local_bank, self.cfg.local_dim)}

    def training_step(self, batch, generator):
        cfg = self.cfg
        view_s, view_t, y_l = self.views(batch, generator)
        # one student pass gives the logits (supervised part) and the features (both distillation terms)
        logits, feats_s, bott_s = self.model["net"](view_s, return_features=True)
        with torch.no_grad():
            _, feats_t, bott_t = self.teacher.module["net"](view_t, return_features=True)
            z_t = self.teacher.module["proj"](bott_t)
            grid = (cfg.local_grid, cfg.local_grid)
            local_t = self.teacher.module["local"](feats_t, size=grid)
        z_s = self.model["pred"](self.model["proj"](bott_s))
        glob = distillation_loss(z_s, z_t, self.banks["global"], self.temperature("global", cfg.tau_student),
                                 cfg.tau_teacher)
        local_s = self.model["local"](feats_s, size=grid)
        local = distillation_loss(local_s, local_t, self.banks["local"], self.temperature("local", cfg.tau_student),
                                  cfg.tau_teacher)
        sup = supervised_loss(logits[:len(y_l)], y_l, self.augment.config.ignore_index)
        rows = local_t.permute(0, 2, 3, 1).reshape(-1, cfg.local_dim)
        pick = torch.randperm(rows.shape[0], generator=generator, device=generator.device)[:cfg.local_push]
        self._pending = {"global": z_t, "local": rows[pick.to(rows.device)]}
        loss = sup["sup"] + cfg.global_weight * glob + cfg.local_weight * local
        return {"loss": loss, "sup": sup["sup"], "global": glob, "local": local}


class Finetuner(_TeacherStage):
    """Stage iii: L_sup + unsup_weight L_unsup (teacher pseudo-labels, augmented jointly with their confidences,
    cutmix) + anco_weight L_anco (anatomical contrast on a representation map at size / rep_stride).
    ACTION++ (plusplus): + saacl_weight L_saacl on labelled grid pixels (student "saacl" head against a queue of
    teacher "saacl" features, class centres assigned by the Hungarian algorithm), temperatures from ATS."""

    stage = "finetune"

    @property
    def teacher_keys(self):
        return ("net", "saacl") if self.cfg.plusplus else ("net",)

    def build_heads(self) -> dict:
        heads = {"rep": RepresentationHead(DECODER, self.cfg.rep_dim, dims=2)}
        if self.cfg.plusplus:
            heads["saacl"] = RepresentationHead(DECODER, self.cfg.saacl_dim, dims=2)
        return heads

    def build_banks(self) -> dict:
        if not self.cfg.plusplus:
            return {}
        cfg = self.cfg
        centres = class_centres(cfg.num_classes, cfg.saacl_dim, cfg.tau_min)
        return {"saacl": SaaclState(cfg.num_classes, cfg.saacl_dim, cfg.saacl_queue, centres, cfg.saacl_eta)}

    def saacl_term(self, feats, view_l, y_small_l, small, generator):
        """L_saacl on the labelled images' grid pixels; queues the teacher's features of the same pixels."""
        cfg = self.cfg
        B = view_l.shape[0]
        emb = self.model["saacl"]([f[:B] for f in feats], size=small)
        rows = emb.permute(0, 2, 3, 1).reshape(-1, cfg.saacl_dim)
        y = y_small_l.reshape(-1)
        with torch.no_grad():
            _, feats_t, _ = self.teacher.module["net"](view_l, return_features=True)
            rows_t = self.teacher.module["saacl"](feats_t, size=small).permute(0, 2, 3, 1).reshape(-1, cfg.saacl_dim)
        state = self.banks["saacl"]
        valid = y >= 0
        state.update_means(rows.detach()[valid], y[valid])
        q = sample_hard_queries(y, torch.zeros(y.numel(), cfg.num_classes, device=y.device), cfg.num_classes,
                                cfg.queries_per_class, 1.0, generator)  # every valid pixel is a candidate
        loss = saacl_loss(rows[q], y[q], state.queue, state.queue_labels, state.centres, state.assignment(),
                          self.temperature("saacl", cfg.saacl_tau), cfg.lambda_a)
        keep = torch.nonzero(valid)[:, 0]
        pick = keep[torch.randperm(keep.numel(), generator=generator, device=generator.device)[:cfg.saacl_push]
                    .to(keep.device)]
        self._pending_saacl = (rows_t[pick], y[pick])
        return loss

    def after_step(self, iteration: int) -> None:
        super().after_step(iteration)
        pending = getattr(self, "_pending_saacl", None)
        if pending is not None:
            self.banks["saacl"].push(*pending)
            self._pending_saacl = None

    def training_step(self, batch, generator):
        cfg, aug = self.cfg, self.augment
        ignore = aug.config.ignore_index
        with torch.no_grad():  # pseudo-labels from the un-augmented unlabelled images
            p_u = self.teacher.module["net"](batch["image_u"]).float().softmax(1)
            conf_u, y_u = p_u.max(1)
        x_l, y_l, _ = aug(batch["image_l"], batch["label_l"], generator=generator)
        x_u, y_u, conf_u = aug(batch["image_u"], y_u, conf_u, generator=generator)
        if cfg.cutmix_p > 0:
            x_u, y_u, conf_u, _, _ = cutmix(x_u, y_u, conf_u, generator=generator, p=cfg.cutmix_p)
        B = x_l.shape[0]
        logits, feats, _ = self.model["net"](torch.cat([x_l, x_u]), return_features=True)
        sup = supervised_loss(logits[:B], y_l, ignore)
        unsup = pseudo_label_loss(logits[B:], y_u, conf_u, cfg.strong_threshold, ignore)
        # anatomical contrast on a coarse grid: labels and probabilities sampled at the grid cells' centres
        s = cfg.rep_stride
        small = (cfg.size // s, cfg.size // s)
        rep = self.model["rep"](feats, size=small)
        y_all = torch.cat([y_l, torch.where(conf_u >= cfg.weak_threshold, y_u, torch.full_like(y_u, ignore))])
        y_small = y_all[:, s // 2::s, s // 2::s]
        y_small = torch.where(y_small == ignore, torch.full_like(y_small, -1), y_small)
        probs = logits.detach().float().softmax(1)[:, :, s // 2::s, s // 2::s]
        anco = anatomical_term(rep, y_small, probs, cfg.num_classes, per_class=cfg.queries_per_class,
                               strong_threshold=cfg.strong_threshold, tau=self.temperature("anco", cfg.anco_tau),
                               negatives=cfg.negatives, num_negatives=cfg.num_negatives, generator=generator)
        loss = sup["sup"] + cfg.unsup_weight * unsup + cfg.anco_weight * anco
        out = {"loss": loss, "sup": sup["sup"], "unsup": unsup, "anco": anco}
        if cfg.plusplus:
            saacl = self.saacl_term(feats, x_l, y_small[:B], small, generator)
            out["loss"] = loss + cfg.saacl_weight * saacl
            out["saacl"] = saacl
        return out


STAGE_TRAINERS = {"supervised": Trainer, "pretrain-global": GlobalPretrainer, "pretrain-local": LocalPretrainer,
                  "finetune": Finetuner}


def run_pipeline(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Stages i, ii, iii in order into <out>/<stage>/, each initialised from the previous stage's last.pt (the
    first from cfg.init when given). With resume, a finished stage (last.pt at its final iteration) is skipped
    and an interrupted one continues. Returns {stage: fit result}."""
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
            results[stage] = STAGE_TRAINERS[stage](sub, progress=progress).fit(resume=resume)
        init = last
    return results

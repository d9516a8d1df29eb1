"""The training loop shared by every stage. A stage is a Trainer subclass overriding these hooks (each is called
by the loop; tests/test_engine.py overrides every one and checks that it is):

    build_data()        the training images in memory (action.data.training)           -> SliceData / VolumeData
    build_model()       the network (and heads) to train                               -> nn.Module
    setup()             after the model holds its initial weights: teachers, banks
    trainable_parameters()  what the optimizer updates
    prepare(b, g)       global preparation of batch b: augmentation, pseudo-labels, mixing -> views (dict)
    compute_losses(v, g) the losses of (a shard of) the views       -> {"loss": total, term: value, ...}
    apply_deferred(name, tensors)   push what compute_losses deferred (defer(name, *t)) into banks/queues, after
                        the optimizer step (each shard's, in global shard order)
    after_step(it)      per-iteration bookkeeping (EMA update)
    extra_state() / load_extra_state(d)   what a checkpoint must hold beyond model and optimizer (EMA, banks)
    eval_model()        the network validation and testing use

Determinism: batch t is a pure function of (seed, t) (TwoStreamSampler); the augmentation generator and torch's
global RNG (dropout) are re-seeded from run_seed(seed, t) at every iteration. A run resumed from a checkpoint at
iteration t therefore computes exactly the iterations an uninterrupted run would have. Checkpoints (atomic,
weights_only) hold model, optimizer, scheduler, extra state, iteration and the best validation score.

Faults (docs/failure-behaviour.md): every file the run will read (training slices, validation and test volumes) is
read and checked before iteration 0. A non-finite loss term or gradient stops the step before any state changes:
the BatchNorm buffers its forward moved are put back, gradients and deferred bank updates dropped, so the
optimizer, scheduler, scaler, EMA teacher and banks are those before the iteration; that state is saved (when it
is finite; else the last checkpoint is kept) and FloatingPointError names the iteration, the terms or parameters,
and the batch's files. SIGINT, SIGTERM and SIGHUP finish the current iteration, save last.pt and raise
Interrupted. A run folder holding a run is refused unless resumed (same options, or force) or overwritten.

Sharding (action.engine.distributed): views whose key ends in "_l" are cut along the labelled batch, "_u" along the
unlabelled one, into world x accumulate contiguous shards; each shard's losses use their own generator seeded
from (seed, t, shard). Under torchrun every rank computes its shards inside DistributedDataParallel
(shard_losses), which averages the gradients across ranks; rank 0 alone validates, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time

import torch
from torch import nn

from action.config import TrainConfig, resume_differences
from action.data import preprocessing as preprocessing_of
from action.data.augment import Augment, AugmentConfig
from action.data.sampling import TwoStreamSampler, run_seed
from action.data.training import check_volumes, training_data
from action.engine import distributed as dist_utils
from action.engine.checkpoint import (
    align_keys,
    check_same_model,
    clean_stale_temporaries,
    eval_weights,
    load_checkpoint,
    save_checkpoint,
)
from action.engine.device import resolve_device
from action.engine.evaluate import evaluate, fast_dice
from action.engine.inference import recalibrate_batchnorm, volume_predictor
from action.engine.logs import RunLogger
from action.engine.losses import supervised_loss
from action.models import build_network

# what a finished or interrupted run leaves in its folder: a folder holding any of these holds a run
RUN_FILES = ("config.json", "last.pt", "best.pt", "train.csv", "val.csv", "tensorboard", "test")
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal (Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP) after saving
    last.pt; signum is the signal (the command line exits with 128 + signum)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def run_files(folder: str) -> list[str]:
    """The RUN_FILES present in `folder` (none when it does not exist)."""
    return [n for n in RUN_FILES if os.path.exists(os.path.join(folder, n))]


class Trainer:
    stage = "supervised"
    uses_unlabelled = False

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg.validate()
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world, local_rank = dist_utils.init_from_env(resolve_device(cfg.device).type)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:  # ranks beyond the GPUs share them (gloo only)
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
        shards = self.world * cfg.accumulate
        for name, n in (("labelled_batch", cfg.labelled_batch), ("unlabelled_batch", cfg.unlabelled_batch)):
            if n % shards:
                raise ValueError(f"{name}={n} must be divisible by world size x accumulate = {shards}")
        self.progress = progress and self.rank == 0
        self.data = self.build_data()
        self.check_evaluation_data()
        self.sampler = TwoStreamSampler(len(self.data.images),
                                        0 if self.data.unlabelled is None else len(self.data.unlabelled),
                                        cfg.labelled_batch, cfg.unlabelled_batch if self.uses_unlabelled else 0,
                                        cfg.seed)
        self.augment = Augment(AugmentConfig(**cfg.augmentation))
        torch.manual_seed(cfg.seed)  # weight initialisation
        self.model = self.build_model().to(self.device)
        if cfg.init:
            self.initialise_from(cfg.init)
        self.setup()
        self.optimizer = torch.optim.SGD(self.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: (1.0 - min(it, cfg.iterations) / cfg.iterations) ** cfg.poly_power)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration, self.best, self.best_iteration = 0, -math.inf, -1
        self._eval_state = None  # the re-estimated network the last validation scored (bn_recalibrate)
        self._deferred: list[tuple[str, tuple]] = []
        self._ddp = None  # DistributedDataParallel over the trained networks, under torchrun (shard_losses)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def build_data(self):
        return training_data(self.cfg, self.uses_unlabelled, self.progress)

    def check_evaluation_data(self) -> None:
        """Reads and checks the volumes validation (when val_every) and the final test (when test_at_end) will
        use, so a bad file stops the run now, not at its first validation or after its last iteration."""
        cfg = self.cfg
        if cfg.val_every:
            check_volumes(self.data.cases, self.data.val_names, "validation")
        if cfg.test_at_end and self.rank == 0:
            check_volumes(self.data.cases, self.data.test_names, "test")

    def build_model(self) -> nn.Module:
        return build_network(self.cfg)

    def setup(self) -> None:
        """After the model exists and holds its initial weights (teachers, banks)."""

    def trainable_parameters(self):
        return self.model.parameters()

    def eval_model(self) -> nn.Module:
        return self.model

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        image, label, _ = self.augment(batch["image_l"], batch["label_l"], generator=generator)
        return {"image_l": image, "label_l": label}

    def compute_losses(self, views: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        losses = supervised_loss(self.model(views["image_l"]), views["label_l"], self.augment.config.ignore_index)
        return {"loss": losses["sup"], "ce": losses["ce"], "dice_loss": losses["dice"]}

    def apply_deferred(self, name: str, tensors: tuple) -> None:
        raise NotImplementedError(f"{type(self).__name__} deferred {name!r} but does not apply it")

    def after_step(self, iteration: int) -> None:
        pass

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- machinery -----------------------------------------------------------------------------------------------
    def defer(self, name: str, *tensors: torch.Tensor) -> None:
        """Called by compute_losses: detached tensors for apply_deferred, after the optimizer step."""
        self._deferred.append((name, tuple(t.detach() for t in tensors)))

    def batch_losses(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """prepare + compute_losses on a whole batch as one shard, without backward or optimizer step (tests and
        the train-step benchmark); deferred bank updates stay pending."""
        return self.compute_losses(self.prepare(batch, generator), generator)

    def _amp_dtype(self):
        if self.cfg.amp == "off" or (self.cfg.amp == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16

    def initialise_from(self, path: str) -> None:
        """Model weights from another run's checkpoint (e.g. the previous pipeline stage): the weights it validated
        (eval_weights: the EMA teacher's for an eval_teacher run); strict about shapes, lenient about heads the other
        stage did not have (a teacher brings only the heads it tracks)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--init {path}: checkpoint not found")
        weights = align_keys(eval_weights(load_checkpoint(path)), self.model.state_dict())
        if not weights:
            raise ValueError(f"--init {path}: no parameter of this model is in the checkpoint")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        self.init_report = {"missing": missing, "unexpected": unexpected}

    def batch(self, t: int) -> dict:
        if self.cfg.dims == 3:
            return self.data.patches(self.sampler.batch(t), t, self.device)
        lab, unl = self.sampler.batch(t)
        out = {"image_l": self.data.images[lab].to(self.device), "label_l": self.data.labels[lab].to(self.device)}
        if len(unl):
            out["image_u"] = self.data.unlabelled[unl].to(self.device)
        return out

    def shard(self, views: dict, index: int, count: int) -> dict:
        """The index-th of count contiguous shards of the views ("_l" keys by the labelled batch, "_u" keys by the
        unlabelled one, anything else whole)."""
        if count == 1:
            return views
        out = {}
        for key, value in views.items():
            if isinstance(value, torch.Tensor) and key.endswith(("_l", "_u")):
                n = value.shape[0] // count
                out[key] = value[index * n:(index + 1) * n]
            else:
                out[key] = value
        return out

    def step(self, t: int) -> dict[str, float]:
        """One optimisation step at iteration t: prepare the global batch, losses and backward per local shard,
        gradients averaged over all shards, optimizer step, deferred bank updates in shard order, after_step."""
        cfg = self.cfg
        saved_buffers = self._snapshot_buffers()  # before any forward of this step (prepare's included)
        generator = self._generator(t)
        autocast = dict(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                        enabled=self.amp_dtype is not None)
        with torch.autocast(**autocast):
            views = self.prepare(self.batch(t), generator)
        shards = self.world * cfg.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        self._deferred = []
        totals: dict[str, float] = {}
        everything = list(self.model.buffers())
        buffers = [b for b in everything if b.is_floating_point()]
        if cfg.accumulate > 1:  # every shard updates BatchNorm statistics from the same start; then the mean
            start, summed = [b.clone() for b in everything], [torch.zeros_like(b) for b in buffers]
        for j in range(cfg.accumulate):
            index = self.rank * cfg.accumulate + j
            if cfg.accumulate > 1 and j:
                for b, b0 in zip(everything, start):
                    b.copy_(b0)
            base = run_seed(cfg.seed, t)
            torch.manual_seed(base + index * 2**40)  # dropout of this shard, the same on whichever rank runs it
            g = torch.Generator(self.device).manual_seed(base * 1009 + index + 1)  # the shard's own sampling
            with torch.autocast(**autocast):
                losses = self.shard_losses(self.shard(views, index, shards), g, sync=j == cfg.accumulate - 1)
            values = {k: float(v.detach()) for k, v in losses.items()}
            self._check_losses(t, values, views, saved_buffers)
            self.scaler.scale(losses["loss"] / cfg.accumulate).backward()
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.accumulate
            if cfg.accumulate > 1:
                for acc, b in zip(summed, buffers):
                    acc += b
        if cfg.accumulate > 1:
            for b, acc in zip(buffers, summed):
                b.copy_(acc / cfg.accumulate)
        dist_utils.average_buffers(buffers)
        self._check_gradients(t, views, saved_buffers)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for name, tensors in dist_utils.gather_in_order(self._deferred):
            self.apply_deferred(name, tuple(x.to(self.device) for x in tensors))
        self._deferred = []
        self.after_step(t)
        return dist_utils.mean_values(totals)

    # -- the non-finite guard of step(): nothing of the run's state changes in an iteration that produced NaN/inf --
    def _snapshot_buffers(self) -> list[torch.Tensor]:
        """Copies of the model's buffers (BatchNorm running statistics and counters) before the step's forwards."""
        return [b.detach().clone() for b in self.model.buffers()]

    def _check_losses(self, t: int, values: dict[str, float], views: dict, saved: list[torch.Tensor]) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            self._stop_non_finite(t, f"loss term(s) {list(bad)} not finite ({bad})", views, saved)

    def _check_gradients(self, t: int, views: dict, saved: list[torch.Tensor]) -> None:
        """Stops when a gradient holds NaN/inf. Under fp16 autocast the grad scaler owns that case (it skips the
        step and lowers its scale: overflow is expected there), so the check is off with it."""
        if self.scaler.is_enabled():
            return
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch._foreach_norm([g for _, g in named], float("inf"))  # max |g|: NaN and inf propagate
        if bool(torch.isfinite(torch.stack(norms)).all()):
            return
        bad = [n for (n, _), v in zip(named, norms) if not bool(torch.isfinite(v))]
        self._stop_non_finite(t, f"gradient not finite in {len(bad)} parameter(s) (first: {', '.join(bad[:3])}); "
                                 f"every loss term was finite", views, saved)

    def _stop_non_finite(self, t: int, what: str, views: dict, saved: list[torch.Tensor]):
        """Puts back the state before iteration t (buffers restored, gradients and deferred updates dropped),
        saves it when finite, and raises FloatingPointError with the iteration, `what` and the batch's files."""
        with torch.no_grad():
            for b, b0 in zip(self.model.buffers(), saved):
                b.copy_(b0)
        self.optimizer.zero_grad(set_to_none=True)
        self._deferred = []
        state = self.model.state_dict()
        if all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            kept = f"the state before this iteration is saved in {self.save()}"
        else:
            kept = (f"the model was already non-finite before this iteration, so "
                    f"{os.path.join(self.cfg.out, 'last.pt')} is kept as it was")
        raise FloatingPointError(f"iteration {t}: {what}; {self._describe_batch(t, views)}; training stopped, "
                                 f"nothing of this iteration applied: {kept}")

    def _describe_batch(self, t: int, views: dict) -> str:
        """The files of batch t (labelled and unlabelled), those of its images that hold NaN/inf, and the
        prepared views that do (augmentation, teacher outputs)."""
        lab, unl = (i.tolist() for i in self.sampler.batch(t))
        data = self.data
        sources = [("labelled", lab, getattr(data, "names", None), data.images),
                   ("unlabelled", unl, getattr(data, "unlabelled_names", None), data.unlabelled)]
        parts, bad = [], []
        for kind, indices, names, images in sources:
            if not indices:
                continue
            shown = [names[i] for i in indices] if names else [f"#{i}" for i in indices]
            parts.append(f"{kind} {shown}")
            bad += [shown[j] for j, i in enumerate(indices) if not bool(torch.isfinite(images[i]).all())]
        text = "batch files: " + "; ".join(parts)
        text += f"; non-finite input images: {bad}" if bad else "; every input image is finite"
        views_bad = [k for k, v in views.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                     and not bool(torch.isfinite(v).all())]
        if views_bad:
            text += f"; non-finite prepared views: {views_bad}"
        return text
    def shard_losses(self, views: dict, generator: torch.Generator, sync: bool = True) -> dict[str, torch.Tensor]:
        """compute_losses of one shard; under torchrun inside DistributedDataParallel (built at the first call:
        action.engine.distributed.wrap), whose backward all-reduces the gradients unless sync is False (the
        accumulated shards before a process's last)."""
        if not dist_utils.initialized():
            return self.compute_losses(views, generator)
        if self._ddp is None:
            self._ddp = dist_utils.wrap(self.model, self.compute_losses, self.device, self.cfg.sync_bn)
        with contextlib.nullcontext() if sync else self._ddp.no_sync():
            return self._ddp(views, generator)

    def _generator(self, t: int) -> torch.Generator:
        seed = run_seed(self.cfg.seed, t)
        torch.manual_seed(seed)  # dropout and anything else on the global RNG
        return torch.Generator(self.device).manual_seed(seed)

    def checkpoint_state(self) -> dict:
        return {"iteration": self.iteration, "stage": self.stage, "config": self.cfg.to_json(),
                "shards": self.world * self.cfg.accumulate,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "best": self.best, "best_iteration": self.best_iteration, "extra": self.extra_state(),
                "preprocessing": self.preprocessing.to_json()}

    @property
    def preprocessing(self):
        """What the training images went through (action.data.preprocessing), for inference to repeat."""
        if getattr(self, "_preprocessing", None) is None:
            self._preprocessing = preprocessing_of.of_training_data(self.cfg, self.data)
        return self._preprocessing

    def save(self, name: str = "last.pt") -> str:
        """Writes <out>/<name>; best.pt also keeps the network its validation scored when that was a
        BatchNorm-re-estimated copy ("eval_model", read by eval_weights)."""
        path = os.path.join(self.cfg.out, name)
        if self.rank == 0:
            state = self.checkpoint_state()
            if name == "best.pt" and self._eval_state is not None:
                state["eval_model"] = self._eval_state
            save_checkpoint(state, path)
        dist_utils.barrier()
        return path

    def resume(self, path: str | None = None, force: bool = False) -> bool:
        """Loads <out>/last.pt (or `path`); returns False when there is nothing to resume. The checkpoint's run
        must have the same options as this one, apart from those that change no computed value (RESUME_NEUTRAL in
        action.config: location, device, logging, bookkeeping; accumulate may change with the number of ranks as
        long as world size x accumulate, the shard count, stays); otherwise a ValueError lists the differences
        (force=True: resume with them, printed). A checkpoint of another model is a ValueError naming the entries
        that differ."""
        path = path or os.path.join(self.cfg.out, "last.pt")
        if not os.path.isfile(path):
            return False
        state = load_checkpoint(path, map_location=self.device)
        if state.get("stage") != self.stage:
            raise ValueError(f"--resume: {path} is a {state.get('stage')!r} checkpoint, this run is {self.stage!r}")
        changed = resume_differences(state.get("config", "{}"), self.cfg)
        shards = self.world * self.cfg.accumulate  # the computation depends on the shard count, not how it splits
        if state.get("shards", shards) != shards:
            changed["world size x accumulate"] = (state["shards"], shards)
        if changed:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            if not force:
                raise ValueError(f"--resume: this run's options differ from those {path} was trained with ({listed}); "
                                 f"rerun with the same options, add --force to resume with the changes (the run "
                                 f"is then no longer the one an uninterrupted run would have been), or start a new "
                                 f"run in another --out")
            if self.rank == 0:
                print(f"--resume --force: continuing {path} with changed options: {listed}", flush=True)
        check_same_model(state["model"], self.model.state_dict(), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state["extra"])
        self.iteration, self.best, self.best_iteration = state["iteration"], state["best"], state["best_iteration"]
        return True

    def prepare_run_folder(self, resume: bool | str = False, overwrite: bool = False) -> bool:
        """Decides, before anything is written, whether this run resumes (returns True) or starts afresh in
        cfg.out, and removes stale temporary checkpoint files there. resume=True needs <out>/last.pt (else
        FileNotFoundError: nothing to resume); resume="auto" resumes when last.pt exists and starts afresh
        otherwise (one command line for a job that a scheduler may restart); a fresh start into a folder that
        holds a run (RUN_FILES) is refused unless overwrite=True, which deletes that run's files (only those)."""
        out, last = self.cfg.out, os.path.join(self.cfg.out, "last.pt")
        if self.rank == 0:
            for stale in clean_stale_temporaries(out):
                print(f"removed {stale}: a checkpoint write that was killed before it finished", flush=True)
        if resume == "auto":
            resume = os.path.isfile(last)
            # a run stopped before its first checkpoint holds nothing to resume: its logs are replaced
            overwrite = overwrite or not any(os.path.isfile(os.path.join(out, n)) for n in ("last.pt", "best.pt"))
        elif resume not in (True, False):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
        if resume:
            if not os.path.isfile(last):
                found = run_files(out)
                raise FileNotFoundError(f"--resume: nothing to resume: {last} does not exist ("
                                        + (f"{out} holds {found}" if found else f"{out} holds no run") +
                                        "); check --out, or start a new run without --resume")
            return True
        existing = run_files(out)
        if existing and not overwrite:
            raise ValueError(f"--out {out} already holds a run ({', '.join(existing)}); continue it with --resume, "
                             f"replace it with --overwrite, or choose another --out")
        if existing and self.rank == 0:
            import shutil

            for name in existing:
                target = os.path.join(out, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
            print(f"--overwrite: removed {', '.join(existing)} from {out}", flush=True)
        dist_utils.barrier()
        return False

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The network validation and testing run: `model` itself, or with bn_recalibrate a copy whose BatchNorm
        statistics are re-estimated on clean training images (the same batches every time: seeded by cfg.seed)."""
        if not self.cfg.bn_recalibrate:
            return model
        batches = self.data.clean_batches(self.cfg.bn_recalibrate, torch.Generator().manual_seed(self.cfg.seed),
                                          self.device)
        return recalibrate_batchnorm(model, batches)

    def validate(self) -> dict:
        net = self.evaluated(self.eval_model())
        self._eval_state = net.state_dict() if net is not self.eval_model() else None
        return self.score_val(net)

    def score_val(self, model: nn.Module) -> dict:
        """Per-class and mean Dice of `model` over the validation volumes (model left in its train/eval mode)."""
        was_training = model.training
        model.eval()
        predict = volume_predictor(model, self.cfg, self.device, self.preprocessing)
        scores = []
        for case in self.data.cases(self.data.val_names):
            pred = predict(case)
            scores.append(fast_dice(pred, case.label, self.cfg.num_classes))
        model.train(was_training)
        per_class = torch.tensor(scores).mean(0).tolist()
        return {**{f"dice_c{c + 1}": v for c, v in enumerate(per_class)}, "mean_dice": sum(per_class) / len(per_class)}

    def test(self, checkpoint: str | None = None, out_dir: str | None = None, overlays: int = 3):
        """Scores `checkpoint` (default: best.pt, else the current model) on the test volumes."""
        from action.data.acdc import CLASSES

        path = checkpoint or os.path.join(self.cfg.out, "best.pt")
        if os.path.isfile(path):  # the network that checkpoint validated (eval_weights)
            net = copy.deepcopy(self.eval_model())
            net.load_state_dict(align_keys(eval_weights(load_checkpoint(path, self.device)), net.state_dict()))
        else:
            net = self.evaluated(self.eval_model())
        predict = volume_predictor(net.eval(), self.cfg, self.device, self.preprocessing)
        names = self.data.test_names
        classes = getattr(self.data, "class_names", None) or (CLASSES if self.cfg.num_classes == len(CLASSES) else None)
        return evaluate(predict, self.data.cases(names), out_dir or os.path.join(self.cfg.out, "test"),
                        self.cfg.num_classes, classes,
                        overlays=overlays, progress=self.progress, total=len(names))

    def fit(self, resume: bool | str = False, overwrite: bool = False, force: bool = False) -> dict:
        """Trains to cfg.iterations. resume: True (continue <out>/last.pt; an error when there is none), "auto"
        (continue when it exists, else start), False (start; an error when <out> holds a run unless overwrite);
        force: resume although options changed (resume()). SIGINT / SIGTERM / SIGHUP: the current iteration
        finishes, last.pt is saved and Interrupted is raised (a second signal stops at once, without saving)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.prepare_run_folder(resume, overwrite) and self.resume(force=force):
            print(f"resumed from {os.path.join(cfg.out, 'last.pt')} at iteration {self.iteration}", flush=True)
        if self.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as fh:
                fh.write(cfg.to_json() + "\n")
        logger = RunLogger(cfg.out, start=self.iteration, tensorboard=cfg.tensorboard, enabled=self.rank == 0)
        self.model.train()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=f"{self.stage}", disable=not self.progress,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        interrupted: list[int] = []
        previous = self._catch_stop_signals(interrupted)
        try:
            while self.iteration < cfg.iterations:
                if interrupted:
                    path = self.save()
                    name = signal.Signals(interrupted[0]).name
                    message = (f"interrupted ({name}) after iteration {self.iteration}: saved {path}; continue "
                               f"with --resume")
                    bar.write(message)
                    raise Interrupted(interrupted[0], message)
                t = self.iteration
                values = self.step(t)
                self.iteration = t + 1
                bar.update(1)
                if self.iteration % cfg.log_every == 0 or self.iteration == cfg.iterations:
                    now = time.perf_counter()
                    logger.log("train", self.iteration, {**values, "lr": self.optimizer.param_groups[0]["lr"],
                                                         "s_per_it": (now - t_last) / cfg.log_every})
                    t_last = now
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                if cfg.val_every and (self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations):
                    scores = self.validate()  # every rank (cheap, keeps them in step); rank 0 logs and saves
                    logger.log("val", self.iteration, scores)
                    if scores["mean_dice"] > self.best:
                        self.best, self.best_iteration = scores["mean_dice"], self.iteration
                        self.save("best.pt")
                    if self.rank == 0:
                        bar.write(f"iteration {self.iteration}: validation mean Dice {scores['mean_dice']:.4f} "
                                  f"(best {self.best:.4f} at {self.best_iteration})")
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                    self.save()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            bar.close()
            logger.close()
        if not cfg.val_every:
            self.save("best.pt")
        result = {"iterations": self.iteration, "best_val_dice": self.best, "best_iteration": self.best_iteration}
        if cfg.test_at_end and self.rank == 0:
            metrics = self.test()
            result["test"] = metrics.aggregate()
            print(metrics.summary_table(), flush=True)
        return result

    @staticmethod
    def _catch_stop_signals(interrupted: list) -> dict:
        """Installs handlers that record SIGINT / SIGTERM / SIGHUP in `interrupted` (the loop saves and stops at
        the next iteration boundary); a second signal raises KeyboardInterrupt at once. Returns the previous
        handlers (none off the main thread, where Python cannot install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if interrupted:
                raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped without saving this "
                                        f"iteration; last.pt holds the last checkpoint")
            interrupted.append(signum)

        return {s: signal.signal(s, handler) for s in STOP_SIGNALS}

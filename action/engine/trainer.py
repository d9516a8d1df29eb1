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
read and checked before iteration 0; an iteration that produces NaN/inf changes nothing and stops the run
(action.engine.guard); SIGINT, SIGTERM and SIGHUP finish the current iteration, save last.pt and raise Interrupted
(action.engine.signals); a run folder holding a run is refused unless resumed or overwritten
(action.engine.run_folder).

Sharding (action.engine.distributed): views whose key ends in "_l" are cut along the labelled batch, "_u" along the
unlabelled one, into world x accumulate contiguous shards; each shard's losses use their own generator seeded
from (seed, t, shard). Under torchrun every rank computes its shards inside DistributedDataParallel
(shard_losses), which averages the gradients across ranks; rank 0 alone validates, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from torch import nn

from action.config import TrainConfig
from action.data.augment import Augment, AugmentConfig
from action.data.names import output_path
from action.data.sampling import TwoStreamSampler, run_seed
from action.data.training import check_volumes, resolve_input_channels, training_data
from action.engine import distributed as dist_utils
from action.engine import guard
from action.engine.device import resolve_device
from action.engine.logs import RunLogger
from action.engine.losses import supervised_loss
from action.engine.requirements import check_requirements
from action.engine.run_folder import prepare_run_folder
from action.engine.run_lock import run_lock
from action.engine.run_state import RunState
from action.engine.signals import interrupted, stop_signals
from action.engine.threads import configure_threads
from action.engine.validation import Validation
from action.models import build_network


class Trainer(RunState, Validation):
    """The training loop; a stage overrides the hooks (module docstring). Checkpoints and resuming: RunState;
    validation and test: Validation."""

    stage = "supervised"
    uses_unlabelled = False

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg.validate()
        self.progress = progress
        configure_threads(cfg.threads)  # cfg.threads, else the idle cores (action.engine.threads)
        check_requirements(cfg, resolve_device(cfg.device))  # environment variables, ranks, CUDA: before anything
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
        resolve_input_channels(self.cfg, self.data)  # cfg.in_channels follows the data (stored in checkpoints)
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

    def batch(self, t: int) -> dict:
        if self.cfg.dims == 3:
            return self.data.patches(self.sampler.batch(t), t, self.device)
        lab, unl = self.sampler.batch(t)
        out = {"image_l": self.data.images[lab].to(self.device), "label_l": self.data.labels[lab].to(self.device)}
        if len(unl):
            out["image_u"] = self.data.unlabelled[unl].to(self.device)
        return out

    def step(self, t: int) -> dict[str, float]:
        """One optimisation step at iteration t: prepare the global batch, losses and backward per local shard,
        gradients averaged over all shards, optimizer step, deferred bank updates in shard order, after_step."""
        cfg = self.cfg
        saved_buffers = guard.snapshot_buffers(self.model)  # before any forward of this step (prepare's included)
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
                losses = self.shard_losses(dist_utils.shard(views, index, shards), g, sync=j == cfg.accumulate - 1)
            values = {k: float(v.detach()) for k, v in losses.items()}
            self._stop_if_non_finite(t, guard.non_finite_losses(values), views, saved_buffers)
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
        if not self.scaler.is_enabled():  # under fp16 the grad scaler owns overflow (skips the step, lowers its scale)
            self._stop_if_non_finite(t, guard.non_finite_gradients(self.model), views, saved_buffers)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for name, tensors in dist_utils.gather_in_order(self._deferred):
            self.apply_deferred(name, tuple(x.to(self.device) for x in tensors))
        self._deferred = []
        self.after_step(t)
        return dist_utils.mean_values(totals)

    def _stop_if_non_finite(self, t: int, what: str | None, views: dict, saved: list[torch.Tensor]) -> None:
        """When `what` (a guard finding) is not None: puts back the state before iteration t (buffers restored,
        gradients and deferred updates dropped), saves it when finite and raises FloatingPointError."""
        if what is None:
            return
        guard.restore_buffers(self.model, saved)
        self.optimizer.zero_grad(set_to_none=True)
        self._deferred = []
        saved_path = self.save() if guard.model_is_finite(self.model) else None
        batch = guard.describe_batch(self.data, self.sampler.batch(t), views)
        raise guard.non_finite_error(t, what, batch, saved_path, self.cfg.out)

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

    def fit(self, resume: bool | str = False, overwrite: bool = False, force: bool = False) -> dict:
        """Trains to cfg.iterations. resume: True (continue <out>/last.pt; an error when there is none), "auto"
        (continue when it exists, else start), False (start; an error when <out> holds a run unless overwrite);
        force: resume although options changed (resume()). SIGINT / SIGTERM / SIGHUP: the current iteration
        finishes, last.pt is saved and Interrupted is raised (a second signal stops at once, without saving). One run
        per folder: the folder's lock (action.engine.run_lock) is held from before anything in it is read until the
        run ends; another process holding it is an error naming its pid."""
        with run_lock(self.cfg.out, enabled=self.rank == 0):
            return self._fit(resume, overwrite, force)

    def _fit(self, resume: bool | str, overwrite: bool, force: bool) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if prepare_run_folder(cfg.out, resume, overwrite, self.rank) and self.resume(force=force) and self.rank == 0:
            print(f"resumed from {os.path.join(cfg.out, 'last.pt')} at iteration {self.iteration}", flush=True)
        if cfg.test_at_end and self.rank == 0:
            output_path(cfg.out, "test")  # the test outputs stay inside --out (a test/ linked elsewhere: refused)
        if self.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as fh:
                fh.write(cfg.to_json() + "\n")
        logger = RunLogger(cfg.out, start=self.iteration, tensorboard=cfg.tensorboard, enabled=self.rank == 0)
        self.model.train()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=f"{self.stage}", disable=not self.progress,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        with stop_signals() as stops, contextlib.closing(bar), contextlib.closing(logger):
            while self.iteration < cfg.iterations:
                if stops:
                    error = interrupted(stops[0], self.iteration, self.save())
                    bar.write(str(error))
                    raise error
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
                    logger.log("val", self.iteration, scores)  # and progress.png
                    logger.image("val/overlay", self.iteration, self.val_overlay)
                    if scores["mean_dice"] > self.best:
                        self.best, self.best_iteration = scores["mean_dice"], self.iteration
                        self.save("best.pt")
                    if self.rank == 0:
                        bar.write(f"iteration {self.iteration}: validation mean Dice {scores['mean_dice']:.4f} "
                                  f"(best {self.best:.4f} at {self.best_iteration})")
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                    self.save()
        if not cfg.val_every:
            self.save("best.pt")
        result = {"iterations": self.iteration, "best_val_dice": self.best, "best_iteration": self.best_iteration}
        if cfg.test_at_end and self.rank == 0:
            metrics = self.test()
            result["test"] = metrics.aggregate()
            print(metrics.summary_table(), flush=True)
        return result

"""What a run saves and restores, mixed into Trainer (action.engine.trainer), whose cfg, data, device, model,
optimizer, scheduler, scaler, rank, world, stage, iteration, best, best_iteration and extra_state() /
load_extra_state() it uses: checkpoints (atomic, weights_only: action.engine.checkpoint) hold model, optimizer,
scheduler, scaler, extra state, iteration, the best validation score, the config and the preprocessing; resume()
continues one (run_folder.check_resumable: same stage and options), initialise_from() starts from another run's
weights."""
from __future__ import annotations

import os

from action.data import preprocessing as preprocessing_of
from action.engine import distributed as dist_utils
from action.engine.checkpoint import align_keys, check_same_model, eval_weights, load_checkpoint, save_checkpoint
from action.engine.checkpoint_entries import check_entries, checkpoint_config
from action.engine.finite_weights import check_finite
from action.engine.run_folder import check_resumable


class RunState:
    def initialise_from(self, path: str) -> None:
        """Model weights from another run's checkpoint (e.g. the previous pipeline stage): the weights it validated
        (eval_weights: the EMA teacher's for an eval_teacher run); strict about shapes, lenient about heads the other
        stage did not have (a teacher brings only the heads it tracks)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--init {path}: checkpoint not found")
        state = load_checkpoint(path)
        checkpoint_config(state, path, option="--init")  # a one-line error for a checkpoint it cannot use
        weights = align_keys(eval_weights(state), self.model.state_dict())
        check_finite(weights, f"--init {path}")
        if not weights:
            raise ValueError(f"--init {path}: no parameter of this model is in the checkpoint")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        self.init_report = {"missing": missing, "unexpected": unexpected}

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
        check_entries(state, path, resume=True, option="--resume")
        check_resumable(state, self.cfg, self.stage, self.world * self.cfg.accumulate, path, force, self.rank)
        check_same_model(state["model"], self.model.state_dict(), path)
        check_finite({k: state[k] for k in ("model", "optimizer", "extra")}, f"--resume {path}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state["extra"])
        self.iteration, self.best, self.best_iteration = state["iteration"], state["best"], state["best_iteration"]
        return True

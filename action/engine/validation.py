"""Validation and testing of a Trainer's network, mixed into Trainer (action.engine.trainer), whose cfg, data,
device, progress, preprocessing and eval_model() they use: validate() scores the network on the validation volumes
(per-class and mean Dice), test() a checkpoint on the test volumes (action.engine.evaluate: metrics, CSV, overlays).
With cfg.bn_recalibrate both run a copy whose BatchNorm statistics are re-estimated on clean training images
(evaluated); validate keeps that copy's weights for best.pt (_eval_state)."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from action.data.names import output_path
from action.engine.checkpoint import align_keys, eval_weights, load_checkpoint
from action.engine.evaluate import evaluate, fast_dice
from action.engine.inference import recalibrate_batchnorm, volume_predictor


class Validation:
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

    def class_names(self) -> tuple[str, ...]:
        """The run's class names by label value: the dataset's (dataset.json), ACDC's for 4 classes, else class<k>."""
        from action.data.acdc import CLASSES

        names = getattr(self.data, "class_names", None) or (CLASSES if self.cfg.num_classes == len(CLASSES) else None)
        return tuple(names) if names else tuple(f"class{c}" for c in range(self.cfg.num_classes))

    def score_val(self, model: nn.Module) -> dict:
        """Per-class Dice (dice_<class name>) and mean Dice of `model` over the validation volumes (model left in its
        train/eval mode). The first volume and its prediction are kept as val_example (the TensorBoard overlay)."""
        was_training = model.training
        model.eval()
        predict = volume_predictor(model, self.cfg, self.device, self.preprocessing)
        scores = []
        for i, case in enumerate(self.data.cases(self.data.val_names)):
            pred = predict(case)
            scores.append(fast_dice(pred, case.label, self.cfg.num_classes))
            if i == 0:
                self.val_example = (case, pred)
        model.train(was_training)
        per_class = torch.tensor(scores).mean(0).tolist()
        names = self.class_names()
        return {**{f"dice_{names[c + 1]}": v for c, v in enumerate(per_class)},
                "mean_dice": sum(per_class) / len(per_class)}

    def val_overlay(self):
        """The first validation volume and its last prediction as an RGB overlay (H, W, 3) (action.engine.overlays;
        for TensorBoard), None before any validation or without matplotlib."""
        from action.engine.overlays import overlay_image

        example = getattr(self, "val_example", None)
        if example is None:
            return None
        case, pred = example
        orientation = self.preprocessing.orientation if case.reference is not None else None
        return overlay_image(case, pred, 1, self.class_names(), orientation)

    def test(self, checkpoint: str | None = None, out_dir: str | None = None, overlays: int = 3):
        """Scores `checkpoint` (default: best.pt, else the current model) on the test volumes."""
        path = checkpoint or os.path.join(self.cfg.out, "best.pt")
        if os.path.isfile(path):  # the network that checkpoint validated (eval_weights)
            net = copy.deepcopy(self.eval_model())
            net.load_state_dict(align_keys(eval_weights(load_checkpoint(path, self.device)), net.state_dict()))
        else:
            net = self.evaluated(self.eval_model())
        predict = volume_predictor(net.eval(), self.cfg, self.device, self.preprocessing)
        names = self.data.test_names
        classes = self.class_names()
        out_dir = out_dir or output_path(self.cfg.out, "test")  # a test/ linked elsewhere is refused
        return evaluate(predict, self.data.cases(names), out_dir,
                        self.cfg.num_classes, classes,
                        overlays=overlays, progress=self.progress, total=len(names))

"""The training engine: Trainer (hooks per stage), the supervised loss, atomic safe checkpoints, CSV/TensorBoard
logs, slice-wise and sliding-window inference, evaluation with per-case CSV, NIfTI predictions and overlays."""
from action.engine.checkpoint import load_checkpoint, save_checkpoint
from action.engine.evaluate import Case, acdc_cases, evaluate, nifti_cases
from action.engine.inference import predict_slices, predict_sliding_window
from action.engine.losses import dice_loss, supervised_loss
from action.engine.trainer import Trainer

__all__ = ["Case", "Trainer", "acdc_cases", "dice_loss", "evaluate", "load_checkpoint", "nifti_cases",
           "predict_sliding_window", "predict_slices", "save_checkpoint", "supervised_loss"]

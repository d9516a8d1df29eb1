"""ACTION itself: the three stages (global distillation, global + local distillation, anatomical-contrast
fine-tuning) as Trainer variants on the fused ops of action_kernels, and the pipeline that chains them."""
from action.method.losses import FifoBank, anatomical_term, distillation_loss, pseudo_label_loss, sample_hard_queries
from action.method.stages import (STAGE_TRAINERS, Finetuner, GlobalPretrainer, LocalPretrainer, run_pipeline)

__all__ = ["STAGE_TRAINERS", "FifoBank", "Finetuner", "GlobalPretrainer", "LocalPretrainer", "anatomical_term",
           "distillation_loss", "pseudo_label_loss", "run_pipeline", "sample_hard_queries"]

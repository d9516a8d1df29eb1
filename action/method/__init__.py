"""ACTION itself: the three stages (global distillation, global + local distillation, anatomical-contrast
fine-tuning) and ACTION++'s fine-tuning as Trainer variants on the fused ops of action_kernels, their registry
(STAGE_TRAINERS, trainer_class), and the pipeline that chains the stages."""
from action.method.losses import (
    anatomical_term,
    distillation_loss,
    pseudo_label_loss,
    sample_hard_queries,
    teacher_bank,
)
from action.method.stages import (
    STAGE_TRAINERS,
    Finetuner,
    GlobalPretrainer,
    LocalPretrainer,
    PlusPlusFinetuner,
    StudentPass,
    run_pipeline,
    trainer_class,
)

__all__ = ["STAGE_TRAINERS", "Finetuner", "GlobalPretrainer", "LocalPretrainer", "PlusPlusFinetuner", "StudentPass",
           "anatomical_term", "distillation_loss", "pseudo_label_loss", "run_pipeline", "sample_hard_queries",
           "teacher_bank", "trainer_class"]

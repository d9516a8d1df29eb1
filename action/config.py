"""Run configuration: one flat dataclass, presets, and JSON/YAML files. Precedence: defaults < preset < config
file < command-line flags. Unknown keys are errors (a typo never silently falls back to a default)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from action.data.augment import AugmentConfig

# the ACDC folder when --data is not given: $ACTION_ACDC, else ../shared/data/acdc relative to the working directory
DEFAULT_ACDC = os.environ.get("ACTION_ACDC", os.path.join("..", "shared", "data", "acdc"))


STAGES = ("supervised", "pretrain-global", "pretrain-local", "finetune", "pipeline")
PIPELINE = ("pretrain-global", "pretrain-local", "finetune")


@dataclass
class TrainConfig:
    # what and where
    stage: str = "supervised"
    data: str = DEFAULT_ACDC
    out: str = "runs/supervised"
    labelled_patients: int | None = 3
    max_train_slices: int | None = None  # use only the first n slices of each set (smoke tests)
    size: int = 256
    num_classes: int = 4
    dims: int = 2  # 3: volumes assembled from the slices, UNet3D on random patches, sliding-window evaluation
    patch: list = field(default_factory=lambda: [16, 96, 96])  # 3D training patch (Z, H, W), multiples of 16
    base_channels: int = 16  # UNet3D width: base x (1, 2, 4, 8, 16)
    # optimisation (method.md section 6: the reference schedule)
    iterations: int = 30000
    labelled_batch: int = 12
    unlabelled_batch: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    poly_power: float = 0.9
    amp: str = "auto"  # auto: bf16/fp16 autocast on CUDA, off on CPU; on; off
    device: str = "auto"
    threads: int | None = None
    accumulate: int = 1  # shards per process and step (gradient accumulation; see action.engine.distributed)
    seed: int = 1337
    augmentation: dict = field(default_factory=dict)  # AugmentConfig fields to override
    # bookkeeping
    val_every: int = 500
    val_volumes: int | None = None  # validate on the first n of val.list (None: all 20)
    checkpoint_every: int = 500
    log_every: int = 10
    tensorboard: bool = True
    test_at_end: bool = True
    init: str | None = None  # initialise the model from this checkpoint (pipeline stages)
    # ACTION stages i-ii (method.md sections 2, 3): distillation
    ema_decay: float = 0.99
    tau_student: float = 0.1
    tau_teacher: float = 0.01
    global_weight: float = 1.0
    global_dim: int = 512
    global_bank: int = 36
    local_weight: float = 1.0
    local_dim: int = 128
    local_grid: int = 16
    local_bank: int = 4096
    local_push: int = 256
    # ACTION stage iii (sections 4, 5): pseudo-labels and anatomical contrast
    unsup_weight: float = 1.0
    unsup_rampup: int = 0  # iterations of the sigmoid ramp-up exp(-5 (1 - t/R)^2) of the pseudo-label weight
    unsup_mask: str = "image"  # "image": method.md section 5 (per-image weight); "pixel": only confident pixels
    teacher_bn: str = "batch"  # stage iii pseudo-labels: BN on the clean unlabelled batch's statistics, or "running"
    split_bn: bool = True  # stage iii student: labelled and unlabelled images in separate forwards (separate BN)
    eval_teacher: bool = False  # validate/test the EMA teacher's network instead of the student's (stages i-iii)
    bn_recalibrate: int = 0  # batches of clean training images re-estimating BN statistics before evaluation
    anco_weight: float = 0.01
    weak_threshold: float = 0.7
    strong_threshold: float = 0.97
    queries_per_class: int = 256
    num_negatives: int = 512
    anco_tau: float = 0.5
    negatives: str = "topk"
    rep_dim: int = 512
    rep_stride: int = 4
    cutmix_p: float = 0.5
    # ACTION++ (section 7): SAACL and the anatomical-aware temperature scheduler (ATS)
    plusplus: bool = False
    saacl_weight: float = 0.01
    saacl_dim: int = 128
    saacl_queue: int = 4096
    saacl_push: int = 512
    saacl_eta: float = 0.1
    lambda_a: float = 0.2
    saacl_tau: float = 0.1
    ats: bool = False
    ats_targets: str = "anco,saacl"
    tau_min: float = 0.1
    tau_max: float = 1.0
    ats_period: int | None = None
    # the pipeline (stage "pipeline"): iterations per stage, run in order into <out>/<stage>/
    stage_iterations: dict = field(default_factory=lambda: {"pretrain-global": 30000, "pretrain-local": 30000,
                                                            "finetune": 30000})

    def validate(self) -> "TrainConfig":
        checks = [
            ("size", self.size >= 16 and self.size % 16 == 0, "a multiple of 16, >= 16"),
            ("iterations", self.iterations >= 1, ">= 1"),
            ("labelled_batch", self.labelled_batch >= 1, ">= 1"),
            ("unlabelled_batch", self.unlabelled_batch >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("amp", self.amp in ("auto", "on", "off"), "one of auto, on, off"),
            ("num_classes", self.num_classes >= 2, ">= 2"),
            ("val_every", self.val_every >= 0, ">= 0 (0: no validation)"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("accumulate", self.accumulate >= 1, ">= 1"),
            ("unsup_rampup", self.unsup_rampup >= 0, ">= 0 (0: no ramp-up)"),
            ("unsup_mask", self.unsup_mask in ("image", "pixel"), "'image' or 'pixel'"),
            ("bn_recalibrate", self.bn_recalibrate >= 0, ">= 0 (0: off)"),
            ("teacher_bn", self.teacher_bn in ("batch", "running"), "'batch' or 'running'"),
            ("dims", self.dims in (2, 3), "2 or 3"),
            ("patch", self.dims == 2 or (len(self.patch) == 3 and all(int(p) >= 16 and int(p) % 16 == 0
                                                                       for p in self.patch)
                                         and max(self.patch[1:]) <= self.size),
             "three multiples of 16 (Z, H, W), in-plane at most size (dims 3)"),
            ("base_channels", self.base_channels >= 1, ">= 1"),
            ("stage", self.stage in STAGES, f"one of {STAGES}"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("tau_student", self.tau_student > 0, "> 0"),
            ("tau_teacher", self.tau_teacher > 0, "> 0"),
            ("anco_tau", self.anco_tau > 0, "> 0"),
            ("negatives", self.negatives in ("topk", "class_graph"), "topk or class_graph"),
            ("weak_threshold", 0 <= self.weak_threshold <= 1, "in [0, 1]"),
            ("strong_threshold", 0 <= self.strong_threshold <= 1, "in [0, 1]"),
            ("rep_stride", self.rep_stride >= 1 and self.size % self.rep_stride == 0, "a divisor of size"),
            ("local_grid", 1 <= self.local_grid <= self.size, "in [1, size]"),
            ("global_bank", self.global_bank >= 1, ">= 1"),
            ("local_bank", self.local_bank >= 1, ">= 1"),
            ("queries_per_class", self.queries_per_class >= 1, ">= 1"),
            ("num_negatives", self.num_negatives >= 1, ">= 1"),
            ("ats_targets", set(filter(None, self.ats_targets.split(","))) <= {"anco", "saacl", "global", "local"},
             "a comma list of anco, saacl, global, local"),
            ("tau_min", 0 < self.tau_min <= self.tau_max, "in (0, tau_max]"),
            ("ats_period", self.ats_period is None or self.ats_period >= 1, "None or >= 1"),
            ("saacl_queue", self.saacl_queue >= 1, ">= 1"),
            ("max_train_slices", self.max_train_slices is None or (self.max_train_slices >= 1 and self.dims == 2),
             ">= 1, and only with dims 2 (3D trains on whole volumes: choose fewer with labelled_patients)"),
            ("stage_iterations", set(self.stage_iterations) <= set(PIPELINE)
             and all(isinstance(v, int) and v >= 1 for v in self.stage_iterations.values()),
             f"a mapping of {PIPELINE} to iteration counts >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"config {name}: expected {expected}, got {getattr(self, name)!r}")
        unknown = set(self.augmentation) - {f.name for f in fields(AugmentConfig)}
        if unknown:
            raise ValueError(f"config augmentation: unknown keys {sorted(unknown)}; valid keys are "
                             f"{[f.name for f in fields(AugmentConfig)]}")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


PRESETS: dict[str, dict] = {
    # the reference setting of the supervised baseline (method.md section 6): 256x256, 30k iterations
    "acdc-2d": {"size": 256, "iterations": 30000, "labelled_batch": 12, "val_every": 500, "checkpoint_every": 500},
    # the project's CPU baseline (README): 3 labelled patients at 128x128, ~40 minutes on 2 cores
    "acdc-cpu": {"size": 128, "iterations": 3000, "labelled_batch": 8, "val_every": 250, "checkpoint_every": 250,
                 "lr": 0.01},
    # the reference ACTION pipeline (method.md section 6; batch 4 + 4 in every stage here, 3 + 3 in the reference's
    # pre-training)
    "action-2d": {"stage": "pipeline", "size": 256, "labelled_batch": 4, "unlabelled_batch": 4, "val_every": 500,
                  "checkpoint_every": 500, "stage_iterations": {"pretrain-global": 30000, "pretrain-local": 30000,
                                                                "finetune": 30000}},
    # the project's CPU ACTION pipeline (README, run 4): same data and resolution as acdc-cpu, about an hour on 2
    # cores; labelled batch 8 as the baseline's, validation (and best.pt) on BatchNorm statistics re-estimated on
    # 50 clean unlabelled batches: the running ones are too noisy to select on (README, Results)
    "action-cpu": {"stage": "pipeline", "size": 128, "labelled_batch": 8, "unlabelled_batch": 4, "val_every": 300,
                   "checkpoint_every": 300, "unsup_rampup": 200, "unsup_mask": "pixel", "bn_recalibrate": 50,
                   "stage_iterations": {"pretrain-global": 100, "pretrain-local": 1200, "finetune": 600}},
    # ACTION++ as measured in the README: the earlier action-cpu recipe (batch 4 + 4, 100 + 1,500 + 600 iterations,
    # validation on running statistics) with SAACL and the temperature scheduler in fine-tuning
    "actionpp-cpu": {"stage": "pipeline", "size": 128, "labelled_batch": 4, "unlabelled_batch": 4, "val_every": 150,
                     "checkpoint_every": 150, "unsup_rampup": 200, "unsup_mask": "pixel",
                     "plusplus": True, "ats": True,
                     "stage_iterations": {"pretrain-global": 100, "pretrain-local": 1500, "finetune": 600}},
    # stage iii alone on a supervised checkpoint (README: test 0.688, against 0.682 for the same wall time of
    # supervised training from the same checkpoint):
    # action train --preset finetune-cpu --init runs/baseline-3p/best.pt
    "finetune-cpu": {"stage": "finetune", "size": 128, "labelled_batch": 8, "unlabelled_batch": 4, "iterations": 300,
                     "val_every": 100, "checkpoint_every": 100, "unsup_rampup": 100, "unsup_mask": "pixel",
                     "bn_recalibrate": 50},
    # the 3D path: volumes assembled from the ACDC slices, UNet3D on 16 x 96 x 96 patches, sliding-window evaluation
    "acdc-3d-cpu": {"dims": 3, "size": 128, "patch": [16, 96, 96], "base_channels": 8, "iterations": 1000,
                    "labelled_batch": 2, "val_every": 250, "checkpoint_every": 250},
    # a seconds-long run for checking an installation
    "smoke": {"size": 64, "iterations": 20, "labelled_batch": 2, "max_train_slices": 8, "val_every": 10,
              "val_volumes": 2, "checkpoint_every": 5, "log_every": 5},
}


def load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values, got "
                         f"{type(data).__name__}")
    return data


def build_config(preset: str | None = None, file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if file is not None:
        values.update(load_file(file))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
    return TrainConfig(**values).validate()

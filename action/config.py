"""Run configuration: one flat dataclass whose fields carry their help text, presets, and JSON/YAML files.
Precedence: defaults < preset < config file < command-line flags. Unknown keys are errors (a typo never silently
falls back to a default; a close name is suggested). Every value is checked by type (check_type: integers are not
booleans, numbers are finite, JSON/YAML strings are not numbers) and by range (TrainConfig.validate), and the error
names the option, where the value came from, what was expected and what came. resume_differences lists the options
a resumed run changes (RESUME_NEUTRAL: those that change no computed value)."""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from action.config_file import bounded_repr, load_file
from action.data.augment import AugmentConfig

# the ACDC folder when --data is not given: $ACTION_ACDC, else ../shared/data/acdc relative to the working directory
DEFAULT_ACDC = os.environ.get("ACTION_ACDC", os.path.join("..", "shared", "data", "acdc"))


UNSUP_LOSSES = ("ce", "dice", "ce+dice")
# the stage list, written only here: ACTION's stages i, ii, iii in the order the pipeline runs them; every stage a
# Trainer runs (action.method.stages.STAGE_TRAINERS, keyed by the classes' `stage`); cfg.stage's choices
PIPELINE = ("pretrain-global", "pretrain-local", "finetune")
TRAINED_STAGES = ("supervised", *PIPELINE)
STAGES = (*TRAINED_STAGES, "pipeline")
# stages whose batches must hold unlabelled images (unlabelled_batch >= 1): stage iii trains on their pseudo-labels
# (the pipeline runs it); stages i and ii distil on whatever the batch holds
NEEDS_UNLABELLED_BATCH = ("finetune", "pipeline")


def option(default, help: str):
    """A config field with its --help text beside it (action.cli builds every train option from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _whole(value) -> bool:
    """An integer, and not a bool (True is an int to Python, never an iteration count)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    # what and where
    stage: str = option("supervised", "training stage to run")
    data: str = option(DEFAULT_ACDC, "ACDC folder in the HDF5 layout (data/*.h5, train_slices.list, val.list, "
                                     "test.list); default $ACTION_ACDC, else ../shared/data/acdc")
    out: str = option("runs/supervised", "run folder: config.json, train.csv, val.csv, last.pt, best.pt, tensorboard/, "
                                         "test/")
    labelled_patients: int | None = option(3, "labelled split: the first N patients of the training list, any N "
                                              "(ACDC: every slice of the first N patients in train_slices.list "
                                              "order, the reference mapping: 3 / 7 -> 68 / 136 slices; 1 -> its "
                                              "first 23 lines; NIfTI: none labels every training case)")
    labelled_cases: int | None = option(None, "labelled split by cases instead: the first N cases (volumes) of the "
                                              "training list labelled, the rest unlabelled (ACDC HDF5: every slice "
                                              "of the first N patient<NNN>_frame<FF> volumes); overrides "
                                              "labelled_patients")
    fold: int = option(0, "NIfTI datasets: the cross-validation fold whose val list validates (splits_final.json; "
                          "nnU-Net's 5 default folds are generated and written when it is absent)")
    max_train_slices: int | None = option(None, "use only the first N labelled and N unlabelled slices (quick checks, "
                                                "smoke tests; 2D only)")
    size: int = option(256, "training size in pixels (square, a multiple of 16); evaluation resizes each slice to it "
                            "and back")
    num_classes: int = option(4, "number of classes including background (ACDC: 4; an nnU-Net ignore label is "
                                 "not a class)")
    in_channels: int | None = option(None, "input channels of the network (none: the data's: 1 for the HDF5 layout, "
                                           "dataset.json's channel_names for NIfTI); stored in checkpoints")
    dims: int = option(2, "2: slice-wise 2D UNet; 3: UNet3D on random patches of volumes assembled from the slices, "
                          "sliding-window evaluation")
    patch: list = option([16, 96, 96], "3D training patch as a JSON list [Z, H, W] of multiples of 16")
    base_channels: int = option(16, "UNet3D width: channels base x (1, 2, 4, 8, 16)")
    # optimisation (docs/method.md section 6: the reference schedule)
    iterations: int = option(30000, "training iterations (the poly learning-rate schedule runs over them)")
    labelled_batch: int = option(12, "labelled images per batch")
    unlabelled_batch: int = option(0, "unlabelled images per batch (semi-supervised stages)")
    lr: float = option(0.01, "initial learning rate of SGD")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "SGD weight decay")
    nesterov: bool = option(False, "Nesterov momentum")
    poly_power: float = option(0.9, "poly schedule: lr * (1 - it / iterations) ** power")
    amp: str = option("auto", "mixed precision: auto (bf16/fp16 autocast on CUDA, off on CPU), on, off")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    threads: int | None = option(None, "CPU threads for torch (default: the idle cores now, at most 4; "
                                       "OMP_NUM_THREADS when set: action.engine.threads)")
    accumulate: int = option(1, "split each step's batch into this many shards per process (gradient accumulation; "
                                "under torchrun the global batch is split over world size x accumulate shards: "
                                "action.engine.distributed)")
    seed: int = option(1337, "seed of initialisation, batches, augmentation and dropout (a run is reproducible from "
                             "it)")
    augmentation: dict = option({}, "JSON object overriding augmentation settings, e.g. '{\"affine_p\": 0.3}' (fields "
                                    "of action.data.augment.AugmentConfig)")
    # bookkeeping
    val_every: int = option(500, "validate every N iterations on val.list (0: never; best.pt is then the last model)")
    val_volumes: int | None = option(None, "validate on the first N volumes of val.list only (default: all 20)")
    checkpoint_every: int = option(500, "write last.pt every N iterations (a kill loses at most this much work)")
    log_every: int = option(10, "log losses every N iterations")
    tensorboard: bool = option(True, "also log to TensorBoard (needs the tensorboard package)")
    test_at_end: bool = option(True, "evaluate best.pt on test.list when training ends (writes <out>/test/)")
    init: str | None = option(None, "initialise the model from this checkpoint (e.g. the previous stage's best.pt)")
    # ACTION stages i-ii (docs/method.md sections 2, 3): distillation
    ema_decay: float = option(0.99, "EMA teacher decay (ramped up as 1 - 1/(it+1) at the start)")
    tau_student: float = option(0.1, "student temperature of the global and local distillation")
    tau_teacher: float = option(0.01, "teacher temperature of the global and local distillation")
    global_weight: float = option(1.0, "weight of the global distillation loss (stages i, ii)")
    global_dim: int = option(512, "global embedding size (projection head output)")
    global_bank: int = option(36, "FIFO bank of teacher image embeddings used as anchors (reference: 36)")
    local_weight: float = option(1.0, "weight of the local (pixel-wise) distillation loss (stage ii)")
    local_dim: int = option(128, "local embedding size")
    local_grid: int = option(16, "local embeddings on a grid of local_grid x local_grid cells per image")
    local_bank: int = option(4096, "FIFO bank of teacher local embeddings used as anchors")
    local_push: int = option(256, "teacher local embeddings pushed into the bank per iteration (a random subset)")
    # ACTION stage iii (docs/method.md sections 4, 5): pseudo-labels and anatomical contrast
    unsup_weight: float = option(1.0, "weight of the pseudo-label loss (stage iii)")
    unsup_rampup: int = option(0, "ramp the pseudo-label weight up over this many iterations: exp(-5 (1 - t/R)^2) "
                                  "(0: none)")
    unsup_mask: str = option("image", "pseudo-label CE: 'image' weights each image's pixels by its confident "
                                      "fraction (docs/method.md section 5), 'pixel' averages over the confident "
                                      "pixels only (confidence >= pseudo_threshold)")
    unsup_loss: str = option("ce+dice", "stage iii pseudo-label loss: 'ce' (masked by unsup_mask), 'dice' (Dice over "
                                        "all classes on the confident pixels), 'ce+dice' (0.5 (ce + dice), the form "
                                        "of L_sup)")
    pseudo_threshold: float | None = option(0.95, "teacher confidence at which an unlabelled pixel's pseudo-label "
                                                  "counts in the pseudo-label loss (none: strong_threshold, as the "
                                                  "reference)")
    unlabelled_view: str = option("strong", "stage iii: the student's view of the unlabelled images: 'weak' (the "
                                          "augmentation the teacher's pseudo-labels move with) or 'strong' (then "
                                          "a strong photometric pass on the student's images alone: "
                                          "strong_augmentation)")
    strong_augmentation: dict = option({}, "JSON object overriding the strong view's photometric settings "
                                           "(action.data.augment.STRONG_PHOTOMETRIC; fields of AugmentConfig)")
    audit_pseudo_labels: bool = option(False, "research use: when the unlabelled images carry ground truth (the "
                                              "ACDC HDF5 files do), log the teacher's pseudo-label Dice against it "
                                              "(train.csv audit_* columns); the ground truth never reaches a loss. "
                                              "2D HDF5 data only")
    teacher_bn: str = option("batch", "the EMA teacher's BatchNorm (every teacher stage): 'batch' normalises each "
                                      "teacher forward with its batch's statistics (the ReCo / ACTION code runs its "
                                      "EMA model in train mode), its running statistics (eval-mode validation) an "
                                      "EMA of the student's like its weights; 'running' runs it in eval mode on "
                                      "running statistics copied from the student")
    split_bn: bool = option(True, "stage iii: the student sees labelled and unlabelled images in separate forwards, "
                                  "so BatchNorm normalises each kind with its own statistics (as the ReCo code "
                                  "does); false: one mixed forward")
    eval_teacher: bool = option(False, "validate and test the EMA teacher's network instead of the student's "
                                       "(teacher stages)")
    bn_recalibrate: int = option(0, "before each validation and test, re-estimate the evaluated network's BatchNorm "
                                    "statistics on this many batches of un-augmented training images (the "
                                    "unlabelled ones when the run loads them, else the labelled ones; a copy: "
                                    "training is unaffected; 0: off)")
    anco_weight: float = option(0.01, "weight of the anatomical contrast loss (stage iii; reference 0.01)")
    weak_threshold: float = option(0.7, "teacher confidence at which an unlabelled pixel joins the anatomical "
                                        "contrast")
    strong_threshold: float = option(0.97, "confidence below which a pixel is a hard query; also the pseudo-label "
                                           "weight threshold")
    queries_per_class: int = option(256, "hard queries sampled per class (with replacement)")
    num_negatives: int = option(512, "negatives per query")
    anco_tau: float = option(0.5, "temperature of the anatomical contrast")
    negatives: str = option("topk", "negative selection: topk (fused hard negatives) or class_graph (the reference "
                                    "sampling)")
    rep_dim: int = option(512, "representation head output size (anatomical contrast embeddings)")
    rep_stride: int = option(4, "anatomical contrast on a grid of size / rep_stride pixels per side")
    cutmix_p: float = option(1.0, "probability of cutmix on unlabelled images and their pseudo-labels (stage iii)")
    cutmix_pairing: str = option("derangement", "cutmix partners: 'random' (a random permutation: an image may be its "
                                           "own partner) or 'derangement' (never itself)")
    cutmix_area: list = option([0.1, 0.5], "cutmix box area as a fraction of the image, [low, high] (per-axis "
                                           "fractions drawn so that their product lies in it)")
    # ACTION++ (docs/method.md section 7): SAACL and the anatomical-aware temperature scheduler (ATS)
    plusplus: bool = option(False, "ACTION++: add the supervised adaptive anatomical contrast (SAACL) in "
                                   "fine-tuning")
    saacl_weight: float = option(0.01, "weight of the SAACL loss")
    saacl_dim: int = option(128, "SAACL embedding size (d)")
    saacl_queue: int = option(4096, "queue of labelled teacher features for SAACL")
    saacl_push: int = option(512, "labelled teacher features pushed into the SAACL queue per iteration")
    saacl_eta: float = option(0.1, "momentum of the running class means (eta)")
    lambda_a: float = option(0.2, "weight of the assigned-centre term inside SAACL")
    saacl_tau: float = option(0.1, "SAACL temperature (when ATS does not set it)")
    ats: bool = option(False, "anatomical-aware temperature scheduler: cosine between tau_min and tau_max")
    ats_targets: str = option("anco,saacl", "temperatures ATS drives: comma list of anco, saacl, global, local")
    tau_min: float = option(0.1, "ATS minimum temperature")
    tau_max: float = option(1.0, "ATS maximum temperature")
    ats_period: int | None = option(None, "ATS period in iterations (default: the stage's iterations)")
    # the pipeline (stage "pipeline"): iterations per stage, run in order into <out>/<stage>/
    stage_iterations: dict = option(dict.fromkeys(PIPELINE, 30000),
                                    "pipeline: JSON object of iterations per stage, e.g. '{\"pretrain-global\": 300, "
                                    "\"pretrain-local\": 600, \"finetune\": 2000}'")
    # NIfTI data and multi-process training (issue 17; docs/data.md, Coming from MONAI / nnU-Net)
    intensity: str = option("minmax", "intensity normalisation of NIfTI training images and of every inference "
                                      "input: minmax (per volume to [0, 1]: how the HDF5 layout stores its images), "
                                      "zscore (per volume, nnU-Net's default for non-CT), ct (nnU-Net's "
                                      "CTNormalization: clipped to the training foreground's 0.5-99.5 percentiles, "
                                      "minus its mean, over its std), none; stored in each checkpoint")
    spacing: str | None = option(None, "NIfTI training: in-plane voxel size to resample slices to, 'x,y' in mm or "
                                       "'median' (of the training volumes), then centre-cropped/padded to size; None: "
                                       "resize every slice to size x size (the HDF5 layout: it stores no spacing)")
    sync_bn: bool = option(False, "under torchrun, SyncBatchNorm: BatchNorm statistics over the whole global batch "
                                  "instead of each rank's shard (CUDA only)")

    def validate(self) -> "TrainConfig":
        """Checks every option's type (check_type) and range; the error names the option, expected and got."""
        for f in fields(self):
            setattr(self, f.name, check_type(f.name, getattr(self, f.name), str(f.type)))
        checks = [
            ("size", self.size >= 16 and self.size % 16 == 0, "a multiple of 16, >= 16"),
            ("iterations", self.iterations >= 1, ">= 1"),
            ("labelled_batch", self.labelled_batch >= 1, ">= 1"),
            ("unlabelled_batch", self.unlabelled_batch >= 0, ">= 0"),
            ("unlabelled_batch", self.stage not in NEEDS_UNLABELLED_BATCH or self.unlabelled_batch >= 1,
             f">= 1 for stage {self.stage} (stage iii trains on pseudo-labels of unlabelled images: pass "
             f"--unlabelled-batch N)"),
            ("lr", self.lr > 0, "> 0"),
            ("amp", self.amp in ("auto", "on", "off"), "one of auto, on, off"),
            ("num_classes", self.num_classes >= 2, ">= 2"),
            ("val_every", self.val_every >= 0, ">= 0 (0: no validation)"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("accumulate", self.accumulate >= 1, ">= 1"),
            ("unsup_rampup", self.unsup_rampup >= 0, ">= 0 (0: no ramp-up)"),
            ("unsup_mask", self.unsup_mask in ("image", "pixel"), "'image' or 'pixel'"),
            ("unsup_loss", self.unsup_loss in UNSUP_LOSSES, f"one of {UNSUP_LOSSES}"),
            ("pseudo_threshold", self.pseudo_threshold is None or 0 <= self.pseudo_threshold <= 1,
             "None (strong_threshold) or in [0, 1]"),
            ("unlabelled_view", self.unlabelled_view in ("weak", "strong"), "'weak' or 'strong'"),
            ("cutmix_pairing", self.cutmix_pairing in ("random", "derangement"), "'random' or 'derangement'"),
            ("cutmix_area", len(self.cutmix_area) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                               for a in self.cutmix_area)
             and 0 < self.cutmix_area[0] <= self.cutmix_area[1] <= 1, "[low, high] with 0 < low <= high <= 1"),
            ("audit_pseudo_labels", not self.audit_pseudo_labels or self.dims == 2,
             "false with dims 3 (the audit reads the unlabelled slices' ground truth: 2D HDF5 data only)"),
            ("bn_recalibrate", self.bn_recalibrate >= 0, ">= 0 (0: off)"),
            ("teacher_bn", self.teacher_bn in ("batch", "running"), "'batch' or 'running'"),
            ("dims", self.dims in (2, 3), "2 or 3"),
            ("patch", self.dims == 2 or (len(self.patch) == 3 and all(_whole(p) and p >= 16 and p % 16 == 0
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
            ("intensity", self.intensity in ("minmax", "zscore", "ct", "none"), "one of minmax, zscore, ct, none"),
            ("labelled_cases", self.labelled_cases is None or self.labelled_cases >= 1, "None or >= 1"),
            ("fold", self.fold >= 0, ">= 0"),
            ("in_channels", self.in_channels is None or self.in_channels >= 1, "None (from the data) or >= 1"),
            ("spacing", self.spacing is None or self.spacing == "median" or _spacing_ok(self.spacing),
             "None, 'median', or 'x,y' (or one number) in mm > 0"),
            ("stage_iterations", set(self.stage_iterations) <= set(PIPELINE)
             and all(_whole(v) and v >= 1 for v in self.stage_iterations.values()),
             f"a mapping of {PIPELINE} to iteration counts >= 1"),
            ("labelled_patients", self.labelled_patients is None or self.labelled_patients >= 1, "None or >= 1"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("poly_power", self.poly_power >= 0, ">= 0"),
            ("threads", self.threads is None or self.threads >= 1, "None or >= 1"),
            ("seed", self.seed >= 0, ">= 0"),
            ("val_volumes", self.val_volumes is None or self.val_volumes >= 1, "None (all) or >= 1"),
            ("global_dim", self.global_dim >= 1, ">= 1"),
            ("local_dim", self.local_dim >= 1, ">= 1"),
            ("local_push", self.local_push >= 1, ">= 1"),
            ("rep_dim", self.rep_dim >= 1, ">= 1"),
            ("saacl_dim", self.saacl_dim >= 1, ">= 1"),
            ("saacl_push", self.saacl_push >= 1, ">= 1"),
            ("saacl_eta", 0 <= self.saacl_eta <= 1, "in [0, 1]"),
            ("saacl_tau", self.saacl_tau > 0, "> 0"),
            ("cutmix_p", 0 <= self.cutmix_p <= 1, "in [0, 1]"),
            *((name, getattr(self, name) >= 0, ">= 0 (a loss weight)") for name in
              ("global_weight", "local_weight", "unsup_weight", "anco_weight", "saacl_weight", "lambda_a")),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"config {name}: expected {expected}, got {bounded_repr(getattr(self, name))}")
        self.augmentation = check_augmentation(self.augmentation)
        self.strong_augmentation = check_augmentation(self.strong_augmentation, "strong_augmentation")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _kind(value) -> str:
    return f"{bounded_repr(value)} ({type(value).__name__})"


def check_type(name: str, value, kind: str, source: str = ""):
    """value of option `name` checked against its declared type `kind` ("int", "float", "bool", "str", "list",
    "dict", "int | None", ...) -> the value (an integral number for a float option becomes a float). source: where
    it came from, for the message ("config file c.yaml", "preset smoke", "--flag")."""
    where = f" (from {source})" if source else ""
    base, optional = kind.replace(" | None", ""), kind.endswith("| None")
    if value is None and optional:
        return None
    expected = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
                "list": "a list", "dict": "a mapping"}[base] + (" or null" if optional else "")
    ok = {"int": _whole(value),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(float(value)),
          "bool": isinstance(value, bool), "str": isinstance(value, str), "list": isinstance(value, list),
          "dict": isinstance(value, dict)}[base]
    if not ok:
        hint = ""
        if isinstance(value, str) and base in ("int", "float") and _is_number(value):
            hint = "; that is text: write the number without quotes"
            if "e" in value.lower() and "." not in value:
                hint += " (PyYAML reads 1e-4 as text; write 1.0e-4)"
        raise ValueError(f"config {name}{where}: expected {expected}, got {_kind(value)}{hint}")
    return float(value) if base == "float" else value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_augmentation(values: dict, option: str = "augmentation") -> dict:
    """The augmentation overrides of `option` checked against AugmentConfig: known keys, each of its field's type
    (pairs as two numbers low <= high), probabilities (keys ending in _p) in [0, 1], magnitudes >= 0."""
    known = {f.name: str(f.type) for f in fields(AugmentConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"config {option}: unknown keys {unknown}{_did_you_mean(unknown, known)}; valid keys "
                         f"are {list(known)}")
    out = {}
    for key, value in values.items():
        name = f"{option}.{key}"
        if known[key].startswith("tuple"):
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ValueError(f"config {name}: expected a pair [low, high], got {_kind(value)}")
            low, high = (check_type(name, v, "float") for v in value)
            if low > high or low < 0:
                raise ValueError(f"config {name}: expected 0 <= low <= high, got {list(value)}")
            out[key] = (low, high)
            continue
        out[key] = check_type(name, value, known[key])
        if key.endswith("_p") and not 0 <= out[key] <= 1:
            raise ValueError(f"config {name}: expected a probability in [0, 1], got {value!r}")
        if known[key] == "float" and out[key] < 0:
            raise ValueError(f"config {name}: expected >= 0, got {value!r}")
    return out


def _did_you_mean(unknown, known) -> str:
    close = {u: difflib.get_close_matches(u, list(known), n=1) for u in unknown}
    hints = [f"{u!r} -> {c[0]!r}" for u, c in close.items() if c]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


# options a resumed run may change: where files are, the hardware, logging and bookkeeping (validation, checkpoints,
# the final test, --init, which a resumed run overwrites with its checkpoint), and accumulate, which the trainer
# checks as world size x accumulate (the shard count; fewer ranks with more accumulation compute the same). Every
# other one changes what the run computes, so resuming with it changed needs force (--force).
RESUME_NEUTRAL = frozenset({"out", "device", "threads", "tensorboard", "log_every", "checkpoint_every", "val_every",
                            "val_volumes", "test_at_end", "init", "accumulate"})


# options added after runs existed, with the behaviour a run of before them had: a checkpoint that predates one of
# them ran with this value, not with today's default (the stage iii recipe changed the defaults when it came)
PREDATING = {"unsup_loss": "ce", "pseudo_threshold": None, "unlabelled_view": "weak", "strong_augmentation": {},
             "cutmix_pairing": "random", "cutmix_area": [0.1, 0.5], "audit_pseudo_labels": False, "in_channels": 1}


def resume_differences(saved_json: str, cfg: "TrainConfig") -> dict:
    """{option: (checkpoint's value, this run's)} for every option outside RESUME_NEUTRAL that differs between a
    checkpoint's stored config (JSON) and cfg; an option the checkpoint predates counts as the behaviour it had
    (PREDATING), else as its default."""
    saved, now = json.loads(saved_json or "{}"), json.loads(cfg.to_json())
    defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cfg)}
    defaults.update(PREDATING)
    out = {}
    for key, value in now.items():
        before = saved.get(key, json.loads(json.dumps(defaults[key])))
        if key not in RESUME_NEUTRAL and before != value:
            out[key] = (before, value)
    return out
def _spacing_ok(text: str) -> bool:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        return False
    return len(values) in (1, 2) and min(values) > 0


PRESETS: dict[str, dict] = {
    # the reference setting of the supervised baseline (docs/method.md section 6): 256x256, 30k iterations
    "acdc-2d": {"size": 256, "iterations": 30000, "labelled_batch": 12, "val_every": 500, "checkpoint_every": 500},
    # the project's CPU baseline (benchmarks/RESULTS.md): 3 labelled patients at 128x128, ~40 minutes on 2 cores
    "acdc-cpu": {"size": 128, "iterations": 3000, "labelled_batch": 8, "val_every": 250, "checkpoint_every": 250,
                 "lr": 0.01},
    # the reference ACTION pipeline (docs/method.md section 6; batch 4 + 4 in every stage here, 3 + 3 in the reference's
    # pre-training)
    "action-2d": {"stage": "pipeline", "size": 256, "labelled_batch": 4, "unlabelled_batch": 4, "val_every": 500,
                  "checkpoint_every": 500, "stage_iterations": dict.fromkeys(PIPELINE, 30000)},
    # the project's CPU ACTION pipeline (benchmarks/RESULTS.md, run 4): same data and resolution as acdc-cpu, about
    # an hour on 2 cores; labelled batch 8 as the baseline's, validation (and best.pt) on BatchNorm statistics
    # re-estimated on 50 clean unlabelled batches: the running ones are too noisy to select on (benchmarks/RESULTS.md,
    # Segmentation); distillation weights 0.1 in stages i-ii, as benchmarks/ssl_protocol.py's pipeline arm (the
    # reference's 1.0 lost to supervised training from scratch on every seed of the protocol, 0.1 won on every seed)
    "action-cpu": {"stage": "pipeline", "size": 128, "labelled_batch": 8, "unlabelled_batch": 4, "val_every": 300,
                   "checkpoint_every": 300, "bn_recalibrate": 50, "global_weight": 0.1, "local_weight": 0.1,
                   "stage_iterations": {"pretrain-global": 100, "pretrain-local": 1200, "finetune": 600}},
    # ACTION++: the earlier action-cpu schedule (batch 4 + 4, 100 + 1,500 + 600 iterations, validation on running
    # statistics) with SAACL and the temperature scheduler in fine-tuning
    "actionpp-cpu": {"stage": "pipeline", "size": 128, "labelled_batch": 4, "unlabelled_batch": 4, "val_every": 150,
                     "checkpoint_every": 150, "plusplus": True, "ats": True, "global_weight": 0.1,
                     "local_weight": 0.1,
                     "stage_iterations": {"pretrain-global": 100, "pretrain-local": 1500, "finetune": 600}},
    # stage iii alone on a supervised checkpoint, with the stage iii recipe of benchmarks/ssl_protocol.py (the
    # defaults): action train --preset finetune-cpu --init runs/baseline-3p/best.pt
    "finetune-cpu": {"stage": "finetune", "size": 128, "labelled_batch": 8, "unlabelled_batch": 4, "iterations": 300,
                     "val_every": 100, "checkpoint_every": 100, "bn_recalibrate": 50},
    # the 3D path: volumes assembled from the ACDC slices, UNet3D on 16 x 96 x 96 patches, sliding-window evaluation
    "acdc-3d-cpu": {"dims": 3, "size": 128, "patch": [16, 96, 96], "base_channels": 8, "iterations": 1000,
                    "labelled_batch": 2, "val_every": 250, "checkpoint_every": 250},
    # a seconds-long run for checking an installation
    "smoke": {"size": 64, "iterations": 20, "labelled_batch": 2, "max_train_slices": 8, "val_every": 10,
              "val_volumes": 2, "checkpoint_every": 5, "log_every": 5},
}


def build_config(preset: str | None = None, file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """defaults < PRESETS[preset] < the config file < overrides (None values skipped), each value type-checked
    with its source named, then the whole config range-checked (validate)."""
    values: dict = {}
    sources: dict = {}
    layers = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}{_did_you_mean([preset], PRESETS)}; choose from "
                             f"{sorted(PRESETS)}")
        layers.append((PRESETS[preset], f"preset {preset}"))
    if file is not None:
        layers.append((load_file(file), f"config file {file}"))
    layers.append(({k: v for k, v in (overrides or {}).items() if v is not None}, "the command line"))
    for layer, source in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        where = sorted({sources[k] for k in unknown})
        raise ValueError(f"unknown config keys {unknown} (from {', '.join(where)}){_did_you_mean(unknown, types)}; "
                         f"valid keys are {sorted(types)}")
    for key, value in values.items():
        values[key] = check_type(key, value, types[key], sources[key])
    return TrainConfig(**values).validate()

"""The `action` command line: train, evaluate, predict, ensemble, data convert. Run `action <command> --help`."""
from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
from dataclasses import MISSING, fields

from action import __version__
from action.config import PRESETS, STAGES, TrainConfig, build_config


class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (--lr never silently means --lr-something) and with "did you mean"
    for a mistyped option or choice."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _all_options(self) -> list[str]:
        options = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    options += parser._all_options()
        return options

    def error(self, message: str):
        words = []
        if message.startswith("unrecognized arguments:"):
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
        elif "invalid choice:" in message and message.split("invalid choice:", 1)[1].count("'") >= 2:
            words = [message.split("invalid choice:", 1)[1].split("'")[1]]
        hints = []
        for word in words:
            pool = self._all_options() if word.startswith("-") else \
                message.split("choose from", 1)[-1].replace("'", " ").replace(",", " ").replace(")", " ").split()
            close = difflib.get_close_matches(word, pool, n=1)
            if close:
                hints.append(f"{word} -> {close[0]}")
        super().error(message + (f" (did you mean {', '.join(hints)}?)" if hints else ""))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def _json_of(kind: type, what: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"expected {what} in JSON, got {text!r} ({exc.msg})") from exc
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected {what} in JSON, got {text!r}")
        return value

    parse.__name__ = what
    return parse


_optional_int.__name__, _bool.__name__ = "integer (or none)", "true/false"
# per declared field type: the flag's parser and its metavar in --help
_FLAG_TYPES = {"int | None": (_optional_int, "N"), "float | None": (_optional_float, "X"), "str | None": (str, None),
               "bool": (_bool, "{true,false}"),
               "dict": (_json_of(dict, "a JSON object"), "JSON"), "list": (_json_of(list, "a JSON list"), "JSON"),
               "float": (float, "X"), "int": (int, "N"), "str": (str, None)}


def _shown(default) -> str:
    if isinstance(default, bool) or default is None or isinstance(default, (dict, list)):
        return json.dumps(default).replace("null", "none")
    return str(default)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="named settings: " + "; ".join(
        f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in PRESETS.items()))
    p.add_argument("--config", help="JSON or YAML file of options (keys as below, with underscores)")
    p.add_argument("--resume", nargs="?", const=True, choices=["auto"], default=False,
                   help="continue from <out>/last.pt where it stopped (an error when there is none, or when "
                        "options changed: see --force); '--resume auto': continue when last.pt exists, else start "
                        "(one command line for a job a scheduler may restart)")
    p.add_argument("--force", action="store_true", help="with --resume: continue although options that change "
                   "the computation differ from the checkpoint's (they are printed)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run, deleting "
                   "its checkpoints, logs and test results (without it, that is an error)")
    group = p.add_argument_group("options (defaults: the reference settings; preset < --config < flags)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind, metavar = _FLAG_TYPES[str(f.type)]
        extra = {"choices": list(STAGES)} if f.name == "stage" else {"metavar": metavar} if metavar else {}
        text = f.metadata["help"]  # a help line that explains its default already gets no second one
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                           help=text if "default" in text else f"{text} (default: {_shown(default)})", **extra)


def _predictor_from_checkpoint(path: str, device: str, bn_recalibrate: int = 0, data: str | None = None,
                               teacher: bool = False, bn_source: str = "run", window: str = "constant",
                               tta: bool = False, largest_component: str | None = None):
    """(case -> labels, config) for a checkpoint of any stage, 2D or 3D: the network its run validated
    (eval_weights); with bn_recalibrate > 0 its BatchNorm statistics re-estimated on that many batches of the
    run's clean training images (read from `data`, default the checkpoint's ACDC folder): the ones its run loaded
    (bn_source "run": unlabelled when it used them, else labelled) or the unlabelled ones ("unlabelled", to compare
    runs of different stages on the same slices); with teacher, the EMA teacher's network the checkpoint holds.
    Every case goes through the checkpoint's preprocessing first (predict.preprocessing; window: the 3D sliding
    window's weights, constant, gaussian or gaussian-monai; tta: flip test-time augmentation; largest_component:
    "all" or classes whose largest connected component alone is kept, action.engine.postprocess)."""
    import dataclasses

    import torch

    from action.data import training
    from action.data.preprocessing import checkpoint_preprocessing
    from action.engine import load_checkpoint
    from action.engine.checkpoint import align_keys, eval_weights, teacher_weights
    from action.engine.checkpoint_entries import checkpoint_config
    from action.engine.device import resolve_device
    from action.engine.finite_weights import check_finite, refuse_non_finite_outputs
    from action.engine.inference import recalibrate_batchnorm, volume_predictor
    from action.method import trainer_class
    from action.models import build_network

    if bn_recalibrate < 0:
        raise SystemExit(f"--bn-recalibrate: expected >= 0 batches, got {bn_recalibrate}")
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path)  # entries and options checked: a one-line error naming the file
    dev = resolve_device(device)
    model = build_network(cfg)
    weights = teacher_weights(state) if teacher else eval_weights(state)  # align_keys keeps the teacher's "net.*"
    if teacher and not weights:
        raise SystemExit(f"--teacher: {path} holds no EMA teacher (a {state.get('stage')!r} checkpoint); the "
                         f"stages pretrain-global, pretrain-local and finetune keep one")
    weights = align_keys(weights, model.state_dict())
    check_finite(weights, f"--checkpoint {path}")  # a NaN weight would give all-background predictions, rc 0
    model.load_state_dict(weights)
    model = model.to(dev).eval()
    if bn_recalibrate:
        train_cfg = dataclasses.replace(cfg, data=data or cfg.data)
        images = training.training_data(train_cfg, trainer_class(cfg).uses_unlabelled or bn_source == "unlabelled")
        generator = torch.Generator().manual_seed(cfg.seed)
        model = recalibrate_batchnorm(model, images.clean_batches(bn_recalibrate, generator, dev))
    prep = checkpoint_preprocessing(state, path)
    from action.engine.postprocess import component_filter

    predict = volume_predictor(refuse_non_finite_outputs(model, f"--checkpoint {path}"), cfg, dev, prep, window, tta)
    predict.postprocess = component_filter(largest_component, cfg.num_classes)
    return predict, cfg


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: the idle cores now, at "
                   "most 4; OMP_NUM_THREADS when set)")


def cmd_train(args) -> int:
    from action.engine.logs import dump_json
    from action.engine.run_lock import run_lock
    from action.method import run_pipeline, trainer_class

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = build_config(args.preset, args.config, overrides)
    args.out_folder = cfg.out  # named by main when a write fails without naming its file
    if args.force and not args.resume:
        raise ValueError("--force only applies with --resume (to --out a run that exists, add --overwrite)")
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other: --resume continues the run in --out, "
                         "--overwrite deletes it")
    from action.engine.distributed import rank

    run = dict(resume=args.resume, overwrite=args.overwrite, force=args.force)
    # one run per folder, refused before any data is loaded (the pipeline's stages lock their own folders too);
    # under torchrun rank 0 holds it
    with run_lock(cfg.out, enabled=os.environ.get("RANK", "0") == "0"):
        if cfg.stage == "pipeline":
            results = run_pipeline(cfg, **run)
            if rank() == 0:  # under torchrun one JSON, not one per rank
                print(dump_json({s: {k: v for k, v in r.items() if k != "test"} for s, r in results.items()}))
            return 0
        result = trainer_class(cfg)(cfg).fit(**run)
    if rank() == 0:
        print(dump_json({k: v for k, v in result.items() if k != "test"}))  # standard JSON: no validation is null
    return 0


def _names(text: str | None) -> list[str] | None:
    """--cases: a comma-separated list of case names, or a file listing one per line."""
    from action.data.names import check_names, read_name_list

    if text is None:
        return None
    if os.path.isfile(text):
        return read_name_list(text)
    return check_names([n.strip() for n in text.split(",") if n.strip()], "--cases")


def _image_items(folder: str, labels: str | None, channels: int = 1):
    """(name, image file or one file per channel, label or None) of an image folder (and its label folder), in any
    format action.data.image_io reads: nnU-Net channel names allowed, `_0000` .. per case for several channels."""
    from action.data.filenames import ENDINGS, ending_of
    from action.data.layouts import channel_groups
    from action.data.nifti import label_path

    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)  # hidden files: a killed write's temporary
                   if ending_of(n) and not n.startswith("."))
    if not paths:
        raise SystemExit(f"{folder}: no image files ({', '.join(ENDINGS)})")
    items = []
    for name, files in channel_groups(paths, channels):
        label = label_path(files[0], labels) if labels else None
        if labels and label is None:
            raise FileNotFoundError(f"image {files[0]} has no label map {os.path.basename(files[0])} or "
                                    f"{name}{ending_of(files[0])} in {labels}")
        items.append((name, files[0] if channels == 1 else tuple(files), label))
    return items


def _dataset_beside(labels: str) -> tuple[tuple[str, ...] | None, int | None]:
    """(class names, ignore label) of the dataset.json beside a label folder (nnU-Net's layout: labelsTs/ next to
    dataset.json); (None, None) without one."""
    from action.data.nnunet import DatasetSpec, read_json

    beside = os.path.join(os.path.dirname(os.path.abspath(labels)), "dataset.json")
    spec = DatasetSpec.read(read_json(beside, {}), beside)
    return spec.class_names, spec.ignore_label


def _cases(args, cfg, prep):
    """(cases, count, class names or None) of evaluate's data options, after --cases / --max-volumes; prep: the
    checkpoint's preprocessing (orientation, ignore label)."""
    from action.data.layouts import NiftiLayout, detect_layout
    from action.engine import acdc_cases, nifti_cases
    from action.engine.evaluate import select_cases

    names, limit = _names(args.cases), args.max_volumes
    ignore = prep.ignore_label  # the training data's ignore label, excluded from every metric
    if args.images:
        items = select_cases(_image_items(args.images, args.labels, cfg.in_channels or 1), names, limit,
                             lambda i: i[0])
        class_names = _dataset_beside(args.labels)[0] if args.labels else None  # columns named as in dataset.json
        if class_names is not None and len(class_names) != cfg.num_classes:
            class_names = None  # a dataset.json of other classes than the checkpoint's: generic names
        return nifti_cases(items, prep.orientation, cfg.num_classes, ignore), len(items), class_names
    if args.acdc_raw:
        from action.data.nifti import acdc_raw_pairs

        items = [(os.path.basename(i).split(".nii")[0], i, lab) for i, lab in acdc_raw_pairs(args.acdc_raw)]
        items = select_cases(items, names, limit, lambda i: i[0])
        return nifti_cases(items, prep.orientation, cfg.num_classes), len(items), None
    root = args.data or cfg.data
    if detect_layout(root) != "hdf5":
        layout = NiftiLayout(root)
        _, _, val, test = layout.split(None, cfg.fold)
        if args.split == "test" and not layout.test:
            print(f"{root} has no labelled test cases (imagesTs with labelsTs): scoring the validation cases of fold "
                  f"{cfg.fold}", file=sys.stderr)
        chosen = select_cases(test if args.split == "test" else val, names, limit, lambda c: c.name)
        return nifti_cases([(c.name, c.images, c.label) for c in chosen], prep.orientation, cfg.num_classes,
                           layout.spec.ignore_label), len(chosen), layout.class_names
    from action.data import AcdcLayout

    layout = AcdcLayout(root)
    chosen = select_cases(layout.test_volumes if args.split == "test" else layout.val_volumes, names, limit)
    return acdc_cases(layout.root, chosen, cfg.num_classes), len(chosen), None


def _score_predictions(args) -> int:
    """evaluate --predictions: scores existing prediction files against --labels (or --data's labelled test or
    validation cases), no checkpoint."""
    from action.engine.postprocess import component_filter
    from action.engine.score_folder import score_folder

    for name in ("checkpoint", "images", "acdc_raw"):
        if getattr(args, name):
            raise ValueError(f"--predictions scores files that exist: drop --{name.replace('_', '-')} (it selects "
                             f"images for a checkpoint to segment)")
    labels, class_names, ignore_label = args.labels, None, None
    if args.labels and not args.data:
        class_names, ignore_label = _dataset_beside(args.labels)
    if args.data:
        from action.data.layouts import NiftiLayout

        layout = NiftiLayout(args.data)
        class_names, ignore_label = layout.class_names, layout.spec.ignore_label
        if labels is None:
            _, _, val, test = layout.split(None)
            chosen = test if args.split == "test" and layout.test else val
            labels = {c.name: c.label for c in chosen if c.label is not None}
    if labels is None:
        raise ValueError("--predictions needs the label maps to score against: --labels DIR (or --data, a NIfTI "
                         "dataset folder whose labelled test or validation cases are used)")
    num_classes = args.num_classes or (len(class_names) if class_names else None)
    postprocess = component_filter(args.largest_component, num_classes)
    metrics = score_folder(args.predictions, labels, args.out, num_classes, class_names, _names(args.cases),
                           args.max_volumes, args.nsd_tolerance, postprocess, ignore_label=ignore_label)
    print(metrics.summary_table())
    print(f"\n{len(metrics.cases)} cases; per-case metrics in {os.path.join(args.out, 'metrics.csv')}")
    return 0


def cmd_evaluate(args) -> int:
    from action.data.acdc import CLASSES
    from action.engine import evaluate
    from action.engine.threads import configure_threads

    configure_threads(args.threads)
    if args.predictions:
        return _score_predictions(args)
    if not args.checkpoint:
        raise ValueError("action evaluate needs --checkpoint (a model to run) or --predictions (files to score)")
    predict, cfg = _predictor_from_checkpoint(args.checkpoint, args.device, args.bn_recalibrate, args.data,
                                              args.teacher, args.bn_source, args.sliding_window, args.tta,
                                              args.largest_component)
    cases, total, class_names = _cases(args, cfg, predict.preprocessing)  # names checked distinct first
    class_names = class_names or (CLASSES if cfg.num_classes == len(CLASSES) else None)
    metrics = evaluate(predict, cases, args.out, cfg.num_classes, class_names,
                       save_predictions=args.save_predictions, overlays=args.overlays, total=total,
                       save_probabilities=args.save_probabilities, nsd_tolerance=args.nsd_tolerance)
    if not metrics.cases:
        raise SystemExit("no case had a label map to score against")
    print(metrics.summary_table())
    print(f"\n{len(metrics.cases)} cases; per-case metrics in {os.path.join(args.out, 'metrics.csv')}")
    return 0


def _input_items(path: str, channels: int = 1):
    """(name, image or one file per channel, None) of --input: an image file or a folder of them (<case>_0000 ..
    <case>_000{C-1} for a model of C > 1 input channels); two inputs of one case name (c.nii and c.nii.gz would
    write one prediction) are an error before anything runs."""
    from action.engine.evaluate import unique_case_names

    if channels > 1 and not os.path.isdir(path):
        raise ValueError(f"--input {path}: the model takes {channels} input channels, one file each: give the folder "
                         f"that holds <case>_0000 .. <case>_{channels - 1:04d}")
    if os.path.isdir(path):
        items = _image_items(path, None, channels)
    elif os.path.isfile(path):
        from action.data.nifti import case_name, channel_files

        items = [(case_name(path, channel_files([path])), path, None)]
    else:
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    unique_case_names([name for name, _, _ in items], [image for _, image, _ in items])
    return items


def cmd_predict(args) -> int:
    from action.engine import evaluate, nifti_cases
    from action.engine.threads import configure_threads

    configure_threads(args.threads)
    items = _input_items(args.input)  # names checked before the checkpoint is read
    predict, cfg = _predictor_from_checkpoint(args.checkpoint, args.device, args.bn_recalibrate, teacher=args.teacher,
                                              bn_source=args.bn_source, window=args.sliding_window, tta=args.tta,
                                              largest_component=args.largest_component)
    if (cfg.in_channels or 1) > 1:  # one file per channel: regrouped as the model's input channels
        items = _input_items(args.input, cfg.in_channels)
    written: list[str] = []
    evaluate(predict, nifti_cases(items, predict.preprocessing.orientation), args.out, cfg.num_classes,
             save_predictions=True, overlays=args.overlays, total=len(items), written=written,
             save_probabilities=args.save_probabilities, desc="predicting")
    print(f"wrote {len(written)} file(s) for {len(items)} input(s) to {args.out}: predictions/"
          + (", probabilities/" if args.save_probabilities else "") + " (source headers kept)")
    return 0


def cmd_ensemble(args) -> int:
    from action.engine.ensemble import ensemble_checkpoints, ensemble_folders
    from action.engine.postprocess import component_filter
    from action.engine.threads import configure_threads

    configure_threads(args.threads)
    if bool(args.checkpoints) == bool(args.predictions):
        raise ValueError("action ensemble takes --checkpoints A.pt B.pt ... (with --input) or --predictions DIR1 "
                         "DIR2 ... (folders written with --save-probabilities), one of the two")
    if args.predictions:
        if args.input:
            raise ValueError("--input is for --checkpoints; --predictions folders hold their probabilities already")
        written = ensemble_folders(args.predictions, args.out, args.save_probabilities,
                                   component_filter(args.largest_component))
        source = f"{len(args.predictions)} prediction folders"
    else:
        if len(args.checkpoints) < 2:
            raise ValueError(f"--checkpoints: ensembling needs at least two, got {len(args.checkpoints)}")
        if not args.input:
            raise ValueError("--checkpoints needs --input (a NIfTI file or a folder of them) to segment")
        items = _input_items(args.input)  # names checked before any checkpoint is read
        predictors = [_predictor_from_checkpoint(path, args.device, window=args.sliding_window, tta=args.tta)[0]
                      for path in args.checkpoints]
        if (predictors[0].cfg.in_channels or 1) > 1:  # one file per channel: regrouped as the inputs' channels
            items = _input_items(args.input, predictors[0].cfg.in_channels)
        written = ensemble_checkpoints(predictors, items, args.out, args.save_probabilities,
                                       component_filter(args.largest_component, predictors[0].cfg.num_classes))
        source = f"{len(args.checkpoints)} checkpoints"
    print(f"wrote {len(written)} file(s) to {args.out} (the mean softmax of {source}, then its argmax)")
    return 0


def cmd_convert(args) -> int:
    from action.data.convert import hdf5_to_nnunet
    from action.data.names import read_name_list
    from action.engine.threads import configure_threads

    configure_threads(args.threads)
    names = args.names
    if names not in ("all", "test", "val"):
        if not os.path.isfile(names):
            raise FileNotFoundError(f"--names {names}: expected all, test, val or a file listing volume names; no "
                                    f"such file")
        names = read_name_list(names)
    spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(spacing) != 3:
        raise SystemExit(f"--spacing takes three numbers x,y,z in mm, got {args.spacing!r}")
    done = hdf5_to_nnunet(args.data, args.out, names, spacing, args.max_volumes)
    print(f"wrote {done['training']} training and {done['test']} test volumes ({len(done['files'])} files) to "
          f"{args.out} in nnU-Net's raw layout")
    return 0


# action.engine.inference.WINDOW_MODES (not imported here: the parser is built without torch)
WINDOW_MODES = ("constant", "gaussian", "gaussian-monai")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="action", description="ACTION / ACTION++ semi-supervised segmentation: "
                                 "train, evaluate, predict, convert data.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__} (action-kernels)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (a stage of the pipeline)",
                       description="Train a model. Example: action train --preset acdc-cpu --out runs/baseline")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    def add_inference_options(p):
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--sliding-window", choices=WINDOW_MODES, default="constant",
                       help="3D checkpoints: weights of the overlapping windows' softmax: equal (default, MONAI's "
                            "constant mode), gaussian (nnU-Net's compute_gaussian: sigma 1/8 of the patch, centred "
                            "at patch // 2) or gaussian-monai (MONAI's: centred at (patch - 1) / 2, floor 1e-3)")
        p.add_argument("--tta", action="store_true",
                       help="flip test-time augmentation: softmax averaged over every mirroring of the spatial axes "
                            "(4 per 2D slice, 8 per 3D window; nnU-Net's default)")
        p.add_argument("--save-probabilities", action="store_true",
                       help="also write probabilities/<case>.nii.gz: the softmax per class, float32 (X, Y, Z, K) in "
                            "the input image's space with its header (labels are its argmax, before "
                            "--largest-component)")
        p.add_argument("--largest-component", nargs="?", const="all", metavar="CLASSES",
                       help="postprocessing: keep only the largest connected component (26-connected) of each "
                            "foreground class ('all', the default when given without a value) or of the listed "
                            "ones (e.g. 1,3); the rest becomes background")
        _add_threads_option(p)

    def add_model_options(p, checkpoint_required=True):
        p.add_argument("--checkpoint", required=checkpoint_required,
                       help="a checkpoint written by action train (best.pt or last.pt)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--overlays", type=int, default=3, help="PNG overlays for the first N cases (0: none)")
        p.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                       help="re-estimate the network's BatchNorm statistics on N batches of the run's clean "
                            "training images first (unlabelled ones when its stage used them; 0: off)")
        p.add_argument("--bn-source", choices=("run", "unlabelled"), default="run",
                       help="which slices --bn-recalibrate uses: the run's own (default) or the unlabelled ones "
                            "whatever the stage (the same slices for a supervised and an ACTION checkpoint)")
        p.add_argument("--teacher", action="store_true",
                       help="use the EMA teacher's network the checkpoint holds (ACTION stages) instead of the one "
                            "its run validated")
        add_inference_options(p)

    p = sub.add_parser("evaluate", help="score a checkpoint on labelled volumes, or prediction files",
                       description="Per-case Dice, Jaccard, HD95 (medpy's pooled convention), ASD, HD95 (MONAI's "
                                   "convention) and NSD per class (metrics.csv), a summary table (summary.md, "
                                   "summary.json), optional NIfTI predictions and PNG overlays. Data: the ACDC HDF5 "
                                   "layout (--data, --split; voxel units), NIfTI folders (--images with --labels; mm "
                                   "from the headers) or the raw ACDC layout (--acdc-raw). Without a checkpoint: "
                                   "--predictions DIR --labels DIR scores prediction files that exist.")
    add_model_options(p, checkpoint_required=False)
    p.add_argument("--predictions", metavar="DIR",
                   help="score the predictions in this folder (or its predictions/; NIfTI, or .mha/.nrrd/... with "
                        "SimpleITK) against --labels (same case names) or --data's labelled cases (its dataset.json's "
                        "ignore label left out), without a checkpoint")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="with --predictions: the number of classes, background included (default: from --data's "
                        "dataset.json, else the largest label found + 1)")
    p.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                   help="the normalised surface Dice's tolerance, in mm (voxels for the HDF5 layout) (default: 2)")
    p.add_argument("--data", help="dataset folder, ACDC HDF5 or NIfTI (nnU-Net raw, images/labels; default: the "
                                  "checkpoint's)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which cases of --data: test.list / "
                   "imagesTs+labelsTs, or val.list / the validation fold")
    p.add_argument("--images", help="folder of images, NIfTI or other formats with SimpleITK (nnU-Net's <case>_0000 "
                                    "names; <case>_0000, _0001, ... for a model of several input channels)")
    p.add_argument("--labels", help="folder of label maps with the same file names as --images (or <case>)")
    p.add_argument("--cases", help="only these cases: comma-separated names, or a file listing one per line")
    p.add_argument("--max-volumes", type=int, help="only the first N cases (after --cases)")
    p.add_argument("--acdc-raw", help="raw ACDC folder (patient<NNN>/patient<NNN>_frame<FF>[_gt].nii.gz)")
    p.add_argument("--save-predictions", action="store_true", help="write predictions/<case>.nii.gz")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment NIfTI images", description="Segment NIfTI images with the "
                       "checkpoint's preprocessing (intensity normalisation, orientation, spacing); predictions are "
                       "written in each source image's space, with its header, to <out>/predictions/.")
    add_model_options(p)
    p.add_argument("--input", required=True, help="an image file (.nii, .nii.gz; .mha, .nrrd, ... with SimpleITK) or a "
                                                  "folder of them (<case>_0000, _0001, ... for several channels)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ensemble", help="average several models' probabilities, then take labels",
                       description="The mean softmax of several checkpoints on --input (each with its own "
                                   "preprocessing, averaged in the input image's space) or of several prediction "
                                   "folders written with --save-probabilities (same cases, same space, same classes), "
                                   "then its argmax: <out>/predictions/<case>.nii.gz (and probabilities/ with "
                                   "--save-probabilities).")
    p.add_argument("--checkpoints", nargs="+", metavar="PT", help="two or more checkpoints to run on --input")
    p.add_argument("--input", help="with --checkpoints: a .nii/.nii.gz file or a folder of them")
    p.add_argument("--predictions", nargs="+", metavar="DIR",
                   help="two or more folders written by predict/evaluate --save-probabilities (or their "
                        "probabilities/ folders)")
    p.add_argument("--out", required=True, help="output folder")
    add_inference_options(p)
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("convert", help="HDF5 layout -> NIfTI (nnU-Net raw layout)", description="Write the ACDC "
                        "HDF5 layout as nnU-Net's raw layout (axes moved to x, y, z): imagesTr/<case>_0000.nii.gz + "
                        "labelsTr/<case>.nii.gz (training volumes assembled from the slices, and val.list, with "
                        "splits_final.json), imagesTs/ + labelsTs/ (test.list), dataset.json. Every command reads "
                        "it: action train --data OUT, action evaluate --data OUT, action predict --input "
                        "OUT/imagesTs.")
    c.add_argument("--data", required=True, help="ACDC HDF5 folder")
    c.add_argument("--names", default="all", help="all (train + val into imagesTr, test into imagesTs); test, val, "
                   "or a file listing volume names (into imagesTs only)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--spacing", default="1,1,1", help="voxel size x,y,z in mm to write (the HDF5 files have none)")
    c.add_argument("--max-volumes", type=int, help="only the first N volumes of each list (quick checks)")
    _add_threads_option(c)
    c.set_defaults(func=cmd_convert)
    return ap


def main(argv=None) -> int:
    """Exit status: 0 done; 2 bad input, or a file that cannot be read or written (a read-only or full disk): the
    message names the option or file; 3 training stopped on a non-finite value (its state before that iteration
    saved); 128 + signal number when interrupted (130 for Ctrl-C, 143 for SIGTERM), after the trainer saved
    last.pt. No traceback for any of them."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"action {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full disk, a path through a file: the file and the system's reason
        # a failed write that names no file (a full disk seen by write()): every output is under --out
        out = getattr(args, "out_folder", None) or getattr(args, "out", None)
        where = f"{exc.filename}: " if exc.filename else f"writing into --out {out}: " if out else ""
        print(f"action {args.command}: error: {where}{exc.strerror or exc} (the command stopped there)",
              file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"action {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:  # the trainer printed what it saved (Interrupted); nothing else to show
        signum = getattr(exc, "signum", signal.SIGINT)
        if not hasattr(exc, "signum"):
            print(f"action {args.command}: interrupted" + (f" ({exc})" if str(exc) else ""), file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())

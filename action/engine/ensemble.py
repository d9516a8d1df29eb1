"""Ensembling (`action ensemble`): the mean of several models' softmax per class, then its argmax, as nnU-Net's
nnUNetv2_ensemble and its cross-validation fold ensembles do.

Two sources:
- checkpoints (ensemble_checkpoints): every checkpoint segments every input with its own preprocessing and options
  (VolumePredictor.predict(probabilities=True)); the softmax maps are turned back to the input image's space
  (action.engine.outputs.source_probabilities) and averaged there, so checkpoints trained in different
  orientations or spacings combine;
- prediction folders (ensemble_folders) written with `--save-probabilities`: their probabilities/<case>.nii.gz maps
  (float32 (X, Y, Z, K)), which must cover the same cases, in one space (shape and affine within 1e-3) with one
  number of classes (each mismatch is an error naming both files).

Both write <out>/predictions/<case>.nii.gz (uint8 labels, argmax of the mean; ties go to the lower class) with the
source header, optionally <out>/probabilities/<case>.nii.gz (the mean), and apply `postprocess` (e.g. the largest
connected component per class) to the labels.
"""
from __future__ import annotations

import numpy as np

from action.engine.outputs import PROBABILITIES, case_file, source_probabilities, write_probabilities

PREDICTIONS = "predictions"


def _write(name: str, mean: np.ndarray, reference, out_dir: str, save_probabilities: bool, postprocess,
           written: list[str]) -> None:
    from action.data.nifti import save_nifti

    labels = mean.argmax(-1)
    if postprocess is not None:
        labels = postprocess(labels)
    path = case_file(out_dir, PREDICTIONS, name)
    if hasattr(reference, "header") and reference.header is not None:
        written.append(save_nifti(labels.astype(np.uint8), reference.affine, path, reference.header))
    else:
        written.append(save_nifti(labels.astype(np.uint8), np.eye(4) if reference is None else reference.affine,
                                  path))
    if save_probabilities:
        written.append(write_probabilities(mean, reference, case_file(out_dir, PROBABILITIES, name)))


def ensemble_checkpoints(predictors: list, items: list[tuple[str, str, str | None]], out_dir: str,
                         save_probabilities: bool = False, postprocess=None, progress: bool = True) -> list[str]:
    """predictors: VolumePredictor of each checkpoint (one number of classes); items: (case, image path, None) of
    the inputs. Returns the written paths."""
    from tqdm.auto import tqdm

    from action.data.cases import nifti_cases

    classes = {p.cfg.num_classes for p in predictors}
    if len(classes) != 1:
        raise ValueError(f"--checkpoints: the checkpoints segment different numbers of classes {sorted(classes)}: "
                         f"only models of one label set can be ensembled")
    written: list[str] = []
    for item in tqdm(items, desc="ensembling", disable=not progress, leave=False):
        total, reference = None, None
        for predictor in predictors:
            [case] = nifti_cases([item], predictor.preprocessing.orientation)
            _, probs = predictor.predict(case, probabilities=True)
            part = source_probabilities(case, probs).astype(np.float64)
            total = part if total is None else total + part
            reference = case.reference
        _write(item[0], (total / len(predictors)).astype(np.float32), reference, out_dir, save_probabilities,
               postprocess, written)
    return written


def probability_files(folders: list[str]) -> dict[str, list[str]]:
    """{case: [its probability file in each folder]}; every folder must hold the same cases."""
    from action.data.nifti import case_name
    from action.engine.score_folder import nifti_files

    per_folder = [{case_name(p): p for p in nifti_files(f, "--predictions", PROBABILITIES)} for f in folders]
    first = per_folder[0]
    for folder, files in zip(folders[1:], per_folder[1:]):
        if set(files) != set(first):
            only_a, only_b = sorted(set(first) - set(files)), sorted(set(files) - set(first))
            raise ValueError(f"--predictions: {folders[0]} and {folder} hold different cases (only in the first: "
                             f"{only_a[:5]}, only in the second: {only_b[:5]}): ensemble folders predicted from "
                             f"the same inputs")
    return {case: [files[case] for files in per_folder] for case in sorted(first)}


def ensemble_folders(folders: list[str], out_dir: str, save_probabilities: bool = False, postprocess=None,
                     progress: bool = True) -> list[str]:
    """The mean of the probability maps of several prediction folders (written with --save-probabilities), its
    argmax written as labels. Returns the written paths."""
    from tqdm.auto import tqdm

    from action.data.nifti import load_nifti

    if len(folders) < 2:
        raise ValueError(f"--predictions: ensembling needs at least two folders, got {len(folders)}")
    written: list[str] = []
    for case, paths in tqdm(list(probability_files(folders).items()), desc="ensembling", disable=not progress,
                            leave=False):
        total, first = None, None
        for path in paths:
            volume = load_nifti(path, np.float32)
            if volume.data.ndim != 4:
                raise ValueError(f"{path}: expected a probability map (X, Y, Z, K) written by --save-probabilities, "
                                 f"got shape {volume.data.shape}")
            if first is None:
                first = volume
            elif volume.data.shape != first.data.shape:
                what = "number of classes" if volume.data.shape[:3] == first.data.shape[:3] else "image grid"
                raise ValueError(f"{path} shape {volume.data.shape} != {first.path} shape {first.data.shape} (a "
                                 f"different {what}): only maps of the same inputs and label set can be averaged")
            elif not np.allclose(volume.affine, first.affine, atol=1e-3):
                raise ValueError(f"{path} and {first.path} are in different spaces (affines differ):\n"
                                 f"{first.affine}\n{volume.affine}")
            total = volume.data.astype(np.float64) if total is None else total + volume.data
        _write(case, (total / len(paths)).astype(np.float32), first, out_dir, save_probabilities, postprocess,
               written)
    return written

"""The training images of an ACDC folder in the HDF5 layout, in memory: the names of a config's split (labelled
slices, validation and test volumes), SliceData (2D: slices at the training size) and VolumeData (3D: the slices
assembled into volumes, batches of random patches). The NIfTI training sets (action.data.nifti_training) derive
from these two; action.data.training chooses between them."""
from __future__ import annotations

import torch

from action.config import TrainConfig
from action.data.acdc import AcdcLayout, AcdcSlices, assemble_volumes
from action.data.cases import acdc_cases
from action.data.sampling import load_slices, random_patches, run_seed


def acdc_names(cfg: TrainConfig):
    """(labelled slice names, unlabelled slice names, validation volumes, test volumes) of a config's ACDC folder:
    the labelled split by cfg.labelled_patients, validation cut to cfg.val_volumes when set."""
    layout = AcdcLayout(cfg.data)
    if cfg.fold != 0:
        raise ValueError(f"config fold={cfg.fold}: the HDF5 layout has one split (val.list); folds need a NIfTI "
                         f"dataset folder (action data convert --data {cfg.data} --out DIR writes one)")
    if cfg.labelled_cases is not None:
        labelled, unlabelled = layout.split(labelled_cases=cfg.labelled_cases)
    else:
        labelled, unlabelled = layout.split(labelled_patients=cfg.labelled_patients)
    val = layout.val_volumes[:cfg.val_volumes] if cfg.val_volumes else layout.val_volumes
    return labelled, unlabelled, val, layout.test_volumes


class SliceData:
    """The training slices of an ACDC folder in memory at the training size: labelled images (N_l, 1, S, S) with
    labels (N_l, S, S), unlabelled images (N_u, 1, S, S) (loaded only when the stage uses them) and, for
    --audit-pseudo-labels only, their ground truth unlabelled_truth (N_u, S, S); names and unlabelled_names: the
    slices in that order (errors about a batch name its files)."""

    channels = 1  # input channels per image (action.data.training.resolve_input_channels)

    def __init__(self, cfg: TrainConfig, need_unlabelled: bool, progress: bool = True):
        labelled, unlabelled, self.val_names, self.test_names = acdc_names(cfg)
        self.root, self.num_classes = cfg.data, cfg.num_classes
        if cfg.max_train_slices:
            labelled, unlabelled = labelled[:cfg.max_train_slices], unlabelled[:cfg.max_train_slices]
        size = (cfg.size, cfg.size)
        self.images, self.labels, self.names = load_slices(
            AcdcSlices(cfg.data, labelled, size, num_classes=cfg.num_classes), "labelled slices", progress)
        self.unlabelled, self.unlabelled_names, self.unlabelled_truth = None, [], None
        if need_unlabelled:
            # the ground truth of the unlabelled slices only for --audit-pseudo-labels (logged, never in a loss)
            audit = cfg.audit_pseudo_labels
            self.unlabelled, self.unlabelled_truth, self.unlabelled_names = load_slices(
                AcdcSlices(cfg.data, unlabelled, size, labels=audit, num_classes=cfg.num_classes if audit else None),
                "unlabelled slices", progress)

    def cases(self, names):
        """The validation or test volumes `names` as action.data.cases.Case records."""
        return acdc_cases(self.root, names, self.num_classes)

    def clean_batches(self, count: int, generator: torch.Generator, device, batch: int = 16):
        """`count` batches (batch, 1, S, S) of un-augmented training slices drawn with replacement: the unlabelled
        ones when loaded, else the labelled ones (BatchNorm re-estimation)."""
        source = self.unlabelled if self.unlabelled is not None else self.images
        for _ in range(count):
            yield source[torch.randint(len(source), (batch,), generator=generator)].to(device)


class VolumeData:
    """The training slices assembled into volumes (Z, S, S) at the in-plane training size, in memory; batches are
    random 3D patches (cfg.patch, half of them centred on foreground), drawn from generators seeded by (seed, t);
    names and unlabelled_names: the volumes in that order."""

    channels = 1

    def __init__(self, cfg: TrainConfig, need_unlabelled: bool, progress: bool = True):
        labelled, unlabelled, self.val_names, self.test_names = acdc_names(cfg)
        size = (cfg.size, cfg.size)
        self.cfg = cfg
        self.images, self.labels, self.names = assemble_volumes(cfg.data, labelled, size, cfg.num_classes)
        self.unlabelled, self.unlabelled_names = None, []
        if need_unlabelled:
            self.unlabelled, _, self.unlabelled_names = assemble_volumes(cfg.data, unlabelled, size, None)

    def cases(self, names):
        """The validation or test volumes `names` as action.data.cases.Case records."""
        return acdc_cases(self.cfg.data, names, self.cfg.num_classes)

    def clean_batches(self, count: int, generator: torch.Generator, device, batch: int = 4):
        """`count` batches (batch, 1, *patch) of un-augmented random patches of the training volumes (unlabelled
        when loaded, else labelled): BatchNorm re-estimation."""
        source = self.unlabelled if self.unlabelled is not None else self.images
        for _ in range(count):
            picks = torch.randint(len(source), (batch,), generator=generator).tolist()
            yield torch.cat([random_patches(source[i], None, tuple(self.cfg.patch), 1, generator)[0]
                             for i in picks]).to(device)

    def patches(self, indices, t: int, device) -> dict:
        lab, unl = indices
        base = run_seed(self.cfg.seed, t) * 64
        out_i, out_l = [], []
        for k, i in enumerate(lab.tolist()):
            g = torch.Generator().manual_seed(base + k)
            img, lbl = random_patches(self.images[i], self.labels[i], tuple(self.cfg.patch), 1, g)
            out_i.append(img)
            out_l.append(lbl)
        batch = {"image_l": torch.cat(out_i).to(device), "label_l": torch.cat(out_l).to(device)}
        if len(unl):
            batch["image_u"] = torch.cat([random_patches(self.unlabelled[i], None, tuple(self.cfg.patch), 1,
                                                         torch.Generator().manual_seed(base + 32 + k))[0]
                                          for k, i in enumerate(unl.tolist())]).to(device)
        return batch

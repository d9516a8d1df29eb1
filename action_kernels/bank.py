"""MemoryBank: a fixed-size ring buffer of feature rows and (optionally) their class labels, the keys of the ops.

    bank = MemoryBank(size=4096, dim=64, num_classes=4)            # an nn.Module: buffers, .to(), state_dict
    bank.push(teacher_map, labels=label_map)                      # (B, D, *S) with (B, *S) / (B, 1, *S), or rows
    protos, _ = class_prototypes(bank.keys(), bank.labels(), 4)
    loss = anatomical_contrast_loss(student_map, label_map, protos, bank.keys(), bank.labels())

Ring: slot ptr is overwritten next; slots 0 .. filled - 1 hold rows (filled grows to size and stays there), so
keys() is bank[:filled] in slot order (not age order: the ops treat keys as a set). A push of more than `size`
rows keeps the last `size`.

keys() / labels() under torch.compile: they return tensors kept on the module (views of the buffers, refreshed by
push, .to() and load_state_dict) and marked dynamic along the row axis, so a compiled function that reads them
compiles once (twice when its first call sees an empty bank: sizes 0 and 1 are always specialised) and then runs
every later fill level, full included, without a graph break or a recompile (tests/test_bank.py counts compiles).
push itself runs eagerly (call it outside the compiled region, e.g. after the optimizer step): it reads the mask
and the labels (one host synchronisation) and refuses non-finite rows (one more).

What a push keeps: rows whose mask is non-zero (mask of the labels' shapes, any dtype) and, in a labelled bank, whose
label is not ignore_label. An empty bank: keys() is (0, D); hard_negative_topk and anatomical_contrast_loss
accept it (no negatives; prototypes from it are all absent, so every query is dropped and the loss is a zero that
keeps the graph); soft_contrastive_loss with K = 0 returns a graph-keeping zero once issue 26 lands (until then
it raises, and the training package returns its own zero).

Distributed: with gather=True (the default) and an initialised torch.distributed process group of more than one
process, push all-gathers every rank's kept rows in rank order first (the counts, then the rows padded to the
largest count), so every rank holds the same bank; every rank must then call push the same number of times.
gather=False pushes the local rows only (action's Trainer gathers its deferred rows itself).

Tensor subclasses (MONAI MetaTensor) are unwrapped to plain tensors before anything else: their metadata is not
read, and a batched MetaTensor's slicing checks never run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from action_kernels._rows import plain
from action_kernels._validation import check_bank_push, check_ignore_label


def _all_gather_rows(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Each x (n, ...) of this rank -> (Σ_r n_r, ...) with every rank's rows in rank order (n_r may differ)."""
    world = dist.get_world_size()
    count = torch.tensor([xs[0].shape[0]], dtype=torch.int64, device=xs[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    out = []
    for x in xs:
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return out


class MemoryBank(nn.Module):
    """A fixed-size ring buffer of `size` feature rows of width `dim` (dtype, device), with class labels when
    num_classes is given (module docstring).

    Args:
        size: K, the number of rows kept. dim: D. num_classes: C for a labelled bank (push then takes labels in
        [0, C) or ignore_label), None for features only. dtype, device: of the stored rows (pushed rows are
        converted). ignore_label: rows pushed with this label are dropped (the ops' default, -1; pass your own,
        e.g. 255 or -100, and the same to the ops). gather: all-gather pushes across ranks when a process group
        is initialised.

    Buffers (saved in state_dict, moved by .to()): bank (K, D), ptr () int64 (the next slot), filled () int64, and
    bank_labels (K,) int64 (ignore_label in empty slots) for a labelled bank. An unlabelled bank's state_dict has
    the names of action's former FifoBank, so its checkpoints load.

    Example:
        >>> bank = MemoryBank(1024, 16, num_classes=3)
        >>> bank.push(torch.randn(2, 16, 8, 8), labels=torch.randint(0, 3, (2, 1, 8, 8)))
        128
        >>> bank.keys().shape, bank.labels().shape
        (torch.Size([128, 16]), torch.Size([128]))
    """

    def __init__(self, size: int, dim: int, num_classes: int | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, ignore_label: int = -1, gather: bool = True):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryBank: {name} must be an int >= 1, got {value!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"MemoryBank: num_classes must be None (no labels) or an int >= 1, got {num_classes!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"MemoryBank: dtype must be a floating point torch.dtype, got {dtype!r}")
        self.size, self.dim, self.num_classes = size, dim, num_classes
        self.ignore_label, self.gather = check_ignore_label(ignore_label), bool(gather)
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64, device=device))
        if num_classes is not None:
            self.register_buffer("bank_labels", torch.full((size,), ignore_label, dtype=torch.int64, device=device))
        self._ptr = self._count = 0  # host copies of ptr and filled: push needs no device read for them
        self._refresh()
        self.register_load_state_dict_post_hook(MemoryBank._after_load)

    # -- reading ------------------------------------------------------------------------------------------------
    def keys(self) -> torch.Tensor:
        """(filled, D): the stored rows, in slot order (a view of the buffer; no copy)."""
        return self._keys

    def labels(self) -> torch.Tensor:
        """(filled,) int64: the labels of keys(), row for row (a labelled bank only)."""
        if self._labels is None:
            raise RuntimeError("MemoryBank.labels(): this bank stores no labels; build it with num_classes=C")
        return self._labels

    @property
    def count(self) -> int:
        """The number of filled slots (0 .. size)."""
        return self._count

    @property
    def is_full(self) -> bool:
        return self._count == self.size

    # -- writing ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> int:
        """Appends rows, overwriting the oldest slots once full. features: (n, D) or a channel-first map (B, D, *S)
        (one row per location, in (b, *s) order); labels: one per row ((n,), (B, *S) or (B, 1, *S)), required in a
        labelled bank; mask: optional, the labels' shapes, rows kept where non-zero. Rows labelled ignore_label are
        dropped. Detached, converted to the bank's dtype and device; all-gathered across ranks (gather=True).
        Returns the number of rows written (after gathering; at most size). Raises ValueError for non-finite rows
        (they would poison every loss until overwritten; drop them with mask=torch.isfinite(x).all(1))."""
        features, labels, mask = plain(features), plain(labels), plain(mask)
        layout, y, keep = check_bank_push(features, labels, mask, self.dim, self.num_classes, self.ignore_label)
        rows = features.detach()
        if layout.spatial:
            rows = rows.movedim(1, -1)
        rows = rows.reshape(-1, self.dim)
        if y is not None:
            labelled = y != self.ignore_label
            keep = labelled if keep is None else keep & labelled
        if keep is not None:
            rows, y = rows[keep], (None if y is None else y[keep])
        rows = rows.to(device=self.bank.device, dtype=self.bank.dtype)
        y = None if y is None else y.to(self.bank.device)
        if rows.shape[0] and not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows).all(1)).sum())
            raise ValueError(f"MemoryBank.push: {bad} of the {rows.shape[0]} rows to push hold NaN or Inf (in "
                             f"{self.bank.dtype}); a bank row is read by every later loss, so nothing was pushed. "
                             f"Drop them with mask=torch.isfinite(features).all(1) (rows) or .all(1) of the map")
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = _all_gather_rows(rows, *(() if y is None else (y,)))
            rows, y = gathered[0], (gathered[1] if y is not None else None)
        n = min(rows.shape[0], self.size)
        if n == 0:
            return 0
        rows, y = rows[-n:], (None if y is None else y[-n:])
        slots = (self._ptr + torch.arange(n, device=self.bank.device)) % self.size
        self.bank.index_copy_(0, slots, rows)
        if y is not None:
            self.bank_labels.index_copy_(0, slots, y)
        self._ptr = (self._ptr + n) % self.size
        self._count = min(self.size, self._count + n)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._count)
        self._refresh()
        return n

    @torch.no_grad()
    def reset(self) -> None:
        """Empties the bank (rows zeroed, labels ignore_label)."""
        self.bank.zero_()
        if self.num_classes is not None:
            self.bank_labels.fill_(self.ignore_label)
        self._ptr = self._count = 0
        self.ptr.zero_()
        self.filled.zero_()
        self._refresh()

    # -- the views keys() / labels() return, kept in step with the buffers ---------------------------------------
    def _refresh(self) -> None:
        self._keys = self.bank[:self._count]
        self._labels = self.bank_labels[:self._count] if self.num_classes is not None else None
        for view in (self._keys, self._labels):
            if view is not None:  # a compiled reader sees a symbolic row count: no recompile as the bank fills
                torch._dynamo.maybe_mark_dynamic(view, 0)

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .half(), ...: new buffers, new views
        out = super()._apply(*args, **kwargs)
        self._refresh()
        return out

    @staticmethod
    def _after_load(module: MemoryBank, incompatible) -> None:
        ptr, filled = int(module.ptr), int(module.filled)
        if not (0 <= filled <= module.size and 0 <= ptr < module.size and (filled == module.size or ptr == filled)):
            raise ValueError(f"MemoryBank.load_state_dict: ptr={ptr}, filled={filled} do not describe a ring of size "
                             f"{module.size} (0 <= ptr < size, filled <= size, ptr == filled until full)")
        module._ptr, module._count = ptr, filled
        module._refresh()

    def __getstate__(self):  # copy.deepcopy / pickle: the views are rebuilt from the copied buffers
        state = self.__dict__.copy()
        state.pop("_keys", None)
        state.pop("_labels", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._refresh()

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, num_classes={self.num_classes}, dtype={self.bank.dtype}, "
                f"ignore_label={self.ignore_label}, gather={self.gather}, filled={self._count}")

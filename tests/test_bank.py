"""MemoryBank: ring semantics against a plain list, masks and ignore labels, errors, MONAI MetaTensor input, keys()
under torch.compile(fullgraph=True) while the bank fills (one compile), state_dict / .to() / deepcopy, old FifoBank
checkpoints, and two gloo processes pushing in rank order."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch

import action_kernels as ak
from helpers import free_port, fresh_seed

try:
    import monai  # noqa: F401
    HAVE_MONAI = True
except ImportError:
    HAVE_MONAI = False


def _expected_slots(pushes, size, dim):
    """The ring, replayed with Python lists: slot order of every row pushed (the last `size` of a large push)."""
    slots, ptr, filled = [None] * size, 0, 0
    for rows in pushes:
        for r in rows[-size:]:
            slots[ptr] = r
            ptr = (ptr + 1) % size
            filled = min(size, filled + 1)
    return torch.stack(slots[:filled]) if filled else torch.zeros(0, dim)


def test_pushes_fill_the_slots_in_order_wrap_around_and_keep_the_last_size_rows():
    g = torch.Generator().manual_seed(fresh_seed())
    size, dim = 7, 3
    bank = ak.MemoryBank(size, dim)
    pushes = []
    for n in (0, 2, 3, 4, 1, 9, 5):
        rows = torch.randn(n, dim, generator=g)
        assert bank.push(rows) == min(n, size)
        pushes.append(list(rows))
        assert torch.equal(bank.keys(), _expected_slots(pushes, size, dim))
        assert bank.count == bank.keys().shape[0] == min(size, sum(len(p) for p in pushes))
    assert bank.is_full and int(bank.ptr) == sum(len(p[-size:]) for p in pushes) % size


def test_a_map_is_pushed_one_row_per_location_with_its_labels_mask_and_ignored_pixels_dropped():
    g = torch.Generator().manual_seed(fresh_seed())
    feats = torch.randn(2, 4, 3, 5, generator=g)
    labels = torch.randint(0, 3, (2, 1, 3, 5), generator=g)
    labels[0, 0, 0] = 255
    mask = torch.rand(2, 1, 3, 5, generator=g) > 0.4
    bank = ak.MemoryBank(100, 4, num_classes=3, ignore_label=255)
    n = bank.push(feats, labels=labels, mask=mask.float())  # a float 0/1 mask works like the bool one
    rows, flat = feats.movedim(1, -1).reshape(-1, 4), labels.reshape(-1)
    keep = mask.reshape(-1) & (flat != 255)
    assert n == int(keep.sum())
    assert torch.equal(bank.keys(), rows[keep]) and torch.equal(bank.labels(), flat[keep])
    assert (bank.bank_labels[n:] == 255).all()  # empty slots carry the ignore label


def test_bad_pushes_are_refused_by_name_and_push_nothing():
    labelled = ak.MemoryBank(8, 4, num_classes=3)
    with pytest.raises(ValueError, match=r"features must have the bank's feature size D=4 .* got shape \(2, 5\)"):
        labelled.push(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels are required: this MemoryBank stores labels \(num_classes=3\)"):
        labelled.push(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        labelled.push(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape .* whose shape is \(2, 4, 6, 6\)\), got \(2, 3, 3\)"):
        labelled.push(torch.randn(2, 4, 6, 6), torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must have shape \(8,\) .*got \(2, 3\)"):
        labelled.push(torch.randn(2, 4, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long), mask=torch.ones(2, 3))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"1 of the 3 rows to push hold NaN or Inf"):
        labelled.push(bad, torch.zeros(3, dtype=torch.long))
    assert labelled.count == 0  # nothing pushed by any of them
    labelled.push(bad, torch.zeros(3, dtype=torch.long), mask=torch.isfinite(bad).all(1))  # the fix it names
    assert labelled.count == 2
    plain = ak.MemoryBank(8, 4)
    with pytest.raises(ValueError, match="built without num_classes, which stores no labels"):
        plain.push(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="this bank stores no labels"):
        plain.labels()
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        ak.MemoryBank(0, 4)


@pytest.mark.skipif(not HAVE_MONAI, reason="monai is not installed (pip install monai, or the dev extra)")
def test_batched_metatensor_maps_push_like_plain_tensors():
    """MONAI's collated MetaTensor refused the row slicing of the old FifoBank ('Inconsistent batched metadata')."""
    from monai.data import MetaTensor, list_data_collate

    g = torch.Generator().manual_seed(fresh_seed())
    items = [{"f": MetaTensor(torch.randn(4, 3, 5, generator=g)), "y": MetaTensor(torch.randint(0, 2, (1, 3, 5)))}
             for _ in range(3)]
    batch = list_data_collate(items)
    assert isinstance(batch["f"], MetaTensor) and batch["f"].is_batch
    meta, ref = ak.MemoryBank(16, 4, num_classes=2), ak.MemoryBank(16, 4, num_classes=2)
    for _ in range(2):
        assert meta.push(batch["f"], labels=batch["y"], mask=batch["y"] >= 0) == \
            ref.push(batch["f"].as_tensor(), labels=batch["y"].as_tensor())
    rows = batch["f"].movedim(1, -1).reshape(-1, 4)  # 45 rows of a batched MetaTensor
    unlabelled = ak.MemoryBank(5, 4)
    unlabelled.push(rows)  # FifoBank's rows[-5:] of this raised
    assert type(meta.keys()) is torch.Tensor and type(meta.labels()) is torch.Tensor
    assert torch.equal(meta.keys(), ref.keys()) and torch.equal(meta.labels(), ref.labels())
    assert torch.equal(unlabelled.keys(), rows.as_tensor()[-5:])


# -- torch.compile ---------------------------------------------------------------------------------------------------
def _loss_reading_the_bank(bank, student, teacher, labels):
    protos, _ = ak.class_prototypes(bank.keys(), bank.labels(), 3)
    anat = ak.anatomical_contrast_loss(student, labels, protos, bank.keys(), bank.labels(), num_negatives=4)
    values, _ = ak.hard_negative_topk(student, labels, bank.keys(), bank.labels(), 4)
    soft = ak.soft_contrastive_loss(student, teacher, bank.keys())
    return anat + soft + values.nan_to_num(neginf=0.0).sum() * 1e-3


def test_keys_under_compile_fullgraph_compile_once_while_the_bank_fills_and_wraps():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(fresh_seed())
    bank = ak.MemoryBank(40, 6, num_classes=3)
    student = torch.randn(2, 6, 3, 3, generator=g, requires_grad=True)
    teacher, labels = torch.randn(2, 6, 3, 3, generator=g), torch.randint(0, 3, (2, 3, 3), generator=g)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda s, t, y: _loss_reading_the_bank(bank, s, t, y), backend=counter, fullgraph=True)
    sizes = []
    for _ in range(9):  # 7 rows a push: 7, 14, ..., 35, then full (40) and wrapping
        bank.push(torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g))
        sizes.append(bank.count)
        got = compiled(student, teacher, labels)
        want = _loss_reading_the_bank(bank, student, teacher, labels)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(got, student)
        assert torch.isfinite(grad).all()
    assert sizes == [7, 14, 21, 28, 35, 40, 40, 40, 40]
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for bank sizes {sizes}"


class _Head(torch.nn.Module):
    """A projection and an anatomical loss against a bank the module holds (a buffer-carrying submodule)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(6, 6, 1)
        self.bank = ak.MemoryBank(30, 6, num_classes=3)

    def forward(self, x, y):
        emb = self.proj(x)
        protos, _ = ak.class_prototypes(self.bank.keys(), self.bank.labels(), 3)
        return ak.anatomical_contrast_loss(emb, y, protos, self.bank.keys(), self.bank.labels(), num_negatives=3)


def _fill_and_compare(head, compiled, x, y, g, pushes):
    for _ in range(pushes):
        head.bank.push(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
        torch.testing.assert_close(compiled(x, y), head(x, y), rtol=1e-6, atol=1e-6)


def test_a_compiled_module_holding_a_filling_bank_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(fresh_seed())
    head, counter = _Head(), CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(head, backend=counter, fullgraph=True)
    x, y = torch.randn(2, 6, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)
    _fill_and_compare(head, compiled, x, y, g, 6)  # 8, 16, 24, then full at 30
    assert head.bank.is_full and counter.frame_count == 1


def test_a_compiled_module_holding_an_empty_then_filling_bank_compiles_at_most_twice():
    """Sizes 0 and 1 are always specialised by torch.compile: an empty bank costs one more compile, then none."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(fresh_seed())
    head, counter = _Head(), CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(head, backend=counter, fullgraph=True)
    x, y = torch.randn(2, 6, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)
    empty = compiled(x, y)  # failed once: torch.compile's fake inf norm refused the empty (0, D) bank
    assert empty.item() == 0.0 and empty.requires_grad  # no prototypes yet: every query dropped, graph kept
    _fill_and_compare(head, compiled, x, y, g, 6)
    assert counter.frame_count == 2


def test_an_empty_bank_gives_a_zero_soft_loss_that_keeps_the_graph():
    bank = ak.MemoryBank(16, 4)
    student = torch.randn(3, 4, requires_grad=True)
    loss = ak.soft_contrastive_loss(student, torch.randn(3, 4), bank.keys())
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


# -- state ---------------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_to_deepcopy_and_further_pushes_agree():
    g = torch.Generator().manual_seed(fresh_seed())
    bank = ak.MemoryBank(10, 3, num_classes=4)
    for n in (4, 5, 3):
        bank.push(torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    loaded = ak.MemoryBank(10, 3, num_classes=4)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert sorted(bank.state_dict()) == ["bank", "bank_labels", "filled", "ptr"]
    twins = [loaded, copy.deepcopy(bank), bank]
    assert all(t.count == 10 and t._ptr == 2 for t in twins)
    more = torch.randn(4, 3, generator=g), torch.randint(0, 4, (4,), generator=g)
    for t in twins:
        t.push(*more)
    for t in twins[:2]:
        assert torch.equal(t.keys(), bank.keys()) and torch.equal(t.labels(), bank.labels())
        assert t.keys().data_ptr() == t.bank.data_ptr()  # views of its own buffers, not of the original's
    wide = bank.to(torch.float64)
    assert wide.keys().dtype == torch.float64 and wide.keys().shape == (10, 3)


def test_a_former_fifobank_checkpoint_loads_and_an_inconsistent_one_is_refused():
    old = {"bank": torch.arange(12.0).view(4, 3), "ptr": torch.tensor(3), "filled": torch.tensor(3)}
    bank = ak.MemoryBank(4, 3)
    bank.load_state_dict(old)
    assert torch.equal(bank.keys(), old["bank"][:3])
    bank.push(torch.full((2, 3), -1.0))
    assert bank.is_full and torch.equal(bank.keys()[0], torch.full((3,), -1.0)) and int(bank.ptr) == 1
    with pytest.raises(ValueError, match="do not describe a ring of size 4"):
        ak.MemoryBank(4, 3).load_state_dict({**old, "ptr": torch.tensor(1)})


# -- torch.distributed -----------------------------------------------------------------------------------------------
GLOO = """
import sys
import torch
import torch.distributed as dist
import action_kernels as ak

dist.init_process_group("gloo")
rank = dist.get_rank()
bank = ak.MemoryBank(12, 2, num_classes=3)
local = ak.MemoryBank(12, 2, num_classes=3, gather=False)
for step in range(3):
    n = 2 + 3 * rank - step  # unequal counts per rank and per step: 2, 1, 0 rows on rank 0; 5, 4, 3 on rank 1
    rows = torch.stack([torch.full((n,), float(rank)), 100.0 * step + torch.arange(n)], 1)
    labels = torch.full((n,), rank + 1)
    labels[::2] = -1 if rank else labels[::2]  # rank 1 drops its even rows before gathering
    bank.push(rows, labels)
    local.push(rows, labels)
torch.save({"keys": bank.keys(), "labels": bank.labels(), "local": local.keys()}, sys.argv[1] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_gloo_processes_push_every_ranks_rows_in_rank_order(tmp_path):
    script = tmp_path / "push.py"
    script.write_text(GLOO)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the expected ring: per step rank 0's kept rows, then rank 1's (odd positions only), 12 slots
    expected, expected_labels = [], []
    for step in range(3):
        for rank in (0, 1):
            n = 2 + 3 * rank - step
            for i in range(n):
                if rank == 1 and i % 2 == 0:
                    continue
                expected.append([float(rank), 100.0 * step + i])
                expected_labels.append(rank + 1)
    assert len(expected) == 2 + 1 + 0 + 2 + 2 + 1  # 8 rows, no wrap
    assert torch.equal(r0["keys"], torch.tensor(expected)) and torch.equal(r1["keys"], r0["keys"])
    assert torch.equal(r0["labels"], torch.tensor(expected_labels)) and torch.equal(r1["labels"], r0["labels"])
    assert (r0["local"][:, 0] == 0).all() and (r1["local"][:, 0] == 1).all()  # gather=False: local rows only
    assert r0["local"].shape[0] == 3 and r1["local"].shape[0] == 5

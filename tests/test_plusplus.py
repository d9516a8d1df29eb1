"""ACTION++: the temperature scheduler, the precomputed class centres, the Hungarian assignment, the SAACL loss
against a plain-torch reference written from the formula, and a fine-tuning run with both switched on."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from action.method.plusplus import (
    SaaclState,
    assign_centres,
    ats_temperature,
    class_centres,
    compute_centres,
    saacl_loss,
)
from action_kernels.testing import assert_allowed
from helpers import needs_acdc, stage_config


def test_ats_matches_its_formula():
    T, lo, hi = 40, 0.1, 1.0
    for t in range(0, 81, 7):
        want = lo + 0.5 * (hi - lo) * (1 + math.cos(2 * math.pi * t / T))
        assert ats_temperature(t, T, lo, hi) == pytest.approx(want)
    assert ats_temperature(0, T) == pytest.approx(1.0) and ats_temperature(20, T) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="period"):
        ats_temperature(1, 0)


@pytest.mark.parametrize("C,d", [(4, 8), (4, 128), (6, 5), (3, 2)])
def test_centres_are_a_regular_simplex_when_the_dimension_allows(C, d):
    psi = compute_centres(C, d, 0.1, 2000)
    torch.testing.assert_close(psi.norm(dim=1), torch.ones(C))
    cos = psi @ psi.T
    off = cos[~torch.eye(C, dtype=torch.bool)]
    assert off.max() <= -1 / (C - 1) + 1e-4 and off.min() >= -1 / (C - 1) - 1e-4  # all pairs at the simplex angle
    assert torch.equal(compute_centres(C, d, 0.1, 2000), psi)  # deterministic


def test_centres_are_cached_on_disk(tmp_path):
    a = class_centres(4, 16, 0.1, str(tmp_path), steps=300)
    [f] = list(tmp_path.iterdir())
    assert torch.equal(torch.load(f, weights_only=True), a)
    f.write_bytes(b"broken")
    assert torch.equal(class_centres(4, 16, 0.1, str(tmp_path), steps=300), a)  # recomputed, same answer


@pytest.mark.parametrize("C", [2, 3, 4, 5, 6])
def test_assignment_is_the_best_permutation(C):
    g = torch.Generator().manual_seed(C)
    phi, psi = torch.randn(C, 7, generator=g), torch.randn(C, 7, generator=g)
    perm = assign_centres(phi, psi)
    assert sorted(perm.tolist()) == list(range(C))
    cos = F.normalize(phi, dim=1) @ F.normalize(psi, dim=1).T
    best = max(sum(cos[c, p[c]] for c in range(C)) for p in itertools.permutations(range(C)))
    assert sum(cos[c, perm[c]] for c in range(C)) == pytest.approx(float(best), abs=1e-5)


def saacl_reference(q, y, keys, ky, centres, assign, tau, lam):
    """The formula, one query at a time, float64."""
    total = []
    for i in range(q.shape[0]):
        qi = F.normalize(q[i].double(), dim=0)
        ks = [F.normalize(keys[j].double(), dim=0) for j in range(keys.shape[0]) if ky[j] >= 0]
        ls = [int(ky[j]) for j in range(keys.shape[0]) if ky[j] >= 0]
        denom = torch.logsumexp(torch.stack([qi @ k / tau for k in ks]), 0)
        pos = [qi @ k / tau - denom for k, lab in zip(ks, ls) if lab == int(y[i])]
        sup = -torch.stack(pos).mean() if pos else torch.zeros((), dtype=torch.float64)
        cs = F.normalize(centres.double(), dim=1)
        c_logits = torch.stack([qi @ c / tau for c in cs])
        centre = torch.logsumexp(c_logits, 0) - c_logits[int(assign[int(y[i])])]
        total.append(sup + lam * centre)
    return torch.stack(total).mean()


def test_saacl_loss_equals_the_formula_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (9,), generator=g)
    keys = torch.randn(12, 6, generator=g)
    ky = torch.randint(-1, 3, (12,), generator=g)
    ky[ky == 2] = -1  # class 2 has no positive: its queries keep only the centre term
    centres = compute_centres(3, 6, 0.1, 500)
    assign = torch.tensor([2, 0, 1])
    got = saacl_loss(q, y, keys, ky, centres, assign, 0.3, 0.2, chunk=4)
    want = saacl_reference(q.detach(), y, keys, ky, centres, assign, 0.3, 0.2)
    assert_allowed("saacl", got.detach(), want, "saacl_fp32")
    got.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    empty = saacl_loss(q[:0], y[:0], keys, ky, centres, assign, 0.3)
    assert empty.item() == 0.0


def test_running_means_and_queue():
    state = SaaclState(3, 4, queue_size=5, centres=torch.eye(3, 4), eta=0.1)
    f = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    state.update_means(f, torch.tensor([0, 1]))
    torch.testing.assert_close(state.phi[:2], torch.eye(2, 4))  # first sighting: the batch mean
    state.update_means(torch.tensor([[0, 1.0, 0, 0]]), torch.tensor([0]))
    torch.testing.assert_close(state.phi[0], F.normalize(torch.tensor([0.9, 0.1, 0, 0]), dim=0))
    assert state.phi[2].abs().sum() == 0  # unseen class untouched
    assert state.assignment().tolist() == [0, 1, 2]
    state.push(torch.randn(7, 4), torch.arange(7) % 3)
    assert (state.queue_labels >= 0).all() and int(state.queue_bank.ptr) == 0 and state.queue.shape == (5, 4)
    torch.testing.assert_close(state.queue.norm(dim=1), torch.ones(5))  # unit rows


def test_a_saacl_state_of_the_former_buffer_layout_loads_into_the_memory_bank_queue():
    """Checkpoints written before the queue became an ak.MemoryBank held queue / queue_labels / ptr buffers, the
    queue full-size with labels -1 in its empty slots."""
    queue = F.normalize(torch.randn(6, 4), dim=1)
    queue[4:] = 0
    old = {"centres": torch.eye(3, 4), "phi": torch.zeros(3, 4), "seen": torch.zeros(3, dtype=torch.bool),
           "queue": queue, "queue_labels": torch.tensor([2, 0, 1, 1, -1, -1]), "ptr": torch.tensor(4)}
    state = SaaclState(3, 4, queue_size=6, centres=torch.zeros(3, 4))
    state.load_state_dict(old)
    assert torch.equal(state.queue, queue[:4]) and state.queue_labels.tolist() == [2, 0, 1, 1]
    state.push(torch.ones(3, 4), torch.tensor([0, 1, 2]))  # continues at slot 4, wraps to slot 0
    assert state.queue_labels.tolist() == [2, 0, 1, 1, 0, 1] and int(state.queue_bank.ptr) == 1


@needs_acdc
def test_finetune_with_saacl_and_ats_runs_and_logs_the_term(tmp_path, monkeypatch):
    import csv

    from action.method import PlusPlusFinetuner, trainer_class

    monkeypatch.setenv("ACTION_CACHE", str(tmp_path / "cache"))
    cfg = stage_config(tmp_path / "run", "finetune", iterations=3, plusplus=True, ats=True, saacl_dim=8,
                       saacl_queue=64, saacl_push=16)
    assert trainer_class(cfg) is PlusPlusFinetuner  # --plusplus selects the registered variant of "finetune"
    trainer = trainer_class(cfg)(cfg, progress=False)
    assert set(trainer.teacher.module) == {"net", "saacl"} and trainer.stage == "finetune"
    trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "train.csv")))
    assert len(rows) == 3 and all(math.isfinite(float(r["saacl"])) for r in rows)
    assert trainer.temperature("anco", 0.5) == pytest.approx(ats_temperature(3, 3))

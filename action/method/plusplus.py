"""ACTION++ additions (docs/method.md section 7): the anatomical-aware temperature scheduler and the supervised adaptive
anatomical contrast (SAACL).

- ATS: tau(t) = tau_min + 0.5 (tau_max - tau_min) (1 + cos(2 pi t / T)), one period over T iterations.
- Class centres psi (C, d) on the unit sphere, precomputed without data by minimising the uniformity loss
  sum_c log sum_c' exp(psi_c . psi_c' / tau): deterministic (seeded start, fixed steps), cached on disk.
- Running class means phi_c <- n((1 - eta) phi_c + eta n(mean of the batch embeddings of class c)), eta = 0.1.
- Centre assignment pi by the Hungarian algorithm (scipy) maximising sum_c phi_c . psi_pi(c).
- Loss per labelled query q (unit vector) of class y, against a queue of labelled teacher features (keys a, labels):
      L_q = -1/|P(q)| sum_{p in P(q)} log( exp(q.p / tau) / sum_{a in queue} exp(q.a / tau) )      (supervised
            contrastive; P(q) = queue entries of class y; queries with no positive contribute 0)
          + lambda_a * -log( exp(q.psi_pi(y) / tau) / sum_c exp(q.psi_c / tau) )             (assigned centre)
  averaged over the queries. The queue term is computed in row chunks (no Q x K matrix beyond a chunk).
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import action_kernels as ak


def ats_temperature(t: int, period: int, tau_min: float = 0.1, tau_max: float = 1.0) -> float:
    """The ACTION++ temperature at iteration t (cosine, one period of `period` iterations, starts at tau_max)."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(2.0 * math.pi * t / period))


def uniformity_loss(psi: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.logsumexp(psi @ psi.T / tau, dim=1).sum()


def compute_centres(num_classes: int, dim: int, tau: float = 0.1, steps: int = 2000, seed: int = 0) -> torch.Tensor:
    """(C, dim) unit vectors minimising the uniformity loss: float64 L-BFGS (strong Wolfe line search, at most
    `steps` iterations) on unconstrained vectors whose normalised form enters the loss, from a seeded Gaussian
    start; deterministic for given arguments."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(num_classes, dim, generator=g, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.LBFGS([raw], lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = uniformity_loss(F.normalize(raw, dim=1), tau)
        loss.backward()
        return loss

    opt.step(closure)
    return F.normalize(raw.detach(), dim=1).float()


def class_centres(num_classes: int, dim: int, tau: float = 0.1, cache_dir: str | None = None,
                  steps: int = 2000) -> torch.Tensor:
    """compute_centres, cached as <cache_dir>/centres-C<C>-d<dim>-tau<tau>-<hash>.pt (default cache:
    $ACTION_CACHE or ~/.cache/action). A cache file that is not such centres (centres_problem: corrupt, poisoned with
    NaN, or tampered) is recomputed, with a line naming it."""
    cache_dir = cache_dir or os.environ.get("ACTION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "action"))
    key = hashlib.sha1(f"{num_classes}-{dim}-{tau}-{steps}-v1".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"centres-C{num_classes}-d{dim}-tau{tau}-{key}.pt")
    if os.path.isfile(path):
        try:
            from action.data.limits import check_zip_archive

            check_zip_archive(path)
            psi = torch.load(path, weights_only=True)
            problem = centres_problem(psi, num_classes, dim, tau)
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt
            problem = f"unreadable ({type(exc).__name__}: {str(exc)[:200]})"
        if problem is None:
            return psi
        print(f"ignored the class-centre cache {path}: {problem}; recomputing it", flush=True)
    psi = compute_centres(num_classes, dim, tau, steps)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(psi, tmp)
    os.replace(tmp, path)
    return psi


def centres_problem(psi, num_classes: int, dim: int, tau: float) -> str | None:
    """Why `psi` (read from a cache) is not a set of class centres of compute_centres' kind, or None: a float tensor
    (num_classes, dim) of finite unit rows at a stationary point of the uniformity loss (its gradient along the
    sphere below 1e-4: random unit vectors give about 1e-2). A rotation of the optimum is an optimum too and passes."""
    if not isinstance(psi, torch.Tensor) or not psi.is_floating_point() or tuple(psi.shape) != (num_classes, dim):
        return f"expected a float tensor of shape ({num_classes}, {dim})"
    if not bool(torch.isfinite(psi).all()):
        return "it holds NaN or infinite values"
    x = psi.detach().double()
    if float((x.norm(dim=1) - 1).abs().max()) > 1e-4:
        return "its rows are not unit vectors"
    x.requires_grad_(True)
    uniformity_loss(x, tau).backward()
    x, g = x.detach(), x.grad
    along = float((g - (g * x).sum(1, keepdim=True) * x).norm())  # the gradient's part along the sphere
    if along > 1e-4:
        return f"not a minimum of the uniformity loss (gradient {along:.1e})"
    return None


def assign_centres(phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """The permutation pi (C,) maximising sum_c cos(phi_c, psi_pi(c)) (scipy's Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    cos = (F.normalize(phi.double(), dim=1) @ F.normalize(psi.double(), dim=1).T).cpu().numpy()
    rows, cols = linear_sum_assignment(-cos)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(phi.device)


def saacl_loss(queries: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor,
               centres: torch.Tensor, assignment: torch.Tensor, tau: float, lambda_a: float = 0.2,
               chunk: int = 1024) -> torch.Tensor:
    """SAACL (module docstring). queries (Q, d) with grad, labels (Q,); queue (K, d) and queue_labels (K,)
    (detached teacher features; -1 marks empty slots); centres (C, d); assignment (C,). Returns a scalar; no
    query -> a graph-keeping zero."""
    if queries.shape[0] == 0:
        return queries.sum() * 0.0
    q = F.normalize(queries.float(), dim=1)
    keys = F.normalize(queue.float().detach(), dim=1)
    valid = queue_labels >= 0
    terms = []
    for s in range(0, q.shape[0], chunk):
        qc, yc = q[s:s + chunk], labels[s:s + chunk]
        logits = qc @ keys.T / tau
        logits = logits.masked_fill(~valid[None], float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (queue_labels[None] == yc[:, None]) & valid[None]
        n_pos = pos.sum(1)
        sup = -(log_prob.masked_fill(~pos, 0.0).sum(1)) / n_pos.clamp_min(1)
        sup = torch.where(n_pos > 0, sup, torch.zeros_like(sup))
        c_logits = qc @ F.normalize(centres.float(), dim=1).T / tau
        centre = torch.logsumexp(c_logits, dim=1) - c_logits.gather(1, assignment[yc][:, None])[:, 0]
        terms.append(sup + lambda_a * centre)
    return torch.cat(terms).mean()


class SaaclState(nn.Module):
    """Running class means phi (C, d), the centres psi (C, d) and a labelled feature queue (queue_bank, an
    ak.MemoryBank: queue / queue_labels are its filled rows), as buffers (saved in checkpoints; those of the former
    queue / queue_labels / ptr buffers load too)."""

    def __init__(self, num_classes: int, dim: int, queue_size: int, centres: torch.Tensor, eta: float = 0.1):
        super().__init__()
        self.eta = eta
        self.register_buffer("centres", centres.clone())
        self.register_buffer("phi", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        # gather=False: the Trainer all-gathers the deferred rows itself (action.engine.distributed.gather_in_order)
        self.queue_bank = ak.MemoryBank(queue_size, dim, num_classes, gather=False)

    @property
    def queue(self) -> torch.Tensor:
        """(k, d) the unit teacher features in the queue, k <= queue_size."""
        return self.queue_bank.keys()

    @property
    def queue_labels(self) -> torch.Tensor:
        """(k,) their labels."""
        return self.queue_bank.labels()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "queue"
        if old in state_dict and prefix + "queue_bank.bank" not in state_dict:  # a checkpoint of the former layout
            labels = state_dict.pop(prefix + "queue_labels")
            state_dict[prefix + "queue_bank.bank"] = state_dict.pop(old)
            state_dict[prefix + "queue_bank.bank_labels"] = labels
            state_dict[prefix + "queue_bank.ptr"] = state_dict.pop(prefix + "ptr")
            state_dict[prefix + "queue_bank.filled"] = (labels >= 0).sum()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_means(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """phi_c <- n((1 - eta) phi_c + eta n(batch mean of class c)) for the classes in the batch (a class seen
        for the first time starts at its batch mean)."""
        C = self.phi.shape[0]
        f = F.normalize(features.float(), dim=1)
        sums = torch.zeros_like(self.phi).index_add_(0, labels, f)
        counts = torch.bincount(labels, minlength=C)
        here = counts > 0
        mean = F.normalize(sums / counts.clamp_min(1)[:, None], dim=1)
        blended = F.normalize((1 - self.eta) * self.phi + self.eta * mean, dim=1)
        new = torch.where(self.seen[:, None], blended, mean)
        self.phi.copy_(torch.where(here[:, None], new, self.phi))
        self.seen |= here

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """features (n, d), labels (n,) in [0, C): their unit rows into the queue (the oldest overwritten)."""
        self.queue_bank.push(F.normalize(features.float(), dim=1), labels)

    def assignment(self) -> torch.Tensor:
        return assign_centres(self.phi, self.centres)

"""The three benchmarked ops, each with its baselines and ours, on identical inputs.

A workload says how to build inputs for a size, what each provider computes (a callable returning a scalar loss
to differentiate, or a tensor for forward-only ops), how to check a provider against float64 (the gate), how many
FLOPs a call counts, and how many N x K-sized fp32 matrices a materialising provider keeps (to skip, not crash,
where it would run out of memory).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import action_kernels as ak
from action_kernels.dispatch import FUSED  # every backend with kernels: a new backend is benchmarked with no edit here
from action_kernels.reference import anatomical_contrast_loss_ref, hard_negative_topk_ref
from action_kernels.testing import rel_error


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


class SoftContrastive:
    """soft_contrastive_loss: size (N rows, K keys, D), forward + backward to the student."""

    name, backward = "soft", True
    providers = ("naive", "compile") + FUSED
    materialised = {"naive": 5.0, "compile": 3.0}  # N x K fp32 matrices at the peak (measured on CPU: 4.9, 2.6)
    tau_s, tau_t = 0.1, 0.01
    gate_size = (2048, 1024)

    tiny_providers = ("naive", "chunked")

    def default_sizes(self, device, preset):
        if preset == "tiny":  # per-call overhead: a batch's global features against a small bank, and pixels
            return [(64, 64, 16), (256, 128, 32)]
        if preset == "quick":
            return [(4096, 1024, 128), (4096, 4096, 128)]
        return [(16384, 8192, 128)] if device.type == "cpu" else [(65536, 4096, 128), (65536, 65536, 128),
                                                                   (65536, 16384, 512)]

    def make_inputs(self, size, dtype, device, seed=0):
        N, K, D = size
        g = _gen(seed)
        s = torch.randn(N, D, generator=g)
        t = s + 0.7 * torch.randn(N, D, generator=g)
        k = torch.randn(K, D, generator=g)
        return (s.to(device=device, dtype=dtype).requires_grad_(True), t.to(device=device, dtype=dtype),
                k.to(device=device, dtype=dtype))

    def naive(self, s, t, k):
        """The reference code's formulation: materialises the logits, softmax, log-softmax and KL terms."""
        s, t, k = F.normalize(s, dim=1), F.normalize(t, dim=1), F.normalize(k, dim=1)
        return F.kl_div(F.log_softmax(s @ k.T / self.tau_s, dim=1), F.softmax(t @ k.T / self.tau_t, dim=1),
                        reduction="batchmean")

    def ours(self, backend):
        return lambda s, t, k: ak.soft_contrastive_loss(s, t, k, self.tau_s, self.tau_t, backend=backend)

    def gate(self, provider, fn, size, dtype, device):
        s, t, k = self.make_inputs((*self.gate_size, size[2]), dtype, device, seed=1)
        loss = fn(s, t, k)
        loss.backward()
        s64 = s.detach().double().requires_grad_(True)
        ref = self.naive(s64, t.double(), k.double())
        ref.backward()
        return max(rel_error(loss.detach(), ref.detach()), rel_error(s.grad, s64.grad))

    def flops(self, size):
        N, K, D = size
        return 3 * 2.0 * N * K * D  # two logit GEMMs and one gradient GEMM

    def floor_flops(self, size):
        N, K, D = size
        return 5 * 2.0 * N * K * D  # the 5-GEMM floor of forward + backward (kernels.md)

    def rows_keys(self, size):
        return size[0], size[1]

    def describe(self, size):
        return f"N={size[0]} K={size[1]} D={size[2]}"


class HardNegativeTopk:
    """hard_negative_topk: size (N anchors, K keys, D), k negatives, 4 classes with 80% of keys in one; forward."""

    name, backward = "topk", False
    providers = ("naive",) + FUSED
    materialised = {"naive": 2.5}  # similarity, masked copy, mask
    k = 64
    gate_size = (1024, 2048)

    tiny_providers = ("naive", "chunked")

    def default_sizes(self, device, preset):
        if preset == "tiny":
            return [(256, 512, 32)]
        if preset == "quick":
            return [(4096, 2048, 128), (4096, 8192, 128)]
        return [(16384, 16384, 128)] if device.type == "cpu" else [(65536, 65536, 128)]

    def make_inputs(self, size, dtype, device, seed=0):
        N, K, D = size
        g = _gen(seed)
        a = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
        keys = torch.randn(K, D, generator=g).to(device=device, dtype=dtype)
        ya = torch.randint(0, 4, (N,), generator=g).to(device)
        yk = torch.where(torch.rand(K, generator=g) < 0.8, 0, torch.randint(1, 4, (K,), generator=g)).to(device)
        return a, ya, keys, yk

    def naive(self, a, ya, keys, yk):
        """Materialise the similarity matrix, mask same-class keys, torch.topk."""
        sim = F.normalize(a.float(), dim=1) @ F.normalize(keys.float(), dim=1).T
        sim = sim.masked_fill_((ya[:, None] == yk[None, :]) | (yk[None, :] == -1), float("-inf"))
        return torch.topk(sim, self.k, dim=1)

    def ours(self, backend):
        return lambda a, ya, keys, yk: ak.hard_negative_topk(a, ya, keys, yk, self.k, backend=backend)

    def gate(self, provider, fn, size, dtype, device):
        a, ya, keys, yk = self.make_inputs((*self.gate_size, size[2]), dtype, device, seed=1)
        values, _ = fn(a, ya, keys, yk)
        ref, _ = hard_negative_topk_ref(a.double(), ya, keys.double(), yk, self.k)
        return rel_error(values.float(), ref)  # the k-th best values agree iff the selections agree (up to ties)

    def flops(self, size):
        N, K, D = size
        return 2.0 * N * K * D

    floor_flops = flops

    def rows_keys(self, size):
        return size[0], size[1]

    def describe(self, size):
        return f"N={size[0]} K={size[1]} D={size[2]} k={self.k}"


class AnatomicalContrast:
    """anatomical_contrast_loss at the reference setting: C classes x 256 queries x 512 negatives x D-dim,
    negatives drawn from K pixel keys; forward + backward to the queries.

    naive: the reference code's structure (a Python loop over classes and queries drawing each negative's class
    and pixel with NumPy, a [256, 513, D] key tensor per class, cosine similarity, cross-entropy). Ours: "chunked"
    and the fused backends use top-k hard negatives; "class_graph" is the reference sampling, vectorised.
    """

    name, backward = "anatomical", True
    # torch: the library's reference backend (materialising top-k), the per-call baseline of the tiny preset
    providers = ("naive", "class_graph", "torch") + FUSED
    tiny_providers = ("torch", "chunked")  # the reference code's Python loop takes seconds a call
    materialised = {"torch": 3.0}
    classes, per_class, negatives, tau = 4, 256, 512, 0.5
    gate_size = None

    def default_sizes(self, device, preset):
        if preset == "tiny":  # the anatomical loss runs every step at the reference setting's 1,024 queries
            return [(self.classes * 64, 2048, 64)]
        if preset == "quick":  # 64 queries per class: the naive path's Python loop is ~25 ms per query
            return [(self.classes * 64, 4096, 256)]
        return [(self.classes * self.per_class, 16384, 512)]

    def make_inputs(self, size, dtype, device, seed=0):
        Q, K, D = size
        g = _gen(seed)
        queries = torch.randn(Q, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        yq = (torch.arange(Q) % self.classes).to(device)
        keys = torch.randn(K, D, generator=g).to(device=device, dtype=dtype)
        yk = torch.where(torch.rand(K, generator=g) < 0.7, 0,
                         torch.randint(1, self.classes, (K,), generator=g)).to(device)
        protos, _ = ak.class_prototypes(keys, yk, self.classes)
        return queries, yq, protos, keys, yk

    def naive(self, queries, yq, protos, keys, yk, seed=0):
        rng = np.random.default_rng(seed)
        yk_np = yk.cpu().numpy()
        pools = [np.nonzero(yk_np == c)[0] for c in range(self.classes)]
        mu = F.normalize(protos.detach().float(), dim=1)
        losses = []
        for c in range(self.classes):
            q = queries[yq == c]
            others = [v for v in range(self.classes) if v != c and len(pools[v])]
            sim = (mu[c] @ mu[others].T / self.tau).softmax(0).cpu().numpy()
            chosen = np.empty((q.shape[0], self.negatives), dtype=np.int64)
            for i in range(q.shape[0]):  # the reference code's per-query Python loop
                classes = rng.choice(others, size=self.negatives, p=sim)
                for j, v in enumerate(classes):
                    chosen[i, j] = pools[v][rng.integers(len(pools[v]))]
            neg = keys[torch.from_numpy(chosen).to(keys.device)]  # (256, 512, D)
            cand = torch.cat([protos[c].expand(q.shape[0], 1, -1), neg], dim=1)  # the [256, 513, D] tensor
            logits = F.cosine_similarity(q.unsqueeze(1), cand, dim=2) / self.tau
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            losses.append(F.cross_entropy(logits, target))
        return torch.stack(losses).mean()

    def ours(self, backend):
        if backend == "class_graph":
            return lambda q, yq, p, k, yk: ak.anatomical_contrast_loss(
                q, yq, p, k, yk, self.tau, "class_graph", self.negatives, generator=_gen(0))
        return lambda q, yq, p, k, yk: ak.anatomical_contrast_loss(q, yq, p, k, yk, self.tau, "topk",
                                                                   self.negatives, backend=backend)

    def gate(self, provider, fn, size, dtype, device):
        """Our loss against the reference formula on the negatives it used (float64), at a reduced size; the
        baseline draws its own negatives with NumPy, so it is checked to run and give a finite loss only."""
        q, yq, p, k, yk = self.make_inputs((64, 2048, size[2]), dtype, device, seed=1)
        loss = fn(q, yq, p, k, yk)
        if provider == "naive":
            return 0.0 if torch.isfinite(loss) else float("inf")
        idx = (ak.class_graph_negatives(p, yq, yk, self.negatives, self.tau, generator=_gen(0))
               if provider == "class_graph"
               else ak.hard_negative_topk(q.detach(), yq, k, yk, self.negatives, backend="torch")[1])
        ref = anatomical_contrast_loss_ref(q.detach().double(), yq, p.double(), k.double(), yk, self.tau, negatives=idx)
        return rel_error(loss.detach(), ref)

    def flops(self, size):
        Q, K, D = size
        return 2.0 * Q * K * D + 3 * 2.0 * Q * self.negatives * D  # top-k scan, then logits and two gradients

    floor_flops = flops

    def rows_keys(self, size):
        return size[0], size[1]

    def describe(self, size):
        return f"Q={size[0]} K={size[1]} D={size[2]} n={self.negatives}"


WORKLOADS = {w.name: w for w in (SoftContrastive(), HardNegativeTopk(), AnatomicalContrast())}
PRESETS = ("quick", "targets", "tiny")

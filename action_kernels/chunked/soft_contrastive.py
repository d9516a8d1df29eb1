"""Memory-bounded soft-label contrastive loss in plain torch (the CPU path).

Rows are processed in chunks of c rows against the whole bank: c x K logits at a time, never N x K. One row's K
logits are small (256 KiB at K = 65,536), so the key axis needs no online statistics here. The GEMMs are torch's
(MKL/OpenBLAS); for fp32 CPU tensors the per-row softmax work between them runs in the native kernel of csrc/cpu/
(three sweeps instead of ~14 torch passes) when the host build is present, else in plain torch
(`USE_NATIVE = False` forces that).

Implements dispatch.SoftContrastiveKernels (the backend contract), fp64 included: rows s, t arrive raw with inverse
norms rs, rt (N,) and keys k with rk (K,), so that ŝ = rs ⊙ s, t̂ = rt ⊙ t, k̂ = rk ⊙ k are the normalised vectors
(all ones without normalisation).
Forward (per chunk):  a = ŝ k̂ᵀ/τ_s, b = t̂ k̂ᵀ/τ_t, lse_s, lse_t, loss = Σ_j p (log p - log q), p = softmax(b),
q = softmax(a). Gradient to the normalised rows, formed in the forward pass when asked (no recompute; exact because
row i's gradient is linear in its own upstream gradient g_i):  ds0_i = (q_i - p_i) k̂ / τ_s, dL/dŝ_i = g_i ds0_i.
Key gradient (backward, recomputed): the keys sit in both distributions, so
    dL/dk̂ = Σ_i g_i [ (q_i - p_i)ᵀ ŝ_i / τ_s + (p_i ⊙ (log p_i - log q_i - KL_i))ᵀ t̂_i / τ_t ],
accumulated chunk by chunk in a fixed order (deterministic). ops/ maps both through the normalisation. The teacher
term cancels: where p_i is nearly one-hot (small τ_t), δ - KL (δ = log p - log q) at the teacher's top key j* is
far smaller than its parts (each of size 1/τ), so any difference between the logits its parts come from (a forward
KL, a recomputed log p) becomes the gradient (issue 26: 400x off at τ_t = 1e-4). Each chunk therefore recomputes
its rows' log-softmaxes from its own logits (the shifted form, as torch's log_softmax), reads nothing of the
forward's statistics, and forms the term pivoted at j*: δ_j - KL = (δ_j - δ_j*) + r with r = Σ_l p_l (δ_j* - δ_l),
where every term is of the size of its own p (exactly 0 at j*), instead of KL = Σ p δ (which torch's autograd
does, and which still loses 1e-3 relative at τ_t = 1e-4 when the student is near-uniform).
"""
from __future__ import annotations

import torch

from action_kernels._extension import Buffer, check_buffers, host_module

# fp32 math for 16-bit inputs (bf16 GEMMs are also ~100x slower on CPUs); fp64 stays fp64
from action_kernels._rows import work_dtype as _work_dtype
from action_kernels.chunked._chunking import row_chunks

USE_NATIVE = True
# The c x K work buffers of one chunk; measured at K = 8192: 1 MiB chunks are 3x slower (skinny GEMMs), 64 MiB
# no faster than 32 MiB. The native path needs two buffers, the torch path three.
CHUNK_BYTES = 32 << 20


def _chunk_rows(num_keys: int, buffers: int = 3) -> int:
    return max(1, CHUNK_BYTES // (buffers * 4 * num_keys))


def _native_kernels(s: torch.Tensor):
    if not USE_NATIVE or s.device.type != "cpu" or _work_dtype(s) != torch.float32:
        return None
    mod = host_module()
    return mod if mod is not None and hasattr(mod, "soft_contrastive_rows_cpu") else None


def _chunk_native(mod, buffers, sc, tc, k_t, loss, lse_s, lse_t, with_grad):
    """One chunk through csrc/cpu: returns q - p (c, K) when with_grad; writes loss / lse slices in place.

    sc, tc: rows already scaled by rs/τ_s and rt/τ_t. buffers: a reused (2, step, K) fp32 tensor (fresh ones per
    chunk cost page faults: ~15% measured).
    """
    rows, K = sc.shape[0], k_t.shape[1]
    # both logit blocks from one GEMM of the stacked rows (the keys read once: ~3% faster than two, measured)
    ab = torch.mm(torch.cat([sc, tc]), k_t, out=buffers.view(-1, K)[:2 * rows])
    a, b = ab[:rows], ab[rows:]
    f32 = torch.float32
    check_buffers("soft_contrastive_rows_cpu", sc.device, a=Buffer(a, (rows, K), f32), b=Buffer(b, (rows, K), f32),
                  loss=Buffer(loss, (rows,), f32), lse_a=Buffer(lse_s, (rows,), f32),
                  lse_b=Buffer(lse_t, (rows,), f32))
    mod.soft_contrastive_rows_cpu(a.data_ptr(), b.data_ptr(), rows, a.shape[1], loss.data_ptr(), lse_s.data_ptr(),
                                  lse_t.data_ptr(), with_grad, torch.get_num_threads())
    return a


def _shifted_logits(x: torch.Tensor, k_t: torch.Tensor):
    """(c, D) scaled rows, (D, K) keys -> z - max(z) in one (c, K) buffer, and max(z) (c,), for z = x k_t."""
    z = torch.mm(x, k_t)
    m = z.amax(dim=1, keepdim=True)
    return z.sub_(m), m.view(-1)


def _chunk_torch(sc, tc, k_t, loss, lse_s, lse_t, with_grad):
    """One chunk in plain torch, same contract as _chunk_native.

    With b' = b - max b, a' = a - max a, p = e^{b'} / l_t, q = e^{a'} / l_s:
    loss = Σ_j p_j (b'_j - a'_j) - log l_t + log l_s, lse = max + log l. Two exponentials per logit.
    """
    b, m_t = _shifted_logits(tc, k_t)
    p = b.exp()
    log_l_t = p.sum(dim=1).log_()
    p.mul_(torch.exp(-log_l_t)[:, None])
    a, m_s = _shifted_logits(sc, k_t)
    cross = b.sub_(a).mul_(p).sum(dim=1)  # Σ p (b' - a')
    e = a.exp_()
    l_s = e.sum(dim=1)
    log_l_s = torch.log(l_s)
    loss.copy_(cross - log_l_t + log_l_s)
    lse_s.copy_(m_s + log_l_s)
    lse_t.copy_(m_t + log_l_t)
    return e.mul_(l_s.reciprocal()[:, None]).sub_(p) if with_grad else None


def soft_contrastive_forward(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D), rs, rt: (N,), rk: (K,) -> loss (N,), lse_s (N,), lse_t (N,), pivot,
    pivot_r, ds0 (N, D).

    ds0 (dL/dŝ per unit upstream gradient) is empty when not with_grad. Outputs are fp32 (fp64 for fp64 inputs).
    pivot is -1 and pivot_r 0 for every row: the backends share one output signature, and this backend's key
    gradient recomputes both per chunk from its own logits (module docstring), so it keeps none.
    """
    B, P, D = s.shape
    N, K = B * P, k.shape[0]
    work = _work_dtype(s)
    k_hat = k.to(work) * rk.to(work)[:, None]
    k_t = k_hat.T.contiguous()
    loss = torch.empty(N, dtype=work, device=s.device)
    lse_s = torch.empty_like(loss)
    lse_t = torch.empty_like(loss)
    ds0 = torch.empty((N, D) if with_grad else (0,), dtype=work, device=s.device)
    native = _native_kernels(s)
    step = min(_chunk_rows(K, buffers=2 if native is not None else 3), max(N, 1))
    if native is not None:
        buffers = torch.empty((2, step, K), dtype=work, device=s.device)
    scale_s, scale_t = rs.to(work) * inv_tau_s, rt.to(work) * inv_tau_t
    for (r0, sc), (_, tc) in zip(row_chunks(s, scale_s, step), row_chunks(t, scale_t, step)):
        r1 = r0 + sc.shape[0]
        stats = (loss[r0:r1], lse_s[r0:r1], lse_t[r0:r1], with_grad)
        if native is not None:
            q_minus_p = _chunk_native(native, buffers, sc, tc, k_t, *stats)
        else:
            q_minus_p = _chunk_torch(sc, tc, k_t, *stats)
        if with_grad:
            torch.mm(q_minus_p, k_hat, out=ds0[r0:r1]).mul_(inv_tau_s)
    pivot = torch.full((N,), -1, dtype=torch.int32, device=s.device)
    return loss, lse_s, lse_t, pivot, torch.zeros_like(loss), ds0


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """(c, K) logits -> their log-softmax along K, in place (x - max - log Σ e^{x - max}; one (c, K) temporary)."""
    x.sub_(x.amax(dim=1, keepdim=True))
    return x.sub_(x.exp().sum(dim=1, keepdim=True).log_())


def soft_contrastive_key_grad(s, t, k, rs, rt, rk, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, pivot,
                              pivot_r, g):
    """dL/dk̂ (K, D) fp32 (fp64 for fp64 inputs) for the upstream g (N,). The forward's statistics (loss, lse_s,
    lse_t, pivot, pivot_r) are not read: each chunk recomputes them from its own logits (module docstring)."""
    K = k.shape[0]
    work = _work_dtype(s)
    k_t = (k.to(work) * rk.to(work)[:, None]).T.contiguous()
    dk = torch.zeros(k.shape, dtype=work, device=k.device)
    step = _chunk_rows(K, buffers=4)
    rs, rt = rs.to(work), rt.to(work)
    for (r0, sc), (_, tc) in zip(row_chunks(s, rs, step), row_chunks(t, rt, step)):
        gc = g[r0:r0 + sc.shape[0], None].to(work)
        log_q = _log_softmax_(torch.mm(sc, k_t).mul_(inv_tau_s))
        log_p = _log_softmax_(torch.mm(tc, k_t).mul_(inv_tau_t))
        pivot = log_p.argmax(dim=1, keepdim=True)  # the teacher's top key j*
        p = log_p.exp()
        delta = log_p.sub_(log_q)  # δ = log p - log q, in place of log p
        delta.sub_(delta.gather(1, pivot))  # δ - δ_j*: exactly 0 at j*
        r = torch.bmm(p.unsqueeze(1), delta.unsqueeze(2)).view(-1, 1).neg_()  # Σ_l p_l (δ_j* - δ_l)
        dz_t = delta.add_(r).mul_(p).mul_(gc * inv_tau_t)  # p (δ - KL) = p ((δ - δ_j*) + r)
        dz_s = log_q.exp_().sub_(p).mul_(gc * inv_tau_s)
        dk.addmm_(dz_s.T, sc).addmm_(dz_t.T, tc)
    return dk

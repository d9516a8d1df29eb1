"""Memory-bounded soft-label contrastive loss in plain torch (the CPU path).

Rows are processed in chunks of c rows against the whole bank: c x K fp32 logits at a time, never N x K.
One row's K logits are small (256 KiB at K = 65,536), so the key axis needs no online statistics here;
the chunk height is chosen so three c x K buffers fit in `CHUNK_BYTES`.

Forward (per chunk):  a = s Kᵀ/τ_s, b = t Kᵀ/τ_t, lse_s, lse_t, loss = Σ_j p (log p - log q).
Gradient to rows, formed in the forward pass when asked (no recompute; exact because row i's gradient is
linear in its own upstream gradient g_i):  ds0_i = (q_i - p_i) K / τ_s, and dL/ds_i = g_i ds0_i.
Key gradient (backward, recomputed): the keys sit in both distributions, so
    dK = Σ_i g_i [ (q_i - p_i)ᵀ s_i / τ_s + (p_i ⊙ (log p_i - log q_i - loss_i))ᵀ t_i / τ_t ],
accumulated chunk by chunk in a fixed order (deterministic).
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 32 << 20  # three c x K fp32 buffers; measured: 1 MiB is 3x slower (skinny GEMMs), 64 MiB no faster


def _chunk_rows(num_keys: int) -> int:
    return max(1, CHUNK_BYTES // (3 * 4 * num_keys))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 accumulation for every 16-bit or fp32 input (bf16 GEMMs are also ~100x slower on CPUs); fp64 stays fp64
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(x: torch.Tensor, num_keys: int):
    """Yields (row offset, (c, D) view or copy in the work dtype) over the rows of a (B, P, D) view, in row order."""
    step = _chunk_rows(num_keys)
    B, P, _ = x.shape
    for b in range(B):
        for p0 in range(0, P, step):
            yield b * P + p0, x[b, p0:p0 + step].to(_work_dtype(x))


def _shifted_logits(x: torch.Tensor, k_t: torch.Tensor, inv_tau: float):
    """(c, D) rows, (D, K) keys -> z - max(z) in one (c, K) buffer, and max(z) (c,), for z = x k_t * inv_tau."""
    z = torch.mm(x * inv_tau, k_t)
    m = z.amax(dim=1, keepdim=True)
    return z.sub_(m), m.view(-1)


def soft_contrastive_forward(s, t, k, inv_tau_s: float, inv_tau_t: float, with_grad: bool):
    """s, t: (B, P, D) views, k: (K, D) -> loss (N,), lse_s (N,), lse_t (N,), ds0 (N, D) (empty if not with_grad).

    Outputs are fp32, or fp64 for fp64 inputs. Per chunk, with b' = b - max b and a' = a - max a (the shifted logits), p = e^{b'} / l_t, q = e^{a'} / l_a:
    loss = Σ_j p_j (b'_j - a'_j) - log l_t + log l_s, lse = max + log l.  Two exponentials per logit, no log.
    """
    B, P, D = s.shape
    N, K = B * P, k.shape[0]
    work = _work_dtype(s)
    kf = k.to(work)
    k_t = kf.T.contiguous()
    loss = torch.empty(N, dtype=work, device=s.device)
    lse_s = torch.empty_like(loss)
    lse_t = torch.empty_like(loss)
    ds0 = torch.empty((N, D) if with_grad else (0,), dtype=work, device=s.device)
    for (r0, sc), (_, tc) in zip(_chunks(s, K), _chunks(t, K)):
        r1 = r0 + sc.shape[0]
        b, m_t = _shifted_logits(tc, k_t, inv_tau_t)
        p = b.exp()
        log_l_t = p.sum(dim=1).log_()
        p.mul_(torch.exp(-log_l_t)[:, None])
        a, m_s = _shifted_logits(sc, k_t, inv_tau_s)
        cross = b.sub_(a).mul_(p).sum(dim=1)  # Σ p (b' - a')
        e = a.exp_()
        l_s = e.sum(dim=1)
        log_l_s = torch.log(l_s)
        loss[r0:r1] = cross - log_l_t + log_l_s
        lse_s[r0:r1] = m_s + log_l_s
        lse_t[r0:r1] = m_t + log_l_t
        if with_grad:
            q_minus_p = e.mul_(l_s.reciprocal()[:, None]).sub_(p)
            torch.mm(q_minus_p, kf, out=ds0[r0:r1]).mul_(inv_tau_s)
    return loss, lse_s, lse_t, ds0


def _log_probs(x: torch.Tensor, k_t: torch.Tensor, inv_tau: float, lse: torch.Tensor):
    """(c, D) rows, (D, K) keys, (c,) lse -> log softmax(x k_t * inv_tau) in one (c, K) buffer."""
    return torch.mm(x * inv_tau, k_t).sub_(lse[:, None])


def soft_contrastive_key_grad(s, t, k, inv_tau_s: float, inv_tau_t: float, loss, lse_s, lse_t, g):
    """dK (K, D) fp32 or fp64 (module docstring), from the forward's loss, lse_s, lse_t (N,) and the upstream g (N,)."""
    K = k.shape[0]
    k_t = k.to(_work_dtype(s)).T.contiguous()
    dk = torch.zeros(k.shape, dtype=k_t.dtype, device=k.device)
    for (r0, sc), (_, tc) in zip(_chunks(s, K), _chunks(t, K)):
        r1 = r0 + sc.shape[0]
        gc = g[r0:r1, None]
        log_q = _log_probs(sc, k_t, inv_tau_s, lse_s[r0:r1])
        log_p = _log_probs(tc, k_t, inv_tau_t, lse_t[r0:r1])
        p = log_p.exp()
        # teacher side first: it needs log q before log q becomes q
        dz_t = log_p.sub_(log_q).sub_(loss[r0:r1, None]).mul_(p).mul_(gc * inv_tau_t)
        dz_s = log_q.exp_().sub_(p).mul_(gc * inv_tau_s)
        dk.addmm_(dz_s.T, sc).addmm_(dz_t.T, tc)
    return dk

"""Triton kernel of the fused similarity + hard-negative top-k (launcher only; autograd lives in ops/).

One program per BLOCK_M anchors streams key tiles against a per-row threshold instead of sorting every tile
(the previous design's per-tile bitonic tl.topk cost about ten GEMMs):
  scan    sim = (a·k) rk on tensor cores; a candidate is a key of another class with sim > thr_i, thr_i a lower
          bound of row i's k-th best. Candidates are appended to the row's slot buffer in global memory (W slots,
          (key index, value bits) pairs) at positions taken from a per-row counter; a warp skips the append of an
          accumulator register unless one of its 32 elements there is a candidate (a vote).
  prune   when a tile overflows a row's W slots (its count passes W; slots past W are not written), every row's
          count goes back to before the tile, each row's threshold rises to about its k-th best (a bisection on
          the values, no sort), the slots below it are dropped (compaction) and the tile runs again. Rows whose
          survivors would still not fit (massive exact ties) get the exact k-th by a radix select instead.
          After the first tiles the threshold rejects almost every key: about 6 prunes per program at K = 65,536,
          k = 64, on random unit vectors (the kernel report's top-k model, docs/kernel-report.md).
  final   one tl.topk per row over what remains (packed int64: value order, ties to the lower index), writing
          values (times the anchor's inverse norm) and indices.
Exact and deterministic whatever order the buffer was filled in (prune and final see sets). Labels arrive as
dense int32 class ids (an exact, sync-free renumbering in the launcher), keys padded to whole tiles, and ignored
or padding keys as a NaN scale (NaN is never above a threshold), so a candidate costs one integer and one float
comparison and the scan has no masked tail.
On a GPU the append is a few lines of PTX (vote, atomic slot, store); under TRITON_INTERPRET=1 the same slots
come from a cumsum, and the final selection takes KP maxima (the interpreter runs tl.topk element by element); a
test runs the tl.topk path there too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from action_kernels.triton import _common as C

OP = "hard_negative_topk"
MAX_K = 512
# (arch, "16" | "32" input bits, BLOCK_D, KP) -> (BLOCK_M, BLOCK_N, num_warps, num_stages[, RELOAD]), chosen among
# the configurations without local memory by the kernel report's static estimate (its tuner, docs/kernel-report.md).
# 16-bit entries: retuned for the overflow-and-rerun scan, every D, as the best configuration without local memory
# under both triton 3.8.0 (CI) and 3.6.0 (the lent GPU's), by the larger of the two estimates; where none is clean
# under both ((90, 64, 512), (90, 512, 512), (80, 64, 512)) the best under 3.8.0 (docs/known-limits.md). The fp32
# entries were not retuned: fp32 CUDA tensors never reach this kernel (dispatch.TRITON_FP32_REASON); the report
# still compiles them.
CONFIGS = {
    (90, "16", 64, 64): (64, 64, 4, 2), (90, "16", 128, 64): (128, 64, 8, 2), (90, "16", 256, 64): (128, 64, 8, 2),
    (90, "16", 512, 64): (64, 64, 8, 2), (90, "16", 64, 512): (128, 64, 8, 2), (90, "16", 128, 512): (32, 128, 8, 2),
    (90, "16", 256, 512): (64, 64, 8, 2), (90, "16", 512, 512): (64, 64, 8, 2),
    (80, "16", 64, 64): (32, 128, 4, 2), (80, "16", 128, 64): (32, 64, 4, 2),
    (80, "16", 256, 64): (32, 64, 4, 2, True), (80, "16", 512, 64): (32, 64, 8, 2, True),
    (80, "16", 64, 512): (32, 128, 4, 2, True), (80, "16", 128, 512): (32, 128, 8, 2),
    (80, "16", 256, 512): (32, 128, 8, 2, True), (80, "16", 512, 512): (32, 64, 8, 2, True),
    (90, "32", 64, 64): (64, 64, 4, 2), (90, "32", 128, 64): (64, 64, 4, 2), (90, "32", 256, 64): (64, 32, 4, 2),
    (90, "32", 512, 64): (64, 32, 4, 1), (90, "32", 64, 512): (64, 64, 4, 2), (90, "32", 128, 512): (64, 64, 4, 2),
    (90, "32", 256, 512): (64, 32, 4, 2), (90, "32", 512, 512): (64, 32, 4, 1),
    (80, "32", 64, 64): (64, 64, 4, 2), (80, "32", 128, 64): (64, 32, 4, 2), (80, "32", 256, 64): (64, 32, 4, 1),
    (80, "32", 512, 64): (64, 16, 4, 1), (80, "32", 64, 512): (64, 64, 4, 2), (80, "32", 128, 512): (64, 32, 4, 2),
    (80, "32", 256, 512): (64, 32, 4, 1), (80, "32", 512, 512): (64, 16, 4, 1),
}
# KP (a power of two >= k, the final selection's width) -> (W slots per row, rows per prune/final step: W x rows
# packed keys are 64 registers a thread at 4 warps)
BUFFERS = {64: (256, 8), 512: (1024, 4)}
SELECT_ROWS = {64: 16, 512: 2}   # rows per program of the selection kernel: 64 registers of packed keys a thread
# the prune's bisection rounds (unrolled): its threshold is within (max - min) / 64 of the k-th best, a few slots
# more than k survive; 8 rounds kept fewer but cost more than the prunes they saved (kernel report estimate)
BISECT_ROUNDS = tl.constexpr(6)
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "RELOAD": False}
# see the module docstring; a test sets this False to run the tl.topk selection under the interpreter
INTERPRETER_SELECT_BY_MAX = True


def kept(k: int) -> int:
    """KP for k: the two compiled variants (k <= 64, k <= 512)."""
    return 64 if k <= 64 else 512


def config_key(kernel: str, arch: int, dtype: torch.dtype, BLOCK_D: int, k: int = 64) -> tuple:
    return (90 if arch >= 90 else 80, "32" if dtype == torch.float32 else "16", BLOCK_D, kept(k))


def config(arch: int, dtype: torch.dtype, BLOCK_D: int, k: int) -> dict:
    if C.interpreting():
        return dict(INTERPRETER_BLOCKS, num_warps=4, num_stages=1)
    key = config_key("topk_scan", arch, dtype, BLOCK_D, k)
    if key not in CONFIGS:
        raise NotImplementedError(f"hard_negative_topk triton kernel supports feature sizes up to 512, got a feature "
                                  f"tile of {BLOCK_D}; use backend='chunked' or 'cuda'")
    bm, bn, warps, stages, *reload = CONFIGS[key]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, RELOAD=bool(reload and reload[0]))


# Append, one element: a candidate (another class, value above the row's threshold) takes a slot from its row's
# counter and stores (key index, value bits) there, if the slot is below W (the count goes on: an overflow). The
# warp votes first and skips the rest unless one of its lanes has a candidate in this register: on random data
# about 1 register in 5 over a whole scan (the kernel report's top-k model), so most elements cost the two compares, the
# vote and the branch. The output is a dummy (inline asm must return something).
_APPEND = tl.constexpr("""{
.reg .pred p, any;
.reg .u32 pos;
.reg .u64 addr;
setp.ne.s32 p, $3, $4;
setp.gt.and.f32 p, $1, $2, p;
vote.sync.any.pred any, p, -1;
@!any bra.uni SKIP;
@p atom.global.add.u32 pos, [$5], $9;
setp.lt.and.u32 p, pos, $10, p;
mad.wide.u32 addr, pos, $7, $6;
@p st.global.v2.b32 [addr], {$8, $1};
SKIP:
}""")
_APPEND_CONSTRAINTS = tl.constexpr("=r,r,r,r,r,l,l,r,r,r,r")


@triton.jit
def _sortable(raw):
    # raw slot (value bits << 32 | index) -> one int64 ordered by value, then by lower index
    bits = (raw >> 32).to(tl.int32)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (4294967295 - (raw & 4294967295))


@triton.jit
def _unsorted(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True), (4294967295 - (key & 4294967295))


@triton.jit
def _scan_tile(a, a_ptrs, row_mask, ya, k_ptrs, RK, YK, j0, thr, buf_row, cnt_row, Buf, Cnt, rows, eight, one,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr, APPEND_ASM: tl.constexpr,
               RELOAD: tl.constexpr):
    if RELOAD:  # the anchor tile from L2 every tile instead of registers (mma.sync, tf32x3: see soft_contrastive)
        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
    cols = j0 + tl.arange(0, BLOCK_N)
    kt = tl.load(k_ptrs)  # keys padded to whole tiles: rows past K are zeros with a NaN scale (never candidates)
    rk = tl.load(RK + cols)
    yk = tl.load(YK + cols)
    # the anchor's inverse norm is positive: ordering by (a·k) rk is ordering by cosine; it is applied at the end
    sim = tl.dot(a, tl.trans(kt), input_precision=PRECISION) * rk[None, :]
    if APPEND_ASM:
        tl.inline_asm_elementwise(
            _APPEND, _APPEND_CONSTRAINTS,
            [sim, tl.broadcast_to(thr[:, None], sim.shape), tl.broadcast_to(ya[:, None], sim.shape),
             tl.broadcast_to(yk[None, :], sim.shape), tl.broadcast_to(cnt_row[:, None], sim.shape),
             # eight: a register multiplier (one IMAD.WIDE)
             tl.broadcast_to(buf_row[:, None], sim.shape), tl.full(sim.shape, 0, tl.int32) + eight,
             tl.broadcast_to(cols[None, :], sim.shape), tl.full(sim.shape, 0, tl.int32) + one,
             tl.full(sim.shape, 0, tl.int32) + (eight * (W // 8))],  # W in a register
            dtype=tl.int8, is_pure=False, pack=1)
    else:
        cand = ((sim > thr[:, None]) & (yk[None, :] != ya[:, None])).to(tl.int32)
        cnt = tl.load(Cnt + rows)
        pos = cnt[:, None] + tl.cumsum(cand, axis=1) - cand
        raw = (sim.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :].to(tl.int64)
        tl.store(Buf + rows.to(tl.int64)[:, None] * W + pos, raw, mask=(cand != 0) & (pos < W))
        tl.store(Cnt + rows, cnt + tl.sum(cand, axis=1))


@triton.jit
def _best(key, KP: tl.constexpr, BY_MAX: tl.constexpr):
    """The KP largest packed keys of each row, sorted descending (keys are distinct: they hold the index)."""
    if BY_MAX:
        col = tl.arange(0, KP)
        best = tl.full([key.shape[0], KP], -(2**63), tl.int64)
        for i in range(KP):
            m = tl.max(key, axis=1)
            best = tl.where(col[None, :] == i, m[:, None], best)
            key = tl.where(key == m[:, None], -(2**63), key)
        return best
    return tl.topk(key, KP, dim=1)


@triton.jit
def _prune(Buf, Cnt, Thr, row0, N, k_out, W: tl.constexpr, LIMIT: tl.constexpr, MERGE_ROWS: tl.constexpr,
           BLOCK_M: tl.constexpr, ROUNDS: tl.constexpr):
    # per row: thr = t with at least k_out used slots >= t, found by bisection on the values (t is within
    # (max - min) / 2^ROUNDS below the k-th best; no sort: Triton's tl.topk costs about 400 instructions a slot
    # here), and the slots >= t compacted at the front; their exact order is the final selection's business
    tl.debug_barrier()
    slots = tl.arange(0, W)
    for r0 in range(0, BLOCK_M, MERGE_ROWS):
        rr = row0 + r0 + tl.arange(0, MERGE_ROWS)
        used = tl.minimum(tl.load(Cnt + rr, cache_modifier=".cg"), W)
        live = slots[None, :] < used[:, None]
        # unmasked (slots past `used` are stale but inside the buffer; `live` masks them below): vector loads
        raw = tl.load(Buf + rr.to(tl.int64)[:, None] * W + slots[None, :], cache_modifier=".cg")
        value = (raw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        lo = tl.where(used > 0, tl.min(tl.where(live, value, float("inf")), axis=1), 0.0)
        hi = tl.where(used > 0, tl.max(tl.where(live, value, float("-inf")), axis=1), 0.0)
        for _ in tl.static_range(ROUNDS):  # unrolled; invariant: at least k_out used slots >= lo
            mid = lo + (hi - lo) * 0.5
            enough = tl.sum((live & (value >= mid[:, None])).to(tl.int32), axis=1) >= k_out
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        t = tl.where(used >= k_out, lo, float("-inf"))
        keep = live & (value >= t[:, None])
        # massive exact ties can leave too many survivors: then the exact k-th packed key, bit by bit
        if tl.max(tl.sum(keep.to(tl.int32), axis=1), axis=0) > LIMIT:
            key = tl.where(live, _sortable(raw), -(2**63)) ^ -(2**63)  # unsigned order = packed order
            prefix = tl.zeros([MERGE_ROWS], tl.int64)
            for bit in range(63, -1, -1):
                cand = prefix | (tl.full([MERGE_ROWS], 1, tl.int64) << bit)
                ge = key.to(tl.uint64, bitcast=True) >= cand.to(tl.uint64, bitcast=True)[:, None]
                enough = tl.sum((live & ge).to(tl.int32), axis=1) >= k_out
                prefix = tl.where(enough, cand, prefix)
            exact = live & (key.to(tl.uint64, bitcast=True) >= prefix.to(tl.uint64, bitcast=True)[:, None])
            keep = tl.where((used >= k_out)[:, None], exact, live)
        k32 = keep.to(tl.int32)
        pos = tl.cumsum(k32, axis=1) - k32
        tl.debug_barrier()  # every slot of the chunk is loaded before any moves
        tl.store(Buf + rr.to(tl.int64)[:, None] * W + pos, raw, mask=keep)
        tl.store(Cnt + rr, tl.sum(k32, axis=1))
        tl.store(Thr + rr, tl.where(rr < N, t, float("inf")))
    tl.debug_barrier()


# The exact selection: per row, the KP best of its used slots by (value, lower index), written out as values (times
# the anchor's inverse norm) and indices, padded with -inf / -1. A kernel of its own: it depends only on KP and W,
# so its sort network compiles once per architecture instead of once per scan configuration.
@triton.jit(do_not_specialize=["N", "k_out"])
def _select_kernel(Buf, Cnt, RA, Values, Indices, N, k_out, KP: tl.constexpr, W: tl.constexpr,
                   ROWS: tl.constexpr, BY_MAX: tl.constexpr):
    rr = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    slots = tl.arange(0, W)
    col = tl.arange(0, KP)
    used = tl.minimum(tl.load(Cnt + rr), W)
    live = slots[None, :] < used[:, None]
    raw = tl.load(Buf + rr.to(tl.int64)[:, None] * W + slots[None, :], mask=live, other=0)
    best = _best(tl.where(live, _sortable(raw), -(2**63)), KP, BY_MAX)
    valid = best != -(2**63)
    value, index = _unsorted(best)
    ra = tl.load(RA + rr, mask=rr < N, other=0.0)
    out = rr.to(tl.int64)[:, None] * k_out + col[None, :]
    mask = (rr < N)[:, None] & (col[None, :] < k_out)
    tl.store(Values + out, tl.where(valid, value * ra[:, None], float("-inf")), mask=mask)
    tl.store(Indices + out, tl.where(valid, index, -1), mask=mask)


# sim_ij = (a_i·k_j) ra_i rk_j; candidates: key_label_j != anchor_label_i and key_label_j != ignore_label;
# values_i = the k largest sim_ij (ties to the lower j), indices_i = their j, padded with -inf / -1. The scan
# leaves a superset of them (at most W per row) in the slots; _select_kernel picks them. (No gradient here: ops/
# differentiates the selected values by a gather.)
@triton.jit(do_not_specialize=["N", "K", "k_out"])
def _scan_kernel(A, Kp, RK, YA, YK, Buf, Cnt, Thr, N, K, k_out,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 W: tl.constexpr, MERGE_ROWS: tl.constexpr, APPEND_ASM: tl.constexpr, RELOAD: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    row0 = pid * BLOCK_M
    rows = row0 + r
    row_mask = rows < N
    d = tl.arange(0, BLOCK_D)
    a_ptrs = A + pid.to(tl.int64) * (BLOCK_M * BLOCK_D) + r[:, None] * BLOCK_D + d[None, :]
    a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
    ya = tl.load(YA + rows, mask=row_mask, other=0)
    buf_row = (Buf + rows.to(tl.int64) * W).to(tl.int64, bitcast=True)
    cnt_row = (Cnt + rows).to(tl.int64, bitcast=True)
    thr = tl.where(row_mask, float("-inf"), float("inf"))  # rows past N never take a candidate
    k_ptrs = Kp + tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + d[None, :]
    n_tiles = (K + BLOCK_N - 1) // BLOCK_N  # the launcher pads the keys to whole tiles (NaN scale: no candidates)
    eight = (n_tiles >> 31) + 8  # 8 and 1 in registers (see the append): K >= 0, the compiler cannot know
    one = eight >> 3
    # A tile appends freely; a candidate whose slot would be past W is not stored but still counted, so a row
    # overflowed when its count passes W. Then every row's count goes back to before the tile (its appends are
    # dropped), the rows are pruned (the threshold rises) and the tile runs again: at most W - BLOCK_N slots
    # survive a prune, so the rerun fits. One prune per run of the outer loop but the last.
    saved = tl.zeros([BLOCK_M], tl.int32)  # each row's count before the current tile
    jt = 0
    while jt < n_tiles:
        over = 0
        while (jt < n_tiles) & (over == 0):
            _scan_tile(a, a_ptrs, row_mask, ya, k_ptrs + jt * (BLOCK_N * BLOCK_D), RK, YK, jt * BLOCK_N, thr,
                       buf_row, cnt_row, Buf, Cnt, rows, eight, one, PRECISION, BLOCK_N, W, APPEND_ASM, RELOAD)
            tl.debug_barrier()
            now = tl.load(Cnt + rows, cache_modifier=".cg")
            over = (tl.max(now, axis=0) > W).to(tl.int32)
            jt += 1 - over
            saved = tl.where(over != 0, saved, now)
        if over != 0:
            tl.store(Cnt + rows, saved)
            _prune(Buf, Cnt, Thr, row0, N, k_out, W, W - BLOCK_N, MERGE_ROWS, BLOCK_M, BISECT_ROUNDS)
            thr = tl.load(Thr + rows, cache_modifier=".cg")
            saved = tl.load(Cnt + rows, cache_modifier=".cg")
    tl.debug_barrier()


def dense_labels(anchor_labels: torch.Tensor, key_labels: torch.Tensor):
    """(N,), (K,) int64 -> int32 class ids, equal exactly where the labels are equal: the rank of each label among
    the distinct values of both (one sort of N + K values, no host synchronisation)."""
    both = torch.cat([anchor_labels.reshape(-1), key_labels.reshape(-1)]).to(torch.int64)
    sorted_, order = torch.sort(both)
    step = torch.ones_like(sorted_, dtype=torch.int32)
    step[1:] = (sorted_[1:] != sorted_[:-1]).to(torch.int32)
    ids = torch.empty_like(step)
    ids[order] = torch.cumsum(step, 0, dtype=torch.int32)
    n = anchor_labels.numel()
    return ids[:n].contiguous(), ids[n:].contiguous()


def topk_launches(anchors, anchor_labels, keys, key_labels, ra, rk, k, ignore_label, values, indices):
    dtype = C.kernel_dtype(anchors)
    B, P, D = anchors.shape
    N, K = B * P, keys.shape[0]
    BD = C.block_d(D)
    C.check_int32("(anchors + keys) x BLOCK_D", (N + K) * BD)
    KP = kept(k)
    W, merge_rows = BUFFERS[KP]
    cfg = config(C.target_arch(anchors.device), dtype, BD, k)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = triton.cdiv(N, bm)
    merge_rows = min(merge_rows, bm)
    # a prune leaves at most W - BLOCK_N slots (k of them at least), so an overflowed tile fits when it runs again
    assert KP <= W - bn, f"launch table: BLOCK_N {bn} leaves fewer than k = {KP} slots of W = {W} after a prune"
    dev = anchors.device
    buf = torch.empty((grid * bm, W), dtype=torch.int64, device=dev)
    cnt = torch.zeros(grid * bm, dtype=torch.int32, device=dev)
    thr = torch.empty(grid * bm, dtype=torch.float32, device=dev)
    a2 = C.padded_rows(anchors, dtype, BD)
    # keys in whole tiles (zero rows past K, one copy when K is ragged, like the feature padding), so the scan
    # has no masked tail; an ignored or padding key gets a NaN scale: NaN is never above a threshold
    k2 = C.padded_rows(keys, dtype, BD, row_multiple=bn)
    ya, yk = dense_labels(anchor_labels, key_labels)
    rk_eff = torch.full((k2.shape[0],), float("nan"), dtype=torch.float32, device=dev)
    rk_eff[:K] = torch.where(key_labels.reshape(-1) == ignore_label, float("nan"), rk.float())
    yk_pad = torch.zeros(k2.shape[0], dtype=torch.int32, device=dev)
    yk_pad[:K] = yk
    scan_args = dict(A=a2, Kp=k2, RK=rk_eff, YA=C.aligned(ya), YK=yk_pad, Buf=buf, Cnt=cnt, Thr=thr, N=N, K=K,
                     k_out=k)
    scan = C.Launch(OP, "topk_scan", _scan_kernel, (grid,), scan_args,
                    dict(PRECISION=C.dot_precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, W=W,
                         MERGE_ROWS=merge_rows, APPEND_ASM=not C.interpreting(), RELOAD=cfg["RELOAD"]),
                    cfg["num_warps"], cfg["num_stages"])
    rows = SELECT_ROWS[KP]
    select = C.Launch(OP, "topk_select", _select_kernel, (triton.cdiv(grid * bm, rows),),
                      dict(Buf=buf, Cnt=cnt, RA=C.aligned(ra.float().contiguous()), Values=values, Indices=indices,
                           N=N, k_out=k),
                      dict(KP=KP, W=W, ROWS=rows, BY_MAX=C.interpreting() and INTERPRETER_SELECT_BY_MAX),
                      4, 1, dot=False)
    return [scan, select]


def hard_negative_topk(anchors, anchor_labels, keys, key_labels, ra, rk, k: int, ignore_label: int):
    """anchors: (B, P, D) view, keys: (K, D), ra (N,), rk (K,), labels int64 -> values (N, k) fp32, indices (N, k)."""
    if k > MAX_K:
        raise NotImplementedError(f"the triton top-k keeps at most {MAX_K} candidates a row in its merge buffers, got "
                                  f"k={k}; use backend='chunked' or 'cuda'")
    B, P, D = anchors.shape
    N = B * P
    values = torch.empty((N, k), dtype=torch.float32, device=anchors.device)
    indices = torch.empty((N, k), dtype=torch.int64, device=anchors.device)
    if N == 0:
        return values, indices
    for plan in topk_launches(anchors, anchor_labels, keys, key_labels, ra, rk, k, ignore_label, values, indices):
        C.launch(plan)
    return values, indices

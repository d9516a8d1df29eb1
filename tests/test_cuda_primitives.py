"""Each primitive of the warp-level matrix layer (csrc/warp_matrix.cuh) and each warp intrinsic the kernels use,
run by a one-warp kernel (csrc/selftest.cu) on fragments built here from the PTX ISA's lane tables, against a plain
matrix product or the CUDA definition, in the CPU emulation (csrc/emulation.h). The self-test kernels are built into
the emulation/test module _C_cpu only, not into the CUDA module _C, so a GPU does not run them.

The ISA tables are written out again here (independently of the emulation's C++) so that a slip in either one
fails: groupID g = lane >> 2, threadID_in_group t = lane % 4 (PTX ISA 9.7.14.5).
"""
import numpy as np
import pytest
import torch

from action_kernels import cuda as ak_cuda

pytestmark = pytest.mark.numerics  # .ci/run runs these again with the AVX2 paths forced

DEVICES = ["cpu"]  # the self-tests live in _C_cpu only (see the module docstring)


def _mod(device: str):
    ok, why = ak_cuda.device_supported(torch.device(device))
    if not ok:
        pytest.skip(why)
    mod, stream, guard = ak_cuda.launch_context(torch.device(device))
    return mod, stream, guard


def _u32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 bit patterns -> int32 tensor with those bits (what the kernels read)."""
    return (x & 0xFFFFFFFF).to(torch.int64).where(x < 2**31, x - 2**32).to(torch.int32)


def _bits16(x: torch.Tensor, dtype) -> np.ndarray:
    return x.to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF


# ---- mma: fragments by the ISA tables ---------------------------------------------------------------------------

def _a_coords(kind: str):
    """[(lane, register, half, row, col)] of the A fragment (16 x K)."""
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if kind == "tf32":  # m16n8k8 .tf32: a0..a3, row g (a0, a2) / g + 8 (a1, a3), col t (a0, a1) / t + 4
            for i in range(4):
                out.append((lane, i, 0, g + (8 if i in (1, 3) else 0), t + (4 if i >= 2 else 0)))
        else:  # m16n8k16 .f16/.bf16: a0..a7, two per register; row g for a0, a1, a4, a5; col 2t + (i & 1), +8 from a4
            for i in range(8):
                row = g if (i < 2 or 4 <= i < 6) else g + 8
                col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
                out.append((lane, i // 2, i & 1, row, col))
    return out


def _b_coords(kind: str):
    """[(lane, register, half, row(k), col(n))] of the B fragment (K x 8)."""
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if kind == "tf32":  # b0: row t, b1: row t + 4; col g
            for i in range(2):
                out.append((lane, i, 0, t + 4 * i, g))
        else:  # b0..b3: row 2t + (i & 1) (+8 for b2, b3), col g
            for i in range(4):
                out.append((lane, i // 2, i & 1, 2 * t + (i & 1) + (8 if i >= 2 else 0), g))
    return out


def _c_coords():
    """[(lane, i, row, col)] of the 16 x 8 fp32 accumulator: c0, c1 row g, c2, c3 row g + 8; col 2t + (i & 1)."""
    return [(lane, i, (lane >> 2) + (8 if i >= 2 else 0), 2 * (lane & 3) + (i & 1))
            for lane in range(32) for i in range(4)]


def _operand_bits(x: torch.Tensor, kind: str) -> np.ndarray:
    if kind == "bf16":
        return _bits16(x, torch.bfloat16)
    if kind == "fp16":
        return _bits16(x, torch.float16)
    # a tf32 value: fp32 with the 13 low mantissa bits zero (here exactly representable, so no rounding question)
    return x.float().view(torch.int32).numpy().astype(np.int64) & 0xFFFFE000


def _pack(x: torch.Tensor, coords, kind: str, regs: int) -> torch.Tensor:
    bits = _operand_bits(x, kind)
    out = np.zeros((32, regs), dtype=np.int64)
    for lane, reg, half, row, col in coords:
        out[lane, reg] |= int(bits[row, col]) << (16 * half)
    return _u32(torch.from_numpy(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,type_id,k", [("bf16", 1, 16), ("fp16", 2, 16), ("tf32", 3, 8)])
def test_mma_matches_a_plain_matrix_product(device, kind, type_id, k):
    mod, stream, guard = _mod(device)
    g = torch.Generator().manual_seed(1000 + type_id)
    for trial in range(3):
        a = torch.randn(16, k, generator=g)
        b = torch.randn(k, 8, generator=g)
        if kind == "bf16":
            a, b = a.bfloat16().float(), b.bfloat16().float()
        elif kind == "fp16":
            a, b = a.half().float(), b.half().float()
        else:  # tf32 values (10 mantissa bits)
            a = (a.view(torch.int32) & ~0x1FFF).view(torch.float32)
            b = (b.view(torch.int32) & ~0x1FFF).view(torch.float32)
        c = torch.randn(16, 8, generator=g)
        ra = _pack(a, _a_coords(kind), kind, 4)
        rb = _pack(b, _b_coords(kind), kind, 2)
        rc = torch.zeros(32, 4)
        for lane, i, row, col in _c_coords():
            rc[lane, i] = c[row, col]
        rd = torch.full((32, 4), float("nan"))
        args = [x.to(device) for x in (ra, rb, rc, rd)]
        with guard:
            mod.selftest_mma(type_id, *(x.data_ptr() for x in args), stream)
        rd = args[3].cpu()
        d = torch.empty(16, 8)
        for lane, i, row, col in _c_coords():
            d[row, col] = rd[lane, i]
        ref = a.double() @ b.double() + c.double()
        err = (d.double() - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), f"{kind} mma trial {trial}: max error {err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_mma_reads_tf32_operands_without_their_low_13_bits(device):
    """A .tf32 operand with low mantissa bits set computes as if they were zero (what cvt.rna.tf32 makes)."""
    mod, stream, guard = _mod(device)
    a = torch.zeros(16, 8)
    b = torch.zeros(8, 8)
    a[0, 0] = b[0, 0] = 1.0 + 2.0 ** -20  # 1 + an ulp below tf32's resolution
    ra = _pack(a, _a_coords("tf32"), "tf32", 4)
    raw = a.view(torch.int32)[0, 0].item()
    ra[0, 0] = raw  # lane 0, a0 = A[0][0], with its low bits
    rb = _pack(b, _b_coords("tf32"), "tf32", 2)
    rb[0, 0] = raw
    rd = torch.zeros(32, 4)
    args = [x.to(device) for x in (ra, rb, torch.zeros(32, 4), rd)]
    with guard:
        mod.selftest_mma(3, *(x.data_ptr() for x in args), stream)
    assert args[3].cpu()[0, 0].item() == 1.0


# ---- ldmatrix -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num,trans", [(4, False), (4, True), (2, False), (2, True)])
def test_ldmatrix_gives_each_lane_the_isa_elements(device, num, trans):
    mod, stream, guard = _mod(device)
    stride = 24  # elements per row: 48 bytes, rows 16-byte aligned
    image = torch.randint(-30000, 30000, (4 * 8 * stride,), dtype=torch.int16)
    # matrix m, row r lives at element offset (8 m + r) * stride + 8 (a 16-byte aligned column offset)
    offsets = torch.tensor([(8 * (lane // 8) + lane % 8) * stride + 8 for lane in range(32)], dtype=torch.int32)
    out = torch.zeros(32, 4, dtype=torch.int32)
    args = [x.to(device) for x in (image, offsets, out)]
    with guard:
        mod.selftest_ldmatrix(args[0].data_ptr(), image.numel(), args[1].data_ptr(), num, trans, args[2].data_ptr(),
                              stream)
    got = args[2].cpu().numpy().astype(np.int64) & 0xFFFFFFFF
    img = image.numpy().astype(np.int64) & 0xFFFF
    for lane in range(32):
        for m in range(num):
            def elem(row, col):
                return int(img[offsets[8 * m + row].item() + col])
            if trans:  # lane l holds column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1
                lo, hi = elem(2 * (lane % 4), lane // 4), elem(2 * (lane % 4) + 1, lane // 4)
            else:  # lane l holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1
                lo, hi = elem(lane // 4, 2 * (lane % 4)), elem(lane // 4, 2 * (lane % 4) + 1)
            assert got[lane, m] == lo | (hi << 16), f"lane {lane} matrix {m} trans={trans}"


# ---- shuffles and votes ---------------------------------------------------------------------------------------------

def _shfl_expected(mode: str, lane: int, arg: int, width: int) -> int:
    """The CUDA Programming Guide's definitions (Warp Shuffle Functions)."""
    base = lane - lane % width
    if mode == "idx":
        return base + arg % width
    if mode == "up":
        return lane - arg if lane - arg >= base else lane
    if mode == "down":
        return lane + arg if lane + arg < base + width else lane
    src = lane ^ arg
    return src if src < base + width else lane


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode_id,mode", [(0, "idx"), (1, "up"), (2, "down"), (3, "xor")])
@pytest.mark.parametrize("width", [32, 16, 4])
def test_shuffles_match_their_definition(device, mode_id, mode, width):
    mod, stream, guard = _mod(device)
    g = torch.Generator().manual_seed(mode_id * 100 + width)
    values = torch.randint(-2**62, 2**62, (32,), generator=g, dtype=torch.int64)
    if mode == "idx":
        args = torch.randint(0, 64, (32,), generator=g, dtype=torch.int32)
    elif mode == "xor":
        args = torch.full((32,), int(torch.randint(1, 32, (1,), generator=g)), dtype=torch.int32)
    else:
        args = torch.full((32,), int(torch.randint(1, width, (1,), generator=g)) if width > 1 else 0, dtype=torch.int32)
    out32 = torch.zeros(32, dtype=torch.int32)
    out64 = torch.zeros(32, dtype=torch.int64)
    t = [x.to(device) for x in (values, args, out32, out64)]
    with guard:
        mod.selftest_shfl(mode_id, width, *(x.data_ptr() for x in t), stream)
    for lane in range(32):
        src = _shfl_expected(mode, lane, int(args[lane]), width)
        assert int(t[3][lane]) == int(values[src]), f"{mode} width {width} lane {lane} (64-bit)"
        assert int(t[2][lane]) & 0xFFFFFFFF == int(values[src]) & 0xFFFFFFFF, f"{mode} width {width} lane {lane}"


@pytest.mark.parametrize("device", DEVICES)
def test_ballot_any_all_match_their_definition(device):
    mod, stream, guard = _mod(device)
    for pred in (torch.zeros(32, dtype=torch.int32), torch.ones(32, dtype=torch.int32),
                 torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(3), dtype=torch.int32) * 7):
        out = [torch.zeros(32, dtype=torch.int32) for _ in range(3)]
        t = [x.to(device) for x in (pred, *out)]
        with guard:
            mod.selftest_vote(*(x.data_ptr() for x in t), stream)
        bits = sum(1 << lane for lane in range(32) if pred[lane])
        assert all(int(v) & 0xFFFFFFFF == bits for v in t[1].cpu())
        assert all(int(v) == int(bits != 0) for v in t[2].cpu())
        assert all(int(v) == int(bits == 0xFFFFFFFF) for v in t[3].cpu())


# ---- cp.async, conversions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_cp_async_copies_src_bytes_and_zero_fills_the_rest(device):
    mod, stream, guard = _mod(device)
    src = torch.randint(1, 255, (32 * 16,), dtype=torch.uint8)
    src_bytes = torch.tensor([(lane * 5) % 17 for lane in range(32)], dtype=torch.int32)  # 0..16
    early, landed = torch.zeros(32 * 16, dtype=torch.uint8), torch.zeros(32 * 16, dtype=torch.uint8)
    t = [x.to(device) for x in (src, src_bytes, early, landed)]
    with guard:
        mod.selftest_cp_async(*(x.data_ptr() for x in t), stream)
    landed = t[3].cpu().view(32, 16)
    for lane in range(32):
        n = int(src_bytes[lane])
        assert torch.equal(landed[lane, :n], src.view(32, 16)[lane, :n])
        assert not landed[lane, n:].any()
    if device == "cpu":  # the emulation lands copies at the wait: a read before it sees the old contents
        assert (t[2].cpu() == 0xEE).all()


def _tf32_rna(x: torch.Tensor) -> np.ndarray:
    u = x.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    return np.where(finite, (u + 0x1000) & 0xFFFFE000, u) & 0xFFFFFFFF


@pytest.mark.parametrize("device", DEVICES)
def test_conversions_round_as_cvt_rn_and_cvt_rna(device):
    mod, stream, guard = _mod(device)
    g = torch.Generator().manual_seed(5)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-5, 6.1e-5, 3e-8, 2.98e-8,
                             1e-40, float("inf"), float("-inf"), 3.3895314e38, 1.0 + 2**-8, 1.0 + 2**-11 + 2**-12])
    x = torch.cat([specials, torch.randn(2000, generator=g) * torch.exp2(torch.randint(-30, 30, (2000,), generator=g))])
    x = x[: x.numel() // 2 * 2]
    n = x.numel() // 2
    outs = [torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32),
            torch.zeros(2 * n, dtype=torch.int32), torch.zeros(2 * n)]
    t = [x.to(device)] + [o.to(device) for o in outs]
    with guard:
        mod.selftest_convert(t[0].data_ptr(), n, *(o.data_ptr() for o in t[1:]), stream)
    bf, hf, tf, ex = (o.cpu() for o in t[1:])
    pairs = x.view(n, 2)
    for got, dtype in ((bf, torch.bfloat16), (hf, torch.float16)):
        want = _bits16(pairs[:, 0], dtype) | (_bits16(pairs[:, 1], dtype) << 16)
        assert np.array_equal(got.numpy().astype(np.int64) & 0xFFFFFFFF, want.astype(np.int64)), dtype
    assert np.array_equal(tf.numpy().astype(np.int64) & 0xFFFFFFFF, _tf32_rna(x))
    ref = torch.exp2(x.double())
    ok = torch.isfinite(ref) & (ref < 1e30) & (ref > 1e-30)
    assert ((ex.double()[ok] - ref[ok]).abs() <= 4e-7 * ref[ok]).all()  # ex2.approx: about 2 ulp


# ---- the emulation reports misuse instead of hanging -----------------------------------------------------------

def test_emulation_reports_divergent_collectives_and_exited_lanes():
    mod, stream, guard = _mod("cpu")
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="divergent collectives"):
        mod.selftest_broken(0, out.data_ptr(), 0)
    with pytest.raises(RuntimeError, match="deadlock"):
        mod.selftest_broken(1, out.data_ptr(), 0)
    # and the emulator is usable afterwards
    test_ballot_any_all_match_their_definition("cpu")

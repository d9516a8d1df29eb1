// The warp-level matrix layer of the tensor-core kernels: mma.sync (bf16 / fp16 m16n8k16, tf32 m16n8k8, fp32
// accumulation), ldmatrix fragment loads, cp.async staging, conversions and exp2. sm_80 and later (A100, L40,
// H100, H200 all run it).
//
// Under nvcc each primitive is one PTX instruction. Under the CPU emulation (csrc/emulation.h) each is implemented
// as the PTX ISA defines it: every lane deposits its registers in its warp's exchange slots, and once the 32 lanes
// have arrived the fragments are assembled with the ISA's lane -> (row, column) tables, so the kernels' own lane
// logic is what the tests run. References: PTX ISA 8.x, section 9.7.14.5 "Matrix Fragments for mma.m16n8k8" (.tf32
// A/B/C tables) and "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16 tables), and
// 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix"; 9.7.9.25 cp.async. In their notation
// groupID = laneid >> 2 and threadID_in_group = laneid % 4 (g and t below).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_compat.h"

#ifdef AK_EMULATION
#define AK_DEV inline
#else
#define AK_DEV __device__ __forceinline__
#endif

namespace ak {

// ---------------------------------------------------------------------------------------------------------------
// Scalar conversions. Bit-exact in both builds: round to nearest even for fp32 -> bf16 / fp16 (cvt.rn), round to
// nearest with ties away from zero for fp32 -> tf32 (cvt.rna: the low 13 bits of the result are zero).
inline uint16_t host_float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline uint16_t host_float_to_half(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow to infinity
  if (a < 0x38800000u) {                                  // below 2^-14: a subnormal half (or zero)
    if (a < 0x33000000u) return uint16_t(sign);           // below half the smallest subnormal: zero
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(a >> 23);                 // 14..24
    const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return uint16_t(sign | (q + (rem > half || (rem == half && (q & 1u)))));
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

inline float host_bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float host_half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1fu) {
    u = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    u = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    u = sign;
  } else {  // subnormal: m * 2^-24, exact in fp32
    float f = float(m) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t host_float_to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u & ((u & 0x7fffffu) ? 0xffffffffu : 0xffffe000u);  // inf, NaN
  return (u + 0x1000u) & 0xffffe000u;
}

// Packs two floats as 16-bit values, `lo` in the low half (the lower-indexed element of a fragment pair).
AK_DEV uint32_t pack_bf16x2(float lo, float hi) {
#ifdef AK_EMULATION
  return uint32_t(host_float_to_bf16(lo)) | (uint32_t(host_float_to_bf16(hi)) << 16);
#else
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#endif
}

AK_DEV uint32_t pack_f16x2(float lo, float hi) {
#ifdef AK_EMULATION
  return uint32_t(host_float_to_half(lo)) | (uint32_t(host_float_to_half(hi)) << 16);
#else
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#endif
}

AK_DEV uint32_t to_tf32(float x) {
#ifdef AK_EMULATION
  return host_float_to_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

AK_DEV uint32_t float_bits(float x) {
#ifdef AK_EMULATION
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#else
  return __float_as_uint(x);
#endif
}

AK_DEV float tf32_value(uint32_t bits) {
  float f;
#ifdef AK_EMULATION
  std::memcpy(&f, &bits, 4);
#else
  f = __uint_as_float(bits);
#endif
  return f;
}

// 2^x (ex2.approx.ftz: about 2 ulp; the emulation uses the correctly rounded exp2).
AK_DEV float fast_exp2(float x) {
#ifdef AK_EMULATION
  return std::exp2(x);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// a / b for normal b >= 1 and finite a, within 1 ulp: rcp.approx, then one Newton step on the quotient. The IEEE
// division is a called subroutine (its slow path), and the call makes ptxas save a live register to the stack.
// The emulation divides exactly (correctly rounded).
AK_DEV float div_normal(float a, float b) {
#ifdef AK_EMULATION
  return a / b;
#else
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  const float q = a * r;
  return fmaf(fmaf(-q, b, a), r, q);
#endif
}

// threadIdx.x read again (a volatile read the compiler cannot merge with earlier ones): for values needed only
// after a long loop, cheaper to recompute than to keep in a register ptxas might spill.
AK_DEV int fresh_thread_index() {
#ifdef AK_EMULATION
  return int(threadIdx.x);
#else
  int r;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(r));
  return r;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// mma.sync: d += a b for one 16x8 tile, a 16xK (row-major fragment), b Kx8 (column-major fragment), fp32 d.
enum class MmaType : int { Bf16 = 1, F16 = 2, Tf32 = 3 };

#ifdef AK_EMULATION
namespace emu {

inline double element(MmaType type, uint32_t reg, int half) {
  const uint16_t h = uint16_t(half ? reg >> 16 : reg & 0xffffu);
  switch (type) {
    case MmaType::Bf16: return host_bf16_to_float(h);
    case MmaType::F16: return host_half_to_float(h);
    case MmaType::Tf32: {
      // .tf32 operands are read as tf32: the low 13 bits of the 32-bit register do not take part
      const uint32_t u = reg & 0xffffe000u;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
  }
  return 0;
}

// The exchange: lane slot in[0..3] = a, in[4..5] = b, in[6..9] = c (as float bits); out[0..3] = d.
inline void mma_compute(ak_emu::Warp& w, const void* param) {
  const MmaType type = *static_cast<const MmaType*>(param);
  const int K = type == MmaType::Tf32 ? 8 : 16;
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    const uint32_t* in = w.lane[lane].in;
    if (type == MmaType::Tf32) {
      // m16n8k8 .tf32, A: a_i at row g + 8 (i & 1), column t + 4 (i >> 1); B: b_i at row t + 4 i, column g
      for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >> 1)] = element(type, in[i], 0);
      for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = element(type, in[4 + i], 0);
    } else {
      // m16n8k16 .bf16/.f16, A: register r holds a_2r, a_2r+1 at row g + 8 (r & 1), columns 2t + h + 8 (r >> 1);
      // B: register r holds b_2r, b_2r+1 at rows 2t + h + 8 r, column g (h = 0 low half, 1 high half)
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * t + h + 8 * (r >> 1)] = element(type, in[r], h);
      for (int r = 0; r < 2; ++r)
        for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * r][g] = element(type, in[4 + r], h);
    }
    // C / D (both shapes): c_i at row g + 8 (i >> 1), column 2t + (i & 1)
    for (int i = 0; i < 4; ++i) {
      float c;
      std::memcpy(&c, &in[6 + i], 4);
      C[g + 8 * (i >> 1)][2 * t + (i & 1)] = c;
    }
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      // products of 8/11-bit significands are exact in double; the sum is rounded to fp32 once
      double s = C[m][n];
      for (int k = 0; k < K; ++k) s += A[m][k] * B[k][n];
      D[m][n] = float(s);
    }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) std::memcpy(&w.lane[lane].out[i], &D[g + 8 * (i >> 1)][2 * t + (i & 1)], 4);
  }
}

inline void mma(MmaType type, float (&d)[4], const uint32_t* a, const uint32_t* b) {
  ak_emu::LaneSlot& s = ak_emu::my_warp().lane[ak_emu::lane_id()];
  for (int i = 0; i < 4; ++i) s.in[i] = a[i];
  for (int i = 0; i < 2; ++i) s.in[4 + i] = b[i];
  std::memcpy(&s.in[6], d, 16);
  ak_emu::warp_collective(ak_emu::Collective::Mma, uint64_t(type), &mma_compute, &type);
  std::memcpy(d, s.out, 16);
}

// ldmatrix .m8n8 .b16: matrix m's eight rows are at the addresses of lanes 8m .. 8m+7 (row r from lane 8m + r).
// Without .trans lane l receives row l >> 2, columns 2 (l % 4) and 2 (l % 4) + 1 of each matrix; with .trans the
// transposed element pair: rows 2 (l % 4) and 2 (l % 4) + 1 of column l >> 2. Lower column/row in the low half.
struct LdmatrixParam {
  int num;
  bool trans;
};

inline void ldmatrix_compute(ak_emu::Warp& w, const void* param) {
  const LdmatrixParam& p = *static_cast<const LdmatrixParam*>(param);
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < p.num; ++m) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = p.trans ? 2 * (lane & 3) + h : lane >> 2;
        const int col = p.trans ? lane >> 2 : 2 * (lane & 3) + h;
        std::memcpy(&e[h], static_cast<const uint16_t*>(w.lane[8 * m + row].ptr) + col, 2);
      }
      w.lane[lane].out[m] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
}

inline void ldmatrix(int num, bool trans, uint32_t* r, const void* row) {
  const unsigned lane = ak_emu::lane_id();
  if (lane < unsigned(8 * num) && reinterpret_cast<uintptr_t>(row) % 16 != 0)
    ak_emu::fail("ldmatrix: lane " + std::to_string(lane) + " passed a row address that is not 16-byte aligned");
  ak_emu::LaneSlot& s = ak_emu::my_warp().lane[lane];
  s.ptr = row;
  const LdmatrixParam p{num, trans};
  ak_emu::warp_collective(ak_emu::Collective::Ldmatrix, uint64_t(num) * 2 + trans, &ldmatrix_compute, &p);
  for (int m = 0; m < num; ++m) r[m] = s.out[m];
}

}  // namespace emu
#endif

AK_DEV void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef AK_EMULATION
  emu::mma(MmaType::Bf16, d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

AK_DEV void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef AK_EMULATION
  emu::mma(MmaType::F16, d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

AK_DEV void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef AK_EMULATION
  emu::mma(MmaType::Tf32, d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// ldmatrix from shared memory: `row` is this lane's row address (lanes 8m .. 8m+7 address matrix m; 16-byte aligned).
#ifndef AK_EMULATION
AK_DEV uint32_t smem_address(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
#endif

AK_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef AK_EMULATION
  emu::ldmatrix(4, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row))
               : "memory");
#endif
}

AK_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef AK_EMULATION
  emu::ldmatrix(4, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row))
               : "memory");
#endif
}

AK_DEV void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#ifdef AK_EMULATION
  emu::ldmatrix(2, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row))
               : "memory");
#endif
}

AK_DEV void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#ifdef AK_EMULATION
  emu::ldmatrix(2, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row))
               : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// cp.async.cg (L2 only, 16 bytes): copies src_bytes (0..16) from global memory and zero-fills the rest of the 16
// destination bytes. Both addresses 16-byte aligned (src only read when src_bytes > 0).
AK_DEV void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#ifdef AK_EMULATION
  ak_emu::cp_async_enqueue(smem, gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_address(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
#endif
}

AK_DEV void cp_async_commit() {
#ifdef AK_EMULATION
  ak_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most `Newest` of this thread's committed groups are still in flight.
template <int Newest>
AK_DEV void cp_async_wait() {
#ifdef AK_EMULATION
  ak_emu::cp_async_wait_group(Newest);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(Newest) : "memory");
#endif
}

}  // namespace ak

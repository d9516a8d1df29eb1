// Tiling of the tensor-core kernels (csrc/soft_contrastive.cu, csrc/hard_negative_topk.cu): input dtypes, tiles
// staged from strided global rows into shared memory, and the two warp-level products every kernel is made of.
//
// A warp owns 16 rows of a tile (one mma m-tile). Shared-memory tiles are row-major [row][feature] in the input's
// own dtype (bf16 / fp16 read natively; fp32 as fp32), with a row pitch LD = D + 8 (16-bit) or D + 4 (fp32)
// elements: the 8 rows an ldmatrix reads then fall in 8 distinct 16-byte bank groups, and the fp32 fragment reads
// (rows g, columns t, or rows 2t, columns g) hit 32 distinct banks.
//   logits:   f[16 x 8 NB] += A[16 x D] B[8 NB x D]^T  (A, B both row-major tiles: ldmatrix without .trans)
//   values:   o[16 x 8 NO] += Z[16 x KB] V[KB x cols]  (Z in registers as mma accumulators, V a row-major tile:
//             ldmatrix .trans gives its column-major B fragments)
// fp32 inputs run on tf32 tensor cores with the 3xTF32 split x = hi + lo (hi = tf32(x), lo = tf32(x - hi)):
// a b ~ hi_a hi_b + hi_a lo_b + lo_a hi_b, each product exact, the dropped lo_a lo_b below 2^-22 relative: about
// fp32 accuracy at 3 tf32 mma per product (tf32 alone would be 2^-11, too coarse for fp32's tolerance).
#pragma once

#include <cstdint>

#include "cuda_compat.h"
#include "launchers.h"
#include "warp_matrix.cuh"

#ifdef AK_EMULATION
#define AK_HD_CONSTEXPR constexpr
#else
#define AK_HD_CONSTEXPR __host__ __device__ constexpr  // tile shapes are read by kernels and launchers alike
#endif

namespace ak {

// ---------------------------------------------------------------------------------------------------------------
// Input dtypes. Elem is the shared-memory element; kStep the mma's k (16 for bf16 / fp16, 8 for tf32).
struct Bf16 {
  using Elem = uint16_t;
  static constexpr int kBytes = 2, kPad = 8, kStep = 16;
  static constexpr bool kBf16 = true;
  static constexpr const char* name = "ak::Bf16";
};
struct F16 {
  using Elem = uint16_t;
  static constexpr int kBytes = 2, kPad = 8, kStep = 16;
  static constexpr bool kBf16 = false;
  static constexpr const char* name = "ak::F16";
};
struct F32 {
  using Elem = float;
  static constexpr int kBytes = 4, kPad = 4, kStep = 8;
  static constexpr bool kBf16 = false;
  static constexpr const char* name = "ak::F32";
};

template <class T>
constexpr bool is_f32 = sizeof(typename T::Elem) == 4;
template <class T>
constexpr bool is_f16 = !is_f32<T> && !T::kBf16;

template <class T>
AK_DEV void mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (T::kBf16) mma_bf16_16816(d, a, b);
  else mma_f16_16816(d, a, b);
}

template <class T>
AK_DEV uint32_t pack16(float lo, float hi) {
  if constexpr (T::kBf16) {
    return pack_bf16x2(lo, hi);
  } else {
    // fp16 saturates instead of overflowing to inf (an inf times a zero feature would make a NaN); the kernels
    // keep fp16 operands in range with a power-of-two scale (ScaleF16)
    const float m = 65504.f;
    return pack_f16x2(fminf(fmaxf(lo, -m), m), fminf(fmaxf(hi, -m), m));
  }
}

// 3xTF32 split of one fragment register.
AK_DEV void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - tf32_value(hi));
}

AK_DEV void mma_3xtf32(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4], const uint32_t (&bh)[2],
                       const uint32_t (&bl)[2]) {
  mma_tf32_1688(d, al, bh);  // the small terms first: they are then added to a small partial sum
  mma_tf32_1688(d, ah, bl);
  mma_tf32_1688(d, ah, bh);
}

// ---------------------------------------------------------------------------------------------------------------
// A strided row source: row n at (n / P) * sb + (n % P) * sp, feature d at + d * sd (elements). Keys use P >= K
// (one batch). `uniform` (fast path): sd == 1, rows at n * sp, every row and 16-byte chunk aligned; then tiles
// stream with cp.async. Otherwise elements are read one by one along the smaller stride (coalesced either way:
// channel-first maps have sd = P, sp = 1), correct for any strides.
struct Src {
  const void* ptr;
  int64_t P, sb, sp, sd;
  bool uniform;
};

// Host side: the source of a (B, P, D) view of `nrows` rows of `bytes`-byte elements, and whether it takes the
// cp.async path.
inline Src src_of(const RowsArg& a, int64_t nrows, int bytes) {
  const int64_t batches = a.P > 0 ? (nrows + a.P - 1) / a.P : 1;
  const bool one_stride = batches <= 1 || a.sb == a.P * a.sp;
  const bool aligned = a.ptr % 16 == 0 && (a.sp * bytes) % 16 == 0;
  return Src{reinterpret_cast<const void*>(a.ptr), a.P, a.sb, a.sp, a.sd, a.sd == 1 && one_stride && aligned};
}

// Streams rows row0 .. row0 + ROWS - 1 of a uniform source (Src::uniform) into the tile `sh` with cp.async (zero
// past nrows and past d_real; the caller commits and waits). Tiles that stream inside a kernel's main loop only
// come this way: the launchers give the kernels uniform streamed operands (a padded copy in the input's own dtype
// otherwise, O(rows x D)), so the hot loop holds no general-path code.
template <class T, int ROWS, int D, int THREADS>
AK_DEV void stream_tile(typename T::Elem* sh, const Src& src, int64_t row0, int64_t nrows, int d_real) {
  using E = typename T::Elem;
  constexpr int LD = D + T::kPad, PER = 16 / T::kBytes, CHUNKS = D / PER;  // PER elements per 16-byte chunk
  constexpr int TRIPS = (ROWS * CHUNKS + THREADS - 1) / THREADS;
  const E* base = static_cast<const E*>(src.ptr);
  const int rows = nrows - row0 < ROWS ? int(nrows - row0) : ROWS;
  if constexpr (THREADS % CHUNKS == 0 || CHUNKS % THREADS == 0) {
    // Every launch plan's shape: a thread's chunks keep one column and step RSTEP rows per trip, or take M
    // consecutive column groups of one row before the next row. Addresses then advance by constants: a trip is
    // a pointer add, a row compare and the copy, with the 64-bit row product once per tile (it was per chunk:
    // ~35 instructions a chunk, a third of top-k's main loop).
    constexpr bool FIXED_COL = THREADS % CHUNKS == 0;
    constexpr int RSTEP = FIXED_COL ? THREADS / CHUNKS : 1, M = FIXED_COL ? 1 : CHUNKS / THREADS;
    const int tid = int(threadIdx.x), r0 = FIXED_COL ? tid / CHUNKS : 0, c0 = FIXED_COL ? tid % CHUNKS : tid;
    const int64_t gstep = int64_t(RSTEP) * src.sp;
    const E* rowp = base + (row0 + r0) * src.sp + c0 * PER;
#pragma unroll(TRIPS <= 8 ? TRIPS : 4)
    for (int k = 0; k < TRIPS; ++k) {
      const int sub = k % M, r = r0 + (k / M) * RSTEP, c = c0 + sub * THREADS;
      if (ROWS % RSTEP != 0 && r >= ROWS) break;
      const int left = d_real - c * PER;
      const int bytes = r < rows && left > 0 ? (left >= PER ? 16 : left * T::kBytes) : 0;
      cp_async_16(sh + r * LD + c * PER, bytes ? rowp + sub * THREADS * PER : base, bytes);
      if (sub == M - 1) rowp += gstep;
    }
  } else {
    // a constant trip count: unrolled when short; long ones (D = 512, small CTAs) keep few addresses live
#pragma unroll(TRIPS <= 8 ? TRIPS : 4)
    for (int k = 0; k < TRIPS; ++k) {
      const int i = int(threadIdx.x) + k * THREADS;
      if (ROWS * CHUNKS % THREADS != 0 && i >= ROWS * CHUNKS) break;
      const int r = i / CHUNKS, c = i % CHUNKS, left = d_real - c * PER;
      const int bytes = r < rows && left > 0 ? (left >= PER ? 16 : left * T::kBytes) : 0;
      cp_async_16(sh + r * LD + c * PER, bytes ? base + (row0 + r) * src.sp + c * PER : base, bytes);
    }
  }
}

// Stages rows row0 .. row0 + ROWS - 1 of any source into the tile `sh` (zero past nrows and past d_real): uniform
// sources by stream_tile, others by synchronous loads along the smaller stride, each row's offset computed once
// into `bases` (ROWS entries of shared scratch), ending with a barrier so the next call may reuse the scratch.
// For the resident tiles (loaded once per CTA); call from uniform control flow (the general path has barriers).
constexpr int kMaxTileRows = 64;

template <class T, int ROWS, int D, int THREADS>
AK_DEV void load_tile(typename T::Elem* sh, const Src& src, int64_t row0, int64_t nrows, int d_real, int64_t* bases) {
  using E = typename T::Elem;
  constexpr int LD = D + T::kPad;
  static_assert(ROWS <= kMaxTileRows, "bases holds kMaxTileRows rows");
  const E* base = static_cast<const E*>(src.ptr);
  const int tid = threadIdx.x;
  if (src.uniform) {
    stream_tile<T, ROWS, D, THREADS>(sh, src, row0, nrows, d_real);
    return;
  }
  for (int r = tid; r < ROWS; r += THREADS) {
    const int64_t n = row0 + r;
    bases[r] = n < nrows ? (n / src.P) * src.sb + (n % src.P) * src.sp : -1;
  }
  __syncthreads();
  // consecutive threads take consecutive elements along the smaller stride: coalesced for row-major rows and for
  // channel-first maps (feature stride P, row stride 1) alike
  const bool rows_fast = src.sp <= src.sd;
  for (int i = tid; i < ROWS * D; i += THREADS) {
    const int r = rows_fast ? i % ROWS : i / D, d = rows_fast ? i / ROWS : i % D;
    const int64_t b = bases[r];
    sh[r * LD + d] = b >= 0 && d < d_real ? base[b + d * src.sd] : E(0);
  }
  __syncthreads();
}

// The logits' feature loop runs kLogitsUnroll k-steps per iteration: fully unrolled up to D = 128 for 16-bit
// inputs (more would keep too many fragments live at D = 512), by 2 for 3xTF32. Its trip count is part of the
// launch plans when it stays a loop.
template <class T>
constexpr int kLogitsUnroll = is_f32<T> ? 2 : 8;
template <class T, int D>
AK_HD_CONSTEXPR int logits_loop_trips() {
  return (D / T::kStep) / kLogitsUnroll<T>;
}

// ---------------------------------------------------------------------------------------------------------------
// Logits: f_i[16 x 8 NB] += A_i[16 x D] B[8 NB x D]^T for A_i, i < NA (one or two row tiles sharing the B tile:
// student and teacher read each key fragment once). a_i, b point at the first row; pitch LD.
template <class T, int D, int NB, int NA>
AK_DEV void warp_logits(const typename T::Elem* const (&a)[NA], const typename T::Elem* b, float (&f)[NA][NB][4]) {
  constexpr int LD = D + T::kPad;
  const int lane = threadIdx.x & 31;
  if constexpr (!is_f32<T>) {
    static_assert(NB % 2 == 0, "16-bit tiles load B fragments two n-tiles at a time");
#pragma unroll(kLogitsUnroll<T>)
    for (int k0 = 0; k0 < D; k0 += 16) {
      uint32_t A[NA][4];
#pragma unroll
      for (int i = 0; i < NA; ++i) ldmatrix_x4(A[i], a[i] + (lane & 15) * LD + k0 + 8 * (lane >> 4));
#pragma unroll
      for (int np = 0; np < NB / 2; ++np) {
        // matrices: (rows 16np .. +7, k0), (rows 16np .. +7, k0 + 8), (rows +8 .. +15, k0), (rows +8 .., k0 + 8)
        uint32_t B[4];
        ldmatrix_x4(B, b + (16 * np + (lane & 7) + 8 * (lane >> 4)) * LD + k0 + 8 * ((lane >> 3) & 1));
        const uint32_t b0[2] = {B[0], B[1]}, b1[2] = {B[2], B[3]};
#pragma unroll
        for (int i = 0; i < NA; ++i) {
          mma16<T>(f[i][2 * np], A[i], b0);
          mma16<T>(f[i][2 * np + 1], A[i], b1);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll(kLogitsUnroll<T>)
    for (int k0 = 0; k0 < D; k0 += 8) {
      uint32_t Ah[NA][4], Al[NA][4];
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        // m16n8k8 .tf32 A: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
        const float* p = a[i] + g * LD + k0 + t;
        split_tf32(p[0], Ah[i][0], Al[i][0]);
        split_tf32(p[8 * LD], Ah[i][1], Al[i][1]);
        split_tf32(p[4], Ah[i][2], Al[i][2]);
        split_tf32(p[8 * LD + 4], Ah[i][3], Al[i][3]);
      }
#pragma unroll
      for (int nt = 0; nt < NB; ++nt) {
        // B (k x n) = rows^T: b0 (k t, n g) = row g, feature t; b1 feature t + 4
        const float* p = b + (8 * nt + g) * LD + k0 + t;
        uint32_t Bh[2], Bl[2];
        split_tf32(p[0], Bh[0], Bl[0]);
        split_tf32(p[4], Bh[1], Bl[1]);
#pragma unroll
        for (int i = 0; i < NA; ++i) mma_3xtf32(f[i][nt], Ah[i], Al[i], Bh, Bl);
      }
    }
  }
}

// Logits of one A tile against two B tiles: f_i[16 x 8 NB] += A[16 x D] B_i[8 NB x D]^T (the key-owned kernel: its
// keys against the student and the teacher rows; each key fragment is read once for both).
template <class T, int D, int NB>
AK_DEV void warp_logits_2b(const typename T::Elem* a, const typename T::Elem* const (&b)[2], float (&f)[2][NB][4]) {
  constexpr int LD = D + T::kPad;
  const int lane = threadIdx.x & 31;
  if constexpr (!is_f32<T>) {
    static_assert(NB % 2 == 0, "16-bit tiles load B fragments two n-tiles at a time");
#pragma unroll(kLogitsUnroll<T>)
    for (int k0 = 0; k0 < D; k0 += 16) {
      uint32_t A[4];
      ldmatrix_x4(A, a + (lane & 15) * LD + k0 + 8 * (lane >> 4));
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int np = 0; np < NB / 2; ++np) {
          uint32_t B[4];
          ldmatrix_x4(B, b[i] + (16 * np + (lane & 7) + 8 * (lane >> 4)) * LD + k0 + 8 * ((lane >> 3) & 1));
          const uint32_t b0[2] = {B[0], B[1]}, b1[2] = {B[2], B[3]};
          mma16<T>(f[i][2 * np], A, b0);
          mma16<T>(f[i][2 * np + 1], A, b1);
        }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll(kLogitsUnroll<T>)
    for (int k0 = 0; k0 < D; k0 += 8) {
      uint32_t Ah[4], Al[4];
      const float* p = a + g * LD + k0 + t;
      split_tf32(p[0], Ah[0], Al[0]);
      split_tf32(p[8 * LD], Ah[1], Al[1]);
      split_tf32(p[4], Ah[2], Al[2]);
      split_tf32(p[8 * LD + 4], Ah[3], Al[3]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int nt = 0; nt < NB; ++nt) {
          const float* q = b[i] + (8 * nt + g) * LD + k0 + t;
          uint32_t Bh[2], Bl[2];
          split_tf32(q[0], Bh[0], Bl[0]);
          split_tf32(q[4], Bh[1], Bl[1]);
          mma_3xtf32(f[i][nt], Ah, Al, Bh, Bl);
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Values: o[16 x 8 NO] += Z[16 x KB] V[KB x 8 NO], V the tile rows 0 .. KB-1, columns c0 .. c0 + 8 NO - 1.
// Z arrives as mma accumulators z[KB / 8][4] (row g / g + 8, columns 2t, 2t + 1 of each 8-column block) and becomes
// the A operand without any shuffle: for 16-bit, two adjacent accumulator blocks are exactly one m16n8k16 A
// fragment; for tf32 the k order inside each 8-block is permuted (A column t <-> z column 2t, column t + 4 <->
// 2t + 1), and the B fragment reads V's rows in the same permuted order, so the sum over k is unchanged.
// `scale` multiplies Z before its 16-bit rounding (ScaleF16); 1 otherwise.
template <class T, int D, int KB, int NO>
AK_DEV void warp_values(const float (&z)[KB / 8][4], float scale, const typename T::Elem* v, int c0,
                        float (&o)[NO][4]) {
  constexpr int LD = D + T::kPad;
  const int lane = threadIdx.x & 31;
  if constexpr (!is_f32<T>) {
    static_assert(KB % 16 == 0 && NO % 2 == 0, "16-bit values need k in steps of 16 and n-tiles in pairs");
#pragma unroll
    for (int kk = 0; kk < KB / 16; ++kk) {
      const uint32_t A[4] = {pack16<T>(z[2 * kk][0] * scale, z[2 * kk][1] * scale),
                             pack16<T>(z[2 * kk][2] * scale, z[2 * kk][3] * scale),
                             pack16<T>(z[2 * kk + 1][0] * scale, z[2 * kk + 1][1] * scale),
                             pack16<T>(z[2 * kk + 1][2] * scale, z[2 * kk + 1][3] * scale)};
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        // .trans matrices: (k rows 0-7, n c0 + 16np), (k 8-15, same n), (k 0-7, n + 8), (k 8-15, n + 8)
        uint32_t B[4];
        ldmatrix_x4_trans(B, v + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + c0 + 16 * np + 8 * (lane >> 4));
        const uint32_t b0[2] = {B[0], B[1]}, b1[2] = {B[2], B[3]};
        mma16<T>(o[2 * np], A, b0);
        mma16<T>(o[2 * np + 1], A, b1);
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kt = 0; kt < KB / 8; ++kt) {
      uint32_t Ah[4], Al[4];
      split_tf32(z[kt][0] * scale, Ah[0], Al[0]);  // (g, k t)      <- z (g, 2t)
      split_tf32(z[kt][2] * scale, Ah[1], Al[1]);  // (g + 8, k t)  <- z (g + 8, 2t)
      split_tf32(z[kt][1] * scale, Ah[2], Al[2]);  // (g, k t + 4)  <- z (g, 2t + 1)
      split_tf32(z[kt][3] * scale, Ah[3], Al[3]);  // (g + 8, t + 4) <- z (g + 8, 2t + 1)
      const float* p = v + (8 * kt + 2 * t) * LD + c0 + g;
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) {
        uint32_t Bh[2], Bl[2];
        split_tf32(p[8 * nt], Bh[0], Bl[0]);       // (k t, n g)     <- V row 2t
        split_tf32(p[LD + 8 * nt], Bh[1], Bl[1]);  // (k t + 4, n g) <- V row 2t + 1
        mma_3xtf32(o[nt], Ah, Al, Bh, Bl);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// fp16 range keeper for a Z operand: a warp-uniform power of two 2^E such that max |Z| 2^E < 2^15 (no overflow,
// and values down to 2^-39 of the max stay representable), with E non-increasing over the tiles; when E drops,
// the accumulator is rescaled by the exact power of two. Other dtypes have fp32's exponent range: scale 1.
struct ScaleF16 {
  int e = 127;
  // Returns the factor for this tile's Z and rescales `o` if the exponent dropped. `absmax`: this lane's max |Z|.
  template <int NO>
  AK_DEV float update(float absmax, float (&o)[NO][4]) {
#pragma unroll
    for (int s = 16; s >= 1; s >>= 1) absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, s));
    if (absmax > 0.f && absmax < INFINITY) {
      const int want = 14 - ilogb_(absmax);
      if (want < e) {
        const float r = exp2f(float(want - e));
#pragma unroll
        for (int n = 0; n < NO; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) o[n][i] *= r;
        e = want;
      }
    }
    return exp2f(float(e));
  }
  AK_DEV float unscale() const { return exp2f(float(-e)); }
  static AK_DEV int ilogb_(float x) {  // floor(log2 x) for finite x > 0 (normal or subnormal)
    return x >= 1.17549435e-38f ? int((float_bits(x) >> 23) & 0xff) - 127 : -127;
  }
};

// Quad (4 lanes sharing an accumulator row) reductions.
AK_DEV float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
AK_DEV float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile shapes and shared memory. Every plan fits 99 KiB of dynamic shared memory (the per-block limit of sm_86 /
// sm_89, e.g. L40; A100 and H100 allow more), so one plan runs on every sm_80+ GPU.
constexpr int64_t kSmemLimit = 99 * 1024;

// Stores the warp's value accumulators o[16 x 8 NO] times `unscale` into out (fp32, rows of D, row-major): lane
// (g, t) holds rows row + 0 / + 8 (row = the warp's first row + g), columns c0 + 8 nb + 2t, + 1 (the m16n8
// accumulator layout); rows >= nrows and columns >= D are skipped.
template <int NO>
AK_DEV void store_values(const float (&o)[NO][4], float unscale, float* out, int64_t row, int64_t nrows, int D,
                         int c0) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = row + 8 * h;
    if (n >= nrows) continue;
#pragma unroll
    for (int nb = 0; nb < NO; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = c0 + 8 * nb + 2 * t + e;
        if (d < D) out[n * D + d] = o[nb][2 * h + e] * unscale;
      }
  }
}

template <class T, int D>
AK_HD_CONSTEXPR int64_t tile_bytes(int rows) {
  return int64_t(rows) * (D + T::kPad) * T::kBytes;
}

AK_HD_CONSTEXPR unsigned ceil_div(int64_t n, int64_t per) { return unsigned((n + per - 1) / per); }

// The feature bucket a D runs in (a template instance per bucket; features past D are zero in the tiles).
inline int feature_bucket(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : D <= 256 ? 256 : D <= 512 ? 512 : 0; }

}  // namespace ak

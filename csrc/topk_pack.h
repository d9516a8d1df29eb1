// Packing of (similarity, key index) into one int64 whose integer order is "higher similarity first, then lower
// index first": top-k selection on packed keys is then deterministic with ties broken by the lower index.
// Shared by the CUDA top-k kernel (csrc/hard_negative_topk.cu) and the native CPU selection (csrc/cpu/).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef AK_HD
#if defined(__CUDACC__)
#define AK_HD __host__ __device__ __forceinline__
#else
#define AK_HD inline
#endif
#endif

namespace ak {

constexpr int64_t kPackedNone = INT64_MIN;  // a masked candidate: below every real one

AK_HD int32_t float_to_ordered(float v) {
  int32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u < 0 ? (u ^ 0x7FFFFFFF) : u;  // negative floats: flip the magnitude bits so larger means greater
}

AK_HD float ordered_to_float(int32_t u) {
  u = u < 0 ? (u ^ 0x7FFFFFFF) : u;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

AK_HD int64_t pack_candidate(float v, int64_t index) {
  return (static_cast<int64_t>(float_to_ordered(v)) * 4294967296LL) + (4294967295LL - index);
}

AK_HD float packed_value(int64_t key) {
  // floor division by 2^32 (arithmetic shift keeps the sign)
  return ordered_to_float(static_cast<int32_t>(key >> 32));
}

AK_HD int64_t packed_index(int64_t key) { return 4294967295LL - (key & 0xFFFFFFFFLL); }

}  // namespace ak

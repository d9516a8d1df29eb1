// Native CPU selection of the chunked hard-negative top-k: per row of a block of similarities (c x K, fp32,
// computed by a GEMM outside), the k best keys among those whose label differs from the row's and is not the
// ignore label. A size-k min-heap of packed (value, index) keys per row: O(K + m log k) for m heap updates, no
// sort of the whole row; ties go to the lower index (csrc/topk_pack.h). Rows split across threads (parallel_rows.h:
// a failure in a worker is rethrown on the caller): deterministic.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../launchers.h"
#include "../topk_pack.h"
#include "parallel_rows.h"

namespace ak {
namespace {

void select_rows(const float* sim, int64_t r0, int64_t r1, int64_t K, const int64_t* row_labels,
                 const int64_t* key_labels, int64_t ignore, int64_t k, float* values, int64_t* indices) {
  std::vector<int64_t> heap;
  heap.reserve(static_cast<size_t>(std::min(k, K)));  // a row never holds more than its K candidates
  const auto greater = std::greater<int64_t>();  // min-heap under std::push_heap's max-heap convention
  for (int64_t i = r0; i < r1; ++i) {
    const float* row = sim + i * K;
    const int64_t y = row_labels[i];
    heap.clear();
    float floor = -INFINITY;  // once the heap is full: the value of its smallest key (a strictly smaller one loses)
    for (int64_t j = 0; j < K; ++j) {
      if (row[j] < floor) continue;  // the common case once full: no label load, no packing
      const int64_t yk = key_labels[j];
      if (yk == y || yk == ignore) continue;
      const int64_t key = pack_candidate(row[j], j);
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.push_back(key);
        std::push_heap(heap.begin(), heap.end(), greater);
        if (static_cast<int64_t>(heap.size()) == k) floor = packed_value(heap.front());
      } else if (key > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), greater);
        heap.back() = key;
        std::push_heap(heap.begin(), heap.end(), greater);
        floor = packed_value(heap.front());
      }
    }
    std::sort(heap.begin(), heap.end(), greater);  // descending
    for (int64_t r = 0; r < k; ++r) {
      const bool ok = r < static_cast<int64_t>(heap.size());
      values[i * k + r] = ok ? packed_value(heap[r]) : -INFINITY;
      indices[i * k + r] = ok ? packed_index(heap[r]) : -1;
    }
  }
}

}  // namespace

void hard_negative_topk_rows_cpu(uintptr_t sim, int64_t rows, int64_t K, uintptr_t row_labels, uintptr_t key_labels,
                                 int64_t ignore_label, int64_t k, uintptr_t values, uintptr_t indices, int threads) {
  // The buffers' sizes were checked by the Python caller (action_kernels._extension.check_buffers); these are the
  // checks a raw-pointer entry point can make itself. std::invalid_argument reaches Python as ValueError.
  if (rows < 0 || K < 0 || k < 1)
    throw std::invalid_argument("hard_negative_topk_rows_cpu: expected rows >= 0, K >= 0, k >= 1, got rows=" +
                                std::to_string(rows) + ", K=" + std::to_string(K) + ", k=" + std::to_string(k));
  if (rows > 0 && (sim == 0 || row_labels == 0 || values == 0 || indices == 0 || (K > 0 && key_labels == 0)))
    throw std::invalid_argument("hard_negative_topk_rows_cpu: a null buffer pointer");
  parallel_rows(rows, threads, [&](int64_t r0, int64_t r1) {
    select_rows(reinterpret_cast<const float*>(sim), r0, r1, K, reinterpret_cast<const int64_t*>(row_labels),
                reinterpret_cast<const int64_t*>(key_labels), ignore_label, k, reinterpret_cast<float*>(values),
                reinterpret_cast<int64_t*>(indices));
  });
}

}  // namespace ak

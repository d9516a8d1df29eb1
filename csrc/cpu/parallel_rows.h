// Rows [0, rows) split into contiguous ranges over up to `threads` std::threads, with failures kept on the caller:
// an exception in a worker (std::bad_alloc from a buffer it reserves, anything else) is caught there, every thread
// is joined, and the first failure is rethrown on the calling thread, where pybind11 turns it into a Python
// exception (MemoryError, RuntimeError). A failure to start a thread is handled the same way. Without this, an
// exception escaping a std::thread calls std::terminate and aborts the interpreter (exit 134) with nothing saved.
#pragma once

#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ak {

// fn(r0, r1) is called once per range; ranges are deterministic for a given (rows, threads). The calling thread
// runs the first range itself.
template <typename Fn>
void parallel_rows(int64_t rows, int threads, Fn&& fn) {
  if (rows <= 0) return;
  const int64_t n = threads < 1 ? 1 : (threads > rows ? rows : threads);
  std::exception_ptr failure;
  std::mutex failure_lock;
  auto guarded = [&](int64_t r0, int64_t r1) {
    try {
      fn(r0, r1);
    } catch (...) {
      std::lock_guard<std::mutex> hold(failure_lock);
      if (!failure) failure = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(static_cast<size_t>(n - 1));
    for (int64_t t = 1; t < n; ++t) pool.emplace_back(guarded, rows * t / n, rows * (t + 1) / n);
  } catch (...) {  // std::system_error (no thread could start) or bad_alloc: the started ones are joined below
    std::lock_guard<std::mutex> hold(failure_lock);
    if (!failure) failure = std::current_exception();
  }
  if (!failure) guarded(0, rows / n);
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace ak

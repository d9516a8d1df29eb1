// CPU emulation of the CUDA subset used by csrc/*.cu, so the same kernel source runs on CPU in tests, with its own
// lane logic: every thread of a block is a user-level fiber, and warp collectives (shuffles, votes, mma, ldmatrix)
// exchange data through a per-warp barrier exactly as the PTX ISA defines the exchange (csrc/warp.cuh).
//
// Model. Blocks are independent: they run in parallel on a few OS threads (AK_EMU_THREADS, default the hardware
// concurrency, at most 8), one block at a time per OS thread. The threads of a block run as fibers on that OS
// thread, round-robin, each until it reaches a synchronisation point:
//   - __syncthreads(): a block barrier (threads that have exited count as arrived, as on the hardware);
//   - a warp collective: the lane deposits its inputs in its warp's exchange slot and waits; the 32nd lane to
//     arrive computes every lane's result (so the collective completes at one instant, as .sync.aligned
//     instructions do) and the lanes resume and read their own results.
// __shared__ variables are function-local `static thread_local`: one copy per OS thread, i.e. per running block;
// dynamic shared memory is one buffer per OS thread (AK_DYNAMIC_SMEM). cp.async copies are queued per thread and
// land at the latest moment the PTX memory model allows (the cp.async.wait_group that covers them), so a kernel
// that reads a staged tile too early reads stale data in tests, as it could on a GPU.
// Misuse is an error, not a hang: a deadlock (threads waiting at different barriers, a collective with exited
// lanes), lanes of one warp meeting at different collectives, a misaligned ldmatrix/cp.async address, or cp.async
// groups still pending when a thread exits raise std::runtime_error from launch(). Two launches never run at once
// (launch() holds a global mutex). Block sizes must be multiples of 32 (whole warps).
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) longlong2 {
  long long x, y;
};

namespace ak_emu {

// ---------------------------------------------------------------------------------------------------------------
// Context switch. x86-64: save the callee-saved registers, MXCSR and the x87 control word on the current stack,
// swap stack pointers, restore (System V ABI: everything else is caller-saved). Elsewhere: ucontext (slower: it
// saves the signal mask with a system call).
#if defined(__x86_64__)
[[gnu::naked, gnu::noinline]] inline void swap_stack(void** /*save_sp*/, void* /*load_sp*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $16, %rsp\n\t"
      "stmxcsr 8(%rsp)\n\t"
      "fnstcw 12(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr 8(%rsp)\n\t"
      "fldcw 12(%rsp)\n\t"
      "addq $16, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

// First entry of a fiber: swap_stack "returns" here with r12 = argument, r13 = function.
[[gnu::naked, gnu::noinline]] inline void fiber_trampoline() {
  asm volatile(
      "movq %r12, %rdi\n\t"
      "callq *%r13\n\t"
      "ud2\n\t");
}
#endif

struct Fiber;
using FiberEntry = void (*)(Fiber*);

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  swap_stack(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
enum class State { Ready, WaitWarp, WaitBlock, Done };

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  int64_t group;
};

struct Block;

struct Fiber {
  Context ctx;
  Block* block = nullptr;
  dim3 tid;
  unsigned linear = 0;  // linear thread index in the block
  State state = State::Ready;
  std::vector<AsyncCopy> pending;  // cp.async copies not yet landed
  int64_t committed = 0;           // cp.async groups committed so far
};

// What a warp collective computes once all 32 lanes have deposited their inputs.
enum class Collective : int { None, SyncWarp, Shfl, Ballot, Mma, Ldmatrix };

struct LaneSlot {
  uint32_t in[12];
  uint32_t out[8];
  const void* ptr;
};

struct Warp;
using WarpFn = void (*)(Warp&, const void* param);

struct Warp {
  LaneSlot lane[32];
  int arrived = 0;
  Collective kind = Collective::None;
  uint64_t tag = 0;  // the collective's parameters: lanes must agree on them
  Fiber* fibers[32] = {};
};

inline void fail(const std::string& what);

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Context scheduler;
  unsigned threads = 0, done = 0, block_arrived = 0;
  std::string error;
  char* stacks = nullptr;
  size_t stack_bytes = 0, stack_total = 0;
  std::vector<unsigned char> dynamic_smem;
  dim3 idx;

  ~Block() {
    if (stacks) munmap(stacks, stack_total);
  }
};

inline thread_local Fiber* current = nullptr;
inline thread_local Block* current_block = nullptr;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::mutex launch_mutex;

// A launch's record (grid, block, dynamic smem), for tests that compare launches with the launch plans.
struct LaunchRecord {
  unsigned grid_x, grid_y, grid_z, block;
  size_t dynamic_smem;
};
inline std::vector<LaunchRecord> launch_log;

inline void yield_to_scheduler() { switch_context(current->ctx, current_block->scheduler); }

// Raised inside a fiber: stop this block (the scheduler throws once it regains control).
inline void fail(const std::string& what) {
  Block* b = current_block;
  if (b->error.empty()) b->error = what;
  current->state = State::Done;  // never resumed
  ++b->done;
  yield_to_scheduler();
  std::abort();  // unreachable: a failed fiber is never resumed
}

// ---------------------------------------------------------------------------------------------------------------
// Barriers.
inline void release_block_barrier(Block& b) {
  for (auto& f : b.fibers)
    if (f.state == State::WaitBlock) f.state = State::Ready;
  b.block_arrived = 0;
}

inline void syncthreads() {
  Block& b = *current_block;
  ++b.block_arrived;
  if (b.block_arrived + b.done == b.threads) {
    release_block_barrier(b);
    return;
  }
  current->state = State::WaitBlock;
  yield_to_scheduler();
}

inline unsigned lane_id() { return current->linear & 31u; }
inline Warp& my_warp() { return current_block->warps[current->linear >> 5]; }

// Deposits nothing itself: the caller has filled its slot. Returns once the collective has completed.
inline void warp_collective(Collective kind, uint64_t tag, WarpFn fn, const void* param) {
  Warp& w = my_warp();
  if (w.arrived == 0) {
    w.kind = kind;
    w.tag = tag;
  } else if (w.kind != kind || w.tag != tag) {
    fail("warp " + std::to_string(current->linear >> 5) + ": lane " + std::to_string(lane_id()) +
         " reached a different warp collective (kind " + std::to_string(int(kind)) + ", parameters " +
         std::to_string(tag) + ") than its warp's other lanes (kind " + std::to_string(int(w.kind)) +
         ", parameters " + std::to_string(w.tag) + "): divergent collectives");
  }
  w.fibers[lane_id()] = current;
  if (++w.arrived == 32) {
    if (fn) fn(w, param);
    w.arrived = 0;
    w.kind = Collective::None;
    for (Fiber* f : w.fibers)
      if (f != current) f->state = State::Ready;
    return;
  }
  current->state = State::WaitWarp;
  yield_to_scheduler();
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu)
    fail(std::string(what) + ": the emulation supports full-warp masks only (0xffffffff), got " +
         std::to_string(mask));
}

// ---------------------------------------------------------------------------------------------------------------
// cp.async: queued, landed by cp_async_wait_group.
inline void cp_async_enqueue(void* dst, const void* src, int bytes, int src_bytes) {
  if ((reinterpret_cast<uintptr_t>(dst) % bytes) != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes))
    fail("cp.async of " + std::to_string(bytes) + " bytes needs addresses aligned to " + std::to_string(bytes));
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size must be in [0, cp-size]");
  current->pending.push_back(AsyncCopy{dst, src, bytes, src_bytes, current->committed});
}

inline void cp_async_commit() { ++current->committed; }

// Lands every copy of the committed groups except the `newest` most recent ones.
inline void cp_async_wait_group(int newest) {
  Fiber& f = *current;
  const int64_t limit = f.committed - newest;  // groups with id < limit must have landed
  size_t keep = 0;
  for (size_t i = 0; i < f.pending.size(); ++i) {
    const AsyncCopy& c = f.pending[i];
    if (c.group < limit) {
      if (c.src_bytes) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
    } else {
      f.pending[keep++] = c;
    }
  }
  f.pending.resize(keep);
}

// ---------------------------------------------------------------------------------------------------------------
// Running a grid.
struct KernelThunk {
  void (*call)(const void* closure);
  const void* closure;
};
inline thread_local const KernelThunk* current_thunk = nullptr;

inline void fiber_main(Fiber* f) {
  current_thunk->call(current_thunk->closure);
  if (!f->pending.empty() && current_block->error.empty())
    current_block->error = "thread " + std::to_string(f->linear) + " exited with " +
                           std::to_string(f->pending.size()) + " cp.async copies never waited for";
  f->state = State::Done;
  Block& b = *current_block;
  ++b.done;
  if (b.block_arrived && b.block_arrived + b.done == b.threads) release_block_barrier(b);
  yield_to_scheduler();
  std::abort();  // unreachable: a finished fiber is never resumed
}

#if !defined(__x86_64__)
inline void fiber_start_ucontext(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

constexpr size_t kStackBytes = 256 << 10;  // per fiber; kernels keep register-sized locals only
constexpr size_t kGuardBytes = 4096;       // an overflow faults instead of corrupting the next stack

inline void prepare_block(Block& b, unsigned threads, size_t smem) {
  if (b.threads != threads) {
    if (b.stacks) munmap(b.stacks, b.stack_total);
    b.threads = threads;
    b.stack_bytes = kStackBytes + kGuardBytes;
    b.stack_total = b.stack_bytes * threads;
    void* mem = mmap(nullptr, b.stack_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("emulation: cannot map fiber stacks");
    b.stacks = static_cast<char*>(mem);
    for (unsigned t = 0; t < threads; ++t) mprotect(b.stacks + t * b.stack_bytes, kGuardBytes, PROT_NONE);
    b.fibers = std::vector<Fiber>(threads);
    b.warps = std::vector<Warp>(threads / 32);
  }
  b.dynamic_smem.assign(smem, 0xA5);  // poisoned: a kernel must not rely on zeroed shared memory
}

inline void run_block(Block& b, dim3 bidx, const KernelThunk& thunk) {
  b.idx = bidx;
  b.done = b.block_arrived = 0;
  for (auto& w : b.warps) {
    w.arrived = 0;
    w.kind = Collective::None;
  }
  const dim3 bd = block_dim;
  for (unsigned t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.block = &b;
    f.linear = t;
    f.tid = dim3(t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y));
    f.state = State::Ready;
    f.pending.clear();
    f.committed = 0;
    char* top = b.stacks + (t + 1) * b.stack_bytes;
#if defined(__x86_64__)
    // Initial frame as swap_stack leaves it: [fp control 16][r15 r14 r13 r12 rbx rbp][return = trampoline]; the
    // trampoline's call then runs with a 16-byte aligned stack, as the ABI requires.
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
    const uint32_t mxcsr = 0x1F80;
    const uint16_t fpucw = 0x037F;
    std::memset(sp, 0, 88);
    std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 12, &fpucw, 2);
    sp[2] = 0;                                          // r15
    sp[3] = 0;                                          // r14
    sp[4] = reinterpret_cast<uint64_t>(&fiber_main);    // r13: the function
    sp[5] = reinterpret_cast<uint64_t>(&f);             // r12: its argument
    sp[6] = 0;                                          // rbx
    sp[7] = 0;                                          // rbp
    sp[8] = reinterpret_cast<uint64_t>(&fiber_trampoline);
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = b.stacks + t * b.stack_bytes + kGuardBytes;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(&fiber_start_ucontext), 2, unsigned(p >> 32),
                unsigned(p & 0xffffffffu));
#endif
  }
  current_block = &b;
  current_thunk = &thunk;
  while (b.done < b.threads) {
    bool progressed = false;
    for (auto& f : b.fibers) {
      if (f.state != State::Ready) continue;
      progressed = true;
      current = &f;
      switch_context(b.scheduler, f.ctx);
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    if (!progressed) {
      unsigned warp_wait = 0, block_wait = 0;
      for (auto& f : b.fibers) {
        warp_wait += f.state == State::WaitWarp;
        block_wait += f.state == State::WaitBlock;
      }
      b.error = "deadlock in block (" + std::to_string(bidx.x) + ", " + std::to_string(bidx.y) + "): " +
                std::to_string(warp_wait) + " threads wait at a warp collective, " + std::to_string(block_wait) +
                " at __syncthreads, " + std::to_string(b.done) + " have exited";
    }
  }
  current = nullptr;
  current_block = nullptr;
  if (!b.error.empty()) {
    std::string e = b.error;
    b.error.clear();
    b.threads = 0;  // fibers abandoned mid-kernel: rebuild the block next time
    b.fibers.clear();
    throw std::runtime_error("CUDA emulation: " + e);
  }
}

inline unsigned worker_count(unsigned blocks) {
  unsigned n = std::max(1u, std::thread::hardware_concurrency());
  if (const char* env = std::getenv("AK_EMU_THREADS")) n = unsigned(std::max(1, std::atoi(env)));
  return std::min({n, 8u, std::max(1u, blocks)});
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads % 32 != 0 || threads > 1024)
    throw std::runtime_error("CUDA emulation: block size must be a multiple of 32 up to 1024, got " +
                             std::to_string(threads));
  if (launch_log.size() >= 4096) launch_log.erase(launch_log.begin(), launch_log.begin() + 2048);
  launch_log.push_back(LaunchRecord{grid.x, grid.y, grid.z, threads, smem});
  block_dim = block;
  grid_dim = grid;
  const unsigned blocks = grid.x * grid.y * grid.z;
  auto body = [&] { kernel(args...); };
  using Body = decltype(body);
  const KernelThunk thunk{[](const void* c) { (*static_cast<const Body*>(c))(); }, &body};
  std::atomic<unsigned> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
  auto worker = [&] {
    Block b;
    try {
      for (unsigned i = next++; i < blocks; i = next++) {
        prepare_block(b, threads, smem);
        run_block(b, dim3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)), thunk);
      }
    } catch (...) {
      std::lock_guard<std::mutex> g(error_mutex);
      if (!error) error = std::current_exception();
      next = blocks;
    }
  };
  const unsigned workers = worker_count(blocks);
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

inline unsigned char* dynamic_smem() { return current_block->dynamic_smem.data(); }

// ---------------------------------------------------------------------------------------------------------------
// Warp shuffles and votes (CUDA Programming Guide, "Warp Shuffle Functions" and "Warp Vote Functions"): width
// splits the warp into segments; an out-of-segment source (xor beyond, up before, down after) returns the
// caller's own value; idx wraps within the segment.
enum class ShflMode : int { Idx, Up, Down, Xor };

struct ShflParam {
  ShflMode mode;
  int width;
};

inline int shfl_source(ShflMode mode, int lane, int arg, int width) {
  const int base = lane & ~(width - 1);
  switch (mode) {
    case ShflMode::Idx: return base + (arg & (width - 1));
    case ShflMode::Up: return lane - arg >= base ? lane - arg : lane;
    case ShflMode::Down: return lane + arg < base + width ? lane + arg : lane;
    case ShflMode::Xor: {
      const int src = lane ^ arg;
      return src < base + width ? src : lane;
    }
  }
  return lane;
}

inline void shfl_compute(Warp& w, const void* param) {
  const ShflParam& p = *static_cast<const ShflParam*>(param);
  for (int l = 0; l < 32; ++l) {
    const int src = shfl_source(p.mode, l, int(w.lane[l].in[2]), p.width);
    w.lane[l].out[0] = w.lane[src].in[0];
    w.lane[l].out[1] = w.lane[src].in[1];
  }
}

template <class T>
T shfl(unsigned mask, T v, int arg, int width, ShflMode mode) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  check_full_mask(mask, "__shfl_sync");
  if (width < 1 || width > 32 || (width & (width - 1))) fail("shuffle width must be a power of two <= 32");
  LaneSlot& s = my_warp().lane[lane_id()];
  s.in[0] = s.in[1] = 0;
  std::memcpy(s.in, &v, sizeof(T));
  s.in[2] = uint32_t(arg);
  const ShflParam p{mode, width};
  // lanes of a shuffle may pass different source lanes, but must agree on the mode and width
  warp_collective(Collective::Shfl, uint64_t(int(mode)) * 64 + uint64_t(width), &shfl_compute, &p);
  T r;
  std::memcpy(&r, s.out, sizeof(T));
  return r;
}

inline void ballot_compute(Warp& w, const void*) {
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (w.lane[l].in[0] ? 1u : 0u) << l;
  for (int l = 0; l < 32; ++l) w.lane[l].out[0] = bits;
}

inline unsigned ballot(unsigned mask, int pred) {
  check_full_mask(mask, "__ballot_sync");
  LaneSlot& s = my_warp().lane[lane_id()];
  s.in[0] = pred != 0;
  warp_collective(Collective::Ballot, 0, &ballot_compute, nullptr);
  return s.out[0];
}

}  // namespace ak_emu

#define threadIdx (ak_emu::current->tid)
#define blockIdx (ak_emu::current_block->idx)
#define blockDim (ak_emu::block_dim)
#define gridDim (ak_emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define AK_DYNAMIC_SMEM(name) unsigned char* name = ak_emu::dynamic_smem()

inline void __syncthreads() { ak_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ak_emu::check_full_mask(mask, "__syncwarp");
  ak_emu::warp_collective(ak_emu::Collective::SyncWarp, 0, nullptr, nullptr);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ak_emu::shfl(mask, v, src, width, ak_emu::ShflMode::Idx);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ak_emu::shfl(mask, v, int(delta), width, ak_emu::ShflMode::Up);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ak_emu::shfl(mask, v, int(delta), width, ak_emu::ShflMode::Down);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ak_emu::shfl(mask, v, lane_mask, width, ak_emu::ShflMode::Xor);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ak_emu::ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return ak_emu::ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return ak_emu::ballot(mask, pred) == 0xffffffffu; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

// SIMT emulation of the CUDA subset the attention kernels use, on the CPU.
//
// Why: the kernels in csrc/cuda/ are compiled by nvcc for the GPU, but most of
// what can go wrong in them is index algebra (fragment layouts, tile bounds,
// masks, the online softmax, the backward's phases and barriers), and that can
// be checked without a GPU. With ATTENTION_EXT_SIMT_EMU defined, the very same
// kernel sources compile as host C++ against this header: every CUDA thread
// becomes a fiber, a CTA runs its fibers cooperatively on one OS thread
// (switching at barriers and warp collectives only; the CTAs of a grid are
// dealt out to ATTENTION_EXT_EMU_THREADS OS threads, default: the CPUs),
// and the PTX wrappers of
// flash_common.cuh (cp.async, ldmatrix, mma.sync, cvt.rna.tf32) and the warp
// intrinsics are replaced by functions that follow the PTX ISA's definitions
// of each lane's fragment. emu/attention_emu.cpp registers the result as the
// ops of the test-only library `attention_ext_emu` on CPU tensors.
//
// The Hopper PTX of hopper/sm90_ptx.cuh (mbarriers, TMA tensor loads with
// swizzle, wgmma with shared-memory descriptors or register A fragments, named
// barriers, setmaxnreg) is emulated by emu/sm90_emu.h / sm90_emu.cpp on top of
// two hooks below: block_until (a fiber blocks on any condition, e.g. an
// mbarrier phase or a warpgroup's wgmma op; the scheduler polls it, and a
// deadlock report says what each waiting thread waits on) and per-CTA
// extension state (reset at every CTA start, with a thread-exit check).
//
// Checks made on the way (each raises simt::Error with the kernel state):
//   * a barrier or warp collective that can never complete (divergence,
//     a thread exiting while others wait)
//   * shared-memory addresses of cp.async / ldmatrix outside the launch's
//     dynamic shared memory or misaligned; global sources of cp.async outside
//     every registered buffer (emu::GlobalRegions) or misaligned
//   * dynamic shared memory above the launch's cap
//   * Hopper: mbarriers used before init / misplaced / over-arrived, waits
//     that can never complete (mbarrier, wgmma, named barrier), TMA
//     destinations misaligned for their swizzle or outside shared memory,
//     TMA reads outside every registered buffer, wgmma descriptors that are
//     not warpgroup-uniform or read outside shared memory, wgmma without a
//     prior wgmma.fence or never waited for
// and shared memory starts each CTA filled with 0xFF bytes (NaN in every
// element type), cp.async data lands only at the matching cp.async.wait_group
// and TMA data only when a thread waits on its mbarrier, wgmma ops execute at
// the wgmma.wait_group that needs them (the latest moments the PTX ISA
// allows; ATTENTION_EXT_EMU_CPASYNC=early: all at issue), and the fibers of a CTA can run in
// forward, reverse or shuffled order between barriers
// (ATTENTION_EXT_EMU_ORDER=forward|reverse|shuffle), so that reads that are
// not ordered by a barrier or a wait show up as wrong results.
//
// With ATTENTION_EXT_EMU_RACECHECK=1, emu/racecheck.h also proves every
// shared-memory access ordered against the others (vector clocks over the
// barriers, collectives, mbarriers and asynchronous waits above).
//
// What it cannot check: timing, occupancy, register spills, bank conflicts,
// the exact fp32 summation order of the tensor cores (products are summed in
// double and rounded once), and PTX syntax (nvcc compiles that in CI).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

// ---------------------------------------------------------------------------
// CUDA keywords as host C++. Shared arrays declared in a kernel become
// function-level statics: every fiber of the running CTA sees the same array
// (each OS thread runs its CTAs of a launch one after another).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

// Emulator code inlined into the instrumented kernels (emu/ptx_emu.h: the
// mma / ldmatrix arithmetic on registers) that racecheck need not see, left out
// of the -fsanitize=thread access instrumentation for speed. Such a function
// inlines only others like it, so it works on raw pointers (emu/racecheck.h).
#define AE_EMU_PLAIN __attribute__((no_sanitize("thread")))

namespace attention_ext {
namespace simt {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Per-fiber built-in variables.
struct ThreadVars {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
const ThreadVars& vars();

// Block-wide barrier (__syncthreads); syncthreads_or also ORs a predicate
// over the block (__syncthreads_or).
void syncthreads();
int syncthreads_or(int pred);

// Base and size of the running CTA's dynamic shared memory.
unsigned char* dynamic_smem();
size_t dynamic_smem_bytes();

// Warp collective: every lane of the calling thread's warp contributes
// `in` (n words); once all 32 have arrived, `combine` runs once over all
// inputs (in[lane * kSlot + w]) and writes every lane's outputs
// (out[lane * kSlot + w]); the caller gets its own lane's outputs.
constexpr int kSlot = 16;
void warp_collective(const uint32_t* in, int n_in, uint32_t* out, int n_out,
                     const std::function<void(const uint32_t* in, uint32_t* out)>& combine, const char* what);

// cp.async queue of the calling thread.
void cp_async(uint32_t smem_off, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int keep_groups);

// Checks for global addresses read by cp.async: [ptr, ptr + bytes) ranges the
// caller registers around a launch (empty = no check).
void add_global_region(const void* ptr, size_t bytes);
void clear_global_regions();

// Is a global range inside a registered region? (true when none are registered)
bool global_read_ok(const void* ptr, size_t bytes);

// ---------------------------------------------------------------------------
// Hooks for emulated asynchronous hardware (emu/sm90_emu.cpp: mbarriers, TMA,
// wgmma, named barriers).
//
// Linear index of the calling thread in its CTA, the CTA's thread count, and
// "kernel, block (x,y,z), thread t" for error messages.
int thread_rank();
int num_threads();
std::string where();
// ATTENTION_EXT_EMU_CPASYNC=early: asynchronous copies / operations take
// effect at issue instead of at the latest moment the PTX ISA allows.
bool early_async();
// Blocks the calling fiber until ready() holds. The scheduler polls ready()
// (it may make progress itself, e.g. land a pending copy) whenever it looks
// for a fiber to run; if no fiber can run, the deadlock error lists what each
// waiting thread waits on (describe()).
void block_until(std::function<bool()> ready, std::function<std::string()> describe);
// Per-CTA state of an extension: slot `slot` of the running CTA (nullptr until
// set); all slots are destroyed when the next CTA starts. thread_exit runs in
// each thread's fiber when the kernel function returns (it may throw Error).
struct CtaState {
  virtual ~CtaState() = default;
  virtual void thread_exit(int /*rank*/) {}
};
constexpr int kCtaSlots = 2;
CtaState* cta_state(int slot);
void set_cta_state(int slot, std::unique_ptr<CtaState> state);

// Runs `kernel` for every CTA of the grid; throws Error on a detected fault.
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel, const char* name);

}  // namespace simt
}  // namespace attention_ext

// ---------------------------------------------------------------------------
// Built-in variables and intrinsics.
#define threadIdx (::attention_ext::simt::vars().thread_idx)
#define blockIdx (::attention_ext::simt::vars().block_idx)
#define blockDim (::attention_ext::simt::vars().block_dim)
#define gridDim (::attention_ext::simt::vars().grid_dim)

inline void __syncthreads() { ::attention_ext::simt::syncthreads(); }
inline int __syncthreads_or(int pred) { return ::attention_ext::simt::syncthreads_or(pred); }

inline unsigned int __float_as_uint(float x) {
  unsigned int u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline uint32_t __shfl_xor_sync_u32(unsigned mask, uint32_t v, int lane_mask) {
  if (mask != 0xffffffffu) throw ::attention_ext::simt::Error("__shfl_xor_sync: only full-warp masks are emulated");
  uint32_t out;
  ::attention_ext::simt::warp_collective(
      &v, 1, &out, 1,
      [lane_mask](const uint32_t* in, uint32_t* o) {
        for (int l = 0; l < 32; ++l) o[l * ::attention_ext::simt::kSlot] = in[((l ^ lane_mask) & 31) * ::attention_ext::simt::kSlot];
      },
      "__shfl_xor_sync");
  return out;
}
// __shfl_sync: lane l gets the value of lane src_lane (of lane l) % 32.
inline uint32_t __shfl_sync_u32(unsigned mask, uint32_t v, int src_lane) {
  if (mask != 0xffffffffu) throw ::attention_ext::simt::Error("__shfl_sync: only full-warp masks are emulated");
  const uint32_t in[2] = {v, static_cast<uint32_t>(src_lane)};
  uint32_t out;
  ::attention_ext::simt::warp_collective(
      in, 2, &out, 1,
      [](const uint32_t* x, uint32_t* o) {
        constexpr int k = ::attention_ext::simt::kSlot;
        for (int l = 0; l < 32; ++l) o[l * k] = x[(x[l * k + 1] & 31) * k];
      },
      "__shfl_sync");
  return out;
}
inline unsigned __shfl_sync(unsigned mask, unsigned v, int src_lane) { return __shfl_sync_u32(mask, v, src_lane); }
inline float __shfl_sync(unsigned mask, float v, int src_lane) {
  return __uint_as_float(__shfl_sync_u32(mask, __float_as_uint(v), src_lane));
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return __uint_as_float(__shfl_xor_sync_u32(mask, __float_as_uint(v), lane_mask));
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask) {
  return static_cast<int>(__shfl_xor_sync_u32(mask, static_cast<uint32_t>(v), lane_mask));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask) {
  return __shfl_xor_sync_u32(mask, v, lane_mask);
}

// CTAs run on several OS threads: a compare-and-swap loop, as on the GPU.
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t seen = __atomic_load_n(u, __ATOMIC_RELAXED);
  for (;;) {
    float old, sum;
    std::memcpy(&old, &seen, 4);
    sum = old + v;
    uint32_t want;
    std::memcpy(&want, &sum, 4);
    if (__atomic_compare_exchange_n(u, &seen, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}

// The dynamic shared memory of a kernel: `extern __shared__ T name[]` on the GPU.
#define AE_DYNAMIC_SMEM(name) unsigned char* name = ::attention_ext::simt::dynamic_smem()

namespace attention_ext {
namespace cuda {

// Launch: the emulated twin of the <<<>>> launcher in flash_common.cuh.
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), unsigned grid, unsigned block, size_t smem, size_t max_smem,
                          cudaStream_t /*stream*/, const char* name, const Args&... args) {
  if (smem > (max_smem > 48 * 1024 ? max_smem : 48 * 1024)) return cudaErrorInvalidValue;
  if (block == 0 || block > 1024 || grid == 0) return cudaErrorInvalidConfiguration;
  simt::run_grid(dim3(grid), dim3(block), smem, [&] { kernel(args...); }, name);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace attention_ext

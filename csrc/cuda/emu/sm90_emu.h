// The Hopper (sm_90a) PTX wrappers of hopper/sm90_ptx.cuh and the wgmma
// wrappers of hopper/wgmma_ops.cuh, emulated (see simt.h): same names and
// signatures, the semantics of the PTX ISA (sections cited in sm90_emu.cpp).
//
//   mbarriers   state per shared address (phase, pending arrivals, expected
//               arrivals, tx-count); mbar_wait blocks the fiber until the phase
//               of the given parity has completed
//   TMA         tma_load_4d copies the box (zero outside the tensor) with the
//               map's swizzle; the bytes land, and complete the mbarrier's
//               transactions, when a thread waits on that mbarrier (late, the
//               default) or at issue (ATTENTION_EXT_EMU_CPASYNC=early)
//   wgmma       each thread's mma_async ops are numbered; op i of a warpgroup
//               is complete when its 128 threads issued it (with uniform
//               shape, types, descriptors and scale_d); it executes at the
//               wgmma_wait that needs it (late) or when its last thread issues
//               it (early), reading shared memory and every thread's
//               accumulators at that moment
//   named bars  bar.sync / bar.arrive with ids 0..15 (the emulator keeps them
//               apart from __syncthreads)
//   proxies     the async proxy (wgmma operands, TMA reduce sources) reads
//               its own view of shared memory, which TMA writes along with
//               the generic one and which takes the generic proxy's writes
//               only after a fence_proxy_async: a generic store read by wgmma
//               or TMA without a fence between them reads stale data here
//               (PTX ISA 8.6, proxies). The view catches up with everything
//               written before the first async read that follows any thread's
//               fence, so a fence missing in all threads is caught, one
//               missing in some threads only if no other fence intervenes.
//   no-ops      mbar_fence_init, tma_prefetch_desc, reg_fence, setmaxnreg
//               (its operand is checked at compile time)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../hopper/tma_desc.h"
#include "simt.h"

namespace attention_ext {
namespace cuda {
namespace sm90 {

// mbarrier (PTX ISA 9.7.13.15)
void mbar_init(uint32_t bar, uint32_t count);
inline void mbar_fence_init() {}
void mbar_arrive(uint32_t bar);
void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes);
void mbar_wait(uint32_t bar, uint32_t parity);

// TMA (PTX ISA cp.async.bulk.tensor; 5.5 Tensors)
inline void tma_prefetch_desc(const TmaDesc*) {}
void tma_load_4d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1, int c2, int c3);
void fence_proxy_async();
void tma_reduce_add_4d(const TmaDesc* d, uint32_t src, int c0, int c1, int c2, int c3);
void bulk_commit();
void bulk_wait_groups(int n);
// The emulator performs a reduce when its group is waited for (or at issue): .read or not, the same.
template <int N>
inline void bulk_wait_read() {
  bulk_wait_groups(N);
}
template <int N>
inline void bulk_wait() {
  bulk_wait_groups(N);
}

// wgmma bookkeeping (PTX ISA wgmma.fence / commit_group / wait_group)
void wgmma_fence();
void wgmma_commit();
void wgmma_wait_groups(int n);
template <int N>
inline void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group: N in 0..7");
  wgmma_wait_groups(N);
}
inline void reg_fence(float&) {}
inline void reg_fence(uint32_t&) {}

// setmaxnreg (PTX ISA): imm-reg-count in 24..256, a multiple of 8
template <int R>
inline void setmaxnreg_inc() {
  static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg: the register count must be in 24..256, a multiple of 8");
}
template <int R>
inline void setmaxnreg_dec() {
  static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg: the register count must be in 24..256, a multiple of 8");
}

// ld.global.nc issued where it stands (sm90_ptx.cuh): here a plain load.
inline int32_t load_here(const int32_t* p) { return *static_cast<const volatile int32_t*>(p); }
inline int64_t load_here(const int64_t* p) { return *static_cast<const volatile int64_t*>(p); }

// red.global.add.v2.f32: CTAs run on several OS threads, so two atomic adds (simt.h's atomicAdd).
inline void red_add_v2(float* p, float a, float b) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) throw simt::Error("red.global.add.v2.f32: address not 8-byte aligned");
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
}

// Named barriers (PTX ISA bar.sync / bar.arrive)
void named_barrier_sync(int id, int nthreads);
void named_barrier_arrive(int id, int nthreads);

// wgmma.mma_async (PTX ISA 9.7.15.5): the calling thread's share of one
// warpgroup op. kind 0: f16 inputs, 1: bf16; a_regs: A from the registers a.
void wgmma_issue(int n, int kind, int trans_a, int trans_b, const uint32_t* a, uint64_t desc_a, uint64_t desc_b,
                 int scale_d, float* d);

template <typename T>
constexpr int wgmma_kind() {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma: T is __half or __nv_bfloat16");
  return std::is_same_v<T, __half> ? 0 : 1;
}

template <int N, typename T, int TA, int TB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma: N in 8..256, a multiple of 8");
  static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1), "wgmma: imm-trans-a / -b are 0 or 1");
  wgmma_issue(N, wgmma_kind<T>(), TA, TB, nullptr, desc_a, desc_b, scale_d, d);
}

template <int N, typename T, int TB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma: N in 8..256, a multiple of 8");
  static_assert(TB == 0 || TB == 1, "wgmma: imm-trans-b is 0 or 1");
  wgmma_issue(N, wgmma_kind<T>(), 0, TB, a, 0, desc_b, scale_d, d);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

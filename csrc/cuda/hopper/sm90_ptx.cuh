// PTX wrappers of the Hopper (sm_90a) kernels: mbarriers, TMA bulk tensor
// copies, wgmma, register reallocation, named barriers.
//
// Torch-free. In the CPU emulation of the kernels (ATTENTION_EXT_SIMT_EMU, see
// ../emu/simt.h) ../emu/sm90_emu.h defines the same names with the semantics
// of the PTX ISA; everything below the #else is the GPU side.
//
// Shared-memory addresses are 32-bit shared-window addresses (smem_u32 of
// flash_common.cuh). The wgmma wrappers (wgmma_ss / wgmma_rs) are generated
// into wgmma_ops.cuh by gen_wgmma.py.
#pragma once

#include <cstdint>

#include "../flash_common.cuh"
#include "tma_desc.h"

#if defined(ATTENTION_EXT_SIMT_EMU) && !defined(__grid_constant__)
#define __grid_constant__
#endif

// Kernel bodies that use these wrappers exist for sm_90a (and the emulator);
// the other targets of a multi-architecture build compile them empty, and the
// dispatch never launches them there.
#if defined(ATTENTION_EXT_SIMT_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AE_SM90_BODY 1
#endif

namespace attention_ext {
namespace cuda {
namespace sm90 {

// Matrix descriptor of a wgmma operand in shared memory (PTX ISA, "Matrix
// Descriptor Format"): bits 0-13 start address >> 4, 16-29 leading-dimension
// byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base offset
// (0: every swizzle atom used here is 1024-byte aligned), 62-63 swizzle
// (0 none, 1 128B, 2 64B, 3 32B: the Swizzle of tma_desc.h).
__host__ __device__ __forceinline__ uint64_t make_smem_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                            int swizzle) {
  return (static_cast<uint64_t>((smem_addr & 0x3ffff) >> 4)) |
         (static_cast<uint64_t>((lbo_bytes & 0x3ffff) >> 4) << 16) |
         (static_cast<uint64_t>((sbo_bytes & 0x3ffff) >> 4) << 32) | (static_cast<uint64_t>(swizzle & 3) << 62);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

#if defined(ATTENTION_EXT_SIMT_EMU)
#include "../emu/sm90_emu.h"
#else

namespace attention_ext {
namespace cuda {
namespace sm90 {

// ---------------------------------------------------------------------------
// mbarrier (a 64-bit object in shared memory). A phase completes when its
// pending arrival count reaches 0 and its transaction count (bytes announced
// by expect_tx and not yet delivered by TMA) is 0.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialisations visible to the async proxy (TMA) and the other threads.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival, and `bytes` more expected from TMA in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Blocks until the phase of parity `parity` has completed (the barrier's
// current phase parity differs from `parity`); a fresh barrier is in phase 0,
// so waiting on parity 1 returns at once.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra LAB_WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ---------------------------------------------------------------------------
// TMA (the bulk tensor copy engine).
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* d) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(d)) : "memory");
}
// Copies the box at element coordinates (c0, c1, c2, c3) (innermost first) of
// the 4-d tensor map `d` into shared memory at dst (laid out as the map's
// swizzle says; elements outside the tensor are zero) and delivers its bytes
// to the transaction count of `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(d)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// Adds the box at (c0, c1, c2, c3) of shared memory src (laid out as the fp32
// map's swizzle says) into global memory through the map `d`; elements outside
// the tensor are skipped. Tracked by the thread's bulk async-groups.
__device__ __forceinline__ void tma_reduce_add_4d(const TmaDesc* d, uint32_t src, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(d)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N bulk groups of this thread still read shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N bulk groups of this thread are incomplete (writes done too).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// Orders this thread's earlier generic-proxy shared-memory writes before later
// async-proxy accesses (wgmma operands, TMA) of that memory.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---------------------------------------------------------------------------
// wgmma bookkeeping (all four warps of a warpgroup execute these together).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of the warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across the
// asynchronous wgmma that owns it.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// ---------------------------------------------------------------------------
// Register reallocation between warpgroups (needs a register cap at entry:
// __launch_bounds__(threads, 1)).
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

// A load of read-only global data issued where it stands: asm volatile keeps the compiler from hoisting it out
// of a loop or merging it with an earlier load of the same address (whose value it would then keep in a
// register through the loop), and ld.global.nc keeps it an L1 hit (ld.volatile would go to L2 each time).
__device__ __forceinline__ int32_t load_here(const int32_t* p) {
  int32_t v;
  asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ int64_t load_here(const int64_t* p) {
  int64_t v;
  asm volatile("ld.global.nc.b64 %0, [%1];\n" : "=l"(v) : "l"(p));
  return v;
}

// Two adjacent fp32 atomic adds in one instruction (p 8-byte aligned), no return value.
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
}

// Named barriers (ids 1..15; 0 is __syncthreads): `nthreads` (a multiple of
// 32) threads take part; sync waits, arrive does not.
__device__ __forceinline__ void named_barrier_sync(int id, int nthreads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int nthreads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

#include "wgmma_ops.cuh"

#endif  // ATTENTION_EXT_SIMT_EMU

namespace attention_ext {
namespace cuda {
namespace sm90 {

// reg_fence over a whole accumulator fragment (see reg_fence).
template <int N>
__device__ __forceinline__ void reg_fence_all(float (&acc)[1][N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) reg_fence(acc[0][i][r]);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

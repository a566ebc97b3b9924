// Faults the SIMT emulator must catch, as small kernels run through the same
// launch path as the attention kernels (op attention_ext_emu::_selftest, used
// by tests/test_cuda_emu.py to check that each check fires, with its message,
// and that a correct kernel passes).
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "../hopper/sm90_ptx.cuh"
#include "ptx_emu.h"
#include "simt.h"

namespace attention_ext {
namespace cuda {
namespace {

enum Fault : int {
  kClean,
  kDivergentBarrier,
  kDivergentShuffle,
  kLdmatrixOutside,
  kSharedAddressOutside,
  kCpAsyncMisaligned,
  kCpAsyncOutside,
  // racecheck (ATTENTION_EXT_EMU_RACECHECK=1); the hazards named are those of the forward order
  kRaceRaw,      // thread 0 writes a word, thread 1 reads it, nothing between
  kRaceWar,      // thread 0 reads a word, thread 1 then writes it
  kRaceWaw,      // threads 0 and 1 write the same word
  kRaceCpAsync   // a thread reads its cp.async destination before cp.async.wait_group
};

__global__ void selftest_kernel(int fault, const float* inside, const float* outside, float* out) {
  AE_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x;
  switch (fault) {
    case kClean: {  // a well-formed use of everything checked below (racecheck too)
      if (tid < 4) cp_async16(smem_u32(smem + 16 * tid), inside + 4 * tid, true);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      uint32_t r[4];
      ldsm_x4(smem_u32(smem + 16 * (tid % 4)), r);
      const float x = __shfl_xor_sync(0xffffffffu, static_cast<float>(r[0] & 1u), 1);
      __syncthreads();  // every lane's ldmatrix is done before shared memory is written again
      if (tid == 5) reinterpret_cast<float*>(smem)[0] = x;
      __syncthreads();
      if (tid == 0) out[0] = reinterpret_cast<const float*>(smem)[0];
      break;
    }
    case kDivergentBarrier:
      if (tid < 16) __syncthreads();
      break;
    case kDivergentShuffle:
      if (tid < 16) out[tid] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      break;
    case kLdmatrixOutside: {
      uint32_t r[4];
      ldsm_x4(smem_u32(smem + 64), r);  // one past the 64 bytes of shared memory
      break;
    }
    case kSharedAddressOutside:
      (void)smem_u32(smem + 80);
      break;
    case kCpAsyncMisaligned:
      cp_async16(smem_u32(smem + 8), inside, true);
      break;
    case kCpAsyncOutside:
      cp_async16(smem_u32(smem), outside, true);
      break;
    case kRaceRaw: {
      float* f = reinterpret_cast<float*>(smem);
      if (tid == 0) f[3] = 1.f;
      if (tid == 1) out[0] = f[3];
      break;
    }
    case kRaceWar: {
      float* f = reinterpret_cast<float*>(smem);
      if (tid == 2) f[3] = 1.f;
      __syncthreads();
      if (tid == 0) out[0] = f[3];
      if (tid == 1) f[3] = 2.f;
      break;
    }
    case kRaceWaw: {
      float* f = reinterpret_cast<float*>(smem);
      if (tid < 2) f[3] = 1.f;
      break;
    }
    case kRaceCpAsync:
      if (tid < 4) cp_async16(smem_u32(smem + 16 * tid), inside + 4 * tid, true);
      cp_async_commit();
      if (tid == 0) out[0] = reinterpret_cast<const float*>(smem)[0];
      cp_async_wait<0>();
      break;
  }
}

// The Hopper faults (sm90_emu.h): one warpgroup, 8 KiB of shared memory, an
// mbarrier at 0x40, a 64 x 64 16-bit global tensor `g` behind the map `d`.
enum Sm90Fault : int {
  kSm90Clean,
  kMbarDeadlock,
  kMbarUninit,
  kMbarExtraArrival,
  kWgmmaNonUniform,
  kWgmmaOutside,
  kWgmmaNotWaited,
  kTmaMisaligned,
  kTmaOutside,
  kNamedBarrierDeadlock,
  // racecheck
  kRaceTmaUnwaited,   // a thread reads a TMA load's destination without waiting on its mbarrier
  kRaceWgmmaReleased  // the A operand's buffer is refilled while the wgmma reading it is still in flight
};

__global__ void sm90_selftest_kernel(int fault, const sm90::TmaDesc* d, float* out) {
  using namespace sm90;
  AE_DYNAMIC_SMEM(smem);
  const uint32_t base = smem_u32(smem), bar = base + 0x40;
  const int tid = threadIdx.x;
  float acc[4] = {};
  // A (64 x 16) and B (16 x 8), K-major, no swizzle, at 1024 / 4096 as TMA
  // lands boxes of 8 x 64: core matrices of 8 rows x 16 bytes; the second 8 k
  // at +LBO = 1024, the next 8 rows at +SBO = 128.
  const uint64_t da = make_smem_desc(base + 1024, 64 * 16, 128, kSwizzleNone);
  const uint64_t db = make_smem_desc(base + 4096, 64 * 16, 128, kSwizzleNone);
  if (fault != kMbarUninit && tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  switch (fault) {
    case kSm90Clean: {
      if (tid == 0) {
        mbar_arrive_expect_tx(bar, 4 * 1024);
        tma_load_4d(base + 1024, d, bar, 0, 0, 0, 0);  // box 8 x 64: A's two k halves come from
        tma_load_4d(base + 2048, d, bar, 8, 0, 0, 0);  // columns 0..7 and 8..15 of g
        tma_load_4d(base + 4096, d, bar, 0, 0, 0, 0);  // B^T (8 x 16): rows 0..7 of the same
        tma_load_4d(base + 5120, d, bar, 8, 0, 0, 0);
      }
      mbar_wait(bar, 0);
      wgmma_fence();
      wgmma_ss<8, __half, 0, 0>(acc, da, db, 0);
      wgmma_commit();
      wgmma_wait<0>();
      named_barrier_sync(1, 128);
      setmaxnreg_inc<240>();
      if (tid == 0) out[0] = acc[0];
      // A's buffer refilled once every thread waited for the wgmma: ordered (racecheck)
      if (tid == 0) {
        mbar_arrive_expect_tx(bar, 1024);
        tma_load_4d(base + 1024, d, bar, 16, 0, 0, 0);
      }
      mbar_wait(bar, 1);
      if (tid == 1) out[1] = reinterpret_cast<const float*>(smem + 1024)[1];
      break;
    }
    case kMbarDeadlock:
      mbar_wait(bar, 0);  // nobody arrives
      break;
    case kMbarUninit:
      if (tid == 0) mbar_arrive(bar);
      break;
    case kMbarExtraArrival:
      if (tid == 0) {
        mbar_arrive_expect_tx(bar, 16);  // the only arrival; 16 bytes still pending
        mbar_arrive(bar);
      }
      break;
    case kWgmmaNonUniform:
      wgmma_fence();
      wgmma_ss<8, __half, 0, 0>(acc, tid == 77 ? da + 1 : da, db, 0);
      wgmma_commit();
      wgmma_wait<0>();
      break;
    case kWgmmaOutside:
      wgmma_fence();
      wgmma_ss<8, __half, 0, 0>(acc, make_smem_desc(base + 8192 - 1024, 64 * 16, 128, kSwizzleNone), db, 0);
      wgmma_commit();
      wgmma_wait<0>();
      break;
    case kWgmmaNotWaited:
      wgmma_fence();
      wgmma_ss<8, __half, 0, 0>(acc, da, db, 0);
      wgmma_commit();
      break;
    case kTmaMisaligned:
      if (tid == 0) {
        const uint64_t dims[4] = {64, 64, 1, 1}, strides[3] = {128, 128 * 64, 128 * 64};
        const uint32_t box[4] = {64, 8, 1, 1};
        TmaDesc sw128;
        make_tma_desc_4d(&sw128, d->base, dims, strides, box, kSwizzle128B);
        mbar_arrive_expect_tx(bar, 1024);
        tma_load_4d(base + 512, &sw128, bar, 0, 0, 0, 0);  // 128B swizzle needs 1024-byte alignment
      }
      break;
    case kTmaOutside:
      if (tid == 0) {
        // a map over the 64 x 64 elements that follow g, which no tensor of the launch covers
        const uint64_t dims[4] = {64, 64, 1, 1}, strides[3] = {128, 128 * 64, 128 * 64};
        const uint32_t box[4] = {8, 64, 1, 1};
        TmaDesc past;
        make_tma_desc_4d(&past, static_cast<const uint16_t*>(d->base) + 64 * 64, dims, strides, box, kSwizzleNone);
        mbar_arrive_expect_tx(bar, 1024);
        tma_load_4d(base + 1024, &past, bar, 0, 0, 0, 0);
      }
      mbar_wait(bar, 0);
      break;
    case kNamedBarrierDeadlock:
      if (tid < 64) named_barrier_sync(1, 128);  // the other 64 threads never come
      break;
    case kRaceTmaUnwaited:
      if (tid == 0) {
        mbar_arrive_expect_tx(bar, 1024);
        tma_load_4d(base + 1024, d, bar, 0, 0, 0, 0);
      }
      if (tid == 1) out[1] = reinterpret_cast<const float*>(smem + 1024)[1];
      mbar_wait(bar, 0);
      break;
    case kRaceWgmmaReleased:
      if (tid == 0) {
        mbar_arrive_expect_tx(bar, 4 * 1024);
        tma_load_4d(base + 1024, d, bar, 0, 0, 0, 0);
        tma_load_4d(base + 2048, d, bar, 8, 0, 0, 0);
        tma_load_4d(base + 4096, d, bar, 0, 0, 0, 0);
        tma_load_4d(base + 5120, d, bar, 8, 0, 0, 0);
      }
      mbar_wait(bar, 0);
      wgmma_fence();
      wgmma_ss<8, __half, 0, 0>(acc, da, db, 0);
      wgmma_commit();
      named_barrier_sync(1, 128);  // every thread issued: the op is in flight
      if (tid == 0) {              // too early: nobody has waited for the wgmma
        mbar_arrive_expect_tx(bar, 1024);
        tma_load_4d(base + 1024, d, bar, 16, 0, 0, 0);
      }
      wgmma_wait<0>();
      mbar_wait(bar, 1);
      break;
  }
}

// A grid of 64 CTAs (ATTENTION_EXT_EMU_THREADS OS threads run them): every
// thread adds 1 to out[0] 50 times through atomicAdd and 50 times through
// red.global.add.v2 (out[0], out[1]), or ("grid_fault") the CTAs from block 5
// on stop at a divergent barrier.
__global__ void grid_selftest_kernel(bool fault, float* out) {
  const int tid = threadIdx.x;
  if (fault) {
    if (blockIdx.x >= 5 && tid < 16) __syncthreads();
    return;
  }
  for (int i = 0; i < 50; ++i) {
    atomicAdd(out, 1.f);
    sm90::red_add_v2(out, 1.f, 1.f);
  }
}

// Global-memory racecheck: two CTAs of 32 threads over the registered float out[8].
//   global_clean          each CTA writes its own word, a barrier orders a read of it, and every thread adds
//                         to out[4] atomically
//   race_global_ctas      thread 0 of both CTAs writes out[0]
//   race_global_raw       CTA 0: thread 0 writes out[1], thread 1 reads it, nothing between
//   race_global_atomic    CTA 0 adds to out[3] atomically, CTA 1 reads it with a plain load
__global__ void global_selftest_kernel(int fault, float* out) {
  const int tid = threadIdx.x, b = blockIdx.x;
  switch (fault) {
    case 0:
      if (tid == 0) out[b] = 1.f;
      __syncthreads();
      if (tid == 1) out[2 + b] = out[b] + 1.f;
      atomicAdd(out + 4, 1.f);
      break;
    case 1:
      if (tid == 0) out[0] = static_cast<float>(b);
      break;
    case 2:
      if (b == 0 && tid == 0) out[1] = 1.f;
      if (b == 0 && tid == 1) out[5] = out[1];
      break;
    case 3:
      if (b == 0 && tid == 0) atomicAdd(out + 3, 1.f);
      if (b == 1 && tid == 0) out[6] = out[3];
      break;
  }
}

// Global-memory racecheck of the asynchronous copies: two CTAs of 32 threads over the registered float g[2][64]
// (row 0 read by copies, row 1 reduced into) behind the fp32 map d (boxes of 32 x 1), 1 KiB of shared memory
// with an mbarrier at 0.
//   copy_clean                 both CTAs read g[0][0..3] with cp.async and g[0][0..31] with a TMA load, add
//                              their 32 shared floats (thread i: i + 1) to g[1][0..31] with a TMA reduce,
//                              and write g[0][32 + b] with a plain store
//   race_global_cp_async       CTA 0 stores g[0][1]; CTA 1 reads g[0][0..3] with cp.async
//   race_global_tma_load       CTA 0 stores g[0][9]; CTA 1 reads row 0 with a TMA load
//   race_global_tma_reduce     CTA 0 reduces into g[1][0..31]; CTA 1 loads g[1][3]
//   race_global_cp_async_raw   CTA 0: thread 1 stores g[0][2], thread 0 reads it with cp.async, nothing between
__global__ void copy_selftest_kernel(int fault, const sm90::TmaDesc* d, float* g) {
  using namespace sm90;
  AE_DYNAMIC_SMEM(smem);
  const uint32_t base = smem_u32(smem), bar = base;
  const int tid = threadIdx.x, b = blockIdx.x;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  auto cp_row0 = [&] {
    if (tid == 0) cp_async16(base + 128, g, true);
    cp_async_commit();
    cp_async_wait<0>();
  };
  auto tma_row0 = [&] {
    if (tid == 0) {
      mbar_arrive_expect_tx(bar, 128);
      tma_load_4d(base + 256, d, bar, 0, 0, 0, 0);
    }
    mbar_wait(bar, 0);
  };
  auto reduce_row1 = [&] {
    reinterpret_cast<float*>(smem + 512)[tid] = static_cast<float>(tid + 1);
    fence_proxy_async();
    __syncthreads();
    if (tid == 0) {
      tma_reduce_add_4d(d, base + 512, 0, 1, 0, 0);
      bulk_commit();
      bulk_wait<0>();
    }
  };
  switch (fault) {
    case 0:
      cp_row0();
      tma_row0();
      reduce_row1();
      if (tid == 0) g[32 + b] = 1.f;
      break;
    case 1:
      if (b == 0 && tid == 0) g[1] = 2.f;
      if (b == 1) cp_row0();
      break;
    case 2:
      if (b == 0 && tid == 0) g[9] = 2.f;
      if (b == 1) tma_row0();
      break;
    case 3:
      if (b == 0) reduce_row1();
      if (b == 1 && tid == 0) g[40] = g[64 + 3];
      break;
    case 4:
      if (b == 0 && tid == 1) g[2] = 2.f;
      if (b == 0) cp_row0();
      break;
  }
}

// Runs launch() (a launch_kernel call) with the global regions registered before it, then clears them;
// emulator faults and launch errors become Python exceptions.
template <class Launch>
void run_launch(Launch&& launch) {
  cudaError_t err;
  try {
    err = launch();
  } catch (const simt::Error& e) {
    simt::clear_global_regions();
    TORCH_CHECK(false, "attention_ext_emu: ", e.what());
  }
  simt::clear_global_regions();
  TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: _selftest: launch failed");
}

void selftest(std::string kind) {
  static const char* kGlobalNames[] = {"global_clean", "race_global_ctas", "race_global_raw", "race_global_atomic"};
  for (int i = 0; i < 4; ++i) {
    if (kind != kGlobalNames[i]) continue;
    alignas(16) static float out[8];
    std::fill(out, out + 8, 0.f);
    simt::clear_global_regions();
    simt::add_global_region(out, sizeof(out));
    run_launch([&] {
      return launch_kernel(global_selftest_kernel, 2, 32, 0, 0, nullptr, "global_selftest_kernel", i,
                           static_cast<float*>(out));
    });
    TORCH_CHECK(i != 0 || (out[2] == 2.f && out[3] == 2.f && out[4] == 64.f), "_selftest: global_clean computed ",
                out[2], ", ", out[3], ", ", out[4]);
    return;
  }

  static const char* kCopyNames[] = {"copy_clean", "race_global_cp_async", "race_global_tma_load",
                                     "race_global_tma_reduce", "race_global_cp_async_raw"};
  for (int i = 0; i < 5; ++i) {
    if (kind != kCopyNames[i]) continue;
    alignas(128) static float g[2 * 64];
    for (int j = 0; j < 2 * 64; ++j) g[j] = static_cast<float>(j % 7);
    sm90::TmaDesc d;
    const uint64_t dims[4] = {64, 2, 1, 1}, strides[3] = {256, 512, 512};
    const uint32_t box[4] = {32, 1, 1, 1};
    const char* err = sm90::make_tma_desc_4d(&d, g, dims, strides, box, sm90::kSwizzleNone, 4);
    TORCH_CHECK(err == nullptr, "_selftest: make_tma_desc_4d: ", err);
    simt::clear_global_regions();
    simt::add_global_region(g, sizeof(g));
    run_launch([&] {
      return launch_kernel(copy_selftest_kernel, 2, 32, 1024, 1024, nullptr, "copy_selftest_kernel", i,
                           static_cast<const sm90::TmaDesc*>(&d), static_cast<float*>(g));
    });
    for (int j = 0; j < 32 && i == 0; ++j) {
      const float want = static_cast<float>((64 + j) % 7 + 2 * (j + 1));
      TORCH_CHECK(g[64 + j] == want, "_selftest: copy_clean reduced ", g[64 + j], " into g[1][", j, "], not ", want);
    }
    return;
  }

  if (kind == "grid_atomics" || kind == "grid_fault") {
    alignas(16) float out[2] = {0.f, 0.f};
    simt::clear_global_regions();
    simt::add_global_region(out, sizeof(out));  // (racecheck: the atomics of 64 CTAs on two words, no race)
    run_launch([&] {
      return launch_kernel(grid_selftest_kernel, 64, 64, 0, 0, nullptr, "grid_selftest_kernel", kind == "grid_fault",
                           static_cast<float*>(out));
    });
    TORCH_CHECK(kind == "grid_fault" || (out[0] == 64 * 64 * 100 && out[1] == 64 * 64 * 50), "_selftest: ", kind,
                " summed ", out[0], " and ", out[1], ", not ", 64 * 64 * 100, " and ", 64 * 64 * 50);
    return;
  }
  static const char* kNames[] = {"clean",           "divergent_barrier",   "divergent_shuffle", "ldmatrix_outside",
                                 "shared_outside",  "cp_async_misaligned", "cp_async_outside",  "race_raw",
                                 "race_war",        "race_waw",            "race_cp_async"};
  static const char* kSm90Names[] = {"sm90_clean",           "mbarrier_deadlock",  "mbarrier_uninit",
                                     "mbarrier_extra_arrival", "wgmma_nonuniform",   "wgmma_outside",
                                     "wgmma_not_waited",     "tma_misaligned",     "tma_outside",
                                     "named_barrier_deadlock", "race_tma_unwaited", "race_wgmma_released"};
  int fault = -1, sm90_fault = -1;
  for (int i = 0; i < static_cast<int>(sizeof(kNames) / sizeof(kNames[0])); ++i)
    if (kind == kNames[i]) fault = i;
  for (int i = 0; i < static_cast<int>(sizeof(kSm90Names) / sizeof(kSm90Names[0])); ++i)
    if (kind == kSm90Names[i]) sm90_fault = i;
  TORCH_CHECK_VALUE(fault >= 0 || sm90_fault >= 0, "_selftest: unknown fault '", kind, "'");
  if (sm90_fault >= 0) {
    alignas(16) static uint16_t g[2 * 64 * 64];  // the second half: outside the registered region
    alignas(16) static float out[4];
    for (int i = 0; i < 64 * 64; ++i) g[i] = 0x3c00;  // 1.0 in f16
    sm90::TmaDesc d;
    const uint64_t dims[4] = {64, 64, 1, 1}, strides[3] = {128, 128 * 64, 128 * 64};
    const uint32_t box[4] = {8, 64, 1, 1};
    const char* err = sm90::make_tma_desc_4d(&d, g, dims, strides, box, sm90::kSwizzleNone);
    TORCH_CHECK(err == nullptr, "_selftest: make_tma_desc_4d: ", err);
    simt::clear_global_regions();
    simt::add_global_region(g, sizeof(g) / 2);
    run_launch([&] {
      return launch_kernel(sm90_selftest_kernel, 1, 128, 8192, 8192, nullptr, "sm90_selftest_kernel", sm90_fault,
                           static_cast<const sm90::TmaDesc*>(&d), static_cast<float*>(out));
    });
    TORCH_CHECK(sm90_fault != kSm90Clean || out[0] == 16.f, "_selftest: sm90_clean computed ", out[0], ", not 16");
    return;
  }
  alignas(16) static float inside[16], outside[16], out[32];
  simt::clear_global_regions();
  simt::add_global_region(inside, sizeof(inside));
  run_launch([&] {
    return launch_kernel(selftest_kernel, 1, 32, 64, 64, nullptr, "selftest_kernel", fault,
                         static_cast<const float*>(inside), static_cast<const float*>(outside),
                         static_cast<float*>(out));
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(attention_ext_emu, m) { m.def("_selftest(str kind) -> ()", &cuda::selftest); }

}  // namespace attention_ext

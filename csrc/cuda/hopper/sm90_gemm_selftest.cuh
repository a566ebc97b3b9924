// A one-tile GEMM through the Hopper machinery, as a layout self-test:
// D (64 x N, fp32) = A (64 x K) B (K x N), f16 / bf16, with A and B loaded by
// TMA (tensor maps over K-major or MN-major copies, swizzle 0 / 32 / 64 /
// 128 bytes) into shared memory on one mbarrier and multiplied by wgmma in
// k16 steps (A from shared memory or from registers).
//
// The same kernel runs on the CPU emulator (attention_ext_emu::_sm90_gemm)
// and on an sm_90 GPU (attention_ext::_sm90_gemm_selftest): the descriptors
// below are one reading of the PTX ISA's shared-memory layouts and the
// emulator another's; on a GPU this test says, layout by layout, whether the
// hardware agrees, before the attention kernels that rely on two of them.
#pragma once

#include "sm90_gemm_params.h"
#include "sm90_ptx.cuh"

namespace attention_ext {
namespace cuda {
namespace sm90 {

// Issues the TMA loads of one operand tile (see tile_bytes).
__device__ inline void load_tile(const TmaDesc* d, uint32_t dst, uint32_t bar, int rows, int K, int sw, bool mn_major) {
  const int e = span_elems(sw);
  if (mn_major) {
    for (int c = 0; c < rows / e; ++c) tma_load_4d(dst + c * K * e * 2, d, bar, c * e, 0, 0, 0);
  } else {
    for (int c = 0; c < (K + e - 1) / e; ++c) tma_load_4d(dst + c * rows * e * 2, d, bar, c * e, 0, 0, 0);
  }
}

// The descriptor of k16 step s of an operand tile (my reading of PTX ISA
// 9.7.15.5.1.2; see sm90_emu.cpp operand_addr):
//   K-major, swizzle span S bytes (E = S / 2 elements): chunk c = 16s / E
//     (rows x S bytes each), start = tile + c * rows * S + (16s % E) * 2,
//     SBO = 8 * S (the next 8 rows), LBO unused (1).
//   K-major, no swizzle: 8-element chunks (rows x 16 bytes each); the step
//     spans chunks 2s and 2s+1: start = tile + 2s * rows * 16, LBO = rows * 16
//     (the second 8 k), SBO = 128 (the next 8 rows).
//   MN-major, swizzle span S: chunks of E mn (K x S bytes each), start =
//     tile + 16s * S, LBO = K * S (the next E mn), SBO = 8 * S (the next 8 k).
//   MN-major, no swizzle: chunks of 8 mn (K x 16 bytes each), start =
//     tile + 16s * 16, LBO = 128 (the next 8 k), SBO = K * 16 (the next 8 mn).
__device__ inline uint64_t step_desc(uint32_t tile, int s, int rows, int K, int sw, bool mn_major) {
  const int e = span_elems(sw), span = 2 * e;
  if (sw == kSwizzleNone) {
    if (mn_major) return make_smem_desc(tile + 16 * s * 16, 128, K * 16, sw);
    return make_smem_desc(tile + 2 * s * rows * 16, rows * 16, 128, sw);
  }
  if (mn_major) return make_smem_desc(tile + 16 * s * span, K * span, 8 * span, sw);
  return make_smem_desc(tile + (16 * s / e) * rows * span + (16 * s % e) * 2, 16, 8 * span, sw);
}

template <int N, typename T>
__device__ inline void mma_step(float (&d)[N / 2], const GemmParams& p, uint32_t base, int s, const uint32_t (&af)[4],
                                int scale_d) {
  const uint64_t db = step_desc(base + p.b_off, s, N, p.K, p.sw, p.b_mn);
  if (p.a_regs) {
    if (p.b_mn) {
      wgmma_rs<N, T, 1>(d, af, db, scale_d);
    } else {
      wgmma_rs<N, T, 0>(d, af, db, scale_d);
    }
    return;
  }
  const uint64_t da = step_desc(base + p.a_off, s, 64, p.K, p.sw, p.a_mn);
  if (p.a_mn && p.b_mn) {
    wgmma_ss<N, T, 1, 1>(d, da, db, scale_d);
  } else if (p.a_mn) {
    wgmma_ss<N, T, 1, 0>(d, da, db, scale_d);
  } else if (p.b_mn) {
    wgmma_ss<N, T, 0, 1>(d, da, db, scale_d);
  } else {
    wgmma_ss<N, T, 0, 0>(d, da, db, scale_d);
  }
}

template <int N, typename T>
__global__ void __launch_bounds__(256, 1) sm90_gemm_kernel(const __grid_constant__ GemmParams p) {
#if defined(AE_SM90_BODY)
  AE_DYNAMIC_SMEM(smem);
  const uint32_t base = smem_u32(smem);
  const uint32_t bar = base;
  const int tid = threadIdx.x;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid < 128) {  // producer warpgroup
    setmaxnreg_dec<40>();
    if (tid == 0) {
      tma_prefetch_desc(&p.tb);
      const uint32_t bytes = (p.a_regs ? 0 : tile_bytes(64, p.K, p.sw, p.a_mn)) + tile_bytes(N, p.K, p.sw, p.b_mn);
      mbar_arrive_expect_tx(bar, bytes);
      if (!p.a_regs) load_tile(&p.ta, base + p.a_off, bar, 64, p.K, p.sw, p.a_mn);
      load_tile(&p.tb, base + p.b_off, bar, N, p.K, p.sw, p.b_mn);
    }
    return;
  }
  setmaxnreg_inc<232>();
  const int t = tid - 128, w = t / 32, g = (t % 32) / 4, q = t % 4;
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = __uint_as_float(0x7fc00000u);  // scale-d = 0 must ignore it
  uint32_t af[2][4] = {};
  mbar_wait(bar, 0);
  for (int s = 0; s < p.K / 16; ++s) {
    if (p.a_regs) {  // the m64nNk16 A fragment (PTX ISA 9.7.15.5.1.1.1): warp w, rows 16w..16w+15
      for (int r = 0; r < 4; ++r) {
        const int m = 16 * w + g + 8 * (r % 2), k = 16 * s + 2 * q + 8 * (r / 2);
        af[s % 2][r] = uint32_t(p.a_glob[m * p.K + k]) | (uint32_t(p.a_glob[m * p.K + k + 1]) << 16);
      }
    }
    wgmma_fence();  // orders the fragment writes above before the mma
    mma_step<N, T>(d, p, base, s, af[s % 2], s > 0);
    wgmma_commit();
    wgmma_wait<1>();  // op s-1 done: af[(s+1) % 2] is free again
  }
  wgmma_wait<0>();
  for (int i = 0; i < N / 2; ++i) {
    reg_fence(d[i]);
    const int row = 16 * w + g + 8 * ((i % 4) / 2), col = 8 * (i / 4) + 2 * q + i % 2;
    p.out[row * N + col] = d[i];
  }
#endif  // AE_SM90_BODY
}

template <int N, typename T>
cudaError_t launch_sm90_gemm(const GemmParams& p, size_t smem, cudaStream_t stream) {
  return launch_kernel(sm90_gemm_kernel<N, T>, 1, 256, smem, smem, stream, "sm90_gemm_kernel", p);
}

// Launches the self-test GEMM for N in {64, 128, 256}; smem from tile_bytes.
inline cudaError_t run_sm90_gemm(const GemmParams& p, int n, bool half, size_t smem, cudaStream_t stream) {
  if (n == 64) {
    return half ? launch_sm90_gemm<64, __half>(p, smem, stream)
                : launch_sm90_gemm<64, __nv_bfloat16>(p, smem, stream);
  }
  if (n == 128) {
    return half ? launch_sm90_gemm<128, __half>(p, smem, stream)
                : launch_sm90_gemm<128, __nv_bfloat16>(p, smem, stream);
  }
  return half ? launch_sm90_gemm<256, __half>(p, smem, stream)
              : launch_sm90_gemm<256, __nv_bfloat16>(p, smem, stream);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

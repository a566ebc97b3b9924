// Params of the Hopper layout self-test GEMM (sm90_gemm_selftest.cuh),
// host- and device-includable (the ATen glue fills them).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tma_desc.h"

namespace attention_ext {
namespace cuda {
namespace sm90 {

// Elements of one swizzle row (the TMA box's inner extent): 16-byte core
// matrix rows without swizzle.
__host__ __device__ constexpr int span_elems(int sw) {
  return sw == kSwizzle128B ? 64 : sw == kSwizzle64B ? 32 : sw == kSwizzle32B ? 16 : 8;
}

struct GemmParams {
  TmaDesc ta, tb;
  const uint16_t* a_glob;  // 64 x K row-major (the register fragments of wgmma_rs)
  float* out;              // 64 x N
  int K;
  int sw;  // Swizzle
  int a_mn, b_mn, a_regs;
  uint32_t a_off, b_off;  // tile offsets in shared memory
};

// Bytes of an operand tile with `rows` rows (m or n) and K columns as loaded
// below: K-major: ceil(K / E) chunks of rows x E; MN-major: rows / E chunks of K x E.
__host__ __device__ inline uint32_t tile_bytes(int rows, int K, int sw, bool mn_major) {
  const int e = span_elems(sw);
  return mn_major ? static_cast<uint32_t>(rows / e) * K * e * 2 : static_cast<uint32_t>((K + e - 1) / e) * rows * e * 2;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

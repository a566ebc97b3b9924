// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), shared by the CPU and
// CUDA kernels so that both draw the very same dropout mask for a given
// (seed, offset). Torch-free and usable on host and device.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace attention_ext {

struct U32x4 {
  uint32_t x, y, z, w;
};

AE_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

AE_HOST_DEVICE U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(kM0, ctr.x, &hi0);
    uint32_t lo1 = mulhilo32(kM1, ctr.z, &hi1);
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Dropout decisions for one row segment. The element (bh, i, j) of the
// (batch*heads_q, len_q, len_k) score matrix is kept iff the (j % 4)-th word of
// philox(counter = {j / 4, i, bh, offset}, key = seed) is below the threshold.
struct DropoutRng {
  uint32_t k0 = 0, k1 = 0, off_lo = 0;
  uint64_t threshold = 0;  // keep iff word < threshold; threshold = (1 - p) * 2^32
  double inv_keep = 1.0;   // 1 / (1 - p), in double so float64 dropout is exact

  AE_HOST_DEVICE DropoutRng() {}
  AE_HOST_DEVICE DropoutRng(uint64_t seed, uint64_t offset, double p) {
    set_key(seed, offset);
    double keep = 1.0 - static_cast<double>(p);
    threshold = static_cast<uint64_t>(keep * 4294967296.0);
    inv_keep = inv_keep_of(p);
  }
  // The key words of (seed, offset); the threshold stays.
  AE_HOST_DEVICE void set_key(uint64_t seed, uint64_t offset) {
    k0 = static_cast<uint32_t>(seed);
    k1 = static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset >> 32);
    off_lo = static_cast<uint32_t>(offset);
  }
  // 1 / (1 - p): the scale of the kept elements; 0 for p = 1, where nothing is kept (as F.dropout(p=1): zeros),
  // so that a kernel that scales a sum of dropped terms by it gets 0, not 0 * inf.
  AE_HOST_DEVICE static double inv_keep_of(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }
  // Four consecutive decisions starting at key column j4 * 4 (bit t = column j4*4 + t kept).
  AE_HOST_DEVICE uint32_t keep4(uint64_t bh, uint64_t i, uint64_t j4) const {
    U32x4 r = philox4x32_10(U32x4{static_cast<uint32_t>(j4), static_cast<uint32_t>(i),
                                  static_cast<uint32_t>(bh), off_lo},
                            k0, k1);
    return (static_cast<uint64_t>(r.x) < threshold ? 1u : 0u) |
           (static_cast<uint64_t>(r.y) < threshold ? 2u : 0u) |
           (static_cast<uint64_t>(r.z) < threshold ? 4u : 0u) |
           (static_cast<uint64_t>(r.w) < threshold ? 8u : 0u);
  }
  AE_HOST_DEVICE bool keep(uint64_t bh, uint64_t i, uint64_t j) const {
    return (keep4(bh, i, j >> 2) >> (j & 3)) & 1u;
  }
};

}  // namespace attention_ext

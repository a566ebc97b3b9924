// bfloat16 x bfloat16 -> float32 matrix products on AVX512-BF16 (vdpbf16ps).
//
// torch's BLAS (MKL) runs bf16 products at fp32 speed on CPUs it does not
// special-case; the dot-product instruction does two bf16 multiply-adds per
// fp32 lane, so these hand-written tiles double the arithmetic rate where the
// CPU has it (Zen 4, Sapphire Rapids and later). Compiled for that target only
// and used after a runtime check (bf16_dot_available).
#include "gemm_bf16.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AE_HAVE_BF16_TARGET 1
#define AE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define AE_HAVE_BF16_TARGET 0
#endif

namespace attention_ext::cpu {

bool bf16_dot_available() {
#if AE_HAVE_BF16_TARGET
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

void pack_rows_bf16(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, uint32_t* packed) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const uint16_t* r0 = b + (2 * p) * ldb;
    const uint16_t* r1 = 2 * p + 1 < k ? b + (2 * p + 1) * ldb : nullptr;
    uint32_t* out = packed + p * n;
    if (r1 != nullptr) {
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<uint32_t>(r0[j]) | (static_cast<uint32_t>(r1[j]) << 16);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<uint32_t>(r0[j]);
    }
  }
}

void pack_trans_bf16(const uint16_t* bt, int64_t ldbt, int64_t n, int64_t k, uint32_t* packed) {
  const int64_t kp = k / 2;
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* row = bt + j * ldbt;
    for (int64_t p = 0; p < kp; ++p) {
      uint32_t w;
      std::memcpy(&w, row + 2 * p, 4);
      packed[p * n + j] = w;
    }
    if (k & 1) packed[kp * n + j] = static_cast<uint32_t>(row[k - 1]);
  }
}

#if AE_HAVE_BF16_TARGET
namespace {

// One MR x 32 tile of C: MR rows of A (pairs along k) against 32 packed columns.
template <int MR>
AE_BF16_TARGET void tile(int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint32_t* bp, int64_t ldp,
                         int64_t ncols, bool accumulate, float* c, int64_t ldc) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 = ncols <= 16 ? 0 : (ncols >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (ncols - 16)) - 1));
  const int64_t kp = (k + 1) / 2;
  const bool odd = k & 1;
  for (int64_t p = 0; p < kp; ++p) {
    const __m512i b0 = _mm512_maskz_loadu_epi32(m0, bp + p * ldp);
    const __m512i b1 = _mm512_maskz_loadu_epi32(m1, bp + p * ldp + 16);
    const bool last_half = odd && p == kp - 1;
    for (int r = 0; r < MR; ++r) {
      uint32_t w;
      if (last_half) {
        w = a[r * lda + 2 * p];  // the pair's second element is past the end of the row
      } else {
        std::memcpy(&w, a + r * lda + 2 * p, 4);
      }
      const __m512i av = _mm512_set1_epi32(static_cast<int>(w));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)av, (__m512bh)b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)av, (__m512bh)b1);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    __m512 c0 = _mm512_mul_ps(acc[r][0], va), c1 = _mm512_mul_ps(acc[r][1], va);
    if (accumulate) {
      c0 = _mm512_add_ps(c0, _mm512_maskz_loadu_ps(m0, cr));
      c1 = _mm512_add_ps(c1, _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, c0);
    _mm512_mask_storeu_ps(cr + 16, m1, c1);
  }
}

using TileFn = void (*)(int64_t, float, const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t, bool, float*,
                        int64_t);
constexpr TileFn kTiles[9] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

}  // namespace

void gemm_bf16_packed(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                      const uint32_t* bp, int64_t ldp, bool accumulate, float* c, int64_t ldc) {
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t nc = std::min<int64_t>(32, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += 8) {
      const int64_t mr = std::min<int64_t>(8, m - i0);
      kTiles[mr](k, alpha, a + i0 * lda, lda, bp + j0, ldp, nc, accumulate, c + i0 * ldc + j0, ldc);
    }
  }
}
#else
void gemm_bf16_packed(int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint32_t*, int64_t, bool,
                      float*, int64_t) {}
#endif

}  // namespace attention_ext::cpu

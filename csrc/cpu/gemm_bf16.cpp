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

#if AE_HAVE_BF16_TARGET
// GCC 12 reports the deliberately undefined source operand inside
// unpack/shuffle/convert intrinsics as "may be used uninitialized" (GCC bug
// 105593, fixed in 13); nothing here is uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

// In-register transpose of a 16 x 16 block of 32-bit words: r[i] holds row i
// on entry and column i on return.
AE_BF16_TARGET inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane l: rows 2i, 2i+1 interleaved, columns 4l..4l+3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane l: rows 4i..4i+3 of column 4l + c
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of the 128-bit lanes of r[c], r[4+c], r[8+c], r[12+c]
    const __m512i b0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), b1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i b2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                  b3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(b0, b2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(b0, b2, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(b1, b3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(b1, b3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

inline uint32_t load_u32(const uint16_t* x) {
  uint32_t w;
  std::memcpy(&w, x, 4);
  return w;
}

inline __mmask16 low_mask16(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

}  // namespace

// The forward packs K^T and V again for every (query block, key block) pair,
// so the packings run on AVX-512 (there wherever the bf16 products are used):
// the transposed one as 16 x 16 blocks of 32-bit words, a bf16 pair of a row
// of B^T being one packed word. (A scalar strided loop took ~20% of the time
// of the products it fed.)
AE_BF16_TARGET void pack_rows_bf16(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, uint32_t* packed,
                                   int64_t ldp) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const uint16_t* r0 = b + (2 * p) * ldb;
    const bool has_r1 = 2 * p + 1 < k;
    const uint16_t* r1 = has_r1 ? b + (2 * p + 1) * ldb : r0;
    uint32_t* out = packed + p * ldp;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = low_mask16(n - j);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + j));
      const __m512i hi = has_r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + j)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(out + j, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

AE_BF16_TARGET void pack_trans_bf16(const uint16_t* bt, int64_t ldbt, int64_t n, int64_t k, uint32_t* packed,
                                    int64_t ldp) {
  const int64_t kp = k / 2;
  __m512i r[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, kp - p0);
      const __mmask16 mp = low_mask16(np);
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < nj ? _mm512_maskz_loadu_epi32(mp, bt + (j0 + i) * ldbt + 2 * p0) : _mm512_setzero_si512();
      transpose16x16(r);
      const __mmask16 mj = low_mask16(nj);
      for (int64_t i = 0; i < np; ++i) _mm512_mask_storeu_epi32(packed + (p0 + i) * ldp + j0, mj, r[i]);
    }
    if (k & 1)
      for (int64_t j = j0; j < j0 + nj; ++j) packed[kp * ldp + j] = static_cast<uint32_t>(bt[j * ldbt + k - 1]);
  }
}
#pragma GCC diagnostic pop
#else
// Without the AVX-512 target these are never called (bf16_dot_available() is
// false); plain versions keep the build complete.
void pack_rows_bf16(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, uint32_t* packed, int64_t ldp) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p)
    for (int64_t j = 0; j < n; ++j)
      packed[p * ldp + j] = b[2 * p * ldb + j] | (2 * p + 1 < k ? static_cast<uint32_t>(b[(2 * p + 1) * ldb + j]) << 16 : 0u);
}
void pack_trans_bf16(const uint16_t* bt, int64_t ldbt, int64_t n, int64_t k, uint32_t* packed, int64_t ldp) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p)
    for (int64_t j = 0; j < n; ++j)
      packed[p * ldp + j] = bt[j * ldbt + 2 * p] | (2 * p + 1 < k ? static_cast<uint32_t>(bt[j * ldbt + 2 * p + 1]) << 16 : 0u);
}
#endif

#if AE_HAVE_BF16_TARGET
namespace {

// One MR x 32 tile of C: MR rows of A (pairs along k) against 32 packed columns.
// The 2 * MR accumulators must stay in registers: an earlier form (the odd k's
// last pair handled inside the loop, A's pair read through a GPR) made GCC 12
// keep them on the stack, a load and a store around every vdpbf16ps, and the
// tile ran at ~42% of the instruction's peak on Zen 4 (NOTES 25). Now the pairs
// are broadcast straight from memory and the odd tail is a separate step.
template <int MR>
AE_BF16_TARGET inline void tile_step(const uint16_t* a, int64_t lda, int64_t p, bool half, __m512bh b0, __m512bh b1,
                                     __m512 (&acc0)[MR], __m512 (&acc1)[MR]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const uint16_t* x = a + r * lda + 2 * p;
    // the pair's second element is past the end of the row for the odd tail
    const __m512i av = half ? _mm512_set1_epi32(static_cast<int>(x[0])) : _mm512_set1_epi32(load_u32(x));
    acc0[r] = _mm512_dpbf16_ps(acc0[r], (__m512bh)av, b0);
    acc1[r] = _mm512_dpbf16_ps(acc1[r], (__m512bh)av, b1);
  }
}

template <int MR>
AE_BF16_TARGET void tile(int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint32_t* bp, int64_t ldp,
                         int64_t ncols, bool accumulate, float* c, int64_t ldc) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 = ncols <= 16 ? 0 : (ncols >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (ncols - 16)) - 1));
  const int64_t kfull = k / 2;
  for (int64_t p = 0; p < kfull; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, bp + p * ldp);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, bp + p * ldp + 16);
    tile_step<MR>(a, lda, p, false, b0, b1, acc0, acc1);
  }
  if (k & 1) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, bp + kfull * ldp);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, bp + kfull * ldp + 16);
    tile_step<MR>(a, lda, kfull, true, b0, b1, acc0, acc1);
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    __m512 c0 = _mm512_mul_ps(acc0[r], va), c1 = _mm512_mul_ps(acc1[r], va);
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

// Vectorised row primitives. Plain loops written so that GCC/Clang vectorise
// them; `target_clones` builds an AVX-512, an AVX2 and a baseline copy of each
// and picks one at load time (ifunc), so no -march flag is needed.
#include "vec_ops.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AE_CLONES
#endif
#define AE_INLINE static inline __attribute__((always_inline))

namespace attention_ext::cpu {
namespace {

AE_INLINE uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
AE_INLINE float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for x <= 0 (scores minus their running max), ~1 ulp on the range that
// matters; branch-free so the loops vectorise. NaN propagates, -inf gives 0.
AE_INLINE float exp_nonpos(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  float n = __builtin_nearbyintf(xc * kLog2e);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // Taylor/minimax-like polynomial of degree 6 on [-ln2/2, ln2/2]
  float p = 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  float scale = u2f(static_cast<uint32_t>(ni + 127) << 23);
  float y = p * scale;
  y = x < -87.0f ? 0.0f : y;
  return x != x ? x : y;
}

}  // namespace

AE_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

AE_CLONES float exp_sub_sum(float* x, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    float e = exp_nonpos(x[j] - m);
    x[j] = e;
    s += e;
  }
  return s;
}

AE_CLONES void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

AE_CLONES void softmax_grad_row(float* ds, const float* p, const float* dp, int64_t n, float d) {
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (dp[j] - d);
}

AE_CLONES float dot_row(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

AE_CLONES float row_sum(const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

AE_CLONES void add_row(float* x, const float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] += y[j];
}

AE_CLONES void scale_bf16_pow2(uint16_t* x, int64_t n, int e) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t v = x[j];
    const int ex = (v >> 7) & 0xFF;
    const int ne = ex + e;
    const uint16_t sign = v & 0x8000u;
    uint16_t r = static_cast<uint16_t>(v + (e << 7));                      // normal result: exponent + e
    r = ne <= 0 ? sign : r;                                                  // underflow: signed zero
    r = ne >= 255 ? static_cast<uint16_t>(sign | 0x7F80u) : r;               // overflow: infinity
    x[j] = (ex == 0 || ex == 255) ? v : r;                                   // zero, subnormal, inf, NaN: kept
  }
}

AE_CLONES void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = u2f(static_cast<uint32_t>(src[j]) << 16);
}

AE_CLONES void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u = f2u(src[j]);
    // round to nearest even; NaN stays a (quiet) NaN
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    dst[j] = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
  }
}

AE_CLONES void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t h = src[j];
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t ex = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t normal = sign | ((ex + 112u) << 23) | (mant << 13);
    uint32_t infnan = sign | 0x7F800000u | (mant << 13);
    float sub = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    uint32_t subnormal = sign | f2u(sub);
    uint32_t r = ex == 0 ? subnormal : (ex == 31 ? infnan : normal);
    dst[j] = u2f(r);
  }
}

AE_CLONES void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u = f2u(src[j]);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    // normal range: rebias exponent, round to nearest even on the 13 dropped bits
    uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    // subnormal range: let the FPU round |x| + 0.5 (whose ulp is 2^-24)
    uint32_t subnormal = f2u(u2f(a) + 0.5f) - 0x3F000000u;
    uint32_t infnan = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
    uint32_t r = a >= 0x7F800000u ? infnan
                 : a >= 0x477FF000u ? 0x7C00u
                 : a < 0x38800000u ? subnormal
                                   : normal;
    dst[j] = static_cast<uint16_t>(sign | r);
  }
}

float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

float f16_to_float(uint16_t h) {
  float f;
  f16_to_f32(&h, &f, 1);
  return f;
}

}  // namespace attention_ext::cpu

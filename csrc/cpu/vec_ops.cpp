// Vectorised row primitives. Plain loops written so that GCC/Clang vectorise
// them; `target_clones` builds an AVX-512, an AVX2 and a baseline copy of each
// and picks one at load time (ifunc), so no -march flag is needed.
#include "vec_ops.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AE_CLONES
#endif
#define AE_INLINE static inline __attribute__((always_inline))

// exp_sub_sum and its bf16-writing form are written out in AVX-512 intrinsics as
// well, used after a runtime check: GCC's vectorisation of exp_nonpos (the
// clone above) takes about twice the instructions (the rounding, integer shift
// and the two blends against the single vscalefps with a zeroing mask here),
// and this pass is a fifth of the bf16 forward's time (benchmarks/NOTES.md,
// entry 13). The results are bit-identical to exp_nonpos.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define AE_HAVE_AVX512_ROWS 1
#define AE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define AE_HAVE_AVX512_ROWS 0
#endif

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

AE_CLONES float exp_sub_sum_generic(float* x, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    float e = exp_nonpos(x[j] - m);
    x[j] = e;
    s += e;
  }
  return s;
}

#if AE_HAVE_AVX512_ROWS
// GCC 12 flags the deliberately undefined source operand inside the masked and
// reducing intrinsics as uninitialised (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// What the hand-written rows may use, probed once: 2 = AVX-512 F/BW/VL and AVX512-BF16, 1 = AVX-512
// F/BW/VL, 0 = F16C only (float16 conversions), -1 = nothing. ATTENTION_EXT_CPU_AVX512=0 turns them all
// off (the tests compare them with the generic loops).
int isa_level() {
  static const int level = [] {
    const char* env = std::getenv("ATTENTION_EXT_CPU_AVX512");
    if (env != nullptr && std::strcmp(env, "0") == 0) return -1;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c") ? 0 : -1;
  }();
  return level;
}
bool has_avx512() { return isa_level() >= 1; }
bool has_avx512_bf16() { return isa_level() >= 2; }
bool has_f16c() { return isa_level() >= 0; }  // every AVX-512 CPU has F16C

// exp_nonpos on 16 lanes, the same operations in the same order (so the same bits): clamp at -87, n =
// round(x log2 e), r = x - n ln 2 in two parts, the degree-6 polynomial, then p * 2^n by vscalefps, zeroed
// where x < -87 (a -inf score gives exactly 0); NaN compares unordered, so it is kept and propagates.
AE_AVX512_TARGET AE_INLINE __m512 exp_nonpos16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
  const __m512 xc = _mm512_max_ps(lo, x);  // second operand returned for NaN: x
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.38888889e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666667e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666667e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

AE_AVX512_TARGET AE_INLINE __mmask16 tail_mask(int64_t left) {
  return static_cast<__mmask16>((1u << left) - 1u);
}

// sum_j exp(x[j] - m), each value handed to store (16 lanes at a time; the tail under a mask); with
// xmax, also max_j x[j] there.
template <class Store>
AE_AVX512_TARGET AE_INLINE float exp_sub_sum16(const float* x, int64_t n, float m, const Store& store,
                                               float* xmax = nullptr) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 s = _mm512_setzero_ps();
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    if (xmax != nullptr) mx = _mm512_max_ps(v, mx);  // NaN in v: mx kept (the caller's check catches it in s)
    const __m512 e = exp_nonpos16(_mm512_sub_ps(v, vm));
    s = _mm512_add_ps(s, e);
    store(j, e, static_cast<__mmask16>(0xFFFF));
  }
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    if (xmax != nullptr) mx = _mm512_mask_max_ps(mx, k, v, mx);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_nonpos16(_mm512_sub_ps(v, vm)));
    s = _mm512_add_ps(s, e);
    store(j, e, k);
  }
  if (xmax != nullptr) *xmax = _mm512_reduce_max_ps(mx);
  return _mm512_reduce_add_ps(s);
}

struct StoreF32 {
  float* x;
  AE_AVX512_TARGET void operator()(int64_t j, __m512 e, __mmask16 k) const { _mm512_mask_storeu_ps(x + j, k, e); }
};
// vcvtneps2bf16 rounds to nearest even and keeps NaN a quiet NaN, as f32_to_bf16 does.
struct StoreBf16 {
  uint16_t* dst;
  AE_AVX512_TARGET void operator()(int64_t j, __m512 e, __mmask16 k) const {
    _mm256_mask_storeu_epi16(dst + j, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
};

AE_AVX512_TARGET float exp_sub_sum_avx512(float* x, int64_t n, float m) {
  return exp_sub_sum16(x, n, m, StoreF32{x});
}

AE_AVX512_TARGET float exp_sub_sum_bf16_avx512(const float* x, int64_t n, float m, uint16_t* dst, int64_t npad,
                                              float* xmax = nullptr) {
  const float s = exp_sub_sum16(x, n, m, StoreBf16{dst}, xmax);
  if (npad > n) std::memset(dst + n, 0, (npad - n) * sizeof(uint16_t));
  return s;
}
#pragma GCC diagnostic pop
#endif

}  // namespace

float exp_sub_sum(float* x, int64_t n, float m) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512()) return exp_sub_sum_avx512(x, n, m);
#endif
  return exp_sub_sum_generic(x, n, m);
}

float exp_sub_sum_bf16(float* x, int64_t n, float m, uint16_t* dst, int64_t npad) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512_bf16()) return exp_sub_sum_bf16_avx512(x, n, m, dst, npad);
#endif
  const float s = exp_sub_sum(x, n, m);
  f32_to_bf16(x, dst, n);
  if (npad > n) std::memset(dst + n, 0, (npad - n) * sizeof(uint16_t));
  return s;
}

float exp_sub_sum_max_bf16(const float* x, int64_t n, float m, uint16_t* dst, int64_t npad, float* xmax) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512_bf16()) return exp_sub_sum_bf16_avx512(x, n, m, dst, npad, xmax);
#endif
  float buf[256];  // x is not written: the exponentials go through a stack buffer, 256 at a time
  float s = 0.f, mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; j += 256) {
    const int64_t c = std::min<int64_t>(256, n - j);
    mx = std::max(mx, row_max(x + j, c));
    std::memcpy(buf, x + j, c * sizeof(float));
    s += exp_sub_sum(buf, c, m);
    f32_to_bf16(buf, dst + j, c);
  }
  if (npad > n) std::memset(dst + n, 0, (npad - n) * sizeof(uint16_t));
  *xmax = mx;
  return s;
}

AE_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// tanh(y), branch-free so that the loops vectorise: y P(y^2) / Q(y^2) on |y| < 9 (P, Q of degree 4 with
// positive coefficients, so no pole and no cancellation: csrc/cpu/fit_tanh.py fits them), +-1 beyond (float32's
// tanh there). Within 3.2e-7 of tanh relatively in float32 (about 5 ulp, the rounding of the two sums and the
// division; the fit itself is within 2e-8). One division and nine FMAs: 2.6x faster than the former
// exp-and-division form (benchmarks/NOTES.md, entry 49). +-inf gives +-1, NaN stays NaN.
AE_INLINE float tanh_f32(float y) {
  const float c = y > 9.f ? 9.f : (y < -9.f ? -9.f : y), z = c * c;
  float p = 1.33553923e-8f;
  p = p * z + 2.06096101e-5f;
  p = p * z + 0.00349562033f;
  p = p * z + 0.13381052f;
  p = p * z + 1.f;
  float q = 7.77685784e-7f;
  q = q * z + 0.000328568742f;
  q = q * z + 0.0258771051f;
  q = q * z + 0.467143685f;
  q = q * z + 1.f;
  const float t = c * p / q;
  return c == 9.f ? 1.f : (c == -9.f ? -1.f : t);
}

// (No hand-written AVX-512 form: it could not be measured or tested on the machines at hand, which have no
// AVX-512; the x86-64-v4 clone is the compiler's vectorisation of this loop.)
AE_CLONES void softcap_row(float* x, int64_t n, float cap, float* d) {
  const float inv = 1.f / cap;
  if (d == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = cap * tanh_f32(x[j] * inv);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float t = tanh_f32(x[j] * inv);
      x[j] = cap * t;
      d[j] = 1.f - t * t;
    }
  }
}

AE_CLONES void alibi_row(float* x, int64_t n, float m, float d0) {
  // (an int32 index converts to float in one vector instruction; d0 - j is exact below 2^24)
#pragma omp simd
  for (int32_t j = 0; j < static_cast<int32_t>(n); ++j) x[j] -= m * std::fabs(d0 - static_cast<float>(j));
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

AE_CLONES void mask_bool_row(float* x, const uint8_t* keep, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] : ninf;
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

namespace {
AE_CLONES void f16_to_f32_generic(const uint16_t* src, float* dst, int64_t n) {
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

AE_CLONES void f32_to_f16_generic(const float* src, uint16_t* dst, int64_t n) {
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

#if AE_HAVE_AVX512_ROWS
// float16 <-> float32 by the conversion instructions (F16C, part of every AVX2 CPU, and its AVX-512
// form): the bit-level loops above took a third of a float16 forward (benchmarks/NOTES.md, entry 13).
// Both round to nearest even with subnormals and infinities as the loops do; a NaN stays a NaN
// (quietened, where the loops keep a signalling NaN's bits or write the canonical one).
#define AE_F16C_TARGET __attribute__((target("avx,f16c")))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

AE_AVX512_TARGET void f16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    _mm512_mask_storeu_ps(dst + j, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + j)));
  }
}

AE_AVX512_TARGET void f32_to_f16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    _mm256_mask_storeu_epi16(dst + j, k, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(k, src + j), _MM_FROUND_TO_NEAREST_INT));
  }
}

AE_F16C_TARGET void f16_to_f32_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  if (j < n) f16_to_f32_generic(src + j, dst + j, n - j);
}

AE_F16C_TARGET void f32_to_f16_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  if (j < n) f32_to_f16_generic(src + j, dst + j, n - j);
}
#pragma GCC diagnostic pop
#endif
}  // namespace

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512()) return f16_to_f32_avx512(src, dst, n);
  if (has_f16c()) return f16_to_f32_f16c(src, dst, n);
#endif
  f16_to_f32_generic(src, dst, n);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512()) return f32_to_f16_avx512(src, dst, n);
  if (has_f16c()) return f32_to_f16_f16c(src, dst, n);
#endif
  f32_to_f16_generic(src, dst, n);
}

// ---- dot_rows / axpy_rows: keys and values read in place, for short query blocks ----
namespace {

AE_INLINE int64_t row_kind_size(RowKind kind) { return kind == RowKind::kF32 ? 4 : 2; }

// Row x (e elements of `kind`) as float: in place for float32, else converted into buf.
const float* row_as_f32(const char* x, RowKind kind, int64_t e, float* buf) {
  if (kind == RowKind::kF32) return reinterpret_cast<const float*>(x);
  if (kind == RowKind::kBf16) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(x), buf, e);
  } else {
    f16_to_f32(reinterpret_cast<const uint16_t*>(x), buf, e);
  }
  return buf;
}

AE_CLONES void axpy_row(float* acc, const float* x, float a, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += a * x[d];
}

void dot_rows_generic(const float* q, int64_t nr, int64_t ldq, const void* x, RowKind kind, int64_t ld, int64_t n,
                      int64_t e, float scale, float* s, int64_t lds) {
  std::vector<float> buf(kind == RowKind::kF32 ? 0 : e);
  const int64_t step = ld * row_kind_size(kind);
  for (int64_t j = 0; j < n; ++j) {
    const float* xj = row_as_f32(static_cast<const char*>(x) + j * step, kind, e, buf.data());
    for (int64_t r = 0; r < nr; ++r) s[r * lds + j] = scale * dot_row(q + r * ldq, xj, e);
  }
}

void axpy_rows_generic(const float* p, int64_t ldp, int64_t nr, const void* x, RowKind kind, int64_t ld, int64_t n,
                       int64_t e, float* acc, int64_t ldacc) {
  std::vector<float> buf(kind == RowKind::kF32 ? 0 : e);
  const int64_t step = ld * row_kind_size(kind);
  for (int64_t j = 0; j < n; ++j) {
    const float* xj = row_as_f32(static_cast<const char*>(x) + j * step, kind, e, buf.data());
    for (int64_t r = 0; r < nr; ++r) axpy_row(acc + r * ldacc, xj, p[r * ldp + j], e);
  }
}

#if AE_HAVE_AVX512_ROWS
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// 16 elements of a row from element i on, as float (exact conversions), lanes outside m zero.
template <RowKind K>
AE_AVX512_TARGET AE_INLINE __m512 load16(const char* row, int64_t i, __mmask16 m) {
  if constexpr (K == RowKind::kF32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(row) + i);
    if constexpr (K == RowKind::kBf16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

AE_AVX512_TARGET AE_INLINE __m256 add_halves(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
// The four sums of a0 .. a3, in that order.
AE_AVX512_TARGET AE_INLINE __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(add_halves(a0), add_halves(a1)),
                                  _mm256_hadd_ps(add_halves(a2), add_halves(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// a[r][u] += q_r[d, d + width) . x_u[same] for the keys u < nu (the others read nothing), lanes outside m zero.
template <RowKind K, int NR, bool kDp>
AE_AVX512_TARGET AE_INLINE void dot_step(__m512 (&a)[NR][4], const float* q, const uint16_t* qb, int64_t ldq,
                                         const char* const* xs, int nu, int64_t d, uint32_t m) {
  if constexpr (kDp) {
    __m512i kv[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u)
      kv[u] = u < nu ? _mm512_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(xs[u]) + d)
                     : _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512i qv = _mm512_maskz_loadu_epi16(m, qb + r * ldq + d);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
        a[r][u] = _mm512_dpbf16_ps(a[r][u], reinterpret_cast<__m512bh>(qv), reinterpret_cast<__m512bh>(kv[u]));
    }
  } else {
    const __mmask16 m16 = static_cast<__mmask16>(m);
    __m512 kv[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) kv[u] = u < nu ? load16<K>(xs[u], d, m16) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 qv = _mm512_maskz_loadu_ps(m16, q + r * ldq + d);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[r][u] = _mm512_fmadd_ps(qv, kv[u], a[r][u]);
    }
  }
}

// NR query rows against keys 4 at a time: each key chunk is loaded (and converted) once for all rows. With
// kDp (bfloat16 keys, AVX512-BF16), 32 elements per vdpbf16ps against the bf16 copy of the queries.
template <RowKind K, int NR, bool kDp>
AE_AVX512_TARGET void dot_rows_nr(const float* q, const uint16_t* qb, int64_t ldq, const char* base, int64_t step,
                                  int64_t n, int64_t e, float scale, float* s, int64_t lds) {
  constexpr int64_t kW = kDp ? 32 : 16;  // elements per vector
  const int64_t full = e / kW * kW;
  const uint32_t all = kDp ? 0xFFFFFFFFu : 0xFFFFu, tail = static_cast<uint32_t>((uint64_t(1) << (e - full)) - 1);
  const __m128 sc = _mm_set1_ps(scale);
  const char* xs[4];
  __m512 a[NR][4];
  for (int64_t j = 0; j < n; j += 4) {
    const int nu = static_cast<int>(n - j < 4 ? n - j : 4);
    for (int u = 0; u < 4; ++u) xs[u] = base + (j + (u < nu ? u : 0)) * step;
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[r][u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < full; d += kW) dot_step<K, NR, kDp>(a, q, qb, ldq, xs, nu, d, all);
    if (full < e) dot_step<K, NR, kDp>(a, q, qb, ldq, xs, nu, full, tail);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m128 v = _mm_mul_ps(reduce4(a[r][0], a[r][1], a[r][2], a[r][3]), sc);
      _mm_mask_storeu_ps(s + r * lds + j, static_cast<__mmask8>((1u << nu) - 1u), v);
    }
  }
}

// acc rows r < NR, columns [d0, d0 + 16 NV) += sum_j p_r[j] x_j[...]: each value chunk is loaded (and
// converted) once for all rows; the last vector under `last`.
template <RowKind K, int NR, int NV>
AE_AVX512_TARGET AE_INLINE void axpy_chunk(const float* p, int64_t ldp, const char* base, int64_t step, int64_t n,
                                           int64_t d0, __mmask16 last, float* acc, int64_t ldacc) {
  __m512 a[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      a[r][c] = _mm512_maskz_loadu_ps(c == NV - 1 ? last : 0xFFFF, acc + r * ldacc + d0 + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    const char* xj = base + j * step;
    __m512 xv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) xv[c] = load16<K>(xj, d0 + 16 * c, c == NV - 1 ? last : 0xFFFF);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) a[r][c] = _mm512_fmadd_ps(pj, xv[c], a[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      _mm512_mask_storeu_ps(acc + r * ldacc + d0 + 16 * c, c == NV - 1 ? last : 0xFFFF, a[r][c]);
}

template <RowKind K, int NR>
AE_AVX512_TARGET void axpy_rows_nr(const float* p, int64_t ldp, const char* base, int64_t step, int64_t n,
                                   int64_t e, float* acc, int64_t ldacc) {
  int64_t d0 = 0;
  for (; d0 + 64 <= e; d0 += 64) axpy_chunk<K, NR, 4>(p, ldp, base, step, n, d0, 0xFFFF, acc, ldacc);
  const int64_t rem = e - d0;
  if (rem == 0) return;
  const int nv = static_cast<int>((rem + 15) / 16);
  const __mmask16 last = tail_mask(rem - 16 * (nv - 1));
  switch (nv) {
    case 1: return axpy_chunk<K, NR, 1>(p, ldp, base, step, n, d0, last, acc, ldacc);
    case 2: return axpy_chunk<K, NR, 2>(p, ldp, base, step, n, d0, last, acc, ldacc);
    case 3: return axpy_chunk<K, NR, 3>(p, ldp, base, step, n, d0, last, acc, ldacc);
    default: return axpy_chunk<K, NR, 4>(p, ldp, base, step, n, d0, last, acc, ldacc);
  }
}

// Rows in groups of up to 4 (the register budget of the kernels above).
template <RowKind K, bool kDp>
AE_AVX512_TARGET void dot_rows_avx512(const float* q, const uint16_t* qb, int64_t nr, int64_t ldq, const void* x,
                                      int64_t ld, int64_t n, int64_t e, float scale, float* s, int64_t lds) {
  const char* base = static_cast<const char*>(x);
  const int64_t step = ld * row_kind_size(K);
  for (int64_t r = 0; r < nr; r += 4) {
    const float* qr = q + r * ldq;
    const uint16_t* qbr = kDp ? qb + r * ldq : nullptr;
    float* sr = s + r * lds;
    switch (nr - r < 4 ? nr - r : 4) {
      case 1: dot_rows_nr<K, 1, kDp>(qr, qbr, ldq, base, step, n, e, scale, sr, lds); break;
      case 2: dot_rows_nr<K, 2, kDp>(qr, qbr, ldq, base, step, n, e, scale, sr, lds); break;
      case 3: dot_rows_nr<K, 3, kDp>(qr, qbr, ldq, base, step, n, e, scale, sr, lds); break;
      default: dot_rows_nr<K, 4, kDp>(qr, qbr, ldq, base, step, n, e, scale, sr, lds); break;
    }
  }
}

template <RowKind K>
AE_AVX512_TARGET void axpy_rows_avx512(const float* p, int64_t ldp, int64_t nr, const void* x, int64_t ld, int64_t n,
                                       int64_t e, float* acc, int64_t ldacc) {
  const char* base = static_cast<const char*>(x);
  const int64_t step = ld * row_kind_size(K);
  for (int64_t r = 0; r < nr; r += 4) {
    const float* pr = p + r * ldp;
    float* ar = acc + r * ldacc;
    switch (nr - r < 4 ? nr - r : 4) {
      case 1: axpy_rows_nr<K, 1>(pr, ldp, base, step, n, e, ar, ldacc); break;
      case 2: axpy_rows_nr<K, 2>(pr, ldp, base, step, n, e, ar, ldacc); break;
      case 3: axpy_rows_nr<K, 3>(pr, ldp, base, step, n, e, ar, ldacc); break;
      default: axpy_rows_nr<K, 4>(pr, ldp, base, step, n, e, ar, ldacc); break;
    }
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

void dot_rows(const float* q, const uint16_t* qb, int64_t nr, int64_t ldq, const void* x, RowKind kind, int64_t ld,
              int64_t n, int64_t e, float scale, float* s, int64_t lds) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512()) {
    switch (kind) {
      case RowKind::kBf16:
        if (has_avx512_bf16() && qb != nullptr)
          return dot_rows_avx512<RowKind::kBf16, true>(q, qb, nr, ldq, x, ld, n, e, scale, s, lds);
        return dot_rows_avx512<RowKind::kBf16, false>(q, qb, nr, ldq, x, ld, n, e, scale, s, lds);
      case RowKind::kF16: return dot_rows_avx512<RowKind::kF16, false>(q, qb, nr, ldq, x, ld, n, e, scale, s, lds);
      default: return dot_rows_avx512<RowKind::kF32, false>(q, qb, nr, ldq, x, ld, n, e, scale, s, lds);
    }
  }
#endif
  dot_rows_generic(q, nr, ldq, x, kind, ld, n, e, scale, s, lds);
}

void axpy_rows(const float* p, int64_t ldp, int64_t nr, const void* x, RowKind kind, int64_t ld, int64_t n,
               int64_t e, float* acc, int64_t ldacc) {
#if AE_HAVE_AVX512_ROWS
  if (has_avx512()) {
    switch (kind) {
      case RowKind::kBf16: return axpy_rows_avx512<RowKind::kBf16>(p, ldp, nr, x, ld, n, e, acc, ldacc);
      case RowKind::kF16: return axpy_rows_avx512<RowKind::kF16>(p, ldp, nr, x, ld, n, e, acc, ldacc);
      default: return axpy_rows_avx512<RowKind::kF32>(p, ldp, nr, x, ld, n, e, acc, ldacc);
    }
  }
#endif
  axpy_rows_generic(p, ldp, nr, x, kind, ld, n, e, acc, ldacc);
}

float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

float f16_to_float(uint16_t h) {
  float f;
  f16_to_f32(&h, &f, 1);
  return f;
}

}  // namespace attention_ext::cpu

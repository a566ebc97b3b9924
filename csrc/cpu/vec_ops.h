// Row primitives of the CPU kernels (torch-free).
//
// The float versions are compiled with GCC function multi-versioning
// (target_clones: AVX-512, AVX2, baseline) in vec_ops.cpp, so the extension runs
// on any x86-64 CPU and still uses wide vectors where they exist. The double
// versions serve float64 (gradcheck) and need no speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace attention_ext::cpu {

// ---- float (vectorised, see vec_ops.cpp) ----
float row_max(const float* x, int64_t n);
// x[j] = exp(x[j] - m); returns the sum of the new values. Values below
// exp(-87) flush to 0 (so a -inf score gives exactly 0).
float exp_sub_sum(float* x, int64_t n, float m);
// The same sum, with the values rounded to bfloat16 (nearest even) into dst[0, n) and
// dst[n, npad) zeroed; x itself may or may not be overwritten with them.
float exp_sub_sum_bf16(float* x, int64_t n, float m, uint16_t* dst, int64_t npad);
// exp_sub_sum_bf16 that never writes x and also stores max_j x[j] in *xmax (where x holds a NaN, *xmax may
// or may not be NaN: the sum is NaN either way). For m below that max (a reference, not the maximum).
float exp_sub_sum_max_bf16(const float* x, int64_t n, float m, uint16_t* dst, int64_t npad, float* xmax);
void scale_row(float* x, int64_t n, float a);
// Logit soft-capping: x[j] = cap tanh(x[j] / cap), and where d is not null d[j] = 1 - tanh^2 (its derivative);
// an absolute error of about 1e-7 in tanh.
void softcap_row(float* x, int64_t n, float cap, float* d);
// ALiBi: x[j] -= m |d0 - j| (d0: the distance to the row's first key; |d0|, n below 2^24)
void alibi_row(float* x, int64_t n, float m, float d0);
// ds[j] = p[j] * (dp[j] - d)
void softmax_grad_row(float* ds, const float* p, const float* dp, int64_t n, float d);
float dot_row(const float* a, const float* b, int64_t n);
float row_sum(const float* x, int64_t n);
void add_row(float* x, const float* y, int64_t n);
// x[j] = keep[j] ? x[j] : -inf (a boolean mask row of bytes 0 / 1)
void mask_bool_row(float* x, const uint8_t* keep, int64_t n);
// x[j] *= 2^e for bfloat16 bits, exactly where the result is a normal number (results below that flush
// to a signed zero, above it to infinity; zeros, subnormals, infinities and NaN are left as they are)
void scale_bf16_pow2(uint16_t* x, int64_t n, int e);
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);
void f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void f16_to_f32(const uint16_t* src, float* dst, int64_t n);
void f32_to_f16(const float* src, uint16_t* dst, int64_t n);

// ---- rows of keys / values read in place (the short-query forward, RowTile in flash_cpu.h) ----
// The element type of such rows: float32, or the bits of bfloat16 / float16.
enum class RowKind { kF32, kBf16, kF16 };
// Rows of keys: x_j = x + j * ld holds e elements of `kind` (j < n). For the query rows r < nr (q + r * ldq,
// e floats each): s[r * lds + j] = scale * sum_d q_r[d] * x_j[d], products and sums in float32. With
// kind == kBf16, qb holds the same query rows as bfloat16 bits (exact copies, rows ldq apart) for the
// AVX512-BF16 dot-product instruction (denormal inputs read as zero there, as on the bf16 tile paths);
// otherwise qb may be null.
void dot_rows(const float* q, const uint16_t* qb, int64_t nr, int64_t ldq, const void* x, RowKind kind, int64_t ld,
              int64_t n, int64_t e, float scale, float* s, int64_t lds);
// Rows of values x_j as above: acc[r * ldacc + d] += sum_j p[r * ldp + j] * x_j[d] for r < nr, d < e, in
// float32, j in order.
void axpy_rows(const float* p, int64_t ldp, int64_t nr, const void* x, RowKind kind, int64_t ld, int64_t n,
               int64_t e, float* acc, int64_t ldacc);

// ---- double (scalar) ----
inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
inline double exp_sub_sum(double* x, int64_t n, double m) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    s += x[j];
  }
  return s;
}
inline void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
inline void softcap_row(double* x, int64_t n, double cap, double* d) {
  for (int64_t j = 0; j < n; ++j) {
    const double t = std::tanh(x[j] / cap);
    x[j] = cap * t;
    if (d != nullptr) d[j] = 1.0 - t * t;
  }
}
inline void alibi_row(double* x, int64_t n, double m, double d0) {
  for (int64_t j = 0; j < n; ++j) x[j] -= m * std::fabs(d0 - static_cast<double>(j));
}
inline void softmax_grad_row(double* ds, const double* p, const double* dp, int64_t n, double d) {
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (dp[j] - d);
}
inline double dot_row(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}
inline double row_sum(const double* x, int64_t n) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}
inline void add_row(double* x, const double* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] += y[j];
}
inline void mask_bool_row(double* x, const uint8_t* keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] : -std::numeric_limits<double>::infinity();
}

// ---- element types ----
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// Load n elements of T into the accumulation type A, and back.
template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(src[j]);
}
template <>
inline void load_row<bf16, float>(const bf16* src, float* dst, int64_t n) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
}
template <>
inline void load_row<f16, float>(const f16* src, float* dst, int64_t n) {
  f16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
}

template <typename T, typename A>
inline void store_row(const A* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}
template <>
inline void store_row<bf16, float>(const float* src, bf16* dst, int64_t n) {
  f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}
template <>
inline void store_row<f16, float>(const float* src, f16* dst, int64_t n) {
  f32_to_f16(src, reinterpret_cast<uint16_t*>(dst), n);
}

// Scalar conversions (for strided or single elements).
float bf16_to_float(uint16_t h);
float f16_to_float(uint16_t h);

}  // namespace attention_ext::cpu

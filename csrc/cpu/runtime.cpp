// Implementation of runtime.h (compiled with -fopenmp so that
// at::parallel_for uses torch's own OpenMP pool).
#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "flash_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <type_traits>

namespace attention_ext::cpu {

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(b, e); });
}

int num_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

void run_jobs(const std::vector<double>& cost, const std::function<void(int64_t)>& fn) {
  const int64_t n = static_cast<int64_t>(cost.size()), nt = num_threads();
  if (nt <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  double total = 0;
  for (double c : cost) total += c;
  std::vector<int64_t> shared;
  for (int64_t i = 0; i < n; ++i)
    if (cost[i] > total / static_cast<double>(2 * nt)) {
      fn(i);
    } else {
      shared.push_back(i);
    }
  std::stable_sort(shared.begin(), shared.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  const int64_t ns = static_cast<int64_t>(shared.size());
  at::parallel_for(0, std::min<int64_t>(nt, ns), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < ns;) fn(shared[i]);
  });
}

void warm_up(DType dtype) {
  if (dtype == DType::kBFloat16) (void)bf16_path();
}

std::string describe_kernel(const char* what, const FwdParams& p, bool backward, bool weights) {
  const Blocks b = choose_blocks(p, backward);
  const char* path = "?";
  const bool rows = !backward && use_row_tile(p);
  switch (p.dtype) {
    case DType::kFloat32: path = "fp32 (BLAS tiles)"; break;
    case DType::kFloat64: path = "fp64 (BLAS tiles)"; break;
    case DType::kFloat16: path = "fp16 (fp32 BLAS tiles)"; break;
    case DType::kBFloat16:
      switch (bf16_path()) {
        case Bf16Path::kDot: path = "bf16 (AVX512-BF16 dot-product tiles)"; break;
        case Bf16Path::kMkl: path = "bf16 (BLAS bf16 GEMM tiles)"; break;
        case Bf16Path::kAmx: path = "bf16 (AMX tiles)"; break;
        default: path = "bf16 (fp32 BLAS tiles)"; break;
      }
      break;
    default: break;
  }
  std::string grouped;
  if (rows) {
    path = "short query rows (keys and values read in place)";
    const int64_t ng = weights ? 1 : row_group_heads(p);
    if (ng > 1) grouped = ", a GQA group's heads " + std::to_string(ng) + " per block";
  }
  return std::string(what) + ": flash kernel, " + path + grouped + ", blocks " + std::to_string(b.q) + "x" +
         std::to_string(b.k);
}

Blocks choose_blocks(const FwdParams& p, bool backward) {
  // ATTENTION_EXT_CPU_BLOCKS="q,k" overrides (for tuning).
  static const char* env_fwd = std::getenv("ATTENTION_EXT_CPU_BLOCKS");
  static const char* env_bwd = std::getenv("ATTENTION_EXT_CPU_BLOCKS_BWD");
  const char* env = backward ? env_bwd : env_fwd;
  if (env != nullptr) {
    long q = 0, k = 0;
    if (std::sscanf(env, "%ld,%ld", &q, &k) == 2 && q > 0 && k > 0) return {q, k};
  }
  // Measured on a 2-core Zen 4 (benchmarks/NOTES.md): large key blocks amortise
  // the BLAS calls; causal/windowed rows want small query blocks (the diagonal
  // block wastes ~block_q / L of the work); the backward's P^T dO and dS^T Q
  // products have k = block_q, so it prefers 128 x 128.
  if (backward) return {128, 128};
  const bool banded = p.window_left != kNoBound || p.window_right != kNoBound;
  int64_t q = banded ? 64 : 128;
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  while (q > 16 && p.batch * p.heads_q * ((p.len_q + q - 1) / q) < want) q /= 2;
  return {q, 512};
}

Bf16Path bf16_path_requested() {
  // ATTENTION_EXT_CPU_BF16=amx|dot|mkl|blas|auto (default auto), read once like the
  // block overrides above; unlike them a bad value is an error, not ignored:
  // a typo would otherwise silently benchmark the wrong path.
  static const char* env = std::getenv("ATTENTION_EXT_CPU_BF16");
  if (env == nullptr || std::strcmp(env, "") == 0 || std::strcmp(env, "auto") == 0) return Bf16Path::kAuto;
  if (std::strcmp(env, "dot") == 0) return Bf16Path::kDot;
  if (std::strcmp(env, "blas") == 0) return Bf16Path::kBlas;
  if (std::strcmp(env, "mkl") == 0) return Bf16Path::kMkl;
  if (std::strcmp(env, "amx") == 0) return Bf16Path::kAmx;
  TORCH_CHECK_VALUE(false, "ATTENTION_EXT_CPU_BF16 must be 'amx', 'dot', 'mkl', 'blas' or 'auto' (the default), got '",
                    env, "'");
}

// BLAS: the Fortran interface (sgemm_/dgemm_, LP64) that torch's own CPU
// build exports (MKL on x86-64 wheels, OpenBLAS elsewhere), resolved weakly at
// load time. Without one, a plain blocked loop keeps everything correct.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's extension (CBLAS enums as int: row-major 101, no-trans 111, trans 112; MKL_BF16 = uint16_t)
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int) __attribute__((weak));
}

namespace {

// Column-major C[m x n] = alpha * op(A) op(B) + beta * C.
template <typename A>
void colmajor_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
                   int64_t ldb, A beta, A* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_ != nullptr && k > 0) return sgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    if (dgemm_ != nullptr && k > 0) return dgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  }
  for (int64_t j = 0; j < n; ++j) {
    A* cj = c + j * ldc;
    for (int64_t i = 0; i < m; ++i) cj[i] = beta == A(0) ? A(0) : beta * cj[i];
    for (int64_t l = 0; l < k; ++l) {
      const A blj = alpha * (tb ? b[j + l * ldb] : b[l + j * ldb]);
      if (ta) {
        for (int64_t i = 0; i < m; ++i) cj[i] += a[l + i * lda] * blj;
      } else {
        const A* al = a + l * lda;
        for (int64_t i = 0; i < m; ++i) cj[i] += al[i] * blj;
      }
    }
  }
}

}  // namespace

// A row-major X (r x c, ld) is the column-major X^T.
// C = A B^T  <=>  C^T = B A^T : first operand B^T stored as (k x n), transposed.
template <typename A>
void gemm_nt(int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
             int64_t ldb, A beta, A* c, int64_t ldc) {
  colmajor_gemm<A>(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C = A B  <=>  C^T = B^T A^T
template <typename A>
void gemm_nn(int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
             int64_t ldb, A beta, A* c, int64_t ldc) {
  colmajor_gemm<A>(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C = A^T B  <=>  C^T = B^T A
template <typename A>
void gemm_tn(int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
             int64_t ldb, A beta, A* c, int64_t ldc) {
  colmajor_gemm<A>(false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

bool bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

void gemm_bf16_rowmajor(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                        const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C, without asking the BLAS about an empty product
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(m), static_cast<int>(n),
                         static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
                         static_cast<int>(ldc));
}

#define AE_INSTANTIATE_GEMM(A)                                                                   \
  template void gemm_nt<A>(int64_t, int64_t, int64_t, A, const A*, int64_t, const A*, int64_t, A, \
                           A*, int64_t);                                                          \
  template void gemm_nn<A>(int64_t, int64_t, int64_t, A, const A*, int64_t, const A*, int64_t, A, \
                           A*, int64_t);                                                          \
  template void gemm_tn<A>(int64_t, int64_t, int64_t, A, const A*, int64_t, const A*, int64_t, A, \
                           A*, int64_t);
AE_INSTANTIATE_GEMM(float)
AE_INSTANTIATE_GEMM(double)

}  // namespace attention_ext::cpu

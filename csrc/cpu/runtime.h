// What the torch-free CPU kernels need from the outside world: a thread pool
// and a BLAS. Implemented in runtime.cpp on top of ATen's parallel_for and
// cpublas (MKL or OpenBLAS, whichever torch was built with), so the kernels use
// the same threads as the rest of torch and do not oversubscribe.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace attention_ext::cpu {

// Runs fn(begin, end) over [0, n) in at most num_threads() contiguous chunks (inline, in one chunk, when
// called from inside a parallel region).
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);
// The threads a kernel called now can use: 1 inside a parallel region (its parallel_for runs inline there).
int num_threads();
// Runs fn(i) for every independent job i (the sequences of a variable-length call), cost[i] its relative work:
// jobs worth more than a thread's fair share run one after another, each on every thread (their kernels'
// own parallel_for); the rest share one parallel region, handed out dynamically, costliest first, each
// running on one thread.
void run_jobs(const std::vector<double>& cost, const std::function<void(int64_t)>& fn);

// Row-major GEMMs on contiguous-row matrices (leading dimensions in elements):
//   gemm_nt: C[m x n] = alpha * A[m x k] * B[n x k]^T + beta * C
//   gemm_nn: C[m x n] = alpha * A[m x k] * B[k x n]   + beta * C
//   gemm_tn: C[m x n] = alpha * A[k x m]^T * B[k x n] + beta * C
template <typename A>
void gemm_nt(int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
             int64_t ldb, A beta, A* c, int64_t ldc);
template <typename A>
void gemm_nn(int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
             int64_t ldb, A beta, A* c, int64_t ldc);
template <typename A>
void gemm_tn(int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
             int64_t ldb, A beta, A* c, int64_t ldc);

// bfloat16 x bfloat16 -> float GEMM of the BLAS (MKL's cblas_gemm_bf16bf16f32, which runs on AMX
// tiles where the CPU has them), row-major, operands as raw bf16 bits:
//   C[m x n] = alpha * A[m x k] * op(B) + beta * C,  op(B) = B[k x n] or, with trans_b, B[n x k]^T.
// Products are exact and accumulate in fp32. Only when bf16_gemm_available() (torch built with MKL).
bool bf16_gemm_available();
void gemm_bf16_rowmajor(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                        const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace attention_ext::cpu

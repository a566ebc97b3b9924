// bfloat16 products on AVX512-BF16 (see gemm_bf16.cpp). Operands are raw
// bfloat16 bit patterns (uint16_t); the B operand is pre-packed in pairs of
// k ("VNNI" layout): word [p][j] = (B[2p][j] | B[2p+1][j] << 16), zero-padded
// when k is odd.
#pragma once

#include <cstdint>

namespace attention_ext::cpu {

// True when this CPU has AVX512-BF16 (then the functions below may be used).
bool bf16_dot_available();

// B given as its k x n row-major rows (ld ldb) -> packed[(k+1)/2][n], packed rows ldp >= n words apart
void pack_rows_bf16(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, uint32_t* packed, int64_t ldp);
// B = Bt^T with Bt given as n x k row-major rows (ld ldbt) -> packed[(k+1)/2][n], rows ldp >= n words apart
void pack_trans_bf16(const uint16_t* bt, int64_t ldbt, int64_t n, int64_t k, uint32_t* packed, int64_t ldp);

// C[m x n] (float, ldc) = alpha * A[m x k] * B (+ C when accumulate).
// A: bf16 rows (ld lda, unit stride along k); B: packed as above with row length ldp.
void gemm_bf16_packed(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                      const uint32_t* bp, int64_t ldp, bool accumulate, float* c, int64_t ldc);

}  // namespace attention_ext::cpu

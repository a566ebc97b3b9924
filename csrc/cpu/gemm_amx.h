// bfloat16 x bfloat16 -> float32 matrix products on AMX tiles (TDPBF16PS), for
// the CPUs that have them (Sapphire Rapids and later Xeons). A as bf16 rows, B
// packed in pairs of k as for gemm_bf16_packed (gemm_bf16.h) but blocked by 16
// columns, so that a B tile is 1 KB of contiguous memory, and everything padded
// so that whole 16 x 32 (A) / 16 x 16 (B) tiles can be read:
//   - A: round_up(m, 16) readable rows (ld lda >= kp), columns [k, kp) zero,
//     kp = round_up(k, 32);
//   - B: ceil(n / 16) column groups of kp / 2 packed rows of 16 words each,
//     group g holding columns 16 g .. 16 g + 15 (pack with ldp = 16 per group);
//     rows [(k + 1) / 2, kp / 2) of each group zero (finite is not enough: they
//     meet A's zeros); columns past n may hold anything (their results are dropped).
// Only the m x n block of C is written, unless c_whole_tiles says that C has
// round_up(m, 16) rows of round_up(n, 16) writable columns: then, with alpha = 1
// and no accumulation, the tiles are stored straight into C (no scratch and
// scaling pass) and the padding rows / columns of C receive garbage.
#pragma once

#include <cstdint>

namespace attention_ext::cpu {

// True when this CPU has AMX-BF16 (and AVX512-BF16), the OS keeps tile state,
// and the process was granted it (arch_prctl, asked once here).
bool amx_available();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[m x n] (float, ldc) = alpha * A[m x k] * B (+ C when accumulate).
void gemm_bf16_amx(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint32_t* bp,
                   bool accumulate, float* c, int64_t ldc, bool c_whole_tiles = false);

// Packs into that layout: B = Bt^T from n x k rows of Bt (ld ldbt), or B from k x n rows (ld ldb);
// writes rows [0, (k + 1) / 2) of each of the ceil(n / 16) groups (kp / 2 rows apart).
void pack_trans_amx(const uint16_t* bt, int64_t ldbt, int64_t n, int64_t k, uint32_t* packed);
void pack_rows_amx(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, uint32_t* packed);

}  // namespace attention_ext::cpu

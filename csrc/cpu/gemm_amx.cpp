// AMX tile products (see gemm_amx.h). C is computed in blocks of up to 2 x 2
// tiles of 16 x 16 floats (tiles 0-3), from two A tiles (16 rows x 32 bf16,
// tiles 4-5) and two B tiles (16 packed rows x 16 columns, 1 KB each, contiguous
// in the blocked packing; tiles 6-7) per step of 32 along k. Each block goes
// through a scratch tile, scaled / added into C for its valid rows and columns
// only, or, where C takes whole tiles (c_whole_tiles, alpha = 1, no
// accumulation), straight into C. Compiled for the AMX target only and used
// after the runtime check.
#include "gemm_amx.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "gemm_bf16.h"
#define AE_HAVE_AMX 1
#define AE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
#else
#define AE_HAVE_AMX 0
#endif

namespace attention_ext::cpu {

#if AE_HAVE_AMX
namespace {

// Linux: tile data is an extended state a process must ask for (arch_prctl
// ARCH_REQ_XCOMP_PERM, feature 18 XTILEDATA) before its first tile instruction.
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

bool cpu_and_os_have_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile || !bf16_dot_available()) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3u) != 3u) return false;  // XCR0: XTILECFG and XTILEDATA enabled by the OS
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One block of MR x NR tiles of C at (i0, j0): valid rows mr <= 16 MR, columns nc <= 16 NR.
// B: the blocked packing of gemm_amx.h from the block's first column group on.
// direct: C = A B into whole tiles of C (see gemm_amx.h), no scratch, no epilogue.
template <int MR, int NR>
AE_AMX_TARGET void block(int64_t kp, float alpha, const uint16_t* a, int64_t lda, const uint32_t* bp, int64_t mr,
                         int64_t nc, bool accumulate, bool direct, float* c, int64_t ldc) {
  _tile_zero(0);
  if constexpr (NR == 2) _tile_zero(1);
  if constexpr (MR == 2) _tile_zero(2);
  if constexpr (MR == 2 && NR == 2) _tile_zero(3);
  const int64_t sa = lda * 2, group = kp / 2 * 16;  // words per column group
  for (int64_t kk = 0; kk < kp; kk += 32) {
    const uint32_t* b = bp + (kk / 2) * 16;
    _tile_loadd(4, a + kk, sa);
    _tile_loadd(6, b, 64);
    if constexpr (NR == 2) _tile_loadd(7, b + group, 64);
    if constexpr (MR == 2) _tile_loadd(5, a + 16 * lda + kk, sa);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NR == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MR == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MR == 2 && NR == 2) _tile_dpbf16ps(3, 5, 7);
  }
  if (direct) {
    const int64_t sc = ldc * 4;
    _tile_stored(0, c, sc);
    if constexpr (NR == 2) _tile_stored(1, c + 16, sc);
    if constexpr (MR == 2) _tile_stored(2, c + 16 * ldc, sc);
    if constexpr (MR == 2 && NR == 2) _tile_stored(3, c + 16 * ldc + 16, sc);
    return;
  }
  alignas(64) float out[4][16 * 16];
  _tile_stored(0, out[0], 64);
  if constexpr (NR == 2) _tile_stored(1, out[1], 64);
  if constexpr (MR == 2) _tile_stored(2, out[2], 64);
  if constexpr (MR == 2 && NR == 2) _tile_stored(3, out[3], 64);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int ti = 0; ti < MR; ++ti) {
    for (int tj = 0; tj < NR; ++tj) {
      const int64_t cols = nc - 16 * tj;
      if (cols <= 0) continue;
      const __mmask16 mask = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
      const float* o = out[ti * 2 + tj];
      for (int64_t r = 0; r < 16 && 16 * ti + r < mr; ++r) {
        float* cr = c + (16 * ti + r) * ldc + 16 * tj;
        __m512 v = _mm512_mul_ps(_mm512_load_ps(o + 16 * r), va);
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, cr));
        _mm512_mask_storeu_ps(cr, mask, v);
      }
    }
  }
}

}  // namespace

bool amx_available() {
  static const bool ok = cpu_and_os_have_amx();
  return ok;
}

void pack_trans_amx(const uint16_t* bt, int64_t ldbt, int64_t n, int64_t k, uint32_t* packed) {
  const int64_t group = round_up(k, 32) / 2 * 16;
  for (int64_t j0 = 0; j0 < n; j0 += 16)
    pack_trans_bf16(bt + j0 * ldbt, ldbt, std::min<int64_t>(16, n - j0), k, packed + (j0 / 16) * group, 16);
}

void pack_rows_amx(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, uint32_t* packed) {
  const int64_t group = round_up(k, 32) / 2 * 16;
  for (int64_t j0 = 0; j0 < n; j0 += 16)
    pack_rows_bf16(b + j0, ldb, k, std::min<int64_t>(16, n - j0), packed + (j0 / 16) * group, 16);
}

AE_AMX_TARGET void gemm_bf16_amx(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                                 const uint32_t* bp, bool accumulate, float* c, int64_t ldc, bool c_whole_tiles) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, n * sizeof(float));
    return;
  }
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t kp = round_up(k, 32);
  const bool direct = c_whole_tiles && alpha == 1.f && !accumulate;
  // columns outer: a 32-column panel of B (two groups, 2 x kp / 2 x 16 words) stays in L1 while every row
  // block of A passes over it; the whole A (at most 128 x 128 bf16 here) fits L1 besides
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t nc = std::min<int64_t>(32, n - j0);
    const uint32_t* bj = bp + (j0 / 16) * (kp / 2 * 16);
    for (int64_t i0 = 0; i0 < m; i0 += 32) {
      const int64_t mr = std::min<int64_t>(32, m - i0);
      const uint16_t* ai = a + i0 * lda;
      float* cij = c + i0 * ldc + j0;
      if (mr > 16) {
        if (nc > 16) block<2, 2>(kp, alpha, ai, lda, bj, mr, nc, accumulate, direct, cij, ldc);
        else block<2, 1>(kp, alpha, ai, lda, bj, mr, nc, accumulate, direct, cij, ldc);
      } else {
        if (nc > 16) block<1, 2>(kp, alpha, ai, lda, bj, mr, nc, accumulate, direct, cij, ldc);
        else block<1, 1>(kp, alpha, ai, lda, bj, mr, nc, accumulate, direct, cij, ldc);
      }
    }
  }
  _tile_release();
}

#else
bool amx_available() { return false; }
void pack_trans_amx(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*) {}
void pack_rows_amx(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*) {}
void gemm_bf16_amx(int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint32_t*, bool, float*, int64_t,
                   bool) {}
#endif

}  // namespace attention_ext::cpu

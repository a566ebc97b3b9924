// Flash-style attention on the CPU (torch-free templates; one instantiation per
// element type, see flash_cpu_<dtype>.cpp).
//
// Forward: each task owns (batch, query head, block of kBlockQ query rows) and
// walks the visible key blocks with an online softmax, so per thread memory is
// O((kBlockQ + kBlockK) * head_dim) and the L x S matrix never exists.
//
// Backward: each task owns (batch, kv head, chunk of key blocks). For a key
// block it loops over every query head of its GQA group and every query block
// that can see the key block, recomputes P from the saved log-sum-exp, and
// accumulates dK/dV in registers-sized buffers it alone writes. dQ goes into a
// private fp32 buffer per task; when key blocks are split over several tasks
// (few batch x heads, many threads) the partial dQs are summed in a fixed
// order afterwards. No atomics anywhere, so the backward is deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "../attention_params.h"
#include "../philox.h"
#include "runtime.h"
#include "gemm_amx.h"
#include "gemm_bf16.h"
#include "vec_ops.h"

namespace attention_ext::cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The running maximum of a softmax row after a new tile of scores: -inf while nothing is visible, and
// NaN when the row so far holds only NaN scores (row_max skips NaN, so without the check such a row
// would look fully masked and give 0 where PyTorch gives NaN). A NaN maximum stays NaN.
template <typename A>
inline A running_max(A m, const A* s, int64_t n) {
  const A mnew = std::max(m, row_max(s, n));
  if (mnew != -std::numeric_limits<A>::infinity()) return mnew;
  for (int64_t j = 0; j < n; ++j)
    if (s[j] != s[j]) return std::numeric_limits<A>::quiet_NaN();
  return mnew;
}

// Per-thread buffers that the kernels write before they read them: allocated without the zero-fill of a
// std::vector (a score tile of 128 x 512 floats per thread and call was 8% of a short call's time),
// or zero-filled when asked (padding that must stay zero). Aligned to 64 bytes, a cache line: operator new
// aligns to 16 only, and a large block (mmap'ed by malloc) then starts 16 bytes into a page, so that
// every 64-byte row load of AVX-512 and AMX straddled two lines (benchmarks/NOTES.md, entry 21).
struct AlignedFree {
  void operator()(void* x) const { std::free(x); }
};
inline void* alloc64(size_t bytes) {
  void* x = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (x == nullptr) throw std::bad_alloc();
  return x;
}
// std::vector's allocator with the same alignment (the tiles' operand copies and packed blocks).
template <typename T>
struct Align64 {
  using value_type = T;
  Align64() = default;
  template <typename U>
  Align64(const Align64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(alloc64(n * sizeof(T))); }
  void deallocate(T* x, size_t) { std::free(x); }
  template <typename U>
  bool operator==(const Align64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Align64<U>&) const { return false; }
};
template <typename T>
using AVec = std::vector<T, Align64<T>>;
template <typename T>
struct Scratch {
  static_assert(std::is_trivial_v<T>, "Scratch holds plain numbers");
  std::unique_ptr<T[], AlignedFree> p;
  int64_t n_ = 0;
  explicit Scratch(int64_t n = 0, bool zero = false) { resize(n, zero); }
  void resize(int64_t n, bool zero = false) {
    n_ = std::max<int64_t>(n, 0);
    if (n <= 0) {
      p.reset();
      return;
    }
    T* x = static_cast<T*>(alloc64(static_cast<size_t>(n) * sizeof(T)));
    if (zero) std::memset(static_cast<void*>(x), 0, static_cast<size_t>(n) * sizeof(T));
    p.reset(x);
  }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
  bool empty() const { return !p; }
  int64_t size() const { return n_; }
};

// Tile sizes: query rows per task, key rows per step (see choose_blocks in runtime.cpp).
struct Blocks {
  int64_t q, k;
};
Blocks choose_blocks(const FwdParams& p, bool backward);

// The bfloat16 product path (forward and backward; attention_probs always uses
// BlasTile): AMX tiles (Bf16AmxTile), the AVX512-BF16 dot-product tiles
// (Bf16DotTile), the BLAS's bf16 GEMM (Bf16GemmTile: MKL, itself on AMX where
// the CPU has it) or fp32 copies through the BLAS (BlasTile<bf16>).
// ATTENTION_EXT_CPU_BF16=amx|dot|mkl|blas|auto (default auto), read once
// (runtime.cpp); a bad value throws an error naming the variable. amx, dot and
// mkl fall back to the fp32 BLAS path where they are not available.
enum class Bf16Path { kAuto, kDot, kBlas, kMkl, kAmx };
Bf16Path bf16_path_requested();
// The path in use (never kAuto), decided at the first bfloat16 call and cached
// for the process: auto times one forward tile step through every available
// path (flash_cpu_bf16.cpp) because which is fastest depends on the CPU (NOTES 3, 7, 8, 12).
Bf16Path bf16_path();

inline int64_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kBool: return 1;
  }
  return 1;
}

template <typename A>
inline A mask_value(const char* ptr, DType d) {
  switch (d) {
    case DType::kFloat32: return static_cast<A>(*reinterpret_cast<const float*>(ptr));
    case DType::kFloat64: return static_cast<A>(*reinterpret_cast<const double*>(ptr));
    case DType::kFloat16: return static_cast<A>(f16_to_float(*reinterpret_cast<const uint16_t*>(ptr)));
    case DType::kBFloat16: return static_cast<A>(bf16_to_float(*reinterpret_cast<const uint16_t*>(ptr)));
    case DType::kBool: return *ptr ? A(0) : -std::numeric_limits<A>::infinity();
  }
  return A(0);
}

// Logit soft-capping (FwdParams::softcap) of a tile of scaled scores S[rows x cols] (row stride ld), before
// the mask: x = cap tanh(x / cap). With dcap (same layout), also the cap's derivative 1 - tanh^2 there, the
// backward's factor from dS to the scores. Nothing when softcap is 0.
template <typename A>
void softcap_tile(const FwdParams& p, A* S, int64_t rows, int64_t cols, int64_t ld, A* dcap = nullptr) {
  if (p.softcap <= 0.0) return;
  for (int64_t r = 0; r < rows; ++r)
    softcap_row(S + r * ld, cols, static_cast<A>(p.softcap), dcap == nullptr ? nullptr : dcap + r * ld);
}

// Applies the sliding window / causal bounds, the ALiBi bias and the explicit mask to a tile of
// scores S[nq x nk] (row stride lds) for query rows i0.., key columns j0...
template <typename A>
void mask_tile(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
               int64_t nk, A* S, int64_t lds, A* tmp) {
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t esize = dtype_size(p.mask_dtype);
  const Strides4& ms = p.mask_stride;
  MaskKind kind = p.mask_kind;
  // A boolean mask that is the same for every row (a key-padding mask broadcast over queries) and keeps
  // every key of this tile has nothing to do: one scan of its bytes per tile instead of one per row.
  if (kind == MaskKind::kBool && ms.r == 0 && (ms.c == 1 || ms.c == 0)) {
    const char* row = static_cast<const char*>(p.mask) + b * ms.b + h * ms.h + j0 * ms.c;
    if (ms.c == 1 ? std::memchr(row, 0, static_cast<size_t>(nk)) == nullptr : *row != 0) kind = MaskKind::kNone;
  }
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t i = i0 + r;
    A* s = S + r * lds;
    int64_t lo, hi;
    key_range(p, i, lo, hi);
    for (int64_t j = j0; j < std::min(lo, j0 + nk); ++j) s[j - j0] = ninf;
    for (int64_t j = std::max(hi, j0); j < j0 + nk; ++j) s[j - j0] = ninf;
    if (p.alibi_slopes != nullptr) {  // -m |i + S - L - j|, after the soft cap and before the mask
      // d0: the distance to the tile's first key
      alibi_row(s, nk, static_cast<A>(alibi_slope(p, b, h)), static_cast<A>(i + p.len_k - p.len_q - j0));
    }
    if (kind == MaskKind::kNone) continue;
    const char* base = static_cast<const char*>(p.mask) + (b * ms.b + h * ms.h + i * ms.r + j0 * ms.c) * esize;
    if (kind == MaskKind::kBool) {
      if (ms.c == 1) {
        mask_bool_row(s, reinterpret_cast<const uint8_t*>(base), nk);
      } else {
        for (int64_t j = 0; j < nk; ++j) s[j] = base[j * ms.c] ? s[j] : ninf;
      }
      continue;
    }
    if constexpr (std::is_same_v<A, float>) {
      if (ms.c == 1 && p.mask_dtype != DType::kFloat64) {
        const float* m = reinterpret_cast<const float*>(base);
        if (p.mask_dtype == DType::kBFloat16) {
          bf16_to_f32(reinterpret_cast<const uint16_t*>(base), tmp, nk);
          m = tmp;
        } else if (p.mask_dtype == DType::kFloat16) {
          f16_to_f32(reinterpret_cast<const uint16_t*>(base), tmp, nk);
          m = tmp;
        }
        add_row(s, m, nk);
        continue;
      }
    }
    for (int64_t j = 0; j < nk; ++j) s[j] += mask_value<A>(base + j * ms.c * esize, p.mask_dtype);
  }
}

// x[j] *= keep(bh, i, j0 + j) / (1 - p), else 0.
template <typename A>
void dropout_row(const DropoutRng& rng, uint64_t bh, int64_t i, int64_t j0, int64_t nk, A* x) {
  const A inv = static_cast<A>(rng.inv_keep);
  int64_t j = j0;
  const int64_t end = j0 + nk;
  while (j < end) {
    uint32_t bits = rng.keep4(bh, static_cast<uint64_t>(i), static_cast<uint64_t>(j >> 2));
    for (int64_t t = j & 3; t < 4 && j < end; ++t, ++j) x[j - j0] = ((bits >> t) & 1u) ? x[j - j0] * inv : A(0);
  }
}

// Union [lo, hi) of the visible key ranges of rows i0 .. i0 + nq - 1
// (both bounds are non-decreasing in i).
inline void block_key_range(const FwdParams& p, int64_t i0, int64_t nq, int64_t& lo, int64_t& hi) {
  int64_t l0, h0, l1, h1;
  key_range(p, i0, l0, h0);
  key_range(p, i0 + nq - 1, l1, h1);
  lo = l0;
  hi = std::max(h1, l0);
}

// What a hidden mask element looks like: a false byte of a boolean mask, -inf in an additive one (its
// element size and bit pattern; `word`: 8 bytes of hidden elements). Anything else can be visible (NaN
// included: it must reach the scores).
struct HiddenKey {
  int64_t esize = 1;
  uint64_t elem = 0, word = 0;
};
inline HiddenKey hidden_key(const FwdParams& p) {
  HiddenKey k;
  if (p.mask_kind == MaskKind::kBool) return k;
  k.esize = dtype_size(p.mask_dtype);
  switch (p.mask_dtype) {
    case DType::kFloat64: k.elem = 0xFFF0000000000000ull; break;
    case DType::kFloat32: k.elem = 0xFF800000ull; break;
    case DType::kBFloat16: k.elem = 0xFF80ull; break;
    default: k.elem = 0xFC00ull; break;  // float16
  }
  for (int64_t i = 0; i < 8; i += k.esize) k.word |= k.elem << (8 * i);
  return k;
}
inline bool is_hidden(const char* x, const HiddenKey& k) {
  uint64_t v = 0;
  std::memcpy(&v, x, static_cast<size_t>(k.esize));
  return v == k.elem;
}

// First element index in [s, e) of a mask row (elements k.esize bytes, contiguous) that is not hidden (e if
// none), and one past the last (s if none), 8 bytes at a time.
inline int64_t first_visible(const char* row, int64_t s, int64_t e, const HiddenKey& k) {
  const int64_t per = 8 / k.esize;
  for (uint64_t w; s + per <= e; s += per) {
    std::memcpy(&w, row + s * k.esize, 8);
    if (w != k.word) break;
  }
  for (; s < e; ++s)
    if (!is_hidden(row + s * k.esize, k)) return s;
  return e;
}
inline int64_t end_visible(const char* row, int64_t s, int64_t e, const HiddenKey& k) {
  const int64_t per = 8 / k.esize;
  for (uint64_t w; e - per >= s; e -= per) {
    std::memcpy(&w, row + (e - per) * k.esize, 8);
    if (w != k.word) break;
  }
  for (; e > s; --e)
    if (!is_hidden(row + (e - 1) * k.esize, k)) return e;
  return s;
}

// The same, narrowed by a mask to the keys some row of the block can see: the tiles that a boolean mask
// (false) or an additive one (-inf) hides from every row (padding, the upper triangle of a causal mask
// given as a tensor, as Hugging Face models and nn.Transformer's generate_square_subsequent_mask give them)
// are never computed; their probabilities and gradients (the float mask's too) are 0. An empty range
// (every key hidden) gives lo = hi. Rows are scanned from the ends inwards, the last row first (for a
// causal mask it sees the most), each stopping where the union so far begins.
inline void block_key_range(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t& lo,
                            int64_t& hi) {
  block_key_range(p, i0, nq, lo, hi);
  if (p.mask_kind == MaskKind::kNone || lo >= hi) return;
  const HiddenKey key = hidden_key(p);
  const Strides4& ms = p.mask_stride;
  const char* base = static_cast<const char*>(p.mask) + (b * ms.b + h * ms.h) * key.esize;
  int64_t ulo = hi, uhi = lo;  // union of the rows' visible ranges, empty so far
  for (int64_t r = (ms.r == 0 ? 0 : nq - 1); r >= 0; --r) {
    const char* row = base + (i0 + r) * ms.r * key.esize;
    if (ms.c == 1) {
      uhi = std::max(uhi, end_visible(row, std::max(uhi, lo), hi, key));
      ulo = std::min(ulo, first_visible(row, lo, std::min(ulo, hi), key));
    } else if (ms.c == 0) {
      if (!is_hidden(row, key)) ulo = lo, uhi = hi;
    } else {
      const int64_t step = ms.c * key.esize;
      int64_t e = hi, f = lo;
      while (e > std::max(uhi, lo) && is_hidden(row + (e - 1) * step, key)) --e;
      while (f < std::min(ulo, hi) && is_hidden(row + f * step, key)) ++f;
      uhi = std::max(uhi, e);
      ulo = std::min(ulo, f);
    }
    if (ulo == lo && uhi == hi) break;
  }
  if (ulo >= uhi) {
    hi = lo;
  } else {
    lo = ulo;
    hi = uhi;
  }
}

// Rows j0 .. j0 + n - 1 of the keys (or values: base p.v, strides p.v_stride) of batch b, key head hk, as one
// block of rows s.r apart: base's rows, or with a paged cache (FwdParams::block_table) the rows of j0's page,
// n then cut at the page's end.
template <typename T>
inline const T* kv_rows(const FwdParams& p, const void* base, const Strides4& s, int64_t b, int64_t hk, int64_t j0,
                        int64_t& n) {
  const T* x = static_cast<const T*>(base) + hk * s.h;
  if (p.block_table == nullptr) return x + b * s.b + j0 * s.r;
  const int64_t page = p.block_table[b * p.block_table_stride + j0 / p.page_size], r = j0 % p.page_size;
  n = std::min(n, p.page_size - r);
  return x + page * s.b + r * s.r;
}

// The same rows as one block whatever the pages: in place (kv_rows, n cut at a page's end) without a buffer, or
// with one (buf: n x cols) copied there page by page when they span pages, so that a tile of a small-page
// cache is as wide as any other (ld: the block's row stride).
template <typename T>
inline const T* kv_tile(const FwdParams& p, const void* base, const Strides4& s, int64_t b, int64_t hk, int64_t j0,
                        int64_t& n, int64_t cols, T* buf, int64_t& ld) {
  ld = s.r;
  if (buf == nullptr) return kv_rows<T>(p, base, s, b, hk, j0, n);
  for (int64_t j = j0; j < j0 + n;) {
    int64_t m = j0 + n - j;
    const T* src = kv_rows<T>(p, base, s, b, hk, j, m);
    for (int64_t r = 0; r < m; ++r) std::memcpy(buf + (j - j0 + r) * cols, src + r * s.r, cols * sizeof(T));
    j += m;
  }
  ld = cols;
  return buf;
}

template <typename T, typename A>
inline void load_rows(const T* base, int64_t row_stride, int64_t nrows, int64_t ncols, A* dst) {
  for (int64_t r = 0; r < nrows; ++r) load_row<T, A>(base + r * row_stride, dst + r * ncols, ncols);
}

// ---- The matrix products of one (query block, key block) tile ----
//
// BlasTile converts the operands to the accumulation type and calls the BLAS
// (exact fp32/fp64 arithmetic). Bf16DotTile (bfloat16 on CPUs with
// AVX512-BF16, where bf16_path() picks it) keeps the operands in bfloat16 and uses the dot-product tiles
// of gemm_bf16.cpp for the products of two bf16 tensors (QK^T, PV, dO V^T);
// the forward rounds P to bfloat16 before PV, as every bf16 flash kernel does.
template <typename T>
struct BlasTile {
  using A = acc_t<T>;
  // An operand: rows `ld` apart. Read in place when T is already the
  // accumulation type and its rows are a valid BLAS leading dimension;
  // otherwise converted into `buf` (rows `cols` apart), allocated at its first use (float32 / float64
  // inputs in the usual layouts never need it).
  struct Operand {
    Scratch<A> buf;
    const A* ptr = nullptr;
    int64_t ld = 0;
    void load(const T* x, int64_t row_stride, int64_t rows, int64_t cols) {
      if constexpr (std::is_same_v<T, A>) {
        if (row_stride >= cols || rows <= 1) {
          ptr = x;
          ld = std::max<int64_t>(row_stride, cols);
          return;
        }
      }
      if (buf.size() < rows * cols) buf.resize(rows * cols);
      load_rows(x, row_stride, rows, cols, buf.data());
      ptr = buf.data();
      ld = cols;
    }
  };
  int64_t E, Ev, nq = 0, nk = 0;
  Operand q, dout, k, v;
  BlasTile(int64_t E_, int64_t Ev_, int64_t, int64_t, bool) : E(E_), Ev(Ev_) {}
  void load_q(const T* x, int64_t ld, int64_t n) { nq = n; q.load(x, ld, n, E); }
  void load_do(const T* x, int64_t ld, int64_t n) { dout.load(x, ld, n, Ev); }
  void load_k(const T* x, int64_t ld, int64_t n) { nk = n; k.load(x, ld, n, E); }
  void load_v(const T* x, int64_t ld, int64_t n) { v.load(x, ld, n, Ev); }
  // S[nq x nk] = scale * Q K^T
  void qk(A scale, A* S, int64_t lds) { gemm_nt<A>(nq, nk, E, scale, q.ptr, q.ld, k.ptr, k.ld, A(0), S, lds); }
  // acc[nq x Ev] += P V
  void pv(const A* P, int64_t lds, A* acc) { gemm_nn<A>(nq, Ev, nk, A(1), P, lds, v.ptr, v.ld, A(1), acc, Ev); }
  // dP[nq x nk] = dO V^T
  void dov(A* dP, int64_t lds) { gemm_nt<A>(nq, nk, Ev, A(1), dout.ptr, dout.ld, v.ptr, v.ld, A(0), dP, lds); }
  // dV[nk x Ev] += P^T dO
  void dv(const A* P, int64_t lds, A* dv) { gemm_tn<A>(nk, Ev, nq, A(1), P, lds, dout.ptr, dout.ld, A(1), dv, Ev); }
  // dK[nk x E] += scale dS^T Q
  void dk(const A* dS, int64_t lds, A scale, A* dk) {
    gemm_tn<A>(nk, E, nq, scale, dS, lds, q.ptr, q.ld, A(1), dk, E);
  }
  // dQ[nq x E] (row stride E) += scale dS K
  void dq(const A* dS, int64_t lds, A scale, A* dq) {
    gemm_nn<A>(nq, E, nk, scale, dS, lds, k.ptr, k.ld, A(1), dq, E);
  }
};

// What the two bf16-operand tiles share: the backward's products with an fp32 P
// or dS (P^T dO, dS^T Q, dS K). A single bf16 rounding of P or dS costs ~10x
// PyTorch's error (the gradients sum terms that cancel), so these run in fp32
// through the BLAS on fp32 copies of Q, dO, K. That is at least as fast as two
// bf16 products with P and dS split into hi + lo terms (as fast on Zen 4, ~2x
// faster where the BLAS runs AVX-512: benchmarks/NOTES.md, entry 7), needs no
// transpose of P or dS, and is exact in fp32.
struct Bf16TileBase {
  using A = float;
  int64_t E, Ev, nq = 0, nk = 0;
  bool backward;
  // Forward: the softmax wrote this key block's P as bf16 into the tile (p_row, exp_sub_sum_bf16), so pv
  // has no conversion to do; cleared by pv.
  bool p_ready = false;
  AVec<float> qf, dof, kf;
  Bf16TileBase(int64_t E_, int64_t Ev_, int64_t bq, int64_t bk, bool bwd)
      : E(E_), Ev(Ev_), backward(bwd), qf(bwd ? bq * E_ : 0), dof(bwd ? bq * Ev_ : 0), kf(bwd ? bk * E_ : 0) {}
  static const uint16_t* bits(const bf16* x) { return reinterpret_cast<const uint16_t*>(x); }
  // n rows of `cols` bf16 values, `ld` apart, to rows `ldd` apart
  static void copy_rows(const bf16* x, int64_t ld, int64_t n, int64_t cols, uint16_t* dst, int64_t ldd) {
    for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * ldd, x + r * ld, cols * sizeof(uint16_t));
  }
  void dv(const float* P, int64_t lds, float* dv) {
    gemm_tn<float>(nk, Ev, nq, 1.f, P, lds, dof.data(), Ev, 1.f, dv, Ev);
  }
  void dk(const float* dS, int64_t lds, float scale, float* dk) {
    gemm_tn<float>(nk, E, nq, scale, dS, lds, qf.data(), E, 1.f, dk, E);
  }
  void dq(const float* dS, int64_t lds, float scale, float* dq) {
    gemm_nn<float>(nq, E, nk, scale, dS, lds, kf.data(), E, 1.f, dq, E);
  }
};

struct Bf16DotTile : Bf16TileBase {
  const uint16_t* q = nullptr;
  const uint16_t* dout = nullptr;
  int64_t ldq = 0, lddo = 0;
  // packed B operands: K^T and V (forward), K^T and V^T (backward)
  AVec<uint32_t> k_t, v_r, v_t;
  AVec<uint16_t> abuf;  // bf16 copy of P (forward)
  Bf16DotTile(int64_t E_, int64_t Ev_, int64_t bq, int64_t bk, bool bwd)
      : Bf16TileBase(E_, Ev_, bq, bk, bwd), k_t(cdiv(E_, 2) * bk), v_r(bwd ? 0 : cdiv(bk, 2) * Ev_),
        v_t(bwd ? cdiv(Ev_, 2) * bk : 0), abuf(bwd ? 0 : bq * bk) {}
  void load_q(const bf16* x, int64_t ld, int64_t n) {
    nq = n;
    q = bits(x);
    ldq = ld;
    if (backward) load_rows(x, ld, n, E, qf.data());
  }
  void load_do(const bf16* x, int64_t ld, int64_t n) {
    dout = bits(x);
    lddo = ld;
    load_rows(x, ld, n, Ev, dof.data());
  }
  void load_k(const bf16* x, int64_t ld, int64_t n) {
    nk = n;
    pack_trans_bf16(bits(x), ld, n, E, k_t.data(), n);
    if (backward) load_rows(x, ld, n, E, kf.data());
  }
  void load_v(const bf16* x, int64_t ld, int64_t n) {
    if (backward) {
      pack_trans_bf16(bits(x), ld, n, Ev, v_t.data(), n);
    } else {
      pack_rows_bf16(bits(x), ld, n, Ev, v_r.data(), Ev);
    }
  }
  void qk(float scale, float* S, int64_t lds) { gemm_bf16_packed(nq, nk, E, scale, q, ldq, k_t.data(), nk, false, S, lds); }
  uint16_t* p_row(int64_t r) { return abuf.data() + r * nk; }
  int64_t p_cols() const { return nk; }
  void pv(const float* P, int64_t lds, float* acc) {
    if (!p_ready)
      for (int64_t r = 0; r < nq; ++r) f32_to_bf16(P + r * lds, p_row(r), nk);
    p_ready = false;
    gemm_bf16_packed(nq, Ev, nk, 1.f, abuf.data(), nk, v_r.data(), Ev, true, acc, Ev);
  }
  void dov(float* dP, int64_t lds) { gemm_bf16_packed(nq, nk, Ev, 1.f, dout, lddo, v_t.data(), nk, false, dP, lds); }
};

// AMX tiles (gemm_bf16_amx) for the products of two bf16 tensors, Q K^T, P V and
// dO V^T, on padded copies (gemm_amx.h): Q and dO in rows of round_up(E, 32)
// with zero columns past E; K^T, V^T (over head dims) and V (over keys) in the
// blocked pair packing, zero rows past the head dim written once at
// allocation (only when the head dim is not a multiple of 32), past the keys at every V packing; P rounded to bf16 in rows with
// zero columns past the block's keys, up to the next multiple of 32.
struct Bf16AmxTile : Bf16TileBase {
  int64_t bq, Ep, Evp, bkp;  // rows of the callers' tile buffers; padded sizes
  float q_scale = 1.f;       // what the bf16 copy of Q has been multiplied by (a power of two)
  Scratch<uint16_t> qpad, dopad, abuf;
  Scratch<uint32_t> k_t, v_t;  // backward
  // Forward: K^T and V packed for the last kSlots key blocks, by source address. A thread runs the query
  // blocks of a head one after another (parallel_for hands out contiguous ranges) and each of them walks
  // the same key blocks, so a head's K and V are packed once per thread instead of once per query block.
  static constexpr int kSlots = 4;
  struct Slot {
    const bf16* k = nullptr;
    const bf16* v = nullptr;
    int64_t ld_k = 0, ld_v = 0, n = -1;
    Scratch<uint32_t> k_t, v_r;
  };
  std::vector<Slot> slots;
  int cur = 0, next = 0;
  Bf16AmxTile(int64_t E_, int64_t Ev_, int64_t bq_, int64_t bk, bool bwd)
      : Bf16TileBase(E_, Ev_, bq_, bk, bwd), bq(bq_), Ep(round_up(E_, 32)), Evp(round_up(Ev_, 32)),
        bkp(round_up(bk, 32)),
        qpad(round_up(bq, 16) * Ep, Ep != E), dopad(bwd ? round_up(bq, 16) * Evp : 0, Evp != Ev),
        abuf(bwd ? 0 : round_up(bq, 16) * bkp), k_t(bwd ? round_up(bk, 16) * Ep / 2 : 0, Ep != E),
        v_t(bwd ? round_up(bk, 16) * Evp / 2 : 0, Evp != Ev), slots(bwd ? 0 : kSlots) {}
  void load_q(const bf16* x, int64_t ld, int64_t n) {
    nq = n;
    copy_rows(x, ld, n, E, qpad.data(), Ep);
    q_scale = 1.f;
    if (backward) load_rows(x, ld, n, E, qf.data());
  }
  void load_do(const bf16* x, int64_t ld, int64_t n) {
    copy_rows(x, ld, n, Ev, dopad.data(), Evp);
    load_rows(x, ld, n, Ev, dof.data());
  }
  void load_k(const bf16* x, int64_t ld, int64_t n) {
    nk = n;
    if (backward) {
      pack_trans_amx(bits(x), ld, n, E, k_t.data());
      load_rows(x, ld, n, E, kf.data());
      return;
    }
    for (int i = 0; i < kSlots; ++i) {
      if (slots[i].k == x && slots[i].ld_k == ld && slots[i].n == n) {
        cur = i;
        return;
      }
    }
    cur = next;
    next = (next + 1) % kSlots;
    Slot& sl = slots[cur];
    if (sl.k_t.empty()) {  // K^T zero-filled when it has rows past the head dim (they stay zero)
      sl.k_t.resize(round_up(bkp, 16) * Ep / 2, Ep != E);
      sl.v_r.resize(round_up(Ev, 16) * bkp / 2);
    }
    pack_trans_amx(bits(x), ld, n, E, sl.k_t.data());
    sl.k = x;
    sl.ld_k = ld;
    sl.n = n;
    sl.v = nullptr;
  }
  void load_v(const bf16* x, int64_t ld, int64_t n) {
    if (backward) {
      pack_trans_amx(bits(x), ld, n, Ev, v_t.data());
      return;
    }
    Slot& sl = slots[cur];  // the block whose K was just loaded
    if (sl.v == x && sl.ld_v == ld) return;
    pack_rows_amx(bits(x), ld, n, Ev, sl.v_r.data());
    // each group's packed rows past this block's keys, up to the next multiple of 32 keys: zero
    const int64_t rows = round_up(n, 32) / 2, from = (n + 1) / 2;
    for (int64_t g = 0; g < cdiv(Ev, 16); ++g)
      std::memset(sl.v_r.data() + (g * rows + from) * 16, 0, (rows - from) * 16 * sizeof(uint32_t));
    sl.v = x;
    sl.ld_v = ld;
  }
  // S and dP are the callers' tile buffers, bq x lds: whole 16 x 16 tiles fit when bq is a multiple of 16
  // (choose_blocks' sizes are) and the keys round up within lds; then the products are stored straight
  // into them. Q K^T also needs alpha = 1 for that: a power-of-two scale (head dims 64, 256, 16, 4, 1)
  // is moved into the bf16 copy of Q, exactly (exponent arithmetic), once per query block.
  bool whole_tiles(int64_t lds) const { return bq % 16 == 0 && round_up(nk, 16) <= lds; }
  void qk(float scale, float* S, int64_t lds) {
    const uint32_t* kp = backward ? k_t.data() : slots[cur].k_t.data();
    int e = 0;
    const bool pow2 = scale > 0.f && std::frexp(scale, &e) == 0.5f && e > -100 && e < 100;
    if (pow2 && whole_tiles(lds)) {
      if (q_scale != scale) {
        int eq = 0;
        std::frexp(q_scale, &eq);
        for (int64_t r = 0; r < nq; ++r) scale_bf16_pow2(qpad.data() + r * Ep, E, e - eq);
        q_scale = scale;
      }
      return gemm_bf16_amx(nq, nk, E, 1.f, qpad.data(), Ep, kp, false, S, lds, true);
    }
    gemm_bf16_amx(nq, nk, E, scale / q_scale, qpad.data(), Ep, kp, false, S, lds);
  }
  uint16_t* p_row(int64_t r) { return abuf.data() + r * bkp; }
  int64_t p_cols() const { return round_up(nk, 32); }  // zero past the keys
  void pv(const float* P, int64_t lds, float* acc) {
    for (int64_t r = 0; r < nq && !p_ready; ++r) {
      f32_to_bf16(P + r * lds, p_row(r), nk);
      std::memset(p_row(r) + nk, 0, (p_cols() - nk) * sizeof(uint16_t));
    }
    p_ready = false;
    gemm_bf16_amx(nq, Ev, nk, 1.f, abuf.data(), bkp, slots[cur].v_r.data(), true, acc, Ev);
  }
  void dov(float* dP, int64_t lds) {
    gemm_bf16_amx(nq, nk, Ev, 1.f, dopad.data(), Evp, v_t.data(), false, dP, lds, whole_tiles(lds));
  }
};

// The BLAS's own bf16 GEMM (gemm_bf16_rowmajor: MKL, on AMX tiles where the CPU
// has them) for the products of two bf16 tensors, Q K^T, P V and dO V^T, reading
// the operands in place (no packing: the BLAS packs); P rounded to bf16 before
// P V as in Bf16DotTile. The backward's other products as in Bf16TileBase.
struct Bf16GemmTile : Bf16TileBase {
  // rows `ld` apart, in place when the rows are a valid leading dimension, else copied to `buf`
  struct Rows {
    AVec<uint16_t> buf;
    const uint16_t* ptr = nullptr;
    int64_t ld = 0;
    void load(const bf16* x, int64_t row_stride, int64_t rows, int64_t cols) {
      if (row_stride >= cols || rows <= 1) {
        ptr = bits(x);
        ld = std::max<int64_t>(row_stride, cols);
        return;
      }
      buf.resize(rows * cols);
      copy_rows(x, row_stride, rows, cols, buf.data(), cols);
      ptr = buf.data();
      ld = cols;
    }
  };
  Rows q, dout, k, v;
  AVec<uint16_t> abuf;  // bf16 copy of P (forward)
  Bf16GemmTile(int64_t E_, int64_t Ev_, int64_t bq, int64_t bk, bool bwd)
      : Bf16TileBase(E_, Ev_, bq, bk, bwd), abuf(bwd ? 0 : bq * bk) {}
  void load_q(const bf16* x, int64_t ld, int64_t n) {
    nq = n;
    q.load(x, ld, n, E);
    if (backward) load_rows(x, ld, n, E, qf.data());
  }
  void load_do(const bf16* x, int64_t ld, int64_t n) {
    dout.load(x, ld, n, Ev);
    load_rows(x, ld, n, Ev, dof.data());
  }
  void load_k(const bf16* x, int64_t ld, int64_t n) {
    nk = n;
    k.load(x, ld, n, E);
    if (backward) load_rows(x, ld, n, E, kf.data());
  }
  void load_v(const bf16* x, int64_t ld, int64_t n) { v.load(x, ld, n, Ev); }
  void qk(float scale, float* S, int64_t lds) {
    gemm_bf16_rowmajor(true, nq, nk, E, scale, q.ptr, q.ld, k.ptr, k.ld, 0.f, S, lds);
  }
  uint16_t* p_row(int64_t r) { return abuf.data() + r * nk; }
  int64_t p_cols() const { return nk; }
  void pv(const float* P, int64_t lds, float* acc) {
    if (!p_ready)
      for (int64_t r = 0; r < nq; ++r) f32_to_bf16(P + r * lds, p_row(r), nk);
    p_ready = false;
    gemm_bf16_rowmajor(false, nq, Ev, nk, 1.f, abuf.data(), nk, v.ptr, v.ld, 1.f, acc, Ev);
  }
  void dov(float* dP, int64_t lds) {
    gemm_bf16_rowmajor(true, nq, nk, Ev, 1.f, dout.ptr, dout.ld, v.ptr, v.ld, 0.f, dP, lds);
  }
};

// Short query blocks (decoding: one query, or a few, against a long key cache). The tile paths pay per
// key block for whole tiles: the AMX and dot-product paths pack K^T and V into their layouts and multiply
// 16-row tiles, the BLAS path converts K and V to float32 copies; with one query row that is several
// times the work of reading K and V once, which is all such a call needs (it is memory-bound). Here
// Q K^T and P V are dot products and row updates straight from K and V in place (dot_rows, axpy_rows:
// AVX-512 where the CPU has it), in float32 with P kept in float32.
template <typename T>
struct RowTile {
  using A = float;
  static constexpr RowKind kKind = std::is_same_v<T, bf16> ? RowKind::kBf16
                                   : std::is_same_v<T, f16> ? RowKind::kF16
                                                            : RowKind::kF32;
  int64_t E, Ev, nq = 0, nk = 0, ldk = 0, ldv = 0;
  AVec<float> qf;
  AVec<uint16_t> qb;  // bfloat16: the query rows' own bits, for the AVX512-BF16 dot products
  const T* k = nullptr;
  const T* v = nullptr;
  RowTile(int64_t E_, int64_t Ev_, int64_t bq, int64_t /*bk*/, bool /*backward*/)
      : E(E_), Ev(Ev_), qf(bq * E_), qb(kKind == RowKind::kBf16 ? bq * E_ : 0) {}
  // n query rows into rows r0 .. r0 + n - 1 of the block (a block may hold rows of several heads)
  void load_q(const T* x, int64_t ld, int64_t n, int64_t r0 = 0) {
    nq = r0 + n;
    load_rows(x, ld, n, E, qf.data() + r0 * E);
    if constexpr (kKind == RowKind::kBf16)
      for (int64_t r = 0; r < n; ++r) std::memcpy(qb.data() + (r0 + r) * E, x + r * ld, E * sizeof(uint16_t));
  }
  void load_k(const T* x, int64_t ld, int64_t n) {
    nk = n;
    k = x;
    ldk = ld;
  }
  void load_v(const T* x, int64_t ld, int64_t /*n*/) {
    v = x;
    ldv = ld;
  }
  void qk(float scale, float* S, int64_t lds) {
    dot_rows(qf.data(), qb.empty() ? nullptr : qb.data(), nq, E, k, kKind, ldk, nk, E, scale, S, lds);
  }
  void pv(const float* P, int64_t lds, float* acc) { axpy_rows(P, lds, nq, v, kKind, ldv, nk, Ev, acc, Ev); }
  // The same on n rows of their own (one page of a paged cache; S and P at that page's first column), so that
  // a tile may span pages without a copy.
  void qk_rows(float scale, const T* kr, int64_t ld, int64_t n, float* S, int64_t lds) {
    dot_rows(qf.data(), qb.empty() ? nullptr : qb.data(), nq, E, kr, kKind, ld, n, E, scale, S, lds);
  }
  void pv_rows(const float* P, int64_t lds, const T* vr, int64_t ld, int64_t n, float* acc) {
    axpy_rows(P, lds, nq, vr, kKind, ld, n, Ev, acc, Ev);
  }
};

// Query lengths up to this take RowTile in the forward (float32 / bfloat16 / float16): measured against the
// tile paths on a Sapphire Rapids Xeon (benchmarks/NOTES.md, entry 18), the rows win up to 8 rows in fp32
// and fp16, up to ~4 in bf16 against AMX tiles.
inline int64_t row_tile_max_rows(DType d) { return d == DType::kBFloat16 ? 4 : d == DType::kFloat64 ? 0 : 8; }
inline bool use_row_tile(const FwdParams& p) { return p.len_q <= row_tile_max_rows(p.dtype); }
// With RowTile, the query heads of a GQA group that share K and V can run as one block of rows, so that
// each key and value row is read (and converted) once for all of them: the most heads, a divisor of the
// group, whose rows number at most 16 and that still leave two tasks per thread. (The row kernels keep 4
// rows in registers at a time, so a block of 16 passes over a key tile 4 times, from cache: on the Zen 4
// EPYC, fp32, 32 / 8 heads, 4 rows, 4k keys, 16 rows per block ran 15-18% faster than 8, NOTES 30.)
inline int64_t row_group_heads(const FwdParams& p) {
  const int64_t G = p.heads_q / p.heads_kv, want = 2 * static_cast<int64_t>(num_threads());
  for (int64_t ng = G; ng > 1; --ng)
    if (G % ng == 0 && ng * p.len_q <= 16 && p.batch * (p.heads_q / ng) >= want) return ng;
  return 1;
}

// The forward. With `weights`, also the attention weights P (dropout applied) from the same pass: the
// score tiles of a query block go side by side into one row-wide buffer instead of overwriting each other,
// each tile's running maximum is remembered, and once a row's final maximum m and sum l are known its
// weights are exp(S - m_tile) * exp(m_tile - m) / l, one multiply per element (attention_probs recomputes
// Q K^T and the exponentials instead). weights is batch x heads_q x len_q x len_k, contiguous, or with
// average_heads batch x len_q x len_k: the mean over the query heads, summed in float32 (a task then owns
// a query block of every head of a batch element, so no two tasks write the same weights).
template <typename T, typename Tile>
void flash_fwd_impl(const FwdParams& p, T* weights, bool average_heads) {
  using A = acc_t<T>;
  constexpr bool kBf16Tile = std::is_base_of_v<Bf16TileBase, Tile>;  // P to bf16 in the tile (p_row)
  constexpr bool kRowTile = std::is_same_v<Tile, RowTile<T>>;
  if (p.batch == 0 || p.heads_kv == 0) return;
  const int64_t Hq = p.heads_q, G = p.heads_q / p.heads_kv, L = p.len_q, S = p.len_k, E = p.dim_qk, Ev = p.dim_v;
  const bool keep = weights != nullptr, avg = keep && average_heads;
  // heads per task: a GQA group's heads together (RowTile, short queries, no weights), else 1
  int64_t ng = 1;
  if constexpr (std::is_same_v<Tile, RowTile<T>>)
    if (!keep) ng = row_group_heads(p);
  const Blocks blk = choose_blocks(p, false);
  const int64_t kBlockK = blk.k, ntiles = cdiv(S, kBlockK);
  // score rows: one tile wide, or (weights) every key plus room for a tile product stored in whole 16 x 16
  // tiles past the last key; then at most ~4 MB of them per thread (fewer query rows for very long rows),
  // and with the head average still 4 tasks per thread where the rows allow
  const int64_t lds = keep ? round_up(S, 32) + 32 : kBlockK;
  int64_t kBlockQ = blk.q;
  while (keep && kBlockQ > 16 && kBlockQ * lds > (int64_t(1) << 20)) kBlockQ /= 2;
  while (avg && kBlockQ > 16 && p.batch * cdiv(L, kBlockQ) < 4 * static_cast<int64_t>(num_threads())) kBlockQ /= 2;
  const int64_t nqb = cdiv(L, kBlockQ);
  const bool dropout = p.dropout_p > 0.0;
  const DropoutRng rng(p.seed, p.offset, p.dropout_p);
  const A ninf = -std::numeric_limits<A>::infinity();

  parallel_for(p.batch * (avg ? 1 : Hq / ng) * nqb, [&](int64_t t0, int64_t t1) {
    // rows of a block: sized by the query length where that is shorter than a block (whole 16-row tiles)
    const int64_t bq = std::min(kBlockQ, round_up(L, 16)) * ng;
    Tile tile(E, Ev, bq, kBlockK, false);
    Scratch<A> sbuf(bq * lds), wsum(avg ? bq * S : 0), acc(bq * Ev);  // acc: cleared per block (attend)
    std::vector<A> tmp(kBlockK), mrow(bq), lrow(bq);
    std::vector<A> mtile(keep ? bq * ntiles : 0);  // (weights) each row's running maximum after each tile
    // a paged cache of pages shorter than a tile: RowTile reads each page's rows in place (qk_rows, pv_rows),
    // the other tiles get each tile's key and value rows copied together (kv_tile)
    const bool paged_rows = kRowTile && p.block_table != nullptr && p.page_size < kBlockK;
    const bool gather = !kRowTile && p.block_table != nullptr && p.page_size < kBlockK;
    std::vector<T> kbuf(gather ? kBlockK * E : 0), vbuf(gather ? kBlockK * Ev : 0);

    // output and lse of query rows i0 .. i0 + nq - 1 of heads h .. h + nh - 1 (nh > 1: one GQA group's
    // heads, RowTile only; block row r is row i0 + r % nq of head h + r / nq); the keys [jlo, jhi) it computed
    auto attend = [&](int64_t b, int64_t h, int64_t nh, int64_t i0, int64_t nq, int64_t& jlo, int64_t& jhi) {
      const int64_t hk = h / G, R = nh * nq;
      for (int64_t g = 0; g < nh; ++g) {
        const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + (h + g) * p.q_stride.h + i0 * p.q_stride.r;
        if constexpr (std::is_same_v<Tile, RowTile<T>>) {
          tile.load_q(q, p.q_stride.r, nq, g * nq);
        } else {
          tile.load_q(q, p.q_stride.r, nq);
        }
      }
      std::fill(acc.data(), acc.data() + R * Ev, A(0));
      std::fill(mrow.begin(), mrow.begin() + R, ninf);
      std::fill(lrow.begin(), lrow.begin() + R, A(0));

      block_key_range(p, b, h, i0, nq, jlo, jhi);
      for (int64_t g = 1; g < nh; ++g) {  // the union of the heads' ranges
        int64_t lo, hi;
        block_key_range(p, b, h + g, i0, nq, lo, hi);
        if (lo >= hi) continue;
        if (jlo >= jhi) jlo = lo, jhi = hi;
        jlo = std::min(jlo, lo);
        jhi = std::max(jhi, hi);
      }
      // (a paged cache: tiles end at page ends too where the pages hold whole tiles, else are copied together
      // from their pages; never with weights, whose tiles are kBlockK apart)
      for (int64_t j0 = jlo, nk = 0; j0 < jhi; j0 += nk) {
        nk = std::min(kBlockK, jhi - j0);
        const int64_t jt = (j0 - jlo) / kBlockK;
        A* const sb = sbuf.data() + (keep ? j0 - jlo : 0);
        if constexpr (kRowTile) {
          if (paged_rows) {
            for (int64_t j = j0, m = 0; j < j0 + nk; j += m) {
              m = j0 + nk - j;
              const T* kr = kv_rows<T>(p, p.k, p.k_stride, b, hk, j, m);
              tile.qk_rows(static_cast<A>(p.scale), kr, p.k_stride.r, m, sb + (j - j0), lds);
            }
          }
        }
        if (!paged_rows) {
          int64_t ldk;
          const T* k = kv_tile<T>(p, p.k, p.k_stride, b, hk, j0, nk, E, gather ? kbuf.data() : nullptr, ldk);
          tile.load_k(k, ldk, nk);
          tile.qk(static_cast<A>(p.scale), sb, lds);
        }
        softcap_tile(p, sb, R, nk, lds);
        for (int64_t g = 0; g < nh; ++g) mask_tile(p, b, h + g, i0, nq, j0, nk, sb + g * nq * lds, lds, tmp.data());
        // bf16 tiles without dropout: the exponentials go straight to the tile's bf16 P (one pass, no
        // fp32 P written and read again); the weights need the fp32 exponentials kept
        const bool bf16_p = kBf16Tile && !dropout && !keep;
        for (int64_t r = 0; r < R; ++r) {
          A* s = sb + r * lds;
          if constexpr (kBf16Tile) {
            // One pass instead of two (max, then exponentials): the running max, or for a row's first tile
            // the max of its first 16 scores, serves as the reference, and the pass also finds the tile's
            // max. Unless that exceeds the reference by more than kSlack (the values would pass e^kSlack;
            // also for NaN or +inf scores), the reference stays: P = exp(S - ref) <= e^kSlack, l and the
            // output sum those, and lse = ref + log l. Otherwise the tile is redone below with its max.
            if (bf16_p) {
              constexpr A kSlack = 8;
              const A ref = mrow[r] != ninf ? mrow[r] : row_max(s, std::min<int64_t>(nk, 16));
              A tmax;
              if (std::isfinite(ref)) {
                const A sum = exp_sub_sum_max_bf16(s, nk, ref, tile.p_row(r), tile.p_cols(), &tmax);
                if (tmax <= ref + kSlack) {
                  lrow[r] += sum;  // 0 before the row's first visible tile, so the same as = sum then
                  mrow[r] = ref;
                  continue;
                }
              }
            }
          }
          const A mnew = running_max(mrow[r], s, nk);
          if (keep) mtile[r * ntiles + jt] = mnew;
          if (mnew == ninf) {  // nothing visible in this row so far
            std::fill(s, s + nk, A(0));
            if constexpr (kBf16Tile)
              if (bf16_p) std::fill(tile.p_row(r), tile.p_row(r) + tile.p_cols(), uint16_t(0));
            continue;
          }
          A sum;
          if constexpr (kBf16Tile) {
            sum = bf16_p ? exp_sub_sum_bf16(s, nk, mnew, tile.p_row(r), tile.p_cols()) : exp_sub_sum(s, nk, mnew);
          } else {
            sum = exp_sub_sum(s, nk, mnew);
          }
          const A alpha = mrow[r] == ninf ? A(0) : std::exp(mrow[r] - mnew);
          lrow[r] = lrow[r] * alpha + sum;
          if (alpha != A(1)) scale_row(acc.data() + r * Ev, Ev, alpha);
          mrow[r] = mnew;
          if (dropout) dropout_row(rng, static_cast<uint64_t>(b * Hq + h + r / nq), i0 + r % nq, j0, nk, s);
        }
        if constexpr (kBf16Tile) tile.p_ready = bf16_p;
        if constexpr (kRowTile) {
          if (paged_rows) {
            for (int64_t j = j0, m = 0; j < j0 + nk; j += m) {
              m = j0 + nk - j;
              const T* vr = kv_rows<T>(p, p.v, p.v_stride, b, hk, j, m);
              tile.pv_rows(sb + (j - j0), lds, vr, p.v_stride.r, m, acc.data());
            }
            continue;
          }
        }
        int64_t nv = nk, ldv;
        const T* v = kv_tile<T>(p, p.v, p.v_stride, b, hk, j0, nv, Ev, gather ? vbuf.data() : nullptr, ldv);
        tile.load_v(v, ldv, nk);
        tile.pv(sb, lds, acc.data());
      }

      for (int64_t r = 0; r < R; ++r) {
        const int64_t hr = h + r / nq, i = i0 + r % nq;
        A* a = acc.data() + r * Ev;
        A& lse = static_cast<A*>(p.lse)[(b * Hq + hr) * L + i];
        if (lrow[r] != A(0)) {  // a NaN sum (NaN scores) gives a NaN row and lse
          scale_row(a, Ev, A(1) / lrow[r]);
          lse = mrow[r] + std::log(lrow[r]);
        } else {  // every key masked: output 0, lse -inf
          std::fill(a, a + Ev, A(0));
          lse = -std::numeric_limits<A>::infinity();
        }
        store_row<T, A>(a, static_cast<T*>(p.out) + b * p.o_stride.b + hr * p.o_stride.h + i * p.o_stride.r, Ev);
      }
    };
    // (weights) the exponentials of row r, keys [jlo, jhi), turned into its probabilities in place
    auto normalise = [&](int64_t r, int64_t jlo, int64_t jhi) {
      A* s = sbuf.data() + r * lds;
      const A inv_l = lrow[r] != A(0) ? A(1) / lrow[r] : A(0);  // 0: a row that sees no key
      for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockK) {
        const A mt = mtile[r * ntiles + (j0 - jlo) / kBlockK];
        // exp(m_tile - m) / l: 0 for tiles before the row saw any key (their exponentials are 0 too)
        const A f = mt == ninf || inv_l == A(0) ? A(0) : std::exp(mt - mrow[r]) * inv_l;
        scale_row(s + (j0 - jlo), std::min(kBlockK, jhi - j0), f);
      }
      return s;
    };

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % nqb, i0 = qb * kBlockQ, nq = std::min(kBlockQ, L - i0);
      int64_t jlo, jhi;
      if (!avg) {
        const int64_t bh = t / nqb * ng;  // the task's first head
        attend(bh / Hq, bh % Hq, ng, i0, nq, jlo, jhi);
        if (!keep) continue;
        T* w = weights + (bh * L + i0) * S;
        for (int64_t r = 0; r < nq; ++r, w += S) {
          std::memset(static_cast<void*>(w), 0, jlo * sizeof(T));  // keys no row of the block sees
          std::memset(static_cast<void*>(w + jhi), 0, (S - jhi) * sizeof(T));
          store_row<T, A>(normalise(r, jlo, jhi), w + jlo, jhi - jlo);
        }
        continue;
      }
      const int64_t b = t / nqb;
      std::fill(wsum.data(), wsum.data() + nq * S, A(0));
      for (int64_t h = 0; h < Hq; ++h) {
        attend(b, h, 1, i0, nq, jlo, jhi);
        for (int64_t r = 0; r < nq; ++r) add_row(wsum.data() + r * S + jlo, normalise(r, jlo, jhi), jhi - jlo);
      }
      T* w = weights + (b * L + i0) * S;
      for (int64_t r = 0; r < nq; ++r) {
        scale_row(wsum.data() + r * S, S, A(1) / A(Hq));
        store_row<T, A>(wsum.data() + r * S, w + r * S, S);
      }
    }
  });
}

// Calls f(TileTag<Tile>{}) with the product path for T: bf16's chosen path (bf16_path), else the BLAS.
template <typename Tile>
struct TileTag {
  using type = Tile;
};
template <typename T, typename F>
void with_tile(F&& f) {
  if constexpr (std::is_same_v<T, bf16>) {
    switch (bf16_path()) {
      case Bf16Path::kDot: return f(TileTag<Bf16DotTile>{});
      case Bf16Path::kMkl: return f(TileTag<Bf16GemmTile>{});
      case Bf16Path::kAmx: return f(TileTag<Bf16AmxTile>{});
      default: break;
    }
  }
  f(TileTag<BlasTile<T>>{});
}

template <typename T>
void flash_fwd(const FwdParams& p, T* weights, bool average_heads) {
  if constexpr (!std::is_same_v<T, double>)
    if (use_row_tile(p)) return flash_fwd_impl<T, RowTile<T>>(p, weights, average_heads);
  with_tile<T>([&](auto tag) { flash_fwd_impl<T, typename decltype(tag)::type>(p, weights, average_heads); });
}

// P = exp(softcap(scale * Q K^T) + mask - lse) for a tile, rows with lse = -inf give 0 (dcap: see softcap_tile).
template <typename Tile, typename A>
void recompute_probs(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                     int64_t nk, Tile& tile, A* sbuf, int64_t lds, A* tmp, const A* shift, const A* rscale,
                     A* dcap = nullptr) {
  tile.qk(static_cast<A>(p.scale), sbuf, lds);
  softcap_tile(p, sbuf, nq, nk, lds, dcap);
  mask_tile(p, b, h, i0, nq, j0, nk, sbuf, lds, tmp);
  for (int64_t r = 0; r < nq; ++r) {
    A* s = sbuf + r * lds;
    if (rscale[r] == A(0)) {  // row with no visible key
      std::fill(s, s + nk, A(0));
    } else {
      exp_sub_sum(s, nk, shift[r]);
      if (rscale[r] != A(1)) scale_row(s, nk, rscale[r]);
    }
  }
}

// Per-row statistics from which the backward and attention_probs recompute
// P_ij = exp(S_ij - shift_i) * rscale_i (rscale 0: a row with no visible key).
// Normally shift = lse and rscale = 1. When |lse| is huge (a mask of ~finfo.min
// on a whole row, as Hugging Face builds them), fp32 has lost log(l) in
// lse = m + log(l); such rows get their exact max m and sum l recomputed, so
// their probabilities stay right (uniform over equally masked keys).
// With D given, also D_i = rowsum(P~ o dP) (the softmax-backward correction):
// dot(dO_i, O_i) from the saved output, or, with exact_d, summed over the
// recomputed tiles, which a reduced-precision output cannot match closely
// enough for the gradient of a mask that broadcasts over keys.
template <typename T, typename Tile>
void row_stats(const BwdParams& p, const Blocks& blk, bool exact_d, std::vector<acc_t<T>>& shift,
               std::vector<acc_t<T>>& rscale, std::vector<acc_t<T>>* D) {
  using A = acc_t<T>;
  const int64_t Hq = p.heads_q, G = p.heads_q / p.heads_kv, L = p.len_q, E = p.dim_qk, Ev = p.dim_v;
  const int64_t bq = blk.q, bk = blk.k, nqb = cdiv(L, bq);
  const A ninf = -std::numeric_limits<A>::infinity();
  const A kExtreme = A(kExtremeLse);
  const bool dropout = p.dropout_p > 0.0;
  const DropoutRng rng(p.seed, p.offset, p.dropout_p);
  shift.assign(p.batch * Hq * L, A(0));
  rscale.assign(p.batch * Hq * L, A(1));
  if (D != nullptr) D->assign(p.batch * Hq * L, A(0));
  parallel_for(p.batch * Hq * nqb, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<Tile> tile;
    Scratch<A> sbuf, dpbuf;
    std::vector<A> tmp(bk), mrow(bq), lrow(bq), a(Ev), c(Ev);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % nqb, bh = t / nqb, h = bh % Hq, b = bh / Hq, hk = h / G;
      const int64_t i0 = qb * bq, nq = std::min(bq, L - i0), row0 = bh * L + i0;
      const A* lse = static_cast<const A*>(p.lse) + row0;
      bool extreme = false;
      for (int64_t r = 0; r < nq; ++r) {
        shift[row0 + r] = lse[r] == ninf ? A(0) : lse[r];
        rscale[row0 + r] = lse[r] == ninf ? A(0) : A(1);
        extreme |= lse[r] != ninf && std::abs(lse[r]) > kExtreme;
      }
      const T* g = D == nullptr ? nullptr
                                : static_cast<const T*>(p.dout) + b * p.do_stride.b + h * p.do_stride.h +
                                      i0 * p.do_stride.r;
      if (D != nullptr && !exact_d) {
        const T* o = static_cast<const T*>(p.out) + b * p.o_stride.b + h * p.o_stride.h + i0 * p.o_stride.r;
        for (int64_t r = 0; r < nq; ++r) {
          load_row<T, A>(o + r * p.o_stride.r, a.data(), Ev);
          load_row<T, A>(g + r * p.do_stride.r, c.data(), Ev);
          (*D)[row0 + r] = dot_row(a.data(), c.data(), Ev);
        }
      }
      const bool need_d = D != nullptr && exact_d;
      if (!extreme && !need_d) continue;
      if (!tile) {
        tile = std::make_unique<Tile>(E, Ev, bq, bk, true);
        sbuf.resize(bq * bk);
        dpbuf.resize(bq * bk);
      }
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h + i0 * p.q_stride.r;
      const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
      const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
      tile->load_q(q, p.q_stride.r, nq);
      int64_t jlo, jhi;
      block_key_range(p, b, h, i0, nq, jlo, jhi);
      if (extreme) {
        std::fill(mrow.begin(), mrow.end(), ninf);
        std::fill(lrow.begin(), lrow.end(), A(0));
        for (int64_t j0 = jlo; j0 < jhi; j0 += bk) {
          const int64_t nk = std::min(bk, jhi - j0);
          tile->load_k(k + j0 * p.k_stride.r, p.k_stride.r, nk);
          tile->qk(static_cast<A>(p.scale), sbuf.data(), bk);
          softcap_tile(p, sbuf.data(), nq, nk, bk);
          mask_tile(p, b, h, i0, nq, j0, nk, sbuf.data(), bk, tmp.data());
          for (int64_t r = 0; r < nq; ++r) {
            A* s = sbuf.data() + r * bk;
            const A mnew = running_max(mrow[r], s, nk);
            if (mnew == ninf) continue;
            const A alpha = mrow[r] == ninf ? A(0) : std::exp(mrow[r] - mnew);
            lrow[r] = lrow[r] * alpha + exp_sub_sum(s, nk, mnew);
            mrow[r] = mnew;
          }
        }
        for (int64_t r = 0; r < nq; ++r) {
          if (std::abs(lse[r]) > kExtreme && lse[r] != ninf && lrow[r] > A(0)) {
            shift[row0 + r] = mrow[r];
            rscale[row0 + r] = A(1) / lrow[r];
          }
        }
      }
      if (!need_d) continue;
      tile->load_do(g, p.do_stride.r, nq);
      for (int64_t j0 = jlo; j0 < jhi; j0 += bk) {
        const int64_t nk = std::min(bk, jhi - j0);
        tile->load_k(k + j0 * p.k_stride.r, p.k_stride.r, nk);
        tile->load_v(v + j0 * p.v_stride.r, p.v_stride.r, nk);
        recompute_probs(p, b, h, i0, nq, j0, nk, *tile, sbuf.data(), bk, tmp.data(), shift.data() + row0,
                        rscale.data() + row0);
        tile->dov(dpbuf.data(), bk);
        for (int64_t r = 0; r < nq; ++r) {
          A* s = sbuf.data() + r * bk;
          A* d = dpbuf.data() + r * bk;
          // D = sum_j P~_j (dO . V_j) with P~ = P * keep / (1 - p), the probabilities that multiplied V
          if (dropout) dropout_row(rng, static_cast<uint64_t>(bh), i0 + r, j0, nk, s);
          (*D)[row0 + r] += dot_row(s, d, nk);
        }
      }
    }
  });
}

template <typename T, typename Tile>
void flash_bwd_impl(const BwdParams& p) {
  using A = acc_t<T>;
  if (p.batch == 0 || p.heads_kv == 0) return;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv, L = p.len_q, S = p.len_k;
  const int64_t E = p.dim_qk, Ev = p.dim_v;
  const bool dropout = p.dropout_p > 0.0;
  const DropoutRng rng(p.seed, p.offset, p.dropout_p);

  const Blocks blk = choose_blocks(p, true);
  std::vector<A> D, shift, rscale;
  // exact D for a mask gradient in reduced precision (see row_stats)
  const bool exact_d = p.dmask != nullptr && !std::is_same_v<T, float> && !std::is_same_v<T, double>;
  row_stats<T, Tile>(p, blk, exact_d, shift, rscale, &D);

  // Split the key blocks of each (batch, kv head) over several tasks only when
  // there are too few (batch, kv head) pairs to keep every thread busy.
  const int64_t kBlockQ = blk.q, kBlockK = blk.k;
  const int64_t nkb = cdiv(S, kBlockK);
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t nchunks = (B * Hkv >= want || nkb <= 1) ? 1 : std::min(nkb, cdiv(want, std::max<int64_t>(B * Hkv, 1)));
  const int64_t kb_per_chunk = std::max<int64_t>(1, cdiv(nkb, nchunks));
  nchunks = std::max<int64_t>(1, cdiv(nkb, kb_per_chunk));
  std::vector<A> dq_part;
  if (nchunks > 1) dq_part.assign(nchunks * B * Hq * L * E, A(0));
  const int64_t nqb = cdiv(L, kBlockQ);
  // every query block's key range, once (block_key_range scans the mask), not once per key block
  std::vector<int64_t> kr(2 * B * Hq * nqb);
  parallel_for(B * Hq * nqb, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t % nqb) * kBlockQ, bh = t / nqb;
      block_key_range(p, bh / Hq, bh % Hq, i0, std::min(kBlockQ, L - i0), kr[2 * t], kr[2 * t + 1]);
    }
  });

  parallel_for(B * Hkv * nchunks, [&](int64_t t0, int64_t t1) {
    Tile tile(E, Ev, kBlockQ, kBlockK, true);
    Scratch<A> pbuf(kBlockQ * kBlockK), pdbuf(dropout ? kBlockQ * kBlockK : 0), dpbuf(kBlockQ * kBlockK);
    Scratch<A> dkacc(kBlockK * E), dvacc(kBlockK * Ev), dq_local(nchunks == 1 ? G * L * E : 0);  // cleared before use
    Scratch<A> dcap(p.softcap > 0.0 ? kBlockQ * kBlockK : 0);  // the soft cap's derivative at the tile's scores
    std::vector<A> tmp(kBlockK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % nchunks, bhk = t / nchunks, hk = bhk % Hkv, b = bhk / Hkv;
      // dq accumulator of this task: G x L x E, row-major
      A* dq_acc;
      if (nchunks == 1) {
        std::fill(dq_local.data(), dq_local.data() + G * L * E, A(0));
        dq_acc = dq_local.data();
      } else {
        dq_acc = dq_part.data() + ((c * B + b) * Hq + hk * G) * L * E;
      }
      const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
      const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
      T* dk = static_cast<T*>(p.dk) + b * p.dk_stride.b + hk * p.dk_stride.h;
      T* dv = static_cast<T*>(p.dv) + b * p.dv_stride.b + hk * p.dv_stride.h;
      const int64_t kb_end = std::min(nkb, (c + 1) * kb_per_chunk);
      for (int64_t kb = c * kb_per_chunk; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, S - j0);
        tile.load_k(k + j0 * p.k_stride.r, p.k_stride.r, nk);
        tile.load_v(v + j0 * p.v_stride.r, p.v_stride.r, nk);
        std::fill(dkacc.data(), dkacc.data() + kBlockK * E, A(0));
        std::fill(dvacc.data(), dvacc.data() + kBlockK * Ev, A(0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
          const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride.b + h * p.do_stride.h;
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, L - i0);
            const int64_t jlo = kr[2 * ((b * Hq + h) * nqb + qb)], jhi = kr[2 * ((b * Hq + h) * nqb + qb) + 1];
            if (jhi <= j0 || jlo >= j0 + nk) continue;  // block sees none of these keys
            tile.load_q(q + i0 * p.q_stride.r, p.q_stride.r, nq);
            tile.load_do(dout + i0 * p.do_stride.r, p.do_stride.r, nq);
            const int64_t row0 = (b * Hq + h) * L + i0;
            recompute_probs(p, b, h, i0, nq, j0, nk, tile, pbuf.data(), kBlockK, tmp.data(), shift.data() + row0,
                            rscale.data() + row0, p.softcap > 0.0 ? dcap.data() : nullptr);
            // A tile that holds every key the query block sees (short rows) is a whole softmax row.
            // Then P is renormalised to sum to 1 and D_i = sum_j P_ij dP~_ij is taken from the tile
            // (below) instead of dO . O from row_stats. Each half matters: D from the output rounded
            // to T put bf16 dK an ulp off where PyTorch's CPU SDPA rounds correctly; D from the tile
            // without renormalising inherits P's error where scores are large (exp(S - lse) with S
            // rounded differently than in the forward: P ~ 1 + 1e-4 on a one-hot row at scale 10),
            // which dO . O, from the forward's normalised weights, does not.
            const bool whole_rows = jlo >= j0 && jhi <= j0 + nk;
            if (whole_rows) {
              for (int64_t r = 0; r < nq; ++r) {
                A* pr = pbuf.data() + r * kBlockK;
                const A sum = row_sum(pr, nk);
                if (sum > A(0)) scale_row(pr, nk, A(1) / sum);
              }
            }
            tile.dov(dpbuf.data(), kBlockK);  // dP = dO V^T
            const A* pv = pbuf.data();  // the probabilities that multiplied V
            if (dropout) {
              const uint64_t bh = static_cast<uint64_t>(b * Hq + h);
              for (int64_t r = 0; r < nq; ++r) {
                std::memcpy(pdbuf.data() + r * kBlockK, pbuf.data() + r * kBlockK, nk * sizeof(A));
                dropout_row(rng, bh, i0 + r, j0, nk, pdbuf.data() + r * kBlockK);
                dropout_row(rng, bh, i0 + r, j0, nk, dpbuf.data() + r * kBlockK);
              }
              pv = pdbuf.data();
            }
            tile.dv(pv, kBlockK, dvacc.data());  // dV += P~^T dO
            // dS = P o (dP - D + c), in place in dpbuf (c: the log-sum-exp's cotangent, d lse / d S = P; a row
            // that sees no key has P = 0 and takes none of it)
            const A* Drow = D.data() + row0;
            const A* crow = p.dlse == nullptr ? nullptr : static_cast<const A*>(p.dlse) + row0;
            for (int64_t r = 0; r < nq; ++r) {
              A* ds = dpbuf.data() + r * kBlockK;
              const A* pr = pbuf.data() + r * kBlockK;
              A d = whole_rows ? dot_row(pr, ds, nk) : Drow[r];
              if (crow != nullptr && rscale[row0 + r] != A(0)) d -= crow[r];
              softmax_grad_row(ds, pr, ds, nk, d);
            }
            if (p.dmask != nullptr) {
              A* dm = static_cast<A*>(p.dmask) + ((b * Hq + h) * L + i0) * S + j0;
              for (int64_t r = 0; r < nq; ++r) std::memcpy(dm + r * S, dpbuf.data() + r * kBlockK, nk * sizeof(A));
            }
            // the mask is added after the soft cap (its gradient is dS); the scores take the cap's derivative
            if (p.softcap > 0.0) {
              for (int64_t r = 0; r < nq; ++r) {
                A* ds = dpbuf.data() + r * kBlockK;
                const A* f = dcap.data() + r * kBlockK;
                for (int64_t c = 0; c < nk; ++c) ds[c] *= f[c];
              }
            }
            // dK += scale dS^T Q ;  dQ += scale dS K
            tile.dk(dpbuf.data(), kBlockK, static_cast<A>(p.scale), dkacc.data());
            tile.dq(dpbuf.data(), kBlockK, static_cast<A>(p.scale), dq_acc + (g * L + i0) * E);
          }
        }
        for (int64_t r = 0; r < nk; ++r) {
          store_row<T, A>(dkacc.data() + r * E, dk + (j0 + r) * p.dk_stride.r, E);
          store_row<T, A>(dvacc.data() + r * Ev, dv + (j0 + r) * p.dv_stride.r, Ev);
        }
      }
      if (nchunks == 1) {
        for (int64_t g = 0; g < G; ++g) {
          T* dq = static_cast<T*>(p.dq) + b * p.dq_stride.b + (hk * G + g) * p.dq_stride.h;
          for (int64_t i = 0; i < L; ++i) store_row<T, A>(dq_acc + (g * L + i) * E, dq + i * p.dq_stride.r, E);
        }
      }
    }
  });

  if (nchunks > 1) {  // fixed-order sum of the partial dQs
    parallel_for(B * Hq, [&](int64_t t0, int64_t t1) {
      std::vector<A> row(E);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hq, h = t % Hq;
        T* dq = static_cast<T*>(p.dq) + b * p.dq_stride.b + h * p.dq_stride.h;
        for (int64_t i = 0; i < L; ++i) {
          std::fill(row.begin(), row.end(), A(0));
          for (int64_t c = 0; c < nchunks; ++c) add_row(row.data(), dq_part.data() + ((c * B + b) * Hq + h) * L * E + i * E, E);
          store_row<T, A>(row.data(), dq + i * p.dq_stride.r, E);
        }
      }
    });
  }
}

template <typename T>
void flash_bwd(const BwdParams& p) {
  with_tile<T>([&](auto tag) { flash_bwd_impl<T, typename decltype(tag)::type>(p); });
}

// Attention probabilities (after dropout, as the forward applied them), recomputed from q, k and the
// log-sum-exp tile by tile with the forward's product path (the same Q K^T as the forward that produced
// lse); out is batch x heads_q x len_q x len_k contiguous. Key tiles outside a query block's key range
// (causal, window, masks' false / -inf: block_key_range) are written as zeros without computing them.
template <typename T, typename Tile>
void flash_probs_impl(const FwdParams& p, T* out) {
  using A = acc_t<T>;
  if (p.batch == 0 || p.heads_kv == 0) return;
  const int64_t Hq = p.heads_q, G = p.heads_q / p.heads_kv, L = p.len_q, S = p.len_k, E = p.dim_qk;
  const Blocks blk = choose_blocks(p, false);
  const int64_t kBlockQ = blk.q, kBlockK = blk.k;
  const int64_t nqb = cdiv(L, kBlockQ);
  const bool dropout = p.dropout_p > 0.0;
  const DropoutRng rng(p.seed, p.offset, p.dropout_p);
  BwdParams bp;
  static_cast<FwdParams&>(bp) = p;
  std::vector<A> shift, rscale;
  row_stats<T, BlasTile<T>>(bp, blk, false, shift, rscale, nullptr);
  parallel_for(p.batch * Hq * nqb, [&](int64_t t0, int64_t t1) {
    Tile tile(E, E, kBlockQ, kBlockK, false);
    Scratch<A> sbuf(kBlockQ * kBlockK);
    std::vector<A> tmp(kBlockK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % nqb, bh = t / nqb, h = bh % Hq, b = bh / Hq, hk = h / G;
      const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, L - i0);
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h + i0 * p.q_stride.r;
      const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
      T* o = out + (bh * L + i0) * S;
      int64_t jlo, jhi;
      block_key_range(p, b, h, i0, nq, jlo, jhi);
      for (int64_t r = 0; r < nq; ++r) {  // keys no row of the block sees
        std::memset(static_cast<void*>(o + r * S), 0, jlo * sizeof(T));
        std::memset(static_cast<void*>(o + r * S + jhi), 0, (S - jhi) * sizeof(T));
      }
      tile.load_q(q, p.q_stride.r, nq);
      for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, jhi - j0);
        tile.load_k(k + j0 * p.k_stride.r, p.k_stride.r, nk);
        recompute_probs(p, b, h, i0, nq, j0, nk, tile, sbuf.data(), kBlockK, tmp.data(), shift.data() + bh * L + i0,
                        rscale.data() + bh * L + i0);
        for (int64_t r = 0; r < nq; ++r) {
          A* s = sbuf.data() + r * kBlockK;
          if (dropout) dropout_row(rng, static_cast<uint64_t>(bh), i0 + r, j0, nk, s);
          store_row<T, A>(s, o + r * S + j0, nk);
        }
      }
    }
  });
}

template <typename T>
void flash_probs(const FwdParams& p, T* out) {
  with_tile<T>([&](auto tag) { flash_probs_impl<T, typename decltype(tag)::type>(p, out); });
}

}  // namespace attention_ext::cpu

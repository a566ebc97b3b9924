// Torch-free description of one attention call.
//
// The ATen glue (csrc/glue.cpp) validates the tensors and fills these structs;
// the CPU and CUDA kernels read nothing else. Every tensor is seen as 4-D
// (batch, heads, seq, dim) with arbitrary element strides; the last dimension of
// q/k/v/out/dout is always unit-stride (the glue guarantees it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define AE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AE_HOST_DEVICE inline
#endif

namespace attention_ext {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kBool = 4 };

enum class MaskKind : int32_t { kNone = 0, kBool = 1, kAdditive = 2 };

// A window bound that is absent (FwdParams::window_left / window_right).
constexpr int64_t kNoBound = INT64_MIN;

// Strides in elements of a 4-D (batch, head, row, col) view.
struct Strides4 {
  int64_t b = 0, h = 0, r = 0, c = 1;
};

struct FwdParams {
  // batch x heads_q x len_q x dim_qk
  const void* q = nullptr;
  // batch x heads_kv x len_k x dim_qk
  const void* k = nullptr;
  // batch x heads_kv x len_k x dim_v
  const void* v = nullptr;
  // batch x heads_q x len_q x dim_v (written)
  void* out = nullptr;
  // batch x heads_q x len_q, contiguous, in the accumulation type (float32, or
  // float64 for float64 inputs) (written): log-sum-exp of the scaled, masked
  // scores of each query row; -inf for a row with no visible key.
  void* lse = nullptr;
  // broadcast to batch x heads_q x len_q x len_k through (possibly zero) strides
  const void* mask = nullptr;

  Strides4 q_stride, k_stride, v_stride, o_stride, mask_stride;

  int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_k = 0, dim_qk = 0, dim_v = 0;

  DType dtype = DType::kFloat32;       // dtype of q, k, v, out
  MaskKind mask_kind = MaskKind::kNone;
  DType mask_dtype = DType::kBool;     // element type of mask when present

  double scale = 1.0;
  // Key j is visible to query i iff  i - window_left <= j <= i + window_right,
  // where kNoBound means unbounded. is_causal is folded into window_right
  // (= min(window_right, 0)) by the glue. A bound may be negative: a call
  // whose queries sit at the end of its keys (attention_kvcache: query i at
  // position i + S - L) shifts both bounds by S - L.
  int64_t window_left = kNoBound, window_right = kNoBound;

  // Dropout: probability of dropping, and the Philox key/counter base.
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;
  // CUDA-graph safe variant: when non-null the kernel reads seed/offset from
  // device memory (captured graphs replay with fresh values).
  const int64_t* seed_offset_ptr = nullptr;
  // Where the kernel records the seed/offset it used (int64[2]), may be null.
  int64_t* rng_state_out = nullptr;
  // Optional (CUDA Hopper kernels): for a boolean mask that is the same for
  // every query row (key padding), keys [key_bounds[2 bh], key_bounds[2 bh + 1])
  // of (batch, query head) bh hold its first and last true element (an empty
  // range when it has none): keys outside it are hidden from every row, and
  // the kernels skip their tiles. Filled on the device by launch_key_bounds.
  const int32_t* key_bounds = nullptr;
  // Optional (CUDA sm80 forward, flash-decoding): with num_splits > 1 the key tiles of each (batch, head,
  // query block) are shared among num_splits CTAs, which write their partial outputs, normalised by their own
  // sums, to o_accum (num_splits x batch * heads_q * len_q x dim_v, fp32) and their row maxima m and sums l
  // to lse_accum (2 x num_splits x batch * heads_q * len_q: all m, then all l) instead of out / lse; a
  // combine kernel merges them.
  int num_splits = 1;
  float* o_accum = nullptr;
  float* lse_accum = nullptr;
  // Optional (CUDA sm80 forward and backward): packed variable-length sequences in one launch. batch is then
  // the number of sequences and len_q / len_k bound their lengths; sequence b is rows
  // [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q / out (and dout, dq) and [cu_seqlens_k[b], cu_seqlens_k[b + 1])
  // of k / v (and dk, dv; batch strides unused), its log-sum-exp (and every per-row buffer of the backward) the
  // (heads_q, L_b) block at heads_q * cu_seqlens_q[b], and its dropout stream is (seed, offset + b) (from
  // seed_offset_ptr[2 b], [2 b + 1] when that is set). The kernels see each sequence as a call of batch 1
  // (sequence_params, cuda/flash_fwd.cuh and flash_bwd.cuh; the host-side twin for the other backends is
  // split_sequences, varlen.h). total_q = cu_seqlens_q[batch], the packed query rows; total_k =
  // cu_seqlens_k[batch], the packed key rows. (With cache_lens below, cu_seqlens_q alone: attention_kvcache's packed
  // queries, each batch element's keys in its cache.)
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  // Logit soft-capping (Gemma 2's attn_logit_softcapping): when > 0, each scaled score x becomes
  // softcap * tanh(x / softcap) before the mask is added; 0: off. (Last: the fields before it keep the offsets
  // the Hopper kernels' parameter loads were tuned with.)
  double softcap = 0.0;
  // ALiBi (attention with linear biases, FlashAttention's alibi_slopes): when non-null, float32 slopes m of
  // (batch, heads_q) through element strides (alibi_stride_b is 0 for one slope per head), and each score of
  // query i and key j gets -m * |i + len_k - len_q - j| (the queries as the last len_q of the len_k positions,
  // so decoding with a cache sees the right distances) after the soft cap, before the mask.
  const float* alibi_slopes = nullptr;
  int64_t alibi_stride_b = 0, alibi_stride_h = 1;
  // Optional (attention_kvcache's CPU forward): a paged key / value cache. Key and value row j of batch b are
  // row j % page_size of page block_table[b * block_table_stride + j / page_size] (pages k_stride.b /
  // v_stride.b apart). Only the CPU forward without weights (cpu/flash_cpu.h, kv_rows) and the CUDA forward with
  // cache_lens read it.
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0, page_size = 0;
  // Optional (attention_kvcache): batch element b attends to the first cache_lens[b] key positions of its cache
  // (contiguous, or its pages with block_table), the len_q queries at their end (cache_batch_params below; the CPU
  // reads it on the host, the sm80 forward's cache variant on the device, pages of any size).
  const int32_t* cache_lens = nullptr;
  // Optional (attention_kvcache with a contiguous cache): batch element b's cache is row cache_batch_idx[b] of k / v
  // (k_stride.b / v_stride.b apart), else row b.
  const int32_t* cache_batch_idx = nullptr;
  // Optional (attention_kvcache with a contiguous cache): batch element b's cache starts at position
  // cache_leftpad[b] (a left padding): it attends to positions cache_leftpad[b] .. cache_lens[b] - 1, counted from
  // there (cache_batch_params).
  const int32_t* cache_leftpad = nullptr;
  // (attention_kvcache) the positions a cache row holds (S_max, or max_pages * page_size) and the rows of the
  // caches (contiguous: the rows cache_batch_idx may name; paged: the pages the block table may name), so that the
  // kernels can tell lengths and indices out of range, which are not read back under CUDA-graph capture
  // (cache_keys_ok).
  int64_t cache_capacity = 0, cache_rows = 0;
};

// ptr moved by `elems` elements of `bytes` bytes each (the params' untyped pointers); nullptr stays nullptr.
template <typename P>
AE_HOST_DEVICE P* offset_by(P* ptr, int64_t elems, size_t bytes) {
  using C = std::conditional_t<std::is_const_v<P>, const char, char>;
  return ptr == nullptr ? ptr : reinterpret_cast<P*>(reinterpret_cast<C*>(ptr) + elems * static_cast<int64_t>(bytes));
}
// The same for a pointer known to be set (no test).
template <typename P>
AE_HOST_DEVICE P* advance(P* ptr, int64_t elems, size_t bytes) {
  using C = std::conditional_t<std::is_const_v<P>, const char, char>;
  return reinterpret_cast<P*>(reinterpret_cast<C*>(ptr) + elems * static_cast<int64_t>(bytes));
}

// Moves the window bounds of p for queries that are the last len_q of len_k positions (query i at position
// i + shift, shift = len_k - len_q: attention_kvcache's bottom-right alignment): a bound may become negative.
AE_HOST_DEVICE void shift_window(FwdParams& p, int64_t shift) {
  if (p.window_left != kNoBound) p.window_left -= shift;
  if (p.window_right != kNoBound) p.window_right += shift;
}

// Whether batch element b of an attention_kvcache call (FwdParams::cache_lens) has query rows inside the call's
// (packed: 0 <= cu_seqlens_q[b] <= cu_seqlens_q[b + 1] <= total_q) / a length in [0, cache_capacity] and a cache
// row (cache_batch_idx) in [0, cache_rows). The glue checks these on the host, except under CUDA-graph capture,
// where the values stay on the device: there a batch element that fails gets no rows (packed queries; its output
// rows keep the glue's NaN) or a NaN output and log-sum-exp, and nothing outside the tensors is read or written.
// (On CUDA, launch_cache_lengths checks the rest beforehand: the pages of a paged cache, and cu_seqlens_q as a
// whole, so that no two batch elements share rows.)
AE_HOST_DEVICE bool cache_rows_ok(const FwdParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) return true;
  const int64_t q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
  return 0 <= q0 && q0 <= q1 && q1 <= p.total_q;
}
AE_HOST_DEVICE bool cache_keys_ok(const FwdParams& p, int64_t b) {
  const int64_t len = p.cache_lens[b];
  if (len < 0 || len > p.cache_capacity) return false;
  if (p.cache_batch_idx == nullptr) return true;
  const int64_t row = p.cache_batch_idx[b];
  return 0 <= row && row < p.cache_rows;
}

// Batch element b of an attention_kvcache call (FwdParams::cache_lens) as a call of its own, of batch 1: its query
// rows, output and log-sum-exp (packed queries: its rows of cu_seqlens_q, the call's len_q being the longest), its
// first cache_lens[b] positions (its cache rows, or its row of the block table) and slopes, the queries at the end
// of its positions. es / acc_es: the element size of q, k, v and out / of the
// log-sum-exp. (The CPU's per-batch params, and on CUDA the cache variant's, cuda/flash_fwd.cuh.)
AE_HOST_DEVICE FwdParams cache_batch_params(const FwdParams& p, int64_t b, size_t es, size_t acc_es) {
  FwdParams s = p;
  s.batch = 1;
  // out of range (cache_rows_ok / cache_keys_ok, under graph capture): no query rows / no keys
  const bool keys_ok = cache_keys_ok(p, b);
  s.len_k = keys_ok ? p.cache_lens[b] : 0;
  // a left padding: the cache from its first position (clamped to [0, S_b]: values not checked under graph capture
  // stay inside the cache)
  int64_t start = 0;
  if (p.cache_leftpad != nullptr) {
    start = p.cache_leftpad[b];
    start = start < 0 ? 0 : (start > s.len_k ? s.len_k : start);
    s.len_k -= start;
  }
  if (p.cu_seqlens_q != nullptr) {  // packed queries: b's rows, its (heads_q, L_b) block of the log-sum-exp
    const bool rows_ok = cache_rows_ok(p, b);
    const int64_t q0 = rows_ok ? p.cu_seqlens_q[b] : 0;
    s.len_q = rows_ok ? p.cu_seqlens_q[b + 1] - q0 : 0;
    s.q = advance(p.q, q0 * p.q_stride.r, es);
    s.out = advance(p.out, q0 * p.o_stride.r, es);
    s.lse = advance(p.lse, p.heads_q * q0, acc_es);
    s.cu_seqlens_q = nullptr;
  } else {
    s.q = advance(p.q, b * p.q_stride.b, es);
    s.out = advance(p.out, b * p.o_stride.b, es);
    s.lse = advance(p.lse, b * p.heads_q * p.len_q, acc_es);
  }
  if (p.block_table != nullptr) {
    s.block_table = p.block_table + b * p.block_table_stride;
  } else {
    const int64_t row = p.cache_batch_idx == nullptr ? b : (keys_ok ? p.cache_batch_idx[b] : 0);
    s.k = advance(p.k, row * p.k_stride.b + start * p.k_stride.r, es);
    s.v = advance(p.v, row * p.v_stride.b + start * p.v_stride.r, es);
  }
  if (p.alibi_slopes != nullptr) s.alibi_slopes += b * p.alibi_stride_b;
  shift_window(s, s.len_k - s.len_q);
  return s;
}

// The ALiBi slope of (batch, query head) (b, h); 0 without ALiBi.
AE_HOST_DEVICE float alibi_slope(const FwdParams& p, int64_t b, int64_t h) {
  return p.alibi_slopes == nullptr ? 0.f : p.alibi_slopes[b * p.alibi_stride_b + h * p.alibi_stride_h];
}

// Rows of the per-row buffers (log-sum-exp, the backward's statistics and dQ workspace): heads_q x every query
// row of the call, packed or not.
AE_HOST_DEVICE int64_t stat_rows(const FwdParams& p) {
  return p.cu_seqlens_q != nullptr ? p.heads_q * p.total_q : p.batch * p.heads_q * p.len_q;
}

struct BwdParams : FwdParams {
  // batch x heads_q x len_q x dim_v
  const void* dout = nullptr;
  // gradients, same shapes as q, k, v (written)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides4 do_stride, dq_stride, dk_stride, dv_stride;
  // Optional gradient of an additive mask in the accumulation type (float32, or
  // float64 for float64 inputs), batch x heads_q x len_q x len_k
  // contiguous (the glue reduces it over broadcast dimensions afterwards).
  void* dmask = nullptr;
  // Optional cotangent c of the log-sum-exp, laid out as lse (stat_rows, accumulation type). As
  // d lse_i / d s_ij = P_ij, it adds c_i P_ij to dS: the softmax-backward row term D_i becomes D_i - c_i, and
  // nothing else changes (dQ, dK and a mask's gradient follow from dS). Ignored on rows that see no key.
  const void* dlse = nullptr;
  bool deterministic = false;
};

// |lse| above which the backward and attention_probs of every backend stop
// trusting P = exp(x - lse): in lse = m + log(l), fp32 has lost log(l) (a whole
// row masked with finfo.min), so such rows get their exact max m and sum l
// recomputed (CPU: row_stats in cpu/flash_cpu.h; CUDA: launch_row_stats).
constexpr double kExtremeLse = 1e4;

// Visible key range [lo, hi) of query row i, before any explicit mask, with len_k keys (p.len_k, or a packed
// sequence's own).
AE_HOST_DEVICE void key_range(const FwdParams& p, int64_t len_k, int64_t i, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = len_k;
  if (p.window_left != kNoBound) lo = i - p.window_left > 0 ? i - p.window_left : 0;
  if (lo > len_k) lo = len_k;  // a row whose window starts past the last key sees nothing
  if (p.window_right != kNoBound) {
    int64_t h = i + p.window_right + 1;
    hi = h < hi ? h : hi;
  }
  if (hi < lo) hi = lo;
}
AE_HOST_DEVICE void key_range(const FwdParams& p, int64_t i, int64_t& lo, int64_t& hi) {
  key_range(p, p.len_k, i, lo, hi);
}

// Query rows [ib, ie) that can see a key of [j0, j1) (the inverse of
// key_range, before any explicit mask): row i sees key j iff
// j - window_right <= i <= j + window_left.
AE_HOST_DEVICE void query_range(const FwdParams& p, int64_t j0, int64_t j1, int64_t& ib, int64_t& ie) {
  ib = 0;
  ie = p.len_q;
  if (p.window_right != kNoBound) ib = j0 - p.window_right > 0 ? j0 - p.window_right : 0;
  if (p.window_left != kNoBound) ie = j1 + p.window_left < p.len_q ? j1 + p.window_left : p.len_q;
  if (ib > p.len_q) ib = p.len_q;
  if (ie < ib) ie = ib;  // (shifted bounds) no row
}

}  // namespace attention_ext

// attention_kvcache: new queries against a key / value cache (decoding, chunked prefill), FlashAttention's
// flash_attn_with_kvcache in this project's (batch, heads, seq, dim) layout (schema in schemas.h):
//   - the cache is key_cache (B, Hkv, S_max, E) / value_cache (B, Hkv, S_max, Ev), or paged:
//     (num_pages, Hkv, page_size, E) / (..., Ev) with block_table (B, max_pages) int32 naming batch b's pages
//     in order (position j of batch b is row j % page_size of page block_table[b, j / page_size]);
//   - cache_seqlens (B,) holds how many positions of each batch's cache are filled; key / value (B, Hkv, L_new,
//     E / Ev), when given, are written in place at positions cache_seqlens[b] .. + L_new - 1 first;
//   - batch b then attends to its first S_b = cache_seqlens[b] + L_new positions, the L queries being the last L
//     of them (bottom-right: query i at position i + S_b - L for is_causal, window_size and ALiBi's distances).
// The CPU runs the flash kernel per batch element on the cache in place, pages included (FwdParams::block_table;
// csrc/cpu/attention_cpu.cpp); CUDA the sm80 forward's cache variant (cuda/workspace.h, run_kvcache_forward, the
// new keys written by its own kernel), or for float64, which it does not take, kvcache_gathered below.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "glue.h"
#include "varlen.h"

namespace attention_ext {

// Whether the query rows sit at consecutive positions for the rotary embedding (a causal or window bound), or all
// at cache_seqlens[b] (FlashAttention's rule).
inline bool queries_advance(const AttnOptions& opt) {
  return opt.is_causal || opt.window_left >= 0 || opt.window_right >= 0;
}

// One attention_kvcache call's tensors (the op's arguments; rotary_cos / rotary_sin: the optional rotary
// embedding tables, (seqlen_ro, rotary_dim / 2), applied to the query and the new keys before anything else).
// Packed (cu_seqlens_q, int32 (B + 1,)): the query is (total_q, Hq, E), batch element b's L_b =
// cu_seqlens_q[b + 1] - cu_seqlens_q[b] rows from cu_seqlens_q[b] (continuous batching: prefill chunks and decoding
// steps in one call), key / value (total_q, Hkv, E / Ev) its L_b new positions, the output (total_q, Hq, Ev) and
// the log-sum-exp (total_q, Hq); max_seqlen_q, when given, at least every L_b. cache_batch_idx (B,) int32 / int64
// (contiguous caches only, FlashAttention's argument of that name): batch element b's cache is row
// cache_batch_idx[b] of key_cache / value_cache (a pool of any number of rows: slots reused across requests, beam
// search), else row b. cache_leftpad (B,) int32 / int64 (contiguous caches only, FlashAttention's argument): batch
// element b's cache starts at position cache_leftpad[b] <= cache_seqlens[b] (a left-padded batch): it attends to
// positions cache_leftpad[b] .. S_b - 1 only, and causal, window and ALiBi distances count from there, while new
// keys still go to cache_seqlens[b] onwards and the rotary embedding keeps the absolute positions (FlashAttention's
// rule).
struct KvCall {
  at::Tensor q, key_cache, value_cache, cache_seqlens;
  std::optional<at::Tensor> key, value, block_table, rotary_cos, rotary_sin;
  bool rotary_interleaved = false;
  std::optional<at::Tensor> cu_seqlens_q;
  std::optional<int64_t> max_seqlen_q;
  std::optional<at::Tensor> cache_batch_idx;
  std::optional<at::Tensor> cache_leftpad;
  // (packed, set by prepare_kv) each query row's batch element and its index there, (total_q,) int64
  at::Tensor row_batch, row_index;
  bool paged() const { return block_table.has_value() && block_table->defined(); }
  bool rotary() const { return rotary_cos.has_value() && rotary_cos->defined(); }
  bool packed() const { return cu_seqlens_q.has_value() && cu_seqlens_q->defined(); }
  bool appends() const { return key.has_value() && key->defined(); }  // (new keys given, maybe of no rows)
  bool indexed() const { return cache_batch_idx.has_value() && cache_batch_idx->defined(); }
  bool leftpadded() const { return cache_leftpad.has_value() && cache_leftpad->defined(); }
  // positions appended per batch element (dense calls): key's length, 0 without new keys
  int64_t new_len() const { return key.has_value() && key->defined() && !packed() ? key->size(2) : 0; }
  // positions the cache holds: S_max, or max_pages * page_size
  int64_t capacity() const { return paged() ? block_table->size(1) * key_cache.size(2) : key_cache.size(2); }
};

// The op's arguments in schema order (schemas.h's kKvcache), as the dispatcher passes them.
using KvcacheFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, std::optional<double>, at::IntArrayRef,
    double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
    const std::optional<at::Tensor>&, std::optional<int64_t>, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

// A dispatch key's kernel of attention_kvcache from Fn(call, opt), the call's tensors and its options (no dropout,
// any GQA group): registered as TORCH_FN(kvcache_kernel<Fn>).
template <std::tuple<at::Tensor, at::Tensor> (*Fn)(const KvCall&, const AttnOptions&)>
std::tuple<at::Tensor, at::Tensor> kvcache_kernel(
    const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
    const std::optional<at::Tensor>& block_table, bool is_causal, std::optional<double> scale, at::IntArrayRef window,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    const std::optional<at::Tensor>& cu_seqlens_q, std::optional<int64_t> max_seqlen_q,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad) {
  return Fn(KvCall{q, key_cache, value_cache, cache_seqlens, key, value, block_table, rotary_cos, rotary_sin,
                   rotary_interleaved, cu_seqlens_q, max_seqlen_q, cache_batch_idx, cache_leftpad},
            make_options(0.0, is_causal, scale, true, window, softcap, alibi_slopes));
}

// The op called through the dispatcher with the call's tensors and options (for the kernels of the dispatch keys
// above the backends': Autograd, Autocast).
std::tuple<at::Tensor, at::Tensor> call_kvcache(const KvCall& c, const AttnOptions& opt);

// Shapes, dtypes and devices (SymInt-safe: the Meta kernel calls it too); errors name the argument.
void check_kvcache_inputs(const KvCall& c, const AttnOptions& opt);

// The positions each batch element attends to, S_b = cache_seqlens[b] + its new positions (keys), and its query
// rows L_b (queries), read on the host (a device sync when they live on a GPU) and checked: cache_seqlens >= 0 and
// S_b within the cache's capacity, (paged) the pages those positions use inside [0, num_pages), (rotary) the
// positions rotated inside the tables, (packed) cu_seqlens_q from 0 to total_q, non-decreasing, within
// max_seqlen_q, (cache_leftpad) 0 <= cache_leftpad[b] <= cache_seqlens[b]. (S_b counts from position 0, a left
// padding included.)
struct KvLengths {
  std::vector<int64_t> keys, queries;
};
KvLengths read_kv_lengths(const KvCall& c, const AttnOptions& opt);

// S_b of every batch element, (B,) int64 on the query's device (no sync).
at::Tensor kv_lengths(const KvCall& c);

// The fused kernels' view of a call once rotated and appended (both backends): the query (and output) as
// (B, Hq, L, E), packed ones as (1, Hq, total_q, E) with FwdParams::cu_seqlens_q; the output and log-sum-exp
// allocated and poisoned (a packed call's log-sum-exp flat, in (Hq, L_b) blocks); the slopes, block table,
// cu_seqlens_q and the lengths lens (S_b, int32 (B,)) on index_device, all kept alive here. max_q: the longest
// L_b of a packed call when known (else max_seqlen_q, or total_q: the kernels skip the rows past each L_b).
struct KvParams {
  FwdParams p;
  at::Tensor q4, out, lse, alibi, table, cu, lens, batch_idx, leftpad;
};
KvParams kv_params(const KvCall& c, const AttnOptions& opt, const at::Tensor& lens, c10::Device index_device,
                   int64_t max_q);

// A packed call's log-sum-exp as the op returns it, (total_q, Hq), from the kernels' flat layout (batch element
// b's (Hq, L_b) block at Hq * cu_seqlens_q[b]).
// checked = false (cu_seqlens_q not read back, CUDA-graph capture): the rows of batch elements whose offsets are
// out of range come out NaN, with no index outside flat (a few more operations, so only then).
at::Tensor packed_lse(const KvCall& c, const at::Tensor& flat, bool checked = true);

// What every backend does before attending, once check_kvcache_inputs has passed, in ATen operations on the
// query's device (no sync). A packed call's rows are located once (KvCall::row_batch / row_index, kept in the
// returned call for packed_lse). Then the query and new keys are rotated (FlashAttention's rotary_cos /
// rotary_sin): new key row t of batch b at position cache_seqlens[b] + t, query row i at cache_seqlens[b] + i with
// a causal or window bound, else at cache_seqlens[b]; the first rotary_dim features, in pairs
// (x_j, x_{j + rotary_dim / 2}) or, interleaved, (x_{2j}, x_{2j + 1}); in float32 (float64 for float64), rounded
// to the inputs' dtype. Last, key / value (when given) are written into the caches at those positions. Returns the
// call with the rotated query (and keys).
// append = false: the caller writes the new keys itself (the CUDA glue, in one launch: cuda::launch_cache_append),
// after check_caches_apart.
KvCall prepare_kv(const KvCall& call, const AttnOptions& opt, bool append = true);

// Refuses key and value caches that share memory when new keys are written (the values would overwrite them).
void check_caches_apart(const KvCall& c);

// The visible cache of every batch element gathered into dense (B, Hkv, C, E) key and (..., Ev) value tensors
// (C = rows), right-aligned (batch b's S_b positions in the last S_b rows), and the boolean mask
// (B, 1, 1 or L, C) that hides the rows before them (and a left padding's) and applies the bottom-right causal /
// window bounds. With the queries the last L of C positions, ALiBi's distances come out as S_b's.
// rows: C, at least the longest S_b (the capacity when the lengths were not read back).
struct GatheredCache {
  at::Tensor key, value, mask;
};
GatheredCache gather_cache(const KvCall& c, const AttnOptions& opt, int64_t rows);

// attention_kvcache through a backend's dense forward (fwd has _attention_forward's signature), once
// check_kvcache_inputs has passed: the query and new keys rotated, the new keys appended, the cache gathered
// (gather_cache) and one fused call with its mask; a packed call batch element by batch element (its rows as a
// dense call of batch 1, which needs the lengths on the host). check_values: read the lengths back and check them
// (read_kv_lengths; a sync on a GPU, which CUDA-graph capture cannot take).
template <typename Fwd>
std::tuple<at::Tensor, at::Tensor> kvcache_gathered(Fwd&& fwd, const KvCall& call, const AttnOptions& opt,
                                                    bool check_values) {
  if (call.packed()) {
    TORCH_CHECK(check_values, "attention_kvcache: packed queries (cu_seqlens_q) of this dtype cannot be captured in "
                "a CUDA graph (their lengths are read back)");
    const KvLengths n = read_kv_lengths(call, opt);
    const int64_t B = static_cast<int64_t>(n.queries.size());
    std::vector<at::Tensor> outs, lses;
    int64_t row = 0;
    for (int64_t b = 0; b < B; ++b) {
      auto one = [&](const at::Tensor& t) { return heads_first(t.narrow(0, row, n.queries[b])).unsqueeze(0); };
      KvCall s = call;
      s.cu_seqlens_q.reset();
      s.max_seqlen_q.reset();
      s.q = one(call.q);
      if (call.key.has_value() && call.key->defined()) {
        s.key = one(*call.key);
        s.value = one(*call.value);
      }
      s.cache_seqlens = call.cache_seqlens.narrow(0, b, 1);
      if (call.paged()) {
        s.block_table = call.block_table->narrow(0, b, 1);
      } else if (call.indexed()) {
        s.cache_batch_idx = call.cache_batch_idx->narrow(0, b, 1);
      } else {
        s.key_cache = call.key_cache.narrow(0, b, 1);
        s.value_cache = call.value_cache.narrow(0, b, 1);
      }
      if (call.leftpadded()) s.cache_leftpad = call.cache_leftpad->narrow(0, b, 1);
      AttnOptions o = opt;
      // slopes per batch element: its row ((Hq,) and (1, Hq) stand for every batch element)
      if (opt.has_alibi() && opt.alibi_slopes->dim() == 2 && opt.alibi_slopes->size(0) != 1)
        o.alibi_slopes = opt.alibi_slopes->narrow(0, b, 1);
      auto [out, lse] = kvcache_gathered(fwd, s, o, false);
      outs.push_back(heads_first(out.squeeze(0)));
      lses.push_back(lse.squeeze(0).transpose(0, 1));
      row += n.queries[b];
    }
    if (B == 0) return {empty_output(call.q, call.value_cache.size(3)), empty_lse(call.q)};
    return {at::cat(outs, 0), at::cat(lses, 0)};
  }
  // as many rows as the longest cache needs (every row of the capacity when the lengths stay on the device)
  const std::vector<int64_t> lens = check_values ? read_kv_lengths(call, opt).keys : std::vector<int64_t>{};
  const int64_t rows =
      lens.empty() ? call.capacity() : std::max<int64_t>(1, *std::max_element(lens.begin(), lens.end()));
  const KvCall c = prepare_kv(call, opt);
  GatheredCache g = gather_cache(c, opt, rows);
  const std::vector<int64_t> no_window{-1, -1};
  auto [out, lse, rng] = fwd(c.q, g.key, g.value, g.mask, 0.0, false, opt.scale, true, no_window, opt.softcap,
                             opt.alibi_slopes);
  if (!check_values && call.rotary()) {
    // (lengths not read back: rotary clamped the positions into the table; a batch element whose rotated positions
    // pass it gets NaN rows, as the kernels' lengths check gives them)
    const int64_t rotated = std::max<int64_t>(call.new_len(), queries_advance(opt) ? call.q.size(2) : 1);
    const at::Tensor past = call.cache_seqlens.to(out.device(), at::kLong).add(rotated).gt(call.rotary_cos->size(0));
    out.masked_fill_(past.view({-1, 1, 1, 1}), std::numeric_limits<double>::quiet_NaN());
    lse.masked_fill_(past.view({-1, 1, 1}), std::numeric_limits<double>::quiet_NaN());
  }
  return {out, lse};
}

}  // namespace attention_ext

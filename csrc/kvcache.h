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
// csrc/cpu/attention_cpu.cpp). Other backends use kvcache_gathered below.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "glue.h"

namespace attention_ext {

// Shapes, dtypes and devices (SymInt-safe: the Meta kernel calls it too); errors name the argument.
void check_kvcache_inputs(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key,
                          const std::optional<at::Tensor>& value, const std::optional<at::Tensor>& block_table,
                          const AttnOptions& opt);

// The positions each batch element attends to, S_b = cache_seqlens[b] + L_new, read on the host (a device sync
// when cache_seqlens lives on a GPU) and checked: cache_seqlens >= 0 and S_b within the cache's capacity, and
// (paged) the pages those positions use inside [0, num_pages).
std::vector<int64_t> read_kv_lengths(const at::Tensor& key_cache, const at::Tensor& cache_seqlens,
                                     const std::optional<at::Tensor>& key,
                                     const std::optional<at::Tensor>& block_table);

// Writes key / value (when given) into the caches at positions cache_seqlens[b] + t, in ATen index operations on
// the caches' device (no sync).
void append_kv(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& cache_seqlens,
               const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
               const std::optional<at::Tensor>& block_table);

// The visible cache of every batch element gathered into dense (B, Hkv, C, E) key and (..., Ev) value tensors
// (C the capacity: S_max, or max_pages * page_size), right-aligned (batch b's S_b positions in the last S_b
// rows), and the boolean mask (B, 1, 1 or L, C) that hides the rows before them and applies the bottom-right
// causal / window bounds. With the queries the last L of C positions, ALiBi's distances come out as S_b's.
struct GatheredCache {
  at::Tensor key, value, mask;
};
GatheredCache gather_cache(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key,
                           const std::optional<at::Tensor>& block_table, const AttnOptions& opt);

// attention_kvcache through a backend's dense forward (fwd has _attention_forward's signature): the new keys
// appended, the cache gathered (gather_cache) and one fused call with its mask. check_values: read the lengths
// back and check them (read_kv_lengths; a sync on a GPU, which CUDA-graph capture cannot take).
template <typename Fwd>
std::tuple<at::Tensor, at::Tensor> kvcache_gathered(Fwd&& fwd, const at::Tensor& q, const at::Tensor& key_cache,
                                                    const at::Tensor& value_cache, const at::Tensor& cache_seqlens,
                                                    const std::optional<at::Tensor>& key,
                                                    const std::optional<at::Tensor>& value,
                                                    const std::optional<at::Tensor>& block_table,
                                                    const AttnOptions& opt, bool check_values) {
  check_kvcache_inputs(q, key_cache, value_cache, cache_seqlens, key, value, block_table, opt);
  if (check_values) read_kv_lengths(key_cache, cache_seqlens, key, block_table);
  append_kv(key_cache, value_cache, cache_seqlens, key, value, block_table);
  GatheredCache g = gather_cache(q, key_cache, value_cache, cache_seqlens, key, block_table, opt);
  const std::vector<int64_t> no_window{-1, -1};
  auto [out, lse, rng] = fwd(q, g.key, g.value, g.mask, 0.0, false, opt.scale, true, no_window, opt.softcap,
                             opt.alibi_slopes);
  return {out, lse};
}

}  // namespace attention_ext

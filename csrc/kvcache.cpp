#include "kvcache.h"

#include <algorithm>

namespace attention_ext {

namespace {

using at::indexing::Slice;

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device() || t.device().is_cpu(), name, " is on ", t.device(), " but query is on ",
              q.device(), "; put it on the query's device or on the CPU");
}

// Capacity of the cache: S_max, or max_pages * page_size.
int64_t capacity(const at::Tensor& key_cache, const std::optional<at::Tensor>& block_table) {
  return has(block_table) ? block_table->size(1) * key_cache.size(2) : key_cache.size(2);
}

int64_t new_len(const std::optional<at::Tensor>& key) { return has(key) ? key->size(2) : 0; }

std::vector<int64_t> host_int64(const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Where positions pos (B, n) of each batch element live in the cache: (row, slot) index tensors for
// cache[row, :, slot] (the batch element and the position, or the page and the row in it).
std::tuple<at::Tensor, at::Tensor> cache_rows(const at::Tensor& key_cache, const std::optional<at::Tensor>& block_table,
                                              const at::Tensor& pos) {
  if (!has(block_table)) {
    const auto li = at::TensorOptions().dtype(at::kLong).device(pos.device());
    return {at::arange(pos.size(0), li).unsqueeze(1).expand_as(pos), pos};
  }
  const int64_t page = key_cache.size(2);
  return {block_table->to(pos.device(), at::kLong).gather(1, at::floor_divide(pos, page)), at::remainder(pos, page)};
}

}  // namespace

void check_kvcache_inputs(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key,
                          const std::optional<at::Tensor>& value, const std::optional<at::Tensor>& block_table,
                          const AttnOptions& opt) {
  TORCH_CHECK_VALUE(q.defined() && key_cache.defined() && value_cache.defined() && cache_seqlens.defined(),
                    "query, key_cache, value_cache and cache_seqlens must be tensors");
  TORCH_CHECK_VALUE(q.dim() == 4, "query must be (batch, heads, L, E) for attention_kvcache, got shape ",
                    q.sym_sizes());
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && value_cache.dim() == 4,
                    "key_cache and value_cache must be 4-D: (batch, heads_kv, S_max, E) / (..., Ev), or paged "
                    "(num_pages, heads_kv, page_size, E) / (..., Ev) with a block_table; got shapes ",
                    key_cache.sym_sizes(), " and ", value_cache.sym_sizes());
  const c10::SymInt B = q.sym_size(0);
  const bool paged = has(block_table);
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.sym_size(0) == B && bt.sym_size(1) >= 1,
                      "block_table must be (batch, max_pages) = (", B, ", >= 1), got shape ", bt.sym_sizes());
    check_index_tensor(bt, "block_table", q);
    TORCH_CHECK_VALUE(key_cache.sym_size(0) >= 1 && key_cache.sym_size(2) >= 1,
                      "a paged key_cache (num_pages, heads_kv, page_size, E) needs num_pages >= 1 and "
                      "page_size >= 1, got shape ", key_cache.sym_sizes());
    TORCH_CHECK_VALUE(value_cache.sym_size(0) == key_cache.sym_size(0), "value_cache has ", value_cache.sym_size(0),
                      " pages but key_cache has ", key_cache.sym_size(0));
  } else {
    TORCH_CHECK_VALUE(key_cache.sym_size(0) == B && value_cache.sym_size(0) == B,
                      "key_cache and value_cache must have the query's batch (", B, ") in dim 0 (or be paged, "
                      "with a block_table), got shapes ", key_cache.sym_sizes(), " and ", value_cache.sym_sizes());
  }
  // dtypes, devices, heads, head dims, window, soft cap and ALiBi: as attention's (any GQA group), with the cache
  // seen as batch-sized keys
  auto as_keys = [&](const at::Tensor& c) {
    return paged ? c.narrow_symint(0, 0, 1).expand_symint({B, c.sym_size(1), c.sym_size(2), c.sym_size(3)}) : c;
  };
  AttnOptions gqa = opt;
  gqa.enable_gqa = true;
  check_inputs(q, as_keys(key_cache), as_keys(value_cache), std::nullopt, gqa);
  TORCH_CHECK_VALUE(q.sym_size(3) >= 1 && value_cache.sym_size(3) >= 1,
                    "attention_kvcache needs head dims >= 1, got E = ", q.sym_size(3), " and Ev = ",
                    value_cache.sym_size(3));
  TORCH_CHECK_VALUE(key_cache.sym_stride(3) == 1 && value_cache.sym_stride(3) == 1,
                    "key_cache and value_cache must have a unit-stride last dimension (they are read and written "
                    "in place), got strides ", key_cache.sym_strides(), " and ", value_cache.sym_strides());
  TORCH_CHECK_VALUE(has(key) == has(value), "key and value must be given together (the new positions to append), "
                    "got ", has(key) ? "a key without a value" : "a value without a key");
  if (has(key)) {
    check_inputs(q, *key, *value, std::nullopt, gqa);
    TORCH_CHECK_VALUE(key->sym_size(1) == key_cache.sym_size(1), "key has ", key->sym_size(1),
                      " heads but key_cache has ", key_cache.sym_size(1));
    TORCH_CHECK_VALUE(value->sym_size(3) == value_cache.sym_size(3), "value has head dim ", value->sym_size(3),
                      " but value_cache has ", value_cache.sym_size(3));
  }
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong,
                   "cache_seqlens must be int32 or int64, got ", cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.sym_size(0) == B,
                    "cache_seqlens must have shape (batch,) = (", B, ",), got ", cache_seqlens.sym_sizes());
  check_index_tensor(cache_seqlens, "cache_seqlens", q);
}

std::vector<int64_t> read_kv_lengths(const at::Tensor& key_cache, const at::Tensor& cache_seqlens,
                                     const std::optional<at::Tensor>& key,
                                     const std::optional<at::Tensor>& block_table) {
  std::vector<int64_t> len = host_int64(cache_seqlens);
  const int64_t add = new_len(key), cap = capacity(key_cache, block_table);
  for (size_t b = 0; b < len.size(); ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0, "cache_seqlens[", b, "] = ", len[b], " is negative");
    TORCH_CHECK_VALUE(len[b] + add <= cap, "cache_seqlens[", b, "] = ", len[b], " plus the ", add,
                      " new positions of key exceeds the cache's capacity (", cap,
                      has(block_table) ? " = max_pages * page_size)" : " = key_cache.size(2))");
    len[b] += add;
  }
  if (has(block_table)) {
    const std::vector<int64_t> bt = host_int64(*block_table);
    const int64_t per = block_table->size(1), page = key_cache.size(2), pages = key_cache.size(0);
    for (size_t b = 0; b < len.size(); ++b) {
      for (int64_t i = 0; i < (len[b] + page - 1) / page; ++i) {
        const int64_t x = bt[b * per + i];
        TORCH_CHECK_VALUE(x >= 0 && x < pages, "block_table[", b, ", ", i, "] = ", x,
                          " is not a page of key_cache (num_pages = ", pages, ")");
      }
    }
  }
  return len;
}

void append_kv(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& cache_seqlens,
               const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
               const std::optional<at::Tensor>& block_table) {
  const int64_t n = new_len(key);
  if (n == 0 || key->size(0) == 0) return;
  const auto dev = key_cache.device();
  const auto li = at::TensorOptions().dtype(at::kLong).device(dev);
  // position of new row t of batch b: cache_seqlens[b] + t  (B, n)
  const at::Tensor pos = cache_seqlens.to(dev, at::kLong).unsqueeze(1) + at::arange(n, li);
  auto [row, slot] = cache_rows(key_cache, block_table, pos);
  // the two index tensors around the heads' slice: the indexed shape is (B, n, heads_kv, E)
  at::Tensor kc = key_cache, vc = value_cache;  // (handles: written in place)
  kc.index_put_({row, Slice(), slot}, key->permute({0, 2, 1, 3}));
  vc.index_put_({row, Slice(), slot}, value->permute({0, 2, 1, 3}));
}

GatheredCache gather_cache(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key,
                           const std::optional<at::Tensor>& block_table, const AttnOptions& opt) {
  const int64_t B = q.size(0), L = q.size(2), C = capacity(key_cache, block_table);
  const auto dev = q.device();
  const auto li = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor len = cache_seqlens.to(dev, at::kLong) + new_len(key);  // S_b
  // row c of the gathered cache holds position c - (C - S_b) of batch b (before 0: hidden)
  at::Tensor src = at::arange(C, li).unsqueeze(0) - (C - len).unsqueeze(1);  // (B, C)
  const at::Tensor visible = src.ge(0);
  auto [row, slot] = cache_rows(key_cache, block_table, src.clamp_min(0));
  GatheredCache g;
  g.key = key_cache.index({row, Slice(), slot}).permute({0, 2, 1, 3});  // (B, Hkv, C, E)
  g.value = value_cache.index({row, Slice(), slot}).permute({0, 2, 1, 3});
  const bool causal = opt.is_causal, left = opt.window_left >= 0, right = opt.window_right >= 0;
  if (!causal && !left && !right) {
    g.mask = visible.view({B, 1, 1, C});
    return g;
  }
  // query i is position C - L + i of the gathered rows
  at::Tensor qpos = (at::arange(L, li) + (C - L)).view({1, L, 1}), kpos = at::arange(C, li).view({1, 1, C});
  at::Tensor m = visible.unsqueeze(1).expand({B, L, C});
  if (left) m = m.logical_and(kpos.ge(qpos - opt.window_left));
  if (causal || right) {
    const int64_t wr = causal ? (right ? std::min<int64_t>(opt.window_right, 0) : 0) : opt.window_right;
    m = m.logical_and(kpos.le(qpos + wr));
  }
  g.mask = m.unsqueeze(1);
  return g;
}

}  // namespace attention_ext

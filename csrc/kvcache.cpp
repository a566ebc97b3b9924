#include "kvcache.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>

#include "composite.h"
#include "varlen.h"

namespace attention_ext {

namespace {

using at::indexing::Slice;

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Where positions pos of batch elements batch (int64 index tensors of one shape) live in the cache: (row, slot)
// index tensors for cache[row, :, slot] (the batch element's cache row, cache_batch_idx's when given, and the
// position; or the page and the row in it).
// Negative positions, rows and pages (values not read back under CUDA-graph capture) become `size`, out of range, so
// that indexing refuses them (an error, or PyTorch's device-side assertion) rather than counting from the end.
std::tuple<at::Tensor, at::Tensor> cache_rows(const KvCall& c, const at::Tensor& batch, const at::Tensor& pos) {
  const auto no_wrap = [](const at::Tensor& i, int64_t size) { return i.masked_fill(i.lt(0), size); };
  const int64_t rows = c.key_cache.size(0);
  if (!c.paged()) {
    const at::Tensor row =
        c.indexed() ? no_wrap(c.cache_batch_idx->to(pos.device(), at::kLong).index({batch}), rows) : batch;
    return {row, no_wrap(pos, c.key_cache.size(2))};
  }
  const int64_t page = c.key_cache.size(2);
  const at::Tensor table = c.block_table->to(pos.device(), at::kLong);
  const at::Tensor p = no_wrap(pos, c.capacity());
  return {no_wrap(table.index({batch, at::floor_divide(p, page)}), rows), at::remainder(p, page)};
}

// The batch index of pos (B, n): b in row b.
at::Tensor batch_of(const at::Tensor& pos) {
  const auto li = at::TensorOptions().dtype(at::kLong).device(pos.device());
  return at::arange(pos.size(0), li).unsqueeze(1).expand_as(pos);
}

// A packed call's rows (KvCall::cu_seqlens_q): the batch element of each and its index there, (total_q,) int64 on
// the query's device, without a sync (rows past cu_seqlens_q[B], which read_kv_lengths refuses, count as the last
// batch element's); those prepare_kv found, once it has run.
std::tuple<at::Tensor, at::Tensor> packed_rows(const KvCall& c) {
  if (c.row_batch.defined()) return {c.row_batch, c.row_index};
  const auto li = at::TensorOptions().dtype(at::kLong).device(c.q.device());
  const at::Tensor cu = c.cu_seqlens_q->to(c.q.device(), at::kLong);
  const at::Tensor t = at::arange(c.q.size(0), li);
  const int64_t B = cu.size(0) - 1;
  // (searched in the running maximum: for cu_seqlens_q out of order, not read back under graph capture, the rows
  // of the batch elements before the first step down still find theirs, as the kernels do)
  const at::Tensor ends = std::get<0>(cu.slice(0, 1).cummax(0));
  const at::Tensor b = at::searchsorted(ends, t, false, true).clamp_max(std::max<int64_t>(B - 1, 0));
  return {b, t - cu.index_select(0, b)};
}

void check_rotary(const KvCall& c) {
  TORCH_CHECK_VALUE(has(c.rotary_cos) == has(c.rotary_sin), "rotary_cos and rotary_sin must be given together");
  if (!c.rotary()) return;
  const at::Tensor &cs = *c.rotary_cos, &sn = *c.rotary_sin;
  TORCH_CHECK_TYPE(cs.is_floating_point() && sn.scalar_type() == cs.scalar_type(),
                   "rotary_cos and rotary_sin must be floating point of one dtype, got ", cs.scalar_type(), " and ",
                   sn.scalar_type());
  TORCH_CHECK_VALUE(cs.dim() == 2 && sn.sym_sizes().equals(cs.sym_sizes()),
                    "rotary_cos and rotary_sin must be (seqlen_ro, rotary_dim / 2) of one shape, got ",
                    cs.sym_sizes(), " and ", sn.sym_sizes());
  const c10::SymInt E = c.q.sym_size(-1);
  TORCH_CHECK_VALUE(cs.sym_size(1) >= 1 && 2 * cs.sym_size(1) <= E, "rotary_cos has rotary_dim / 2 = ",
                    cs.sym_size(1), " columns; rotary_dim must be in [2, E = ", E, "]");
  TORCH_CHECK(cs.device() == c.q.device() && sn.device() == c.q.device(), "rotary_cos and rotary_sin are on ",
              cs.device(), " and ", sn.device(), " but query is on ", c.q.device());
}

// x (B, H, n, E) with its first 2 * cos.size(1) features rotated at positions pos (B, n), in float32 (float64 for
// float64).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                  bool interleaved) {
  const int64_t B = x.size(0), n = x.size(2), half = cos.size(1), rd = 2 * half;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // (positions clamped into the table: under CUDA-graph capture the lengths are not read back, and a batch element
  // whose positions leave it is refused by the kernels, launch_cache_lengths, instead of an indexing error; the
  // values read back are checked, read_kv_lengths. A table of no positions: every element refused, x as it is.)
  if (cos.size(0) == 0) return x.to(acc).contiguous();
  const at::Tensor flat = pos.reshape({-1}).clamp(0, cos.size(0) - 1);
  const at::Tensor c = cos.index_select(0, flat).to(acc).view({B, 1, n, half});
  const at::Tensor s = sin.index_select(0, flat).to(acc).view({B, 1, n, half});
  const at::Tensor xr = x.narrow(3, 0, rd).to(acc);
  at::Tensor a, b;  // the pairs' two halves
  if (interleaved) {
    const at::Tensor pairs = xr.unflatten(3, {half, 2});
    a = pairs.select(4, 0);
    b = pairs.select(4, 1);
  } else {
    a = xr.narrow(3, 0, half);
    b = xr.narrow(3, half, half);
  }
  const at::Tensor ra = a * c - b * s, rb = a * s + b * c;
  const at::Tensor rotated = interleaved ? at::stack({ra, rb}, 4).flatten(3) : at::cat({ra, rb}, 3);
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  out.narrow(3, 0, rd).copy_(rotated);
  return out;
}

}  // namespace

void check_kvcache_inputs(const KvCall& c, const AttnOptions& opt) {
  const at::Tensor &q = c.q, &key_cache = c.key_cache, &value_cache = c.value_cache;
  TORCH_CHECK_VALUE(q.defined() && key_cache.defined() && value_cache.defined() && c.cache_seqlens.defined(),
                    "query, key_cache, value_cache and cache_seqlens must be tensors");
  TORCH_CHECK_TYPE(c.cache_seqlens.scalar_type() == at::kInt || c.cache_seqlens.scalar_type() == at::kLong,
                   "cache_seqlens must be int32 or int64, got ", c.cache_seqlens.scalar_type());
  // the query as (B, Hq, L, E) for the checks shared with dense calls: a packed query's rows seen by every batch
  // element (an expanded view: shapes only)
  at::Tensor q4 = q;
  c10::SymInt B;
  if (c.packed()) {
    const at::Tensor& cu = *c.cu_seqlens_q;
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "cu_seqlens_q must be int32, got ", cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.sym_size(0) >= 1, "cu_seqlens_q must be (batch + 1,), got shape ",
                      cu.sym_sizes());
    check_index_device(cu, "cu_seqlens_q", q);
    B = cu.sym_size(0) - 1;
    TORCH_CHECK_VALUE(q.dim() == 3, "query must be (total_q, heads, E) with cu_seqlens_q, got shape ",
                      q.sym_sizes());
    TORCH_CHECK_VALUE(c.max_seqlen_q.value_or(0) >= 0, "max_seqlen_q must be >= 0 (or None), got ",
                      c.max_seqlen_q.value_or(0));
    q4 = heads_first(q).unsqueeze(0).expand_symint({B, q.sym_size(1), q.sym_size(0), q.sym_size(2)});
  } else {
    TORCH_CHECK_VALUE(q.dim() == 4, "query must be (batch, heads, L, E) for attention_kvcache (or (total_q, heads, "
                      "E) with cu_seqlens_q), got shape ", q.sym_sizes());
    TORCH_CHECK_VALUE(!c.max_seqlen_q.has_value(), "max_seqlen_q goes with cu_seqlens_q (packed queries), which is None");
    B = q.sym_size(0);
  }
  TORCH_CHECK_VALUE(c.cache_seqlens.dim() == 1 && c.cache_seqlens.sym_size(0) == B,
                    "cache_seqlens must have shape (batch,) = (", B, ",), got ", c.cache_seqlens.sym_sizes());
  check_index_device(c.cache_seqlens, "cache_seqlens", q);
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && value_cache.dim() == 4,
                    "key_cache and value_cache must be 4-D: (batch, heads_kv, S_max, E) / (..., Ev), or paged "
                    "(num_pages, heads_kv, page_size, E) / (..., Ev) with a block_table; got shapes ",
                    key_cache.sym_sizes(), " and ", value_cache.sym_sizes());
  if (c.paged()) {
    const at::Tensor& bt = *c.block_table;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.sym_size(0) == B && bt.sym_size(1) >= 1,
                      "block_table must be (batch, max_pages) = (", B, ", >= 1), got shape ", bt.sym_sizes());
    check_index_device(bt, "block_table", q);
    TORCH_CHECK_VALUE(key_cache.sym_size(0) >= 1 && key_cache.sym_size(2) >= 1,
                      "a paged key_cache (num_pages, heads_kv, page_size, E) needs num_pages >= 1 and "
                      "page_size >= 1, got shape ", key_cache.sym_sizes());
    TORCH_CHECK_VALUE(value_cache.sym_size(0) == key_cache.sym_size(0), "value_cache has ", value_cache.sym_size(0),
                      " pages but key_cache has ", key_cache.sym_size(0));
    TORCH_CHECK_VALUE(!c.indexed(), "cache_batch_idx takes a contiguous cache, not a paged one: the block_table "
                      "already names each batch element's pages");
  } else if (c.indexed()) {  // a pool of cache rows, batch element b's at cache_batch_idx[b]
    const at::Tensor& idx = *c.cache_batch_idx;
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
                     "cache_batch_idx must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK_VALUE(idx.dim() == 1 && idx.sym_size(0) == B, "cache_batch_idx must be (batch,) = (", B,
                      ",), got shape ", idx.sym_sizes());
    check_index_device(idx, "cache_batch_idx", q);
    TORCH_CHECK_VALUE(key_cache.sym_size(0) >= 1 && value_cache.sym_size(0) == key_cache.sym_size(0),
                      "with cache_batch_idx, key_cache and value_cache must hold the same number (>= 1) of cache "
                      "rows in dim 0, got shapes ", key_cache.sym_sizes(), " and ", value_cache.sym_sizes());
  }
  if (c.leftpadded()) {  // each batch element's first cached position
    const at::Tensor& lp = *c.cache_leftpad;
    TORCH_CHECK_VALUE(!c.paged(), "cache_leftpad takes a contiguous cache, not a paged one (as FlashAttention's): "
                      "leave the padding out of the block_table instead");
    TORCH_CHECK_TYPE(lp.scalar_type() == at::kInt || lp.scalar_type() == at::kLong,
                     "cache_leftpad must be int32 or int64, got ", lp.scalar_type());
    TORCH_CHECK_VALUE(lp.dim() == 1 && lp.sym_size(0) == B, "cache_leftpad must be (batch,) = (", B,
                      ",), got shape ", lp.sym_sizes());
    check_index_device(lp, "cache_leftpad", q);
  }
  if (!c.paged() && !c.indexed()) {
    TORCH_CHECK_VALUE(key_cache.sym_size(0) == B && value_cache.sym_size(0) == B,
                      "key_cache and value_cache must have the query's batch (", B, ") in dim 0 (or be paged, "
                      "with a block_table, or a pool of rows with cache_batch_idx), got shapes ",
                      key_cache.sym_sizes(), " and ", value_cache.sym_sizes());
  }
  // dtypes, devices, heads, head dims, window, soft cap and ALiBi: as attention's (any GQA group), with the cache
  // seen as batch-sized keys (pages, or a pool of rows: one of them for every batch element)
  auto as_keys = [&](const at::Tensor& t) {
    return c.paged() || c.indexed()
               ? t.narrow_symint(0, 0, 1).expand_symint({B, t.sym_size(1), t.sym_size(2), t.sym_size(3)})
               : t;
  };
  AttnOptions gqa = opt;
  gqa.enable_gqa = true;
  check_inputs(q4, as_keys(key_cache), as_keys(value_cache), std::nullopt, gqa);
  TORCH_CHECK_VALUE(q4.sym_size(3) >= 1 && value_cache.sym_size(3) >= 1,
                    "attention_kvcache needs head dims >= 1, got E = ", q4.sym_size(3), " and Ev = ",
                    value_cache.sym_size(3));
  TORCH_CHECK_VALUE(key_cache.sym_stride(3) == 1 && value_cache.sym_stride(3) == 1,
                    "key_cache and value_cache must have a unit-stride last dimension (they are read and written "
                    "in place), got strides ", key_cache.sym_strides(), " and ", value_cache.sym_strides());
  TORCH_CHECK_VALUE(has(c.key) == has(c.value), "key and value must be given together (the new positions to "
                    "append), got ", has(c.key) ? "a key without a value" : "a value without a key");
  if (has(c.key)) {
    // the new positions are written in place: an expanded cache (a stride-0 dim) would hold them in one place
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key_cache, "key_cache"},
                                  std::pair<const at::Tensor&, const char*>{value_cache, "value_cache"}})
      for (int64_t d = 0; d < 4; ++d)
        TORCH_CHECK_VALUE(!(t.sym_size(d) > 1 && t.sym_stride(d) == 0), name, " is expanded along dim ", d,
                          " (stride 0, size ", t.sym_size(d), "): key / value are written into it in place, where ",
                          "its entries share memory; pass a cache with memory of its own (.clone())");
    at::Tensor k4 = *c.key, v4 = *c.value;
    if (c.packed()) {
      TORCH_CHECK_VALUE(k4.dim() == 3 && v4.dim() == 3 && k4.sym_size(0) == q.sym_size(0) &&
                            v4.sym_size(0) == q.sym_size(0),
                        "key and value must be (total_q, heads_kv, E) / (..., Ev) with cu_seqlens_q: each batch "
                        "element's new positions are its query rows; got shapes ", k4.sym_sizes(), " and ",
                        v4.sym_sizes(), " for a query of ", q.sym_size(0), " rows");
      k4 = heads_first(k4).unsqueeze(0).expand_symint({B, k4.sym_size(1), k4.sym_size(0), k4.sym_size(2)});
      v4 = heads_first(v4).unsqueeze(0).expand_symint({B, v4.sym_size(1), v4.sym_size(0), v4.sym_size(2)});
    }
    check_inputs(q4, k4, v4, std::nullopt, gqa);
    TORCH_CHECK_VALUE(k4.sym_size(1) == key_cache.sym_size(1), "key has ", k4.sym_size(1),
                      " heads but key_cache has ", key_cache.sym_size(1));
    TORCH_CHECK_VALUE(v4.sym_size(3) == value_cache.sym_size(3), "value has head dim ", v4.sym_size(3),
                      " but value_cache has ", value_cache.sym_size(3));
  }
  check_rotary(c);
}

KvLengths read_kv_lengths(const KvCall& c, const AttnOptions& opt) {
  KvLengths n;
  n.keys = host_int64(c.cache_seqlens);
  const int64_t B = static_cast<int64_t>(n.keys.size()), cap = c.capacity();
  if (c.packed()) {
    const std::vector<int64_t> cu = host_int64(*c.cu_seqlens_q);
    TORCH_CHECK_VALUE(cu[0] == 0 && cu[B] == c.q.size(0), "cu_seqlens_q must run from 0 to total_q = ", c.q.size(0),
                      " (the query's rows), got ", cu[0], " .. ", cu[B]);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "cu_seqlens_q must be non-decreasing, got cu_seqlens_q[", b, "] = ", cu[b],
                        " > cu_seqlens_q[", b + 1, "] = ", cu[b + 1]);
      n.queries.push_back(cu[b + 1] - cu[b]);
      TORCH_CHECK_VALUE(n.queries[b] <= c.max_seqlen_q.value_or(n.queries[b]), "max_seqlen_q = ", *c.max_seqlen_q,
                        " but batch element ", b, " has ", n.queries[b], " query rows");
    }
  } else {
    n.queries.assign(B, c.q.size(2));
  }
  // (cache_leftpad: the padding before each cache, within what it holds before the append)
  const std::vector<int64_t> pad = c.leftpadded() ? host_int64(*c.cache_leftpad) : std::vector<int64_t>(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t& len = n.keys[b];
    const int64_t add = c.packed() ? (has(c.key) ? n.queries[b] : 0) : c.new_len();
    // (rotary) the last position rotated: the new keys', or the queries' where they advance
    const int64_t rotated = std::max<int64_t>(add, queries_advance(opt) ? n.queries[b] : 1);
    TORCH_CHECK_VALUE(len >= 0, "cache_seqlens[", b, "] = ", len, " is negative");
    TORCH_CHECK_VALUE(pad[b] >= 0 && pad[b] <= len, "cache_leftpad[", b, "] = ", pad[b],
                      " must be in [0, cache_seqlens[", b, "] = ", len, "]");
    TORCH_CHECK_VALUE(len + add <= cap, "cache_seqlens[", b, "] = ", len, " plus the ", add,
                      " new positions of key exceeds the cache's capacity (", cap,
                      c.paged() ? " = max_pages * page_size)" : " = key_cache.size(2))");
    if (c.rotary())
      TORCH_CHECK_VALUE(len + rotated <= c.rotary_cos->size(0), "rotary_cos has ", c.rotary_cos->size(0),
                        " positions (seqlen_ro) but batch element ", b, " rotates positions up to ",
                        len + rotated - 1);
    len += add;
  }
  if (c.indexed()) {  // rows of the pool; one batch element per row where new keys are written
    const std::vector<int64_t> idx = host_int64(*c.cache_batch_idx);
    const int64_t rows = c.key_cache.size(0);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(idx[b] >= 0 && idx[b] < rows, "cache_batch_idx[", b, "] = ", idx[b],
                        " is not a row of key_cache (", rows, " rows)");
      for (int64_t a = 0; a < b && c.appends(); ++a)
        TORCH_CHECK_VALUE(idx[a] != idx[b], "cache_batch_idx[", a, "] = cache_batch_idx[", b, "] = ", idx[b],
                          ": two batch elements cannot append key / value to one cache row");
    }
  }
  if (c.paged()) {
    const std::vector<int64_t> bt = host_int64(*c.block_table);
    const int64_t per = c.block_table->size(1), page = c.key_cache.size(2), pages = c.key_cache.size(0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < (n.keys[b] + page - 1) / page; ++i) {
        const int64_t x = bt[b * per + i];
        TORCH_CHECK_VALUE(x >= 0 && x < pages, "block_table[", b, ", ", i, "] = ", x,
                          " is not a page of key_cache (num_pages = ", pages, ")");
      }
    }
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> call_kvcache(const KvCall& c, const AttnOptions& opt) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("attention_ext::attention_kvcache", "").typed<KvcacheFn>();
  return op.call(c.q, c.key_cache, c.value_cache, c.cache_seqlens, c.key, c.value, c.block_table, opt.is_causal,
                 opt.scale, std::vector<int64_t>{opt.window_left, opt.window_right}, opt.softcap, opt.alibi_slopes,
                 c.rotary_cos, c.rotary_sin, c.rotary_interleaved, c.cu_seqlens_q, c.max_seqlen_q, c.cache_batch_idx,
                 c.cache_leftpad);
}

at::Tensor kv_lengths(const KvCall& c) {
  at::Tensor len = c.cache_seqlens.to(c.q.device(), at::kLong);
  if (!c.packed()) return len + c.new_len();
  if (!has(c.key)) return len;
  const at::Tensor cu = c.cu_seqlens_q->to(c.q.device(), at::kLong);
  return len + (cu.slice(0, 1) - cu.slice(0, 0, -1));
}

namespace {

KvCall rotate(const KvCall& c, const AttnOptions& opt) {
  if (!c.rotary()) return c;
  KvCall r = c;
  const auto li = at::TensorOptions().dtype(at::kLong).device(c.q.device());
  const at::Tensor start = c.cache_seqlens.to(c.q.device(), at::kLong);  // (B,)
  if (c.packed()) {  // every row as one batch element (1, H, total_q, E), at its own position
    auto [b, i] = packed_rows(c);
    const at::Tensor first = start.index_select(0, b);
    const at::Tensor qpos = (queries_advance(opt) ? first + i : first).unsqueeze(0);
    auto rows = [&](const at::Tensor& x, const at::Tensor& pos) {
      return heads_first(rotary(heads_first(x).unsqueeze(0), *c.rotary_cos, *c.rotary_sin, pos,
                                c.rotary_interleaved).squeeze(0)).to(x.scalar_type());
    };
    r.q = rows(c.q, qpos);
    if (has(c.key)) r.key = rows(*c.key, (first + i).unsqueeze(0));
    return r;
  }
  const int64_t L = c.q.size(2);
  const at::Tensor s = start.unsqueeze(1);  // (B, 1)
  const at::Tensor qpos = queries_advance(opt) ? s + at::arange(L, li) : s.expand({c.q.size(0), L});
  r.q = rotary(c.q, *c.rotary_cos, *c.rotary_sin, qpos, c.rotary_interleaved).to(c.q.scalar_type());
  if (c.new_len() > 0)
    r.key = rotary(*c.key, *c.rotary_cos, *c.rotary_sin, s + at::arange(c.new_len(), li), c.rotary_interleaved)
                .to(c.key->scalar_type());
  return r;
}

void append_kv(const KvCall& c) {
  if (!c.appends() || c.key->numel() == 0) return;
  check_caches_apart(c);
  at::Tensor kc = c.key_cache, vc = c.value_cache;  // (handles: written in place)
  const at::Tensor start = c.cache_seqlens.to(c.key_cache.device(), at::kLong);
  if (c.packed()) {  // packed row t of batch element b at position cache_seqlens[b] + its index in b
    auto [b, i] = packed_rows(c);
    auto [row, slot] = cache_rows(c, b, start.index_select(0, b) + i);
    kc.index_put_({row, Slice(), slot}, *c.key);
    vc.index_put_({row, Slice(), slot}, *c.value);
    return;
  }
  const auto li = at::TensorOptions().dtype(at::kLong).device(c.key_cache.device());
  // position of new row t of batch b: cache_seqlens[b] + t  (B, n)
  const at::Tensor pos = start.unsqueeze(1) + at::arange(c.new_len(), li);
  auto [row, slot] = cache_rows(c, batch_of(pos), pos);
  // the two index tensors around the heads' slice: the indexed shape is (B, n, heads_kv, E)
  kc.index_put_({row, Slice(), slot}, c.key->permute({0, 2, 1, 3}));
  vc.index_put_({row, Slice(), slot}, c.value->permute({0, 2, 1, 3}));
}

}  // namespace

void check_caches_apart(const KvCall& c) {
  const at::MemOverlapStatus shared = at::get_overlap_status(c.key_cache, c.value_cache);
  TORCH_CHECK_VALUE(shared != at::MemOverlapStatus::Full && shared != at::MemOverlapStatus::Partial,
                    "key_cache and value_cache share memory: the new values would overwrite the new keys; pass "
                    "two caches (two halves of one buffer are fine)");
}

KvCall prepare_kv(const KvCall& call, const AttnOptions& opt, bool append) {
  KvCall c = call;
  if (c.packed()) std::tie(c.row_batch, c.row_index) = packed_rows(c);
  c = rotate(c, opt);
  if (append) append_kv(c);
  return c;
}

KvParams kv_params(const KvCall& c, const AttnOptions& opt, const at::Tensor& lens, c10::Device index_device,
                   int64_t max_q) {
  KvParams k;
  const at::Tensor& q = c.q;
  const bool packed = c.packed();
  const int64_t B = c.cache_seqlens.size(0);
  k.q4 = packed ? as_4d(heads_first(q)) : as_4d(q);
  k.out = empty_output(q, c.value_cache.size(3));
  k.lse = packed ? at::empty({q.size(1) * q.size(0)}, empty_lse(q).options()) : empty_lse(q);
  poison(k.out);
  poison(k.lse);
  FwdParams& p = k.p;
  p = make_fwd_params(k.q4, c.key_cache, c.value_cache, packed ? heads_first(k.out).unsqueeze(0) : k.out, k.lse,
                      std::nullopt, opt);
  // (the slopes broadcast to (B, Hq): a packed query's shape stands for every batch element)
  k.alibi = set_alibi(p, opt, packed ? k.q4.expand({B, -1, -1, -1}) : k.q4);
  if (c.paged()) {
    k.table = c.block_table->to(index_device).contiguous();
    p.block_table = k.table.data_ptr<int32_t>();
    p.block_table_stride = k.table.size(1);
    p.page_size = c.key_cache.size(2);
  }
  if (c.indexed()) {
    k.batch_idx = c.cache_batch_idx->to(index_device, at::kInt).contiguous();
    p.cache_batch_idx = k.batch_idx.data_ptr<int32_t>();
  }
  if (c.leftpadded()) {
    k.leftpad = c.cache_leftpad->to(index_device, at::kInt).contiguous();
    p.cache_leftpad = k.leftpad.data_ptr<int32_t>();
  }
  if (packed) {
    k.cu = c.cu_seqlens_q->to(index_device).contiguous();
    p.cu_seqlens_q = k.cu.data_ptr<int32_t>();
    p.batch = B;
    p.total_q = q.size(0);
    p.len_q = max_q >= 0 ? max_q : std::min(c.max_seqlen_q.value_or(q.size(0)), q.size(0));
  }
  k.lens = lens;
  p.cache_lens = k.lens.data_ptr<int32_t>();
  p.cache_capacity = c.capacity();
  p.cache_rows = c.key_cache.size(0);
  return k;
}

at::Tensor packed_lse(const KvCall& c, const at::Tensor& flat, bool checked) {
  auto [b, i] = packed_rows(c);
  const int64_t Hq = c.q.size(1);
  const at::Tensor cu = c.cu_seqlens_q->to(c.q.device(), at::kLong);
  const at::Tensor start = cu.index_select(0, b), end = cu.index_select(0, b + 1), len = end - start;
  const auto li = at::TensorOptions().dtype(at::kLong).device(c.q.device());
  const at::Tensor h = at::arange(Hq, li);
  const at::Tensor at_row = (Hq * start + i).unsqueeze(1) + h.unsqueeze(0) * len.unsqueeze(1);
  if (checked || flat.numel() == 0) return flat.index({at_row});
  // rows of a batch element whose cu_seqlens_q is out of range (not read back under CUDA-graph capture; the
  // kernels wrote nothing for it: cu_seqlens_q[0 .. b + 1] not a non-decreasing run from 0 to at most total_q):
  // NaN, and no index outside the buffer
  const at::Tensor unordered = cu.slice(0, 1).lt(cu.slice(0, 0, -1)).cumsum(0).gt(0);  // (B,): some pair up to b + 1
  const at::Tensor element_ok = unordered.logical_not() & cu.slice(0, 1).le(c.q.size(0)) & cu.slice(0, 0, 1).eq(0);
  const at::Tensor ok = element_ok.index_select(0, b) & i.ge(0) & i.lt(len);
  return flat.index({at_row.clamp(0, flat.numel() - 1)})
      .masked_fill(ok.logical_not().unsqueeze(1), std::numeric_limits<double>::quiet_NaN());
}

GatheredCache gather_cache(const KvCall& c, const AttnOptions& opt, int64_t rows) {
  const int64_t B = c.q.size(0), L = c.q.size(2), C = rows;
  const auto li = at::TensorOptions().dtype(at::kLong).device(c.q.device());
  const at::Tensor len = kv_lengths(c);  // S_b
  // row j of the gathered cache holds position j - (C - S_b) of batch b (before 0: hidden)
  at::Tensor src = at::arange(C, li).unsqueeze(0) - (C - len).unsqueeze(1);  // (B, C)
  const at::Tensor visible =
      c.leftpadded() ? src.ge(c.cache_leftpad->to(c.q.device(), at::kLong).unsqueeze(1)) : src.ge(0);
  const at::Tensor pos = src.clamp_min(0);
  auto [row, slot] = cache_rows(c, batch_of(pos), pos);
  GatheredCache g;
  g.key = c.key_cache.index({row, Slice(), slot}).permute({0, 2, 1, 3});  // (B, Hkv, C, E)
  g.value = c.value_cache.index({row, Slice(), slot}).permute({0, 2, 1, 3});
  // the causal / window bounds with query i at position C - L + i of the gathered rows (L x C; undefined: none)
  const at::Tensor band = band_visibility(L, C, opt, c.q.device(), C - L);
  g.mask = band.defined() ? visible.view({B, 1, 1, C}).logical_and(band) : visible.view({B, 1, 1, C});
  return g;
}

}  // namespace attention_ext

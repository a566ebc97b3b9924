// The forward and backward launch sequences and the backward's workspace, shared by the two glues that launch the CUDA
// kernels (attention_cuda.cpp on the GPU, emu/attention_emu.cpp on the CPU
// emulator), so that the emulated path allocates and wires exactly what the
// GPU path does. ATen-level: the tensors come from the caching allocator of
// the query's device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "../glue.h"
#include "../kvcache.h"
#include "../varlen.h"
#include "launch.h"

namespace attention_ext {
namespace cuda {

// The tensors one launch reads or writes, as the glues name them (null or undefined entries skipped): the
// emulator registers their storage for its bounds checks and its racecheck of global memory; the GPU ignores
// them. Every launch(...) callable below takes, last, those of the call's own intermediate tensors (partials,
// key bounds, packed offsets) that the launch touches, `extra`, for the glue to add to the tensors it names.
class LaunchTensors {
 public:
  LaunchTensors() = default;
  LaunchTensors(std::initializer_list<const at::Tensor*> ts) {
    for (const at::Tensor* t : ts) add(t);
  }
  LaunchTensors operator+(const LaunchTensors& more) const {
    LaunchTensors all = *this;
    for (const at::Tensor* t : more) all.add(t);
    return all;
  }
  const at::Tensor* const* begin() const { return t_; }
  const at::Tensor* const* end() const { return t_ + n_; }

 private:
  static constexpr int kMax = 24;
  void add(const at::Tensor* t) {
    if (t == nullptr || !t->defined()) return;
    TORCH_INTERNAL_ASSERT(n_ < kMax, "LaunchTensors: more than ", kMax, " tensors");
    t_[n_++] = t;
  }
  const at::Tensor* t_[kMax] = {};
  int n_ = 0;
};

struct BwdWorkspace {
  at::Tensor dq_accum;  // nsplit x rows x head_dim fp32, zero-filled
  at::Tensor stats;     // 3 x rows fp32: row shift, logl, D
  BwdWork work;         // points into both
  FwdStats row_stats;   // for launch_row_stats
};

inline BwdWorkspace make_bwd_workspace(const BwdParams& p, const BwdEntry& e, int num_sms,
                                       const at::TensorOptions& like) {
  BwdWorkspace ws;
  const int64_t rows = stat_rows(p);
  ws.work = plan_bwd_work(p, e, num_sms, p.deterministic);
  ws.dq_accum = at::zeros({ws.work.nsplit, rows, e.head_dim}, like.dtype(at::kFloat));
  ws.stats = at::empty({3, rows}, like.dtype(at::kFloat));
  ws.work.dq_accum = ws.dq_accum.data_ptr<float>();
  ws.row_stats = bwd_row_stats(p, ws.stats.data_ptr<float>());
  ws.work.row_shift = ws.row_stats.shift;
  ws.work.row_logl = ws.row_stats.logl;
  ws.work.dsum = ws.row_stats.dsum;
  return ws;
}

// The Hopper kernels' params: p, plus FwdParams::key_bounds (in `bounds`) for a
// boolean key-padding mask, so that they skip the key tiles it hides. (The sm80
// kernels narrow by any boolean mask themselves, inside each CTA.)
template <class P, class Launch>
P with_key_bounds(const P& p, const LaunchEnv& env, const at::TensorOptions& like, at::Tensor& bounds,
                  Launch&& launch) {
  P ph = p;
  if (p.mask_kind == MaskKind::kBool && (p.mask_stride.r == 0 || p.len_q == 1) && p.batch * p.heads_q > 0) {
    bounds = at::empty({p.batch * p.heads_q * 2}, like.dtype(at::kInt));
    launch([&] { return launch_key_bounds(p, bounds.data_ptr<int32_t>(), env); }, LaunchTensors{&bounds});
    ph.key_bounds = bounds.data_ptr<int32_t>();
  }
  return ph;
}

// ATTENTION_EXT_FWD_SPLITS=n (tests): the forward's keys split n ways whatever plan_fwd_splits says; 0 when
// unset. A bad value is an error, not ignored: a typo would silently test the planner's choice instead.
inline int forced_fwd_splits() {
  const char* e = std::getenv("ATTENTION_EXT_FWD_SPLITS");
  if (e == nullptr || *e == 0) return 0;
  char* end = nullptr;
  const long n = std::strtol(e, &end, 10);
  TORCH_CHECK_VALUE(end != e && *end == 0 && n >= 1 && n <= 1024,
                    "ATTENTION_EXT_FWD_SPLITS must be a number of key shares in 1..1024, got '", e, "'");
  return static_cast<int>(n);
}

// ATTENTION_EXT_PACK_GQA=0 (benchmarks, tests): decoding with grouped-query attention runs one CTA per query
// head as before pack_gqa_rows; unset or 1: packed. Any other value is an error.
inline bool pack_gqa_enabled() {
  const char* e = std::getenv("ATTENTION_EXT_PACK_GQA");
  if (e == nullptr || *e == 0) return true;
  TORCH_CHECK_VALUE((e[0] == '0' || e[0] == '1') && e[1] == 0, "ATTENTION_EXT_PACK_GQA must be 0 or 1, got '", e,
                    "'");
  return e[0] == '1';
}

// ATTENTION_EXT_PACKED_SM90=0 (benchmarks; a way around the packed Hopper kernels, not yet run on a GPU):
// attention_varlen on an sm_90 device runs the packed sm80 kernels (long sequences: the Hopper kernels sequence
// by sequence) as before the packed Hopper kernels; unset or 1: the packed Hopper kernels. Any other value is an
// error.
inline bool packed_sm90_enabled() {
  const char* e = std::getenv("ATTENTION_EXT_PACKED_SM90");
  if (e == nullptr || *e == 0) return true;
  TORCH_CHECK_VALUE((e[0] == '0' || e[0] == '1') && e[1] == 0, "ATTENTION_EXT_PACKED_SM90 must be 0 or 1, got '",
                    e, "'");
  return e[0] == '1';
}

// Decoding with grouped-query attention (one query row per head, heads_q = G * heads_kv): the G query heads
// that share a key / value head become G rows of one head, so the CTA of a group (or each CTA of a key share)
// reads every K and V tile once for the group instead of G CTAs reading it G times (FlashAttention's
// pack_gqa; the CPU kernels group such heads the same way). Only strides change: query head hk * G + g, row
// 0, is row g of head hk (the head strides of q, out and the mask grow G times, their row strides become the
// old head strides: any layout, broadcast masks included), and the log-sum-exp's (batch, heads_q, 1) layout
// is the same memory as (batch, heads_kv, G). Not with dropout (its streams are numbered by head and row),
// causal or window bounds (they depend on the row index), ALiBi (its slope is the query head's and its distance
// the row's) or packed sequences. Returns G where p was changed, else 1.
inline int64_t pack_gqa_rows(FwdParams& p) {
  const int64_t G = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
  if (G <= 1 || p.len_q != 1 || p.dropout_p > 0.0 || p.window_left != kNoBound || p.window_right != kNoBound ||
      p.alibi_slopes != nullptr || p.cu_seqlens_q != nullptr || !pack_gqa_enabled())
    return 1;
  auto fold = [G](Strides4& s) {
    s.r = s.h;
    s.h *= G;
  };
  fold(p.q_stride);
  fold(p.o_stride);
  if (p.mask_kind != MaskKind::kNone) fold(p.mask_stride);
  p.heads_q = p.heads_kv;
  p.len_q = G;
  return G;
}

// The key shares run_forward gives p: n > 1 where flash-decoding runs (the sm80 kernel with its key tiles
// shared among n CTAs, then the merge), else 1 (the Hopper kernel h, if any, or the sm80 kernel, whole).
// Taken before the Hopper kernels too (their persistent grid has the same few tiles to hand out) where it
// multiplies the CTAs at work by 4 or more; below that, the Hopper kernel's faster tiles win back what the
// idle SMs cost.
inline int fwd_key_splits(const FwdParams& p, const FwdEntry& sm80, const Sm90FwdEntry* h, const LaunchEnv& env) {
  const int forced = forced_fwd_splits();
  const int splits = forced > 0 ? forced : plan_fwd_splits(p, sm80, env.num_sms);
  return splits > 1 && (splits >= 4 || h == nullptr) ? splits : 1;
}

// Runs the launcher fn through launch(fn, extra) unless it declines the call (cudaErrorNotSupported, returned before
// launching anything: a Hopper launcher outside what its kernel covers). Returns whether it ran.
template <class Launch, class Fn>
bool launched_unless_declined(Launch&& launch, Fn&& fn, const LaunchTensors& extra = {}) {
  cudaError_t err = cudaSuccess;
  launch(
      [&] {
        err = fn();
        return err == cudaErrorNotSupported ? cudaSuccess : err;
      },
      extra);
  return err != cudaErrorNotSupported;
}

// Flash-decoding: the sm80 kernel with the key tiles of each query block shared among `splits` CTAs, writing
// fp32 shares that launch_fwd_combine merges into p's output and log-sum-exp. extra: the call's tensors (the
// emulator's bounds checks).
template <class Launch>
void run_split_forward(const FwdParams& p, int splits, const at::TensorOptions& like, const FwdEntry& sm80,
                       const LaunchEnv& env, Launch&& launch, const LaunchTensors& extra = {}) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  at::Tensor o_accum = at::empty({splits, rows, p.dim_v}, like.dtype(at::kFloat));
  at::Tensor lse_accum = at::empty({2, splits, rows}, like.dtype(at::kFloat));
  poison(o_accum);  // (tests) every share writes all its rows, empty or not
  poison(lse_accum);
  FwdParams ps = p;
  ps.num_splits = splits;
  ps.o_accum = o_accum.data_ptr<float>();
  ps.lse_accum = lse_accum.data_ptr<float>();
  const LaunchTensors tensors = extra + LaunchTensors{&o_accum, &lse_accum};
  launch([&] { return sm80.fn(ps, nullptr, env); }, tensors);
  launch([&] { return launch_fwd_combine(ps, env); }, tensors);
}

// The forward of run_forward once the GQA heads are packed (or not): the Hopper kernel when it covers the call
// (its launcher declines with cudaErrorNotSupported before launching anything), else the sm80 kernel.
template <class Launch>
std::string run_forward_unpacked(const FwdParams& p, const LaunchEnv& env, const at::TensorOptions& like,
                                 const FwdEntry& sm80, const char* what, Launch&& launch) {
  // flash-decoding (few CTAs, many keys: decoding with a KV cache)
  const Sm90FwdEntry* h = find_fwd_sm90(p, env);
  const int splits = fwd_key_splits(p, sm80, h, env);
  if (splits > 1) {
    run_split_forward(p, splits, like, sm80, env, launch);
    return describe_kernel(what, sm80.head_dim, p.dtype, env) + ", keys split " + std::to_string(splits) + " ways";
  }
  if (h != nullptr) {
    at::Tensor bounds;
    const FwdParams ph = with_key_bounds(p, env, like, bounds, launch);
    if (launched_unless_declined(launch, [&] { return h->fn(ph, env); }, {&bounds})) {
      return describe_kernel_sm90(what, h->head_dim, p.dtype);
    }
  }
  launch([&] { return sm80.fn(p, nullptr, env); });
  return describe_kernel(what, sm80.head_dim, p.dtype, env);
}

// The forward as both glues run it: decoding GQA heads packed into rows (pack_gqa_rows), split keys where the
// grid is too small (flash-decoding), the Hopper kernel when it covers the call, else the sm80 kernel.
// launch(fn, extra = {}) runs one launcher and checks its error. Returns the kernel-log line of the kernel that ran.
template <class Launch>
std::string run_forward(const FwdParams& p_call, const LaunchEnv& env, const at::TensorOptions& like,
                        const FwdEntry& sm80, const char* what, Launch&& launch) {
  FwdParams p = p_call;
  const int64_t group = pack_gqa_rows(p);
  const std::string ran = run_forward_unpacked(p, env, like, sm80, what, launch);
  return group > 1 ? ran + ", GQA heads packed " + std::to_string(group) + " per CTA" : ran;
}

// A sequence of average length of a packed call, as a call of its own.
template <class P>
P mean_sequence(const P& packed, const VarlenOffsets& off) {
  P one = packed;
  one.batch = 1;
  one.cu_seqlens_q = one.cu_seqlens_k = nullptr;
  one.len_q = off.q.back() / off.batch();
  one.len_k = off.k.back() / off.batch();
  return one;
}

// Packed sequences (attention_varlen): one launch of the sm80 kernel over all of them (true), or sequence by
// sequence through run_forward (false). A single sequence is an ordinary call (the Hopper kernels and the
// split keys of decoding apply); where the sequences are long (1024 query rows or more on average: a guess,
// not yet measured on a GPU) and the Hopper kernel would run such a sequence whole, its faster tiles should
// win back the launches.
// sm80: the call's sm80 entry (taken only for 2 sequences or more).
template <class FindSm80>
bool packed_in_one_launch(const FwdParams& packed, const VarlenOffsets& off, FindSm80&& sm80, const LaunchEnv& env) {
  if (off.batch() <= 1) return false;
  const FwdParams one = mean_sequence(packed, off);
  if (one.len_q < 1024) return true;
  const Sm90FwdEntry* h = find_fwd_sm90(one, env);
  return h == nullptr || fwd_key_splits(one, *sm80(), h, env) > 1;
}

// launch_packed_rows' offsets for a packed launch whose offsets were not read back (CUDA-graph capture): every
// sequence from the first bad one on (a first offset not 0, a step down, an end past the total, more rows than the
// maximum, in either offsets) given no rows; p's offsets are made those. launch(params, tensors) runs it.
template <class Launch>
std::pair<at::Tensor, at::Tensor> checked_packed_rows(FwdParams& p, const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                      const LaunchEnv& env, Launch&& launch) {
  at::Tensor rows_q = at::empty({p.batch + 1}, cu_q.options()), rows_k = at::empty({p.batch + 1}, cu_k.options());
  PackedRowsParams rp;
  rp.cu_q = p.cu_seqlens_q;
  rp.cu_k = p.cu_seqlens_k;
  rp.cu_q_out = rows_q.data_ptr<int32_t>();
  rp.cu_k_out = rows_k.data_ptr<int32_t>();
  rp.batch = p.batch;
  rp.total_q = p.total_q;
  rp.total_k = p.total_k;
  rp.max_q = p.len_q;
  rp.max_k = p.len_k;
  launch([&] { return launch_packed_rows(rp, env); }, LaunchTensors{&cu_q, &cu_k, &rows_q, &rows_k});
  p.cu_seqlens_q = rp.cu_q_out;
  p.cu_seqlens_k = rp.cu_k_out;
  return {rows_q, rows_k};
}

// Packed sequences on an sm_90 device: the Hopper forward that takes them all in one launch, or nullptr. Per
// 128-row query block it is the kernel an ordinary call gets, and the sm80 kernel's blocks are as tall (64 rows
// for head dims above 128), so it is taken wherever it covers the call, short sequences included; it also
// replaces the launch per sequence of long ones.
inline const Sm90FwdEntry* packed_fwd_sm90(const FwdParams& packed, const VarlenOffsets& off, const LaunchEnv& env) {
  return off.batch() > 1 && packed_sm90_enabled() ? find_fwd_sm90(packed, env) : nullptr;
}

// _attention_varlen_forward as both glues run it: one launch over the packed sequences (FwdParams::cu_seqlens_q)
// of the Hopper kernel where packed_fwd_sm90 gives one, else of the sm80 kernel where packed_in_one_launch says
// so, else (and for a head dim of 0) sequence by sequence through the glue's forward `fwd` into the same outputs
// (the offsets read once either way). draw_rng() gives the call's int64[2] (seed, offset) (zeros without
// dropout); sequence b takes (seed, offset + b), row b of the returned rng_state.
// find(p) is the glue's sm80 entry for p (or its error); launch(fn, extra = {}) runs one launcher and checks its
// error.
template <class Fwd, class DrawRng, class Find, class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_varlen_forward(
    Fwd&& fwd, DrawRng&& draw_rng, Find&& find, Launch&& launch, const LaunchEnv& env, const char* what,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool read_values = true) {
  PackedForward s = prepare_packed_forward(
      q, k, v, cu_q, cu_k, make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes), max_q,
      max_k, read_values);
  FwdParams& p = s.st.p;
  // (find(p) has no kernel for the first; the packed kernels take no ALiBi)
  const bool by_sequence = varlen_cuda_by_sequence(q, v) || p.alibi_slopes != nullptr;
  const int64_t batch = p.batch;
  const Sm90FwdEntry* hopper = nullptr;
  at::Tensor rows_q, rows_k;  // (offsets not read back) cu_seqlens_q / _k as the kernels see them
  if (read_values) {
    hopper = by_sequence ? nullptr : packed_fwd_sm90(p, s.off, env);
    if (by_sequence || (hopper == nullptr && !packed_in_one_launch(p, s.off, [&] { return find(p); }, env))) {
      return varlen_forward_by_sequence(fwd, s, q, k, v, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                        alibi_slopes);
    }
  } else {
    // CUDA-graph capture: one launch whatever the lengths, over offsets checked on the device (launch_packed_rows);
    // rows of a sequence it refuses, and rows no sequence covers, keep NaN
    const char* which = p.alibi_slopes != nullptr              ? "with ALiBi"
                        : q.scalar_type() == at::kDouble ? "in float64"
                                                         : "of head dim 0";
    TORCH_CHECK(!by_sequence, "attention_varlen ", which, " cannot be captured in a CUDA graph: it runs sequence by "
                "sequence, which needs the offsets on the host");
    hopper = batch > 0 && packed_sm90_enabled() ? find_fwd_sm90(p, env) : nullptr;
    s.st.o4.fill_(std::numeric_limits<double>::quiet_NaN());
    s.lse.fill_(std::numeric_limits<double>::quiet_NaN());
    std::tie(rows_q, rows_k) = checked_packed_rows(p, s.cu_q, s.cu_k, env, launch);
  }
  at::Tensor rng = draw_rng().view({1, 2}).repeat({batch, 1});
  if (dropout_p > 0.0) {
    rng.select(1, 1).add_(at::arange(batch, rng.options()));
    p.seed_offset_ptr = rng.data_ptr<int64_t>();
  }
  std::string ran;
  const LaunchTensors packed{&s.out, &s.lse, &s.cu_q, &s.cu_k, &rng, &rows_q, &rows_k};
  if (hopper != nullptr && p.len_q > 0 && p.heads_q > 0 &&
      launched_unless_declined(launch, [&] { return hopper->fn(p, env); }, packed)) {
    ran = describe_kernel_sm90(what, hopper->head_dim, p.dtype);
  }
  if (ran.empty()) {
    const FwdEntry* sm80 = find(p);
    if (p.len_q > 0 && p.heads_q > 0) launch([&] { return sm80->fn(p, nullptr, env); }, packed);
    ran = describe_kernel(what, sm80->head_dim, p.dtype, env);
  }
  if (log_kernels()) log_kernel(ran + ", " + std::to_string(p.batch) + " packed sequences in one launch");
  finish_forward(s.st);
  return {s.out, s.lse, rng};
}

// A decoding step of attention_kvcache with grouped-query attention (one query row per batch element, not packed):
// the group's query heads as rows of their key / value head, as pack_gqa_rows packs a dense call, so that each CTA
// reads the cache once for the group. The one query row sits at the last position (S_b - 1): a causal bound, or a
// right window bound, hides nothing and is dropped; a left window bound (the same for every row, which the packed
// rows' shifted bounds would not be) or ALiBi keeps one CTA per query head. Returns G where p was changed, else 1.
inline int64_t pack_gqa_kv_decode(FwdParams& p, bool packed) {
  if (packed || p.len_q != 1 || p.window_left != kNoBound || (p.window_right != kNoBound && p.window_right < 0))
    return 1;
  FwdParams f = p;
  f.window_right = kNoBound;
  const int64_t group = pack_gqa_rows(f);
  if (group > 1) p = f;
  return group;
}

// launch_cache_append's params for a call's new keys (c after prepare_kv, rotated) and the lengths lp gives.
inline CacheAppendParams cache_append_params(const KvCall& c, const CacheLengthsParams& lp) {
  const at::Tensor &key = *c.key, &value = *c.value, &kc = c.key_cache, &vc = c.value_cache;
  CacheAppendParams ap;
  const int d = c.packed() ? 1 : 0;  // (packed rows have no batch dim: (total_q, heads_kv, E))
  ap.key = key.data_ptr();
  ap.value = value.data_ptr();
  ap.k_stride_b = d == 0 ? key.stride(0) : 0;
  ap.k_stride_h = key.stride(1);
  ap.k_stride_t = key.stride(2 - 2 * d);
  ap.k_stride_e = key.stride(3 - d);
  ap.v_stride_b = d == 0 ? value.stride(0) : 0;
  ap.v_stride_h = value.stride(1);
  ap.v_stride_t = value.stride(2 - 2 * d);
  ap.v_stride_e = value.stride(3 - d);
  ap.key_cache = kc.data_ptr();
  ap.value_cache = vc.data_ptr();
  ap.kc_stride_b = kc.stride(0);
  ap.kc_stride_h = kc.stride(1);
  ap.kc_stride_s = kc.stride(2);
  ap.vc_stride_b = vc.stride(0);
  ap.vc_stride_h = vc.stride(1);
  ap.vc_stride_s = vc.stride(2);
  ap.lens = lp.lens;
  ap.cu = lp.cu_out;
  ap.batch_idx = lp.batch_idx;
  ap.batch_idx_64 = lp.batch_idx_64;
  ap.block_table = lp.block_table;
  ap.max_pages = lp.max_pages;
  ap.page_size = lp.page_size;
  ap.batch = lp.batch;
  ap.total_q = c.q.size(0);
  ap.new_len = c.new_len();
  ap.heads_kv = kc.size(1);
  ap.dim_k = kc.size(3);
  ap.dim_v = vc.size(3);
  ap.elem_bytes = static_cast<int>(kc.element_size());
  return ap;
}

// attention_kvcache as both glues run it: the query and new keys rotated (ATen), the lengths found and checked
// (launch_cache_lengths), the new keys written (launch_cache_append), then one launch of the sm80 forward's cache
// variant over every batch element (FwdParams::cache_lens) reading the cache in place, pages included, where it
// covers the call: fp32 / fp16 / bf16, any page size, ALiBi. Anything else (float64) goes through kvcache_gathered
// with the glue's dense forward `fwd`. check_values: read the lengths back to check them on the host too (a sync,
// which CUDA-graph capture cannot take). launch(fn, extra = {}) runs one launcher and checks its error.
template <class Fwd, class Launch>
std::tuple<at::Tensor, at::Tensor> run_kvcache_forward(Fwd&& fwd, Launch&& launch, const LaunchEnv& env,
                                                       const char* what, const KvCall& call, const AttnOptions& opt,
                                                       bool check_values) {
  check_kvcache_inputs(call, opt);
  const at::Tensor &q = call.q, &kc = call.key_cache, &vc = call.value_cache;
  const bool paged = call.paged();
  const FwdEntry* sm80 = q.scalar_type() == at::kDouble
                             ? nullptr
                             : find_fwd(to_dtype(q.scalar_type()), static_cast<int>(std::max(q.size(-1), vc.size(3))));
  if (sm80 == nullptr) {
    if (log_kernels())
      log_kernel(std::string(what) +
                 ": the cache gathered, then the dense forward with a mask (no kernel for the dtype and head dim)");
    return kvcache_gathered(fwd, call, opt, check_values);
  }
  // the lengths on the host when they may be read back: for the checks, the plan and a packed call's grid
  const KvLengths host = check_values ? read_kv_lengths(call, opt) : KvLengths{};
  // (rotated here; the new keys are written below, by launch_cache_append)
  const KvCall c = prepare_kv(call, opt, false);
  const bool appends = c.appends() && c.key->numel() > 0;
  if (appends) check_caches_apart(c);
  const int64_t max_q =
      host.queries.empty() ? -1 : *std::max_element(host.queries.begin(), host.queries.end());
  // S_b for the kernels, filled by launch_cache_lengths below (-1 for a batch element with values out of range)
  const int64_t B = c.cache_seqlens.size(0);
  const at::TensorOptions i32 = q.options().dtype(at::kInt);
  const KvParams k = kv_params(c, opt, at::empty({B}, i32), q.device(), max_q);
  // lengths not read back (graph capture): packed rows that no batch element's kernel writes (its cu_seqlens_q
  // out of range, or L_b past max_seqlen_q) stay NaN
  if (!check_values && c.packed()) {
    k.out.fill_(std::numeric_limits<double>::quiet_NaN());
    k.lse.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  FwdParams p = k.p;
  const at::Tensor seqlens = c.cache_seqlens.to(q.device()).contiguous();
  const at::Tensor batch_idx = c.indexed() ? c.cache_batch_idx->to(q.device()).contiguous() : at::Tensor();
  const at::Tensor rows = c.packed() ? at::empty({B + 1}, i32) : at::Tensor();  // cu_seqlens_q as the kernels see it
  CacheLengthsParams lp;
  lp.seqlens = seqlens.data_ptr();
  lp.seqlens_64 = seqlens.scalar_type() == at::kLong;
  if (c.indexed()) {
    lp.batch_idx = batch_idx.data_ptr();
    lp.batch_idx_64 = batch_idx.scalar_type() == at::kLong;
  }
  if (paged) {
    lp.block_table = p.block_table;
    lp.max_pages = p.block_table_stride;
    lp.page_size = p.page_size;
  }
  if (c.packed()) {
    lp.cu_seqlens_q = p.cu_seqlens_q;
    lp.cu_out = rows.data_ptr<int32_t>();
    lp.packed_keys = c.appends();
    p.cu_seqlens_q = lp.cu_out;
  }
  lp.batch = B;
  lp.total_q = p.total_q;
  lp.new_len = c.new_len();
  lp.capacity = c.capacity();
  lp.rows = kc.size(0);
  if (c.rotary()) {
    lp.rotary = true;
    lp.rotary_rows = c.rotary_cos->size(0);
    lp.rotary_queries = !queries_advance(opt) ? 1 : c.packed() ? -1 : c.q.size(2);
  }
  lp.lens = k.lens.data_ptr<int32_t>();
  const int64_t group = pack_gqa_kv_decode(p, c.packed());
  // flash-decoding as for a dense call (few CTAs, many key tiles), planned with the longest cache (or the capacity
  // when the lengths were not read back); packed queries too, their shares laid out by the longest L_b
  FwdParams plan = p;
  plan.len_k = host.keys.empty() ? c.capacity() : *std::max_element(host.keys.begin(), host.keys.end());
  const int splits = fwd_key_splits(plan, *sm80, nullptr, env);
  const LaunchTensors tensors{&k.q4,    &kc,    &vc,          &k.out,    &k.lse, &k.lens,
                                &k.table, &k.alibi, &k.cu, &k.batch_idx, &k.leftpad, &rows};
  const bool any = p.batch * p.heads_q > 0 && p.len_q > 0;
  if (any || appends)
    launch([&] { return launch_cache_lengths(lp, env); }, {&seqlens, &batch_idx, &k.table, &k.cu, &k.lens, &rows});
  if (appends) {
    const at::Tensor &key = *c.key, &value = *c.value;
    const CacheAppendParams ap = cache_append_params(c, lp);
    launch([&] { return launch_cache_append(ap, env); },
           {&key, &value, &kc, &vc, &k.lens, &rows, &batch_idx, &k.table});
  }
  if (any && splits > 1) {
    run_split_forward(p, splits, q.options(), *sm80, env, launch, tensors);
  } else if (any) {
    launch([&] { return sm80->fn(p, nullptr, env); }, tensors);
  }
  if (log_kernels()) {
    log_kernel(describe_kernel(what, sm80->head_dim, p.dtype, env) + ", " + std::to_string(p.batch) +
               (c.packed() ? " batch elements of packed queries in one launch" : " batch elements in one launch") +
               (paged ? ", paged (" + std::to_string(p.page_size) + " positions a page)" : "") +
               (splits > 1 ? ", keys split " + std::to_string(splits) + " ways" : "") +
               (group > 1 ? ", GQA heads packed " + std::to_string(group) + " per CTA" : ""));
  }
  return {k.out, c.packed() ? packed_lse(c, k.lse, check_values) : k.lse};
}

// The backward as both glues run it: the row statistics (launch_row_stats),
// the Hopper kernel when it covers the call (its launcher declines with
// cudaErrorNotSupported before launching anything), else the sm80 kernel,
// then the dQ conversion. launch(what, workspace, fn, extra = {}) runs one
// launcher and checks its error. Returns the kernel-log line of the kernel that ran.
// sm90 = false: the sm80 kernels whatever the device (ATTENTION_EXT_PACKED_SM90=0).
template <class Launch>
std::string run_backward(const BwdParams& p, const LaunchEnv& env, const at::TensorOptions& like, const FwdEntry& fwd,
                         const BwdEntry& sm80, const char* what, Launch&& launch, bool sm90 = true) {
  if (const BwdEntry* h = sm90 ? find_bwd_sm90(p, env) : nullptr) {
    const BwdWorkspace ws = make_bwd_workspace(p, *h, env.num_sms, like);
    launch("row statistics", ws, [&] { return launch_row_stats(p, ws.row_stats, fwd, env); });
    auto step = [&launch, &ws](const char* name) {
      return [&launch, &ws, name](auto&& fn, const LaunchTensors& extra) {
        launch(name, ws, std::forward<decltype(fn)>(fn), extra);
      };
    };
    at::Tensor bounds;
    const BwdParams ph = with_key_bounds(p, env, like, bounds, step("key bounds"));
    if (launched_unless_declined(step("backward"), [&] { return h->fn(ph, ws.work, env); }, {&bounds})) {
      launch("dq convert", ws, [&] { return launch_dq_convert(p, ws.work, env); });
      return describe_kernel_sm90(what, h->head_dim, p.dtype);
    }
  }
  const BwdWorkspace ws = make_bwd_workspace(p, sm80, env.num_sms, like);
  launch("row statistics", ws, [&] { return launch_row_stats(p, ws.row_stats, fwd, env); });
  launch("backward", ws, [&] { return sm80.fn(p, ws.work, env); });
  launch("dq convert", ws, [&] { return launch_dq_convert(p, ws.work, env); });
  return describe_kernel(what, sm80.head_dim, p.dtype, env, &ws.work);
}

// Rows [rows[0], rows[batch]) of a packed (total, heads, dim) gradient 0, the others NaN: a captured backward that
// runs no kernel (a longest sequence of 0 rows), as fill_empty_backward with offsets left on the device.
inline void fill_rows_unread(const at::Tensor& grad, const at::Tensor& rows) {
  const int64_t batch = rows.size(0) - 1;
  const at::Tensor r = at::arange(grad.size(0), rows.options()).view({-1, 1, 1});
  const at::Tensor in = r.ge(rows.narrow(0, 0, 1)).logical_and(r.lt(rows.narrow(0, batch, 1)));
  grad.copy_(at::where(in, at::zeros({}, grad.options()),
                       at::full({}, std::numeric_limits<double>::quiet_NaN(), grad.options())));
}

// _attention_varlen_backward as both glues run it: the row statistics, the backward kernel and the dQ
// conversion each in one launch over the packed sequences; the backward kernel the Hopper one where it covers
// the call (packed, as the forward), else the sm80 one. Without a packed Hopper backward, sequences of 1024+
// query rows on average that the ordinary Hopper backward covers go sequence by sequence through the glue's
// backward `bwd` (the offsets read once either way), and so does a head dim of 0 (the dense ops take it in
// ATen operations). rng_on_kernels(rng) returns the (batch, 2) rng_state where the kernels read it (sequence b:
// row b); find_fwd(p) / find_bwd(p) are the glue's sm80 entries (or their errors);
// launch(what, setup, workspace, fn, extra = {}) runs one launcher and checks its error.
// read_values = false (CUDA-graph capture, offsets on the GPU): as the forward, one launch of each kernel whatever
// the lengths, sized by max_q / max_k, over offsets checked on the device (checked_packed_rows); the gradient
// rows of a sequence it refuses, and rows no sequence covers, are NaN. What runs sequence by sequence (ALiBi, a
// soft cap, float64, head dim 0) refuses capture.
template <class Bwd, class RngOnKernels, class FindFwd, class FindBwd, class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_varlen_backward(
    Bwd&& bwd, RngOnKernels&& rng_on_kernels, FindFwd&& find_fwd, FindBwd&& find_bwd, Launch&& launch,
    const LaunchEnv& env, const char* what, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal, std::optional<double> scale,
    bool enable_gqa, at::IntArrayRef window, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<int64_t> max_q, std::optional<int64_t> max_k,
    bool read_values = true) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  check_varlen_backward_inputs(grad_out, q, v, cu_q, out, lse, rng, dropout_p, grad_lse);
  // (softcap, ALiBi: the packed backward kernel has neither, the ordinary one takes each sequence)
  const bool by_sequence = varlen_cuda_by_sequence(q, v) || softcap > 0.0 || opt.has_alibi();
  VarlenOffsets off;
  if (read_values) {
    off = prepare_varlen(q, k, v, cu_q, cu_k, opt, max_q, max_k);
  } else {
    check_varlen_inputs(q, k, v, cu_q, cu_k, opt);
    const char* which = opt.has_alibi()                  ? "with ALiBi"
                        : softcap > 0.0                  ? "with a soft cap"
                        : q.scalar_type() == at::kDouble ? "in float64"
                                                         : "of head dim 0";
    TORCH_CHECK(!by_sequence, "attention_varlen's backward ", which, " cannot be captured in a CUDA graph: it runs "
                "sequence by sequence, which needs the offsets on the host");
  }
  auto by_sequences = [&](const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
    varlen_backward_by_sequence(bwd, off, grad_out, q, k, v, out, lse, rng, dq, dk, dv, dropout_p, is_causal, scale,
                                enable_gqa, window, grad_lse, softcap, alibi_slopes);
    return std::make_tuple(dq, dk, dv);
  };
  if (read_values ? off.batch() <= 1 || by_sequence : cu_q.size(0) == 1) {
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    if (!read_values) {  // (no sequence: no row is any sequence's)
      check_capture_maxima(max_q, max_k, "attention_varlen's backward");
      for (const at::Tensor* t : {&dq, &dk, &dv}) t->fill_(std::numeric_limits<double>::quiet_NaN());
      return {dq, dk, dv};
    }
    poison(dq);
    poison(dk);
    poison(dv);
    return by_sequences(dq, dk, dv);
  }
  PackedBackward s = prepare_packed_backward(off, grad_out, q, k, v, cu_q, cu_k, out, lse, rng, opt, grad_lse,
                                             read_values, max_q, max_k);
  BwdParams& p = s.st.p;
  p.deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor rows_q, rows_k;  // (offsets not read back) cu_seqlens_q / _k as the kernels see them
  if (read_values) {
    const BwdEntry* hopper = packed_sm90_enabled() ? find_bwd_sm90(p, env) : nullptr;
    const BwdParams one = mean_sequence(p, off);
    if (hopper == nullptr && one.len_q >= 1024 && find_bwd_sm90(one, env) != nullptr)
      return by_sequences(heads_first(s.st.dq), heads_first(s.st.dk), heads_first(s.st.dv));
  } else {
    for (const at::Tensor* t : {&s.st.dq4, &s.st.dk4, &s.st.dv4}) t->fill_(std::numeric_limits<double>::quiet_NaN());
    std::tie(rows_q, rows_k) = checked_packed_rows(p, s.cu_q, s.cu_k, env, [&](auto&& fn, const LaunchTensors& t) {
      launch("packed rows", s.st, BwdWorkspace{}, std::forward<decltype(fn)>(fn), t);
    });
  }
  const at::Tensor rng_k = rng_on_kernels(rng);
  if (dropout_p > 0.0) p.seed_offset_ptr = rng_k.template data_ptr<int64_t>();
  if (p.len_q == 0 || p.len_k == 0 || p.heads_q == 0) {
    // no kernel runs: every gradient row belongs to an empty sequence (the kernels write those rows themselves:
    // 0 for dK / dV of keys no query sees, and dQ of rows without a key from the zeroed workspace)
    if (read_values) {
      fill_empty_backward(off, heads_first(s.st.dq), heads_first(s.st.dk), heads_first(s.st.dv));
    } else {
      fill_rows_unread(heads_first(s.st.dq), rows_q);
      fill_rows_unread(heads_first(s.st.dk), rows_k);
      fill_rows_unread(heads_first(s.st.dv), rows_k);
    }
  } else {
    const std::string ran =
        run_backward(p, env, q.options(), *find_fwd(p), *find_bwd(p), what,
                     [&](const char* step, const BwdWorkspace& ws, auto&& fn, const LaunchTensors& extra = {}) {
                       launch(step, s.st, ws, std::forward<decltype(fn)>(fn),
                              LaunchTensors{&s.cu_q, &s.cu_k, &rng_k, &rows_q, &rows_k} + extra);
                     },
                     packed_sm90_enabled());
    if (log_kernels()) log_kernel(ran + ", " + std::to_string(p.batch) + " packed sequences in one launch");
  }
  auto [gq, gk, gv, gm] = finish_backward(s.st, std::nullopt, heads_first(q));
  return {heads_first(gq), heads_first(gk), heads_first(gv)};
}

}  // namespace cuda
}  // namespace attention_ext

// CPU backend: thin glue from the ops to the torch-free kernels in flash_cpu.h.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <mutex>

#include "../composite.h"
#include "../glue.h"
#include "../kvcache.h"
#include "../philox.h"
#include "../varlen.h"
#include "kernels.h"

namespace attention_ext {
namespace {

template <typename Fn>
void dispatch_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(cpu::bf16{}); break;
    case at::kHalf: fn(cpu::f16{}); break;
    default: TORCH_CHECK_TYPE(false, "attention_ext: unsupported dtype ", t);
  }
}

// Seed drawn from torch's default CPU generator: torch.manual_seed(s) makes
// the dropout mask reproducible. Offset 0: every call gets its own seed.
std::pair<uint64_t, uint64_t> draw_seed(double dropout_p) {
  if (dropout_p <= 0.0) return {0, 0};
  auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {gen->random64(), 0};
}

at::Tensor make_rng_state(uint64_t seed, uint64_t offset) {
  at::Tensor rng = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  int64_t* r = rng.data_ptr<int64_t>();  // (rng[0] = seed through indexing: two dispatched ops, ~1 us each)
  r[0] = static_cast<int64_t>(seed);
  r[1] = static_cast<int64_t>(offset);
  return rng;
}

void read_rng_state(const at::Tensor& rng, double dropout_p, FwdParams& p) {
  if (dropout_p <= 0.0) return;
  check_rng_state(rng, dropout_p);
  at::Tensor r = rng.cpu();
  p.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
  p.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
}


// The forward, and with `with_weights` the attention weights from the same pass (allocated once the
// inputs are validated; undefined otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    double softcap, bool with_weights, bool average_heads, const std::optional<at::Tensor>& alibi_slopes) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  ForwardSetup st = prepare_forward(q, k, v, mask, opt);
  auto [seed, offset] = draw_seed(dropout_p);
  if (zero_head_dim(st.p)) {
    if (log_kernels()) log_kernel("cpu forward: head dim 0, in ATen operations");
    at::Tensor rng = make_rng_state(seed, offset);
    at::Tensor w = composite_forward(st, q, k, v, mask, opt, rng, with_weights, average_heads);
    return {st.out, st.lse, rng, with_weights ? w : at::Tensor()};
  }
  at::Tensor w;
  if (with_weights) {
    w = empty_weights(q, k, average_heads);
    poison(w);
  }
  st.p.seed = seed;
  st.p.offset = offset;
  if (log_kernels())
    log_kernel(cpu::describe_kernel(with_weights ? "cpu forward with weights" : "cpu forward", st.p, false,
                                    with_weights));
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    cpu::flash_fwd<T>(st.p, with_weights ? static_cast<T*>(w.data_ptr()) : nullptr, average_heads);
  });
  finish_forward(st);
  return {st.out, st.lse, make_rng_state(seed, offset), w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  auto [out, lse, rng, w] = run_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                        false, false, alibi_slopes);
  return {out, lse, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_weights_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool average_heads, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  return run_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, true, average_heads,
                     alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  BackwardSetup st = prepare_backward(grad_out, q, k, v, mask, out, lse, rng, opt, mask_grad, grad_lse);
  if (zero_head_dim(st.p)) return composite_backward(st, grad_out, q, k, v, mask, rng, opt, mask_grad);
  read_rng_state(rng, dropout_p, st.p);
  st.p.deterministic = true;  // the CPU backward never uses atomics
  if (log_kernels()) log_kernel(cpu::describe_kernel("cpu backward", st.p, true));
  dispatch_dtype(q.scalar_type(), [&](auto t) { cpu::flash_bwd<decltype(t)>(st.p); });
  return finish_backward(st, mask, q);
}

at::Tensor probs_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                     const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                     std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
                     const std::optional<at::Tensor>& alibi_slopes) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  ProbsSetup st = prepare_probs(q, k, mask, lse, rng, opt);
  if (st.p.dim_qk == 0) {
    composite_probs(st, q, k, mask, opt, rng, false);
    return st.probs;
  }
  read_rng_state(rng, dropout_p, st.p);
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    cpu::flash_probs<T>(st.p, static_cast<T*>(st.probs.data_ptr()));
  });
  return st.probs;
}

at::Tensor dropout_mask_cpu(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                            double dropout_p) {
  check_dropout_mask_args(rng, batch, heads, len_q, len_k, dropout_p);
  FwdParams p;
  read_rng_state(rng, dropout_p, p);
  at::Tensor m = at::empty({batch, heads, len_q, len_k}, rng.options().dtype(at::kBool));
  bool* out = m.data_ptr<bool>();
  const DropoutRng r(p.seed, p.offset, dropout_p);
  cpu::parallel_for(batch * heads * len_q, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < len_k; ++j) out[t * len_k + j] = r.keep(t / len_q, t % len_q, j);
  });
  return m;
}

// Variable-length sequences: one kernel call per sequence (batch 1, its rows of the packed tensors), all in
// one parallel region where the sequences are short (cpu::run_jobs); sequence b draws dropout with offset b.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  if (varlen_zero_head_dim(q, v)) {  // (prepare_packed_forward validates the call)
    PackedForward s = prepare_packed_forward(q, k, v, cu_q, cu_k, opt, max_q, max_k);
    return varlen_forward_by_sequence(forward_cpu, s, q, k, v, dropout_p, is_causal, scale, enable_gqa, window,
                                      softcap, alibi_slopes);
  }
  const VarlenOffsets off = prepare_varlen(q, k, v, cu_q, cu_k, opt, max_q, max_k);
  ForwardSetup st = prepare_forward(heads_first(q), heads_first(k), heads_first(v), std::nullopt, without_alibi(opt));
  st.alibi = set_varlen_alibi(st.p, opt);
  auto [seed, offset] = draw_seed(dropout_p);
  st.p.seed = seed;
  st.p.offset = offset;
  at::Tensor lse = st.lse.view({-1});
  at::Tensor out = heads_first(st.out);
  fill_empty_forward(off, out, lse, q.size(1));
  const std::vector<FwdParams> ps = split_sequences(st.p, off);
  at::Tensor rng = at::empty({off.batch(), 2}, at::TensorOptions().dtype(at::kLong));
  std::vector<double> cost(off.batch());
  int64_t* rd = rng.data_ptr<int64_t>();
  for (int64_t b = 0; b < off.batch(); ++b) {
    rd[2 * b] = static_cast<int64_t>(seed);
    rd[2 * b + 1] = static_cast<int64_t>(ps[b].offset);
    cost[b] = off.len_k(b) == 0 ? 0.0 : static_cast<double>(off.len_q(b)) * static_cast<double>(off.len_k(b));
  }
  if (log_kernels()) {
    log_kernel("cpu varlen forward: " + std::to_string(off.batch()) + " sequences, flash kernel per sequence");
  }
  cpu::warm_up(st.p.dtype);
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    cpu::run_jobs(cost, [&](int64_t b) {
      if (off.len_q(b) > 0 && off.len_k(b) > 0) cpu::flash_fwd<decltype(t)>(ps[b]);
    });
  });
  finish_forward(st);
  return {out, lse, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& rng, double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
    at::IntArrayRef window, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<int64_t> max_q,
    std::optional<int64_t> max_k) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  check_varlen_backward_inputs(grad_out, q, v, cu_q, out, lse, rng, dropout_p, grad_lse);
  const VarlenOffsets off = prepare_varlen(q, k, v, cu_q, cu_k, opt, max_q, max_k);
  if (varlen_zero_head_dim(q, v)) {
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    poison(dq);
    poison(dk);
    poison(dv);
    varlen_backward_by_sequence(backward_cpu, off, grad_out, q, k, v, out, lse, rng, dq, dk, dv, dropout_p,
                                is_causal, scale, enable_gqa, window, grad_lse, softcap, alibi_slopes);
    return {dq, dk, dv};
  }
  // prepare_backward checks a (Hq, total_q) logsumexp and an int64[2] rng state: the packed ones are checked
  // above, and each sequence's seed and offset are read from its own row below
  const at::Tensor rng2 = at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  BackwardSetup st = prepare_backward(heads_first(grad_out), heads_first(q), heads_first(k), heads_first(v),
                                      std::nullopt, heads_first(out), lse.reshape({q.size(1), q.size(0)}), rng2,
                                      without_alibi(opt), false, stats_2d(grad_lse, q.size(1), q.size(0)));
  st.alibi = set_varlen_alibi(st.p, opt);
  st.p.deterministic = true;
  fill_empty_backward(off, heads_first(st.dq), heads_first(st.dk), heads_first(st.dv));
  std::vector<BwdParams> ps = split_sequences(st.p, off);
  std::vector<double> cost(off.batch());
  const at::Tensor r = dropout_p > 0.0 ? rng.to(at::kCPU).contiguous() : at::Tensor();
  for (int64_t b = 0; b < off.batch(); ++b) {
    if (r.defined()) {
      ps[b].seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[2 * b]);
      ps[b].offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[2 * b + 1]);
    }
    cost[b] = static_cast<double>(off.len_q(b)) * static_cast<double>(off.len_k(b));
  }
  if (log_kernels()) {
    log_kernel("cpu varlen backward: " + std::to_string(off.batch()) + " sequences, flash kernel per sequence");
  }
  cpu::warm_up(st.p.dtype);
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    cpu::run_jobs(cost, [&](int64_t b) {
      if (off.len_q(b) > 0 && off.len_k(b) > 0) cpu::flash_bwd<decltype(t)>(ps[b]);
    });
  });
  auto [dq, dk, dv, dm] = finish_backward(st, std::nullopt, heads_first(q));
  return {heads_first(dq), heads_first(dk), heads_first(dv)};
}

// attention_kvcache (csrc/kvcache.h): the new keys appended, then the flash kernel per batch element on the
// cache in place (no copy of it; a paged cache through FwdParams::block_table), every batch element in one
// parallel region (cpu::run_jobs), each seeing its own S_b positions with its L_b queries at their end (packed
// queries: its rows of cu_seqlens_q, FwdParams::cu_seqlens_q).
std::tuple<at::Tensor, at::Tensor> kvcache_cpu(const KvCall& call, const AttnOptions& opt) {
  check_kvcache_inputs(call, opt);
  const KvLengths len = read_kv_lengths(call, opt);
  const KvCall c = prepare_kv(call, opt);
  const bool packed = c.packed();
  const int64_t B = c.cache_seqlens.size(0), Hq = c.q.size(1);
  const int64_t max_q = len.queries.empty() ? 0 : *std::max_element(len.queries.begin(), len.queries.end());
  // (S_b within int32: checked against the cache's rows)
  KvParams k = kv_params(c, opt, at::tensor(std::vector<int32_t>(len.keys.begin(), len.keys.end()), at::kInt),
                         at::kCPU, max_q);
  const FwdParams& p = k.p;
  const size_t es = c.q.element_size(), acc_es = k.lse.element_size();
  std::vector<FwdParams> ps(B);
  std::vector<double> cost(B);
  for (int64_t b = 0; b < B; ++b) {
    ps[b] = cache_batch_params(p, b, es, acc_es);
    // (ps[b].len_k: S_b less a left padding)
    cost[b] = static_cast<double>(len.queries[b]) * static_cast<double>(ps[b].len_k);
    if (ps[b].len_k == 0) {  // nothing to attend to: 0 and lse -inf, as a fully masked row
      const int64_t q0 = packed ? k.cu.data_ptr<int32_t>()[b] : 0;
      (packed ? k.out.narrow(0, q0, len.queries[b]) : k.out.select(0, b)).zero_();
      (packed ? k.lse.narrow(0, Hq * q0, Hq * len.queries[b]) : k.lse.select(0, b))
          .fill_(-std::numeric_limits<double>::infinity());
    }
  }
  if (log_kernels()) {
    log_kernel(cpu::describe_kernel("cpu kvcache forward", p, false) + ", " + std::to_string(B) +
               (packed ? " batch elements of packed queries" : " batch elements") +
               (p.block_table != nullptr ? ", paged (" + std::to_string(p.page_size) + " positions a page)" : ""));
  }
  cpu::warm_up(p.dtype);
  dispatch_dtype(c.q.scalar_type(), [&](auto t) {
    cpu::run_jobs(cost, [&](int64_t b) {
      if (ps[b].len_k > 0 && len.queries[b] > 0) cpu::flash_fwd<decltype(t)>(ps[b]);
    });
  });
  return {k.out, packed ? packed_lse(c, k.lse) : k.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("attention_kvcache", TORCH_FN(kvcache_kernel<kvcache_cpu>));
  m.impl("_attention_varlen_forward", TORCH_FN(varlen_forward_cpu));
  m.impl("_attention_varlen_backward", TORCH_FN(varlen_backward_cpu));
  m.impl("_attention_forward", TORCH_FN(forward_cpu));
  m.impl("_attention_forward_weights", TORCH_FN(forward_weights_cpu));
  m.impl("_attention_backward", TORCH_FN(backward_cpu));
  m.impl("attention_probs", TORCH_FN(probs_cpu));
  m.impl("_dropout_mask", TORCH_FN(dropout_mask_cpu));
}

}  // namespace attention_ext

// Meta (fake) kernels: shapes, dtypes and strides of every op's outputs, from
// the same validation and allocation code as the real backends (SymInt-safe,
// so torch.compile with dynamic shapes works and raises the same errors).
#include <torch/library.h>

#include "glue.h"
#include "kvcache.h"
#include "varlen.h"

namespace attention_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q, k, v, mask, make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes));
  return {empty_output(q, v.sym_size(-1)), empty_lse(q), at::empty({2}, q.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_weights_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool average_heads, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  auto [out, lse, rng] =
      forward_meta(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  return {out, lse, rng, empty_weights(q, k, average_heads)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q, k, v, mask, make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes));
  check_backward_inputs(grad_out, out, lse, rng, q, v, dropout_p, grad_lse);
  const bool want_dmask = mask_grad && mask.has_value() && mask->defined() && mask->is_floating_point();
  at::Tensor dmask = want_dmask ? at::empty_symint(mask->sym_sizes(), mask->options())
                                : at::empty({0}, q.options());
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v), dmask};
}

at::Tensor probs_meta(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                      const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                      std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
                      const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q, k, k, mask, make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes));
  check_lse(lse, q);
  check_rng_state(rng, dropout_p);
  return empty_weights(q, k);
}

at::Tensor dropout_mask_meta(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                             double dropout_p) {
  check_dropout_mask_args(rng, batch, heads, len_q, len_k, dropout_p);
  return at::empty({batch, heads, len_q, len_k}, rng.options().dtype(at::kBool));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t>, std::optional<int64_t>, double dropout_p, bool is_causal, std::optional<double> scale,
    bool enable_gqa, at::IntArrayRef window, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_varlen_inputs(q, k, v, cu_q, cu_k,
                      make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes));
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = heads_first(empty_output(heads_first(q), v.sym_size(2)));
  at::Tensor lse = at::empty_symint({q.sym_size(0) * q.sym_size(1)}, q.options().dtype(acc));
  at::Tensor rng = at::empty_symint({cu_q.sym_size(0) - 1, 2}, q.options().dtype(at::kLong));
  return {out, lse, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& rng, double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
    at::IntArrayRef window, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<int64_t> max_q,
    std::optional<int64_t> max_k) {
  check_varlen_inputs(q, k, v, cu_q, cu_k,
                      make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes));
  check_varlen_backward_inputs(grad_out, q, v, cu_q, out, lse, rng, dropout_p, grad_lse);
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v)};
}

std::tuple<at::Tensor, at::Tensor> kvcache_meta(const KvCall& call, const AttnOptions& opt) {
  check_kvcache_inputs(call, opt);
  return {empty_output(call.q, call.value_cache.sym_size(3)), empty_lse(call.q)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, Meta, m) {
  m.impl("attention_kvcache", TORCH_FN(kvcache_kernel<kvcache_meta>));
  m.impl("_attention_varlen_forward", TORCH_FN(varlen_forward_meta));
  m.impl("_attention_varlen_backward", TORCH_FN(varlen_backward_meta));
  m.impl("_attention_forward", TORCH_FN(forward_meta));
  m.impl("_attention_forward_weights", TORCH_FN(forward_weights_meta));
  m.impl("_attention_backward", TORCH_FN(backward_meta));
  m.impl("attention_probs", TORCH_FN(probs_meta));
  m.impl("_dropout_mask", TORCH_FN(dropout_mask_meta));
}

}  // namespace attention_ext

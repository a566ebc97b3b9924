// The one TORCH_LIBRARY block of the project: every schema, plus the
// user-facing differentiable `attention` op (CompositeImplicitAutograd: a C++
// autograd::Function over the internal forward/backward ops, so autograd works
// from Python, from C++ through LibTorch, and under torch.compile, which traces
// through it down to the internal ops and their Meta kernels).
#include <torch/autograd.h>
#include <torch/library.h>

#include "glue.h"
#include "schemas.h"

namespace attention_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether the call records an autograd node: grad mode on and an input that requires grad. Otherwise
// (no_grad, inference mode, inputs without requires_grad) the forward op runs alone, without building
// the autograd function's context and saved values (about half the fixed cost of a small call).
bool needs_graph(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, bool, std::optional<double>, bool, at::IntArrayRef)>();
  return op.call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           double, bool, std::optional<double>, bool, at::IntArrayRef, bool)>();
  return op.call(grad, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, mask_grad);
}

// First-order gradients as an autograd function of their own, so that with
// create_graph=True the gradients carry a node whose backward raises a clear
// error (instead of silently not requiring grad).
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng, double dropout_p,
                               bool is_causal, std::optional<double> scale, bool enable_gqa,
                               at::IntArrayRef window, bool mask_grad) {
    auto [dq, dk, dv, dmask] = call_backward(grad, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale,
                                             enable_gqa, window, mask_grad);
    return {dq, dk, dv, dmask};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "attention_ext.attention does not support double backward (differentiating its gradients); "
                "use create_graph=False, or torch.nn.functional.scaled_dot_product_attention's math backend "
                "for higher-order gradients");
  }
};

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                            std::optional<double> scale, bool enable_gqa, at::IntArrayRef window) {
    auto [out, lse, rng] = call_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window);
    const bool has_mask = mask.has_value() && mask->defined();
    ctx->save_for_backward({q, k, v, has_mask ? *mask : at::Tensor(), out, lse, rng});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["has_mask"] = has_mask;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool has_mask = ctx->saved_data["has_mask"].toBool();
    std::optional<at::Tensor> mask = has_mask ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const bool mask_grad = has_mask && ctx->needs_input_grad(3);
    const auto window = ctx->saved_data["window"].toIntVector();
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(saved[4]);
    auto g = AttentionBackwardFunction::apply(
        grad, saved[0], saved[1], saved[2], mask, saved[4], saved[5], saved[6],
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
        ctx->saved_data["scale"].toOptional<double>(), ctx->saved_data["enable_gqa"].toBool(), window, mask_grad);
    return {g[0], g[1], g[2], mask_grad ? g[3] : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                     std::optional<double> scale, bool enable_gqa, at::IntArrayRef window) {
  TORCH_CHECK_VALUE(!q.is_nested() && !k.is_nested() && !v.is_nested(),
                    "torch.ops.attention_ext.attention takes dense tensors; for nested (jagged) tensors call "
                    "attention_ext.attention or attention_ext.scaled_dot_product_attention, which pack them for "
                    "attention_varlen, or call torch.ops.attention_ext.attention_varlen with packed values and "
                    "offsets");
  if (!needs_graph({&q, &k, &v, mask.has_value() ? &*mask : nullptr}))
    return std::get<0>(call_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window));
  return AttentionFunction::apply(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window);
}

// Variable-length (packed) sequences: the same pattern over _attention_varlen_forward / _backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_varlen_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, at::IntArrayRef window) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_varlen_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, double, bool,
                           std::optional<double>, bool, at::IntArrayRef)>();
  return op.call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window);
}

class AttentionVarlenBackwardFunction : public torch::autograd::Function<AttentionVarlenBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng, double dropout_p,
                               bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("attention_ext::_attention_varlen_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, bool, std::optional<double>, bool, at::IntArrayRef)>();
    auto [dq, dk, dv] =
        op.call(grad, q, k, v, cu_q, cu_k, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window);
    return {dq, dk, dv};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attention_ext.attention_varlen does not support double backward (differentiating its "
                       "gradients); use create_graph=False");
  }
};

class AttentionVarlenFunction : public torch::autograd::Function<AttentionVarlenFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_q, const at::Tensor& cu_k, std::optional<int64_t> max_q,
                            std::optional<int64_t> max_k, double dropout_p, bool is_causal,
                            std::optional<double> scale, bool enable_gqa, at::IntArrayRef window) {
    auto [out, lse, rng] =
        call_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window);
    ctx->save_for_backward({q, k, v, cu_q, cu_k, out, lse, rng});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["window"] = window.vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(s[5]);
    auto g = AttentionVarlenBackwardFunction::apply(
        grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        ctx->saved_data["enable_gqa"].toBool(), ctx->saved_data["window"].toIntVector());
    return {g[0],         g[1],         g[2],         at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, std::optional<int64_t> max_q, std::optional<int64_t> max_k,
                            double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
                            at::IntArrayRef window) {
  if (!needs_graph({&q, &k, &v}))
    return std::get<0>(call_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale,
                                           enable_gqa, window));
  return AttentionVarlenFunction::apply(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa,
                                        window);
}

}  // namespace

TORCH_LIBRARY(attention_ext, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
      "bool is_causal=False, float? scale=None, bool enable_gqa=False, int[2] window_size=[-1, -1]) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int? max_seqlen_q=None, int? max_seqlen_k=None, float dropout_p=0.0, bool is_causal=False, "
      "float? scale=None, bool enable_gqa=False, int[2] window_size=[-1, -1]) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def(schema::kForward, {at::Tag::nondeterministic_seeded});
  m.def(schema::kVarlenForward, {at::Tag::nondeterministic_seeded});
  m.def(schema::kVarlenBackward);
  m.def(schema::kForwardWeights, {at::Tag::nondeterministic_seeded});
  m.def(schema::kBackward);
  m.def(schema::kProbs);
  m.def(schema::kDropoutMask);
  m.def(schema::kSm90GemmSelftest);
}

TORCH_LIBRARY_IMPL(attention_ext, CompositeImplicitAutograd, m) {
  m.impl("attention", TORCH_FN(attention));
  m.impl("attention_varlen", TORCH_FN(attention_varlen));
}

// The internal ops are not differentiable by themselves (attention is the
// differentiable entry point): their outputs never require grad.
TORCH_LIBRARY_IMPL(attention_ext, Autograd, m) {
  m.impl("_attention_forward", torch::CppFunction::makeFallthrough());
  m.impl("_attention_forward_weights", torch::CppFunction::makeFallthrough());
  m.impl("_attention_backward", torch::CppFunction::makeFallthrough());
  m.impl("_attention_varlen_forward", torch::CppFunction::makeFallthrough());
  m.impl("_attention_varlen_backward", torch::CppFunction::makeFallthrough());
  m.impl("attention_probs", torch::CppFunction::makeFallthrough());
  m.impl("_dropout_mask", torch::CppFunction::makeFallthrough());
  m.impl("_sm90_gemm_selftest", torch::CppFunction::makeFallthrough());
}

}  // namespace attention_ext

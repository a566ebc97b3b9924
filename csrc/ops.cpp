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
  return AttentionFunction::apply(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window);
}

}  // namespace

TORCH_LIBRARY(attention_ext, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
      "bool is_causal=False, float? scale=None, bool enable_gqa=False, int[2] window_size=[-1, -1]) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def(schema::kForward, {at::Tag::nondeterministic_seeded});
  m.def(schema::kForwardWeights, {at::Tag::nondeterministic_seeded});
  m.def(schema::kBackward);
  m.def(schema::kProbs);
  m.def(schema::kDropoutMask);
  m.def(schema::kSm90GemmSelftest);
}

TORCH_LIBRARY_IMPL(attention_ext, CompositeImplicitAutograd, m) {
  m.impl("attention", TORCH_FN(attention));
}

// The internal ops are not differentiable by themselves (attention is the
// differentiable entry point): their outputs never require grad.
TORCH_LIBRARY_IMPL(attention_ext, Autograd, m) {
  m.impl("_attention_forward", torch::CppFunction::makeFallthrough());
  m.impl("_attention_forward_weights", torch::CppFunction::makeFallthrough());
  m.impl("_attention_backward", torch::CppFunction::makeFallthrough());
  m.impl("attention_probs", torch::CppFunction::makeFallthrough());
  m.impl("_dropout_mask", torch::CppFunction::makeFallthrough());
  m.impl("_sm90_gemm_selftest", torch::CppFunction::makeFallthrough());
}

}  // namespace attention_ext

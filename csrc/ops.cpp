// The one TORCH_LIBRARY block of the project: every schema, plus the
// user-facing differentiable `attention` op (CompositeImplicitAutograd: a C++
// autograd::Function over the internal forward/backward ops, so autograd works
// from Python, from C++ through LibTorch, and under torch.compile, which traces
// through it down to the internal ops and their Meta kernels).
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "glue.h"
#include "composite.h"
#include "kvcache.h"
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

// Whether an input carries a forward-mode tangent (a dual tensor of torch.autograd.forward_ad, level 0).
bool has_tangent(std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs)
    if (t != nullptr && t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  return false;
}

// Whether a torch.func transform (grad, vjp, jvp, vmap, ...) is running, so that a C++ autograd function
// would raise: functorch's own check, the one torch::autograd::Function::apply makes. (The TLS object
// stays once a transform has run; the check fails only while a transform's layer is on the stack.)
bool functorch_active() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> call_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double dropout_p,
                                             bool is_causal, std::optional<double> scale, bool enable_gqa,
                                             at::IntArrayRef window, const std::optional<at::Tensor>& rng,
                                             double softcap, const std::optional<at::Tensor>& alibi) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_math", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, bool, std::optional<double>, bool, at::IntArrayRef,
                           const std::optional<at::Tensor>&, bool, bool, double, const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, rng, false, false, softcap, alibi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    double softcap, const std::optional<at::Tensor>& alibi) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, bool, std::optional<double>, bool, at::IntArrayRef, double,
                           const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad, double softcap, const std::optional<at::Tensor>& alibi) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           double, bool, std::optional<double>, bool, at::IntArrayRef, bool,
                           const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&)>();
  return op.call(grad, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, mask_grad,
                 std::nullopt, softcap, alibi);
}

// First-order gradients as an autograd function of their own, so that with create_graph=True they can be
// differentiated again: the double backward recomputes the attention in plain ATen operations
// (attention_math, with the forward's dropout mask) and differentiates its gradients with autograd. The
// L x S scores exist only then, as in PyTorch's math backend, the one SDPA backend with a double backward.
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng, double dropout_p,
                               bool is_causal, std::optional<double> scale, bool enable_gqa,
                               at::IntArrayRef window, bool mask_grad, double softcap,
                               const std::optional<at::Tensor>& alibi) {
    auto [dq, dk, dv, dmask] = call_backward(grad, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale,
                                             enable_gqa, window, mask_grad, softcap, alibi);
    const bool has_mask = mask.has_value() && mask->defined();
    const bool has_alibi = alibi.has_value() && alibi->defined();
    ctx->save_for_backward({grad, q, k, v, has_mask ? *mask : at::Tensor(), rng, has_alibi ? *alibi : at::Tensor()});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["mask_grad"] = mask_grad;
    ctx->saved_data["softcap"] = softcap;
    return {dq, dk, dv, dmask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list ggrads) {
    auto saved = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    at::AutoGradMode grad_mode(true);
    // differentiable stand-ins: a view of each input that requires grad (so that the gradients below are
    // partial derivatives, stopping there, and keep their graph back to the input for higher orders), a
    // fresh leaf for each that does not
    auto leaf = [](const at::Tensor& t) { return t.requires_grad() ? t.view_as(t) : t.detach().requires_grad_(true); };
    at::Tensor g = leaf(saved[0]), q = leaf(saved[1]), k = leaf(saved[2]), v = leaf(saved[3]);
    const at::Tensor& mask_saved = saved[4];
    const bool float_mask = mask_saved.defined() && mask_saved.is_floating_point();
    at::Tensor m = float_mask ? leaf(mask_saved) : mask_saved;
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const auto window = ctx->saved_data["window"].toIntVector();
    std::optional<at::Tensor> mask = m.defined() ? std::optional<at::Tensor>(m) : std::nullopt;
    std::optional<at::Tensor> rng = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    at::Tensor out = std::get<0>(call_math(q, k, v, mask, dropout_p, ctx->saved_data["is_causal"].toBool(),
                                           ctx->saved_data["scale"].toOptional<double>(),
                                           ctx->saved_data["enable_gqa"].toBool(), window, rng,
                                           ctx->saved_data["softcap"].toDouble(),
                                           saved[6].defined() ? std::optional<at::Tensor>(saved[6]) : std::nullopt));
    // the first-order gradients again, now with a graph
    variable_list wrt = {q, k, v};
    if (float_mask) wrt.push_back(m);
    variable_list first = torch::autograd::grad({out}, wrt, {g}, /*retain_graph=*/true, /*create_graph=*/true,
                                                /*allow_unused=*/true);
    // ... and their vector-Jacobian product with the incoming gradients
    variable_list ys, gys;
    for (size_t i = 0; i < first.size(); ++i) {
      const bool wanted = i < 3 || ctx->saved_data["mask_grad"].toBool();
      if (wanted && i < ggrads.size() && ggrads[i].defined() && first[i].defined() && first[i].requires_grad()) {
        ys.push_back(first[i]);
        gys.push_back(ggrads[i]);
      }
    }
    variable_list inputs = {g, q, k, v};
    if (float_mask) inputs.push_back(m);
    variable_list second(inputs.size());
    if (!ys.empty())
      second = torch::autograd::grad(ys, inputs, gys, /*retain_graph=*/create_graph, create_graph,
                                     /*allow_unused=*/true);
    variable_list result(16);
    for (size_t i = 0; i < 4; ++i) result[i] = second[i];
    if (float_mask) result[4] = second[4];
    return result;
  }
};

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                            std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
                            const std::optional<at::Tensor>& alibi) {
    auto [out, lse, rng] =
        call_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi);
    const bool has_mask = mask.has_value() && mask->defined();
    const bool has_alibi = alibi.has_value() && alibi->defined();
    ctx->save_for_backward({q, k, v, has_mask ? *mask : at::Tensor(), out, lse, rng,
                            has_alibi ? *alibi : at::Tensor()});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["has_mask"] = has_mask;
    ctx->saved_data["softcap"] = softcap;
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
        ctx->saved_data["scale"].toOptional<double>(), ctx->saved_data["enable_gqa"].toBool(), window, mask_grad,
        ctx->saved_data["softcap"].toDouble(),
        saved[7].defined() ? std::optional<at::Tensor>(saved[7]) : std::nullopt);
    return {g[0],         g[1],         g[2],         mask_grad ? g[3] : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),                  at::Tensor()};
  }
};

// Sparse, MKL-DNN and other layouts have no kernel here: an error naming the argument, not the dispatcher's
// "could not run ... with arguments from the 'SparseCPU' backend".
void check_strided(const at::Tensor& t, const char* name) {
  const at::Layout l = t.layout();
  if (l == at::kStrided) return;
  const char* py = l == at::kSparse      ? "torch.sparse_coo"
                   : l == at::kSparseCsr ? "torch.sparse_csr"
                   : l == at::kSparseCsc ? "torch.sparse_csc"
                   : l == at::kSparseBsr ? "torch.sparse_bsr"
                   : l == at::kSparseBsc ? "torch.sparse_bsc"
                   : l == at::kMkldnn    ? "torch._mkldnn"
                                         : nullptr;
  const bool sparse = l != at::kMkldnn && py != nullptr;
  TORCH_CHECK_VALUE(false, name, " must be a dense (strided) tensor, got layout ", py ? std::string(py) : c10::str(l),
                    sparse ? " (call .to_dense() on it)" : "");
}

// ALiBi slopes are constants (no gradient, as FlashAttention's): strided, and not differentiated by autograd.
void check_constant_slopes(const std::optional<at::Tensor>& alibi, const char* op) {
  if (!alibi.has_value() || !alibi->defined()) return;
  check_strided(*alibi, "alibi_slopes");
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && alibi->requires_grad()), "alibi_slopes: ", op,
                    " has no gradient with respect to the ALiBi slopes (as FlashAttention); pass "
                    "alibi_slopes.detach()");
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                     std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
                     const std::optional<at::Tensor>& alibi) {
  TORCH_CHECK_VALUE(!q.is_nested() && !k.is_nested() && !v.is_nested(),
                    "torch.ops.attention_ext.attention takes dense tensors; for nested (jagged) tensors call "
                    "attention_ext.attention or attention_ext.scaled_dot_product_attention, which pack them for "
                    "attention_varlen, or call torch.ops.attention_ext.attention_varlen with packed values and "
                    "offsets");
  check_strided(q, "query");
  check_strided(k, "key");
  check_strided(v, "value");
  if (mask.has_value() && mask->defined()) check_strided(*mask, "attn_mask");
  // (the fused backward has no gradient for the slopes; the composite would differentiate them, but a gradient
  // that exists only on some paths would be worse than none)
  check_constant_slopes(alibi, "attention");
  const at::Tensor* m = mask.has_value() ? &*mask : nullptr;
  const bool graph = needs_graph({&q, &k, &v, m});
  if (has_tangent({&q, &k, &v, m}) || (graph && functorch_active())) {
    // forward-mode AD, or a torch.func transform that differentiates: the fused kernels have no formula
    // for the one and C++ autograd functions cannot run under the other, so the ATen composite does both
    // (its dropout mask drawn by the fused forward, which also validates the inputs first). In Python,
    // attention_ext/_transforms.py takes torch.func calls before they get here, onto the fused kernels
    // where it can; this is the path of LibTorch programs and of dual tensors outside torch.func.
    std::optional<at::Tensor> rng;
    if (dropout_p > 0.0)
      rng = std::get<2>(
          call_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi));
    return std::get<0>(
        call_math(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, rng, softcap, alibi));
  }
  if (!graph)
    return std::get<0>(call_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi));
  return AttentionFunction::apply(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi);
}

// Variable-length (packed) sequences: the same pattern over _attention_varlen_forward / _backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_varlen_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_attention_varlen_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, double, bool,
                           std::optional<double>, bool, at::IntArrayRef, double, const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi);
}

class AttentionVarlenBackwardFunction : public torch::autograd::Function<AttentionVarlenBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng, double dropout_p,
                               bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
                               double softcap, const std::optional<at::Tensor>& alibi, std::optional<int64_t> max_q,
                               std::optional<int64_t> max_k) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("attention_ext::_attention_varlen_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, bool, std::optional<double>, bool, at::IntArrayRef,
                             const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                             std::optional<int64_t>, std::optional<int64_t>)>();
    auto [dq, dk, dv] = op.call(grad, q, k, v, cu_q, cu_k, out, lse, rng, dropout_p, is_causal, scale, enable_gqa,
                                window, std::nullopt, softcap, alibi, max_q, max_k);
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
                            std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
                            const std::optional<at::Tensor>& alibi) {
    auto [out, lse, rng] = call_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale,
                                               enable_gqa, window, softcap, alibi);
    const bool has_alibi = alibi.has_value() && alibi->defined();
    ctx->save_for_backward({q, k, v, cu_q, cu_k, out, lse, rng, has_alibi ? *alibi : at::Tensor()});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["max_q"] = max_q;  // (for a backward captured in a CUDA graph)
    ctx->saved_data["max_k"] = max_k;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(s[5]);
    auto g = AttentionVarlenBackwardFunction::apply(
        grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        ctx->saved_data["enable_gqa"].toBool(), ctx->saved_data["window"].toIntVector(),
        ctx->saved_data["softcap"].toDouble(), s[8].defined() ? std::optional<at::Tensor>(s[8]) : std::nullopt,
        ctx->saved_data["max_q"].toOptional<int64_t>(), ctx->saved_data["max_k"].toOptional<int64_t>());
    return {g[0],         g[1],         g[2],         at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, std::optional<int64_t> max_q, std::optional<int64_t> max_k,
                            double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
                            at::IntArrayRef window, double softcap, const std::optional<at::Tensor>& alibi) {
  check_strided(q, "query");
  check_strided(k, "key");
  check_strided(v, "value");
  check_strided(cu_q, "cu_seqlens_q");
  check_strided(cu_k, "cu_seqlens_k");
  check_constant_slopes(alibi, "attention_varlen");
  TORCH_CHECK_NOT_IMPLEMENTED(
      !has_tangent({&q, &k, &v}),
      "attention_ext.attention_varlen has no forward-mode AD (dual tensors, torch.func.jvp / jacfwd); "
      "attention_ext.attention with a boolean mask has");
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(functorch_active() && needs_graph({&q, &k, &v})),
      "attention_ext.attention_varlen cannot be differentiated under torch.func transforms (grad, vjp, "
      "jacrev, ...); use torch.autograd, or attention_ext.attention with a boolean mask");
  if (!needs_graph({&q, &k, &v}))
    return std::get<0>(call_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale,
                                           enable_gqa, window, softcap, alibi));
  return AttentionVarlenFunction::apply(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa,
                                        window, softcap, alibi);
}

// attention_kvcache under autograd: it has no gradient (inference), so inputs that would need one raise
// instead of giving outputs that silently do not require grad; otherwise the backend kernel runs, and the caches
// it wrote get their version bumped (as an in-place ATen op's would).
std::tuple<at::Tensor, at::Tensor> attention_kvcache_autograd(const KvCall& c, const AttnOptions& opt) {
  auto opt_ptr = [](const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; };
  TORCH_CHECK_VALUE(!needs_graph({&c.q, &c.key_cache, &c.value_cache, opt_ptr(c.key), opt_ptr(c.value),
                                  opt_ptr(opt.alibi_slopes), opt_ptr(c.rotary_cos), opt_ptr(c.rotary_sin)}),
                    "attention_kvcache has no gradient (it serves inference: decoding against a cache); call it "
                    "under torch.no_grad() or torch.inference_mode(), or on tensors that do not require grad");
  std::tuple<at::Tensor, at::Tensor> r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = call_kvcache(c, opt);
  }
  if (c.appends() && !c.key_cache.is_inference()) {  // the caches were written
    c.key_cache.unsafeGetTensorImpl()->bump_version();
    c.value_cache.unsafeGetTensorImpl()->bump_version();
  }
  return r;
}

}  // namespace

TORCH_LIBRARY(attention_ext, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
      "bool is_causal=False, float? scale=None, bool enable_gqa=False, int[2] window_size=[-1, -1], "
      "float softcap=0.0, Tensor? alibi_slopes=None) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int? max_seqlen_q=None, int? max_seqlen_k=None, float dropout_p=0.0, bool is_causal=False, "
      "float? scale=None, bool enable_gqa=False, int[2] window_size=[-1, -1], float softcap=0.0, "
      "Tensor? alibi_slopes=None) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def(schema::kForward, {at::Tag::nondeterministic_seeded});
  m.def(schema::kVarlenForward, {at::Tag::nondeterministic_seeded});
  m.def(schema::kVarlenBackward);
  m.def(schema::kForwardWeights, {at::Tag::nondeterministic_seeded});
  m.def(schema::kMath);
  m.def(schema::kMathLse);
  m.def(schema::kBackward);
  m.def(schema::kProbs);
  m.def(schema::kDropoutMask);
  m.def(schema::kKvcache);
  m.def(schema::kSm90GemmSelftest);
}

TORCH_LIBRARY_IMPL(attention_ext, CompositeImplicitAutograd, m) {
  m.impl("attention", TORCH_FN(attention));
  m.impl("attention_varlen", TORCH_FN(attention_varlen));
  m.impl("_attention_math", TORCH_FN(attention_math));
  m.impl("_attention_math_lse", TORCH_FN(attention_math_lse));
}

// The internal ops are not differentiable by themselves (attention is the
// differentiable entry point): their outputs never require grad.
TORCH_LIBRARY_IMPL(attention_ext, Autograd, m) {
  m.impl("attention_kvcache", TORCH_FN(kvcache_kernel<attention_kvcache_autograd>));
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

// Attention in plain ATen operations (scores, softmax and the product with V
// materialised): the path for what the fused kernels have no formula for.
//   - forward-mode AD (dual tensors, torch.func.jvp / jacfwd),
//   - torch.func transforms that differentiate (grad, vjp, jacrev, hessian,
//     vmap over grad), which C++ autograd functions cannot take part in,
//   - double backward (differentiating the fused backward's gradients).
// Every ATen op used here is differentiable to any order and has forward-mode
// and batching rules, so these work through it. The semantics are the fused
// ops' own (fully masked rows give 0, the dropout mask of `rng_state`), so a
// gradient recomputed here matches the fused kernels' results.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace attention_ext {

// (output, weights): with need_weights, weights are the probabilities after dropout (..., Hq, L, S), or
// their mean over the query heads (..., L, S) with average_heads, in the query's dtype (else an empty
// tensor). rng_state: the forward's, needed when dropout_p > 0.
std::tuple<at::Tensor, at::Tensor> attention_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& mask, double dropout_p,
                                                  bool is_causal, std::optional<double> scale, bool enable_gqa,
                                                  at::IntArrayRef window, const std::optional<at::Tensor>& rng,
                                                  bool need_weights, bool average_heads);

// The log-sum-exp of the masked, scaled scores (..., Hq, L) in float32 (float64 for float64 inputs), -inf
// for rows that see no key: what the fused forward saves for its backward.
at::Tensor attention_math_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, bool is_causal, std::optional<double> scale,
                              bool enable_gqa, at::IntArrayRef window);

}  // namespace attention_ext

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

#include "glue.h"

namespace attention_ext {

// (L, S) bool: the keys is_causal and the window leave to each query row (query i at position i + q_offset among
// the keys); undefined when they leave all. Symbolic lengths stay symbolic (exporters with dynamic shapes trace
// this).
at::Tensor band_visibility(const c10::SymInt& len_q, const c10::SymInt& len_k, const AttnOptions& opt,
                           const at::Device& device, int64_t q_offset = 0);

// (output, weights): with need_weights, weights are the probabilities after dropout (..., Hq, L, S), or
// their mean over the query heads (..., L, S) with average_heads, in the query's dtype (else an empty
// tensor). rng_state: the forward's, needed when dropout_p > 0.
std::tuple<at::Tensor, at::Tensor> attention_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& mask, double dropout_p,
                                                  bool is_causal, std::optional<double> scale, bool enable_gqa,
                                                  at::IntArrayRef window, const std::optional<at::Tensor>& rng,
                                                  bool need_weights, bool average_heads, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes);

// The log-sum-exp of the masked, scaled scores (..., Hq, L) in float32 (float64 for float64 inputs), -inf
// for rows that see no key: what the fused forward saves for its backward.
at::Tensor attention_math_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, bool is_causal, std::optional<double> scale,
                              bool enable_gqa, at::IntArrayRef window, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes);

// The first-order gradients of attention_math in ATen operations (the L x S weights materialised, D taken
// exactly as rowsum(P * dP)): (dq, dk, dv, dmask) in the inputs' dtypes, dmask at the mask's shape when
// mask_grad and the mask is floating, else an empty tensor (as the fused backward returns it). grad_lse (when
// defined): the cotangent of the log-sum-exp as well.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_math_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng, const AttnOptions& opt,
    bool mask_grad, const at::Tensor& grad_lse = {});

// Calls the fused kernels have no instantiation for, which a backend's ops run here, in ATen operations, after
// validating them and drawing the dropout state as for any other call:
//   - a head dim of 0, which F.scaled_dot_product_attention accepts (every backend): E = 0 makes every score 0
//     (the weights are the softmax of the mask and the band alone, the output their average of V), Ev = 0
//     gives an empty output;
//   - float64 on CUDA, which SDPA's math backend takes on the GPU (gradcheck there): the CPU has float64
//     kernels, the CUDA ops (and the emulator's, which share their glue) take it here.
inline bool zero_head_dim(const FwdParams& p) { return p.dim_qk == 0 || p.dim_v == 0; }
// Why the CUDA ops take a call here (the kernel log says it), or nullptr when their kernels take it (every
// other call: forward, backward and weights alike).
inline const char* cuda_composite_reason(const FwdParams& p) {
  if (zero_head_dim(p)) return "head dim 0";
  if (p.dtype == DType::kFloat64) return "float64";
  return nullptr;
}
// Fills st.out and st.lse; returns the weights (need_weights: per head, or their mean with average_heads;
// else an empty tensor). rng: the forward's state (read when dropout_p > 0).
at::Tensor composite_forward(ForwardSetup& st, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, const AttnOptions& opt, const at::Tensor& rng,
                             bool need_weights, bool average_heads);
// attention_probs / the weights, into st.probs (the value plays no part in them).
void composite_probs(ProbsSetup& st, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                     const AttnOptions& opt, const at::Tensor& rng, bool average_heads);
// The backward (grad_logsumexp from st.dlse): fills st.dq, st.dk, st.dv and returns the four gradients as
// finish_backward does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_backward(
    BackwardSetup& st, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& rng, const AttnOptions& opt, bool mask_grad);

}  // namespace attention_ext

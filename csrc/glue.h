// ATen glue shared by every backend: argument validation (SymInt-safe, so the
// Meta kernels raise exactly the same errors under torch.compile), output
// allocation, and filling the torch-free params structs.
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>

#include <optional>

#include "attention_params.h"

namespace attention_ext {

// Everything the ops accept beyond the tensors.
struct AttnOptions {
  double dropout_p = 0.0;
  bool is_causal = false;
  std::optional<double> scale;
  bool enable_gqa = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;  // logit soft-capping, 0: off (FwdParams::softcap)
  // ALiBi slopes (float32, broadcastable to (..., heads_q)), or none (FwdParams::alibi_slopes)
  std::optional<at::Tensor> alibi_slopes;
  bool has_alibi() const { return alibi_slopes.has_value() && alibi_slopes->defined(); }
};

// opt without its ALiBi slopes (the varlen glue checks and sets those itself).
inline AttnOptions without_alibi(AttnOptions opt) {
  opt.alibi_slopes.reset();
  return opt;
}

AttnOptions make_options(double dropout_p, bool is_causal, std::optional<double> scale,
                         bool enable_gqa, at::IntArrayRef window_size, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes);

// Raises ValueError/TypeError/RuntimeError naming the offending argument.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, const AttnOptions& opt);
// ALiBi slopes' dtype (float32) and device (the query's); their shape is the caller's to check.
void check_alibi_slopes(const at::Tensor& a, const at::Tensor& q);
// Checks a tensor that must have exactly `like`'s shape (grad_output, output, ...).
void check_same_shape(const at::Tensor& t, const char* name, c10::SymIntArrayRef expected,
                      const at::Tensor& q);

// The forward's log-sum-exp: shape (..., Hq, L), dtype of empty_lse(q).
void check_lse(const at::Tensor& lse, const at::Tensor& q);

// rng_state returned by the forward: int64[2] (checked only when dropout_p > 0).
void check_rng_state(const at::Tensor& rng, double dropout_p);
// output and grad_output of a backward: shape `out_shape` and the query's dtype.
void check_output_and_grad(const at::Tensor& grad_out, const at::Tensor& out, c10::SymIntArrayRef out_shape,
                           const at::Tensor& q);
// grad_logsumexp (optional): the cotangent of the forward's log-sum-exp, of its shape and dtype.
void check_grad_lse(const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse, const at::Tensor& q);
// Everything _attention_backward takes besides check_inputs' arguments.
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                           const at::Tensor& rng, const at::Tensor& q, const at::Tensor& v, double dropout_p,
                           const std::optional<at::Tensor>& grad_lse);
// _dropout_mask's arguments.
void check_dropout_mask_args(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                             double dropout_p);

// (..., Hq, L, Ev) output laid out in q's memory order (so a (B, L, H, E) view
// seen through transpose(1, 2) gives an output of the same kind).
at::Tensor empty_output(const at::Tensor& q, const c10::SymInt& dim_v);
// (..., Hq, L) log-sum-exp: float32 (float64 for float64 inputs).
at::Tensor empty_lse(const at::Tensor& q);
// (..., Hq, L, S) attention weights, contiguous, q's dtype; (..., L, S) with average_heads.
at::Tensor empty_weights(const at::Tensor& q, const at::Tensor& k, bool average_heads = false);

// With ATTENTION_EXT_POISON=1 in the environment (the test suite sets it),
// fills a freshly allocated output with NaN before a kernel writes it, so an
// element a kernel forgets to write cannot pass a test by luck.
void poison(const at::Tensor& t);

// With ATTENTION_EXT_LOG_KERNEL=1 in the environment (read at every call),
// each op prints one line on stderr naming the backend and the kernel that
// runs ("attention_ext: cuda forward: ..."): which instantiation, tile path
// or fallback a call takes is then visible without a profiler.
bool log_kernels();
void log_kernel(const std::string& line);

// (B, H, L, E) view of a (..., H, L, E) tensor whose last dim is unit-stride.
at::Tensor as_4d(const at::Tensor& t);
// attn_mask broadcast (zero strides) to (B, Hq, L, S).
at::Tensor mask_4d(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k);

// An index tensor (offsets, lengths, a block table) on the query's device or on the CPU, else an error naming it.
void check_index_device(const at::Tensor& t, const char* name, const at::Tensor& q);
// Its values as int64 on the host (a copy, and so a device sync, when it lives on a GPU).
std::vector<int64_t> host_int64(const at::Tensor& t);

DType to_dtype(at::ScalarType t);
Strides4 strides_of(const at::Tensor& t4);

// Fills everything but the RNG fields and the ALiBi slopes; q4/k4/v4/o4/mask4 must stay alive.
FwdParams make_fwd_params(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4,
                          const at::Tensor& o4, const at::Tensor& lse,
                          const std::optional<at::Tensor>& mask4, const AttnOptions& opt);

// The ALiBi slopes of opt as a (B, Hq) view of q's flattened batch (stride 0 where they broadcast), set in p;
// returns the tensor p points into (undefined without ALiBi), which must stay alive.
at::Tensor set_alibi(FwdParams& p, const AttnOptions& opt, const at::Tensor& q);

// attn_mask (if any) as mask_4d, else nullopt.
std::optional<at::Tensor> mask4_of(const std::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k);

// Everything a backend's backward needs besides its kernels and RNG: validated
// inputs, gradient tensors (allocated like q/k/v, poisoned), their 4-D views,
// the params struct, and the full-size mask-gradient buffer when one is wanted.
struct BackwardSetup {
  at::Tensor dq, dk, dv;
  at::Tensor q4, k4, v4, o4, g4, dq4, dk4, dv4, lse;
  at::Tensor dlse;  // grad_logsumexp, contiguous (undefined without one)
  std::optional<at::Tensor> m4;
  at::Tensor alibi;  // set_alibi's
  at::Tensor dmask_full;
  BwdParams p;
};
BackwardSetup prepare_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& rng, const AttnOptions& opt, bool mask_grad,
                               const std::optional<at::Tensor>& grad_lse);
// Copies views back where they were not aliases and reduces the mask gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    BackwardSetup& s, const std::optional<at::Tensor>& mask, const at::Tensor& q);

// The forward's shared part: validated inputs, (poisoned) output and
// log-sum-exp, 4-D views and params (RNG left to the backend). After the
// kernel, finish_forward copies the output back if its 4-D view was a copy.
struct ForwardSetup {
  at::Tensor out, lse, q4, k4, v4, o4;
  std::optional<at::Tensor> m4;
  at::Tensor alibi;  // set_alibi's
  FwdParams p;
};
ForwardSetup prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, const AttnOptions& opt);
void finish_forward(ForwardSetup& s);

// attention_probs' shared part: validated inputs, the (poisoned) output
// (..., Hq, L, S) contiguous, views and params (RNG left to the backend).
struct ProbsSetup {
  at::Tensor probs, q4, k4, lse;
  std::optional<at::Tensor> m4;
  at::Tensor alibi;  // set_alibi's
  FwdParams p;
};
// probs: (..., heads, L, S), or with average_heads (..., L, S) for the mean over the heads (empty_weights).
ProbsSetup prepare_probs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                         const at::Tensor& lse, const at::Tensor& rng, const AttnOptions& opt,
                         bool average_heads = false);

// _attention_forward_weights as a backend's forward followed by its attention weights (recomputed with the
// forward's dropout mask; weights(..., average_heads) gives their mean over the heads, in float32, when
// asked); the CUDA backends use it, the CPU fuses all three.
template <typename Fwd, typename Weights>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_then_probs(
    Fwd&& fwd, Weights&& weights, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal, std::optional<double> scale,
    bool enable_gqa, at::IntArrayRef window, bool average_heads, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  auto [out, lse, rng] = fwd(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  at::Tensor w = weights(q, k, mask, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, average_heads, softcap,
                         alibi_slopes);
  return {out, lse, rng, w};
}

// Reduces the float (B, Hq, L, S) mask gradient to the mask's own shape and dtype.
at::Tensor reduce_mask_grad(const at::Tensor& dmask_full, const at::Tensor& mask,
                            const at::Tensor& q);

}  // namespace attention_ext

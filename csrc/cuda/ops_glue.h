// The dense ops of the CUDA kernels (_attention_forward, _attention_backward, the attention weights) as both
// glues run them: attention_cuda.cpp on the GPU and emu/attention_emu.cpp on the CPU emulator. Written once,
// so that everything between the op's arguments and the launches (validation, outputs, the dropout state, the
// calls taken in ATen operations -- head dims of 0 and float64 --, empty calls, the deterministic flag, the
// weights' statistics) is what the emulated tests run, and only the device policy differs.
//
// Dev, the device policy, provides
//   kForward, kBackward             "cuda forward" / "emu backward" ...: the kernel log's names
//   guard(q)                        an RAII guard of q's device (or nothing)
//   env(q)                          the LaunchEnv: stream, multiprocessor count, compute capability, TF32
//   draw_rng(q, dropout_p, env)     the forward's int64[2] rng_state, where the kernels read it
//   rng_for_kernels(rng, q)         a given rng_state (checked) where the kernels read it
//   fwd(p) / bwd(p)                 the sm80 registry entries (or the error naming the build switch)
//   launch(what, tensors, fn)       runs one launcher (a cudaError_t) and raises on its error; tensors
//                                   (LaunchTensors): those the launch reads or writes (the emulator registers
//                                   them for its bounds checks and its racecheck of global memory)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <optional>
#include <string>
#include <tuple>

#include "../composite.h"
#include "../glue.h"
#include "launch.h"
#include "workspace.h"

namespace attention_ext {
namespace cuda {

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const Dev& dev, const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                          double dropout_p, bool is_causal, std::optional<double> scale,
                                                          bool enable_gqa, at::IntArrayRef window,
                                                          double softcap,
                                                          const std::optional<at::Tensor>& alibi_slopes) {
  [[maybe_unused]] auto guard = dev.guard(q);
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  ForwardSetup st = prepare_forward(q, k, v, mask, opt);
  FwdParams& p = st.p;
  const LaunchEnv env = dev.env(q);
  at::Tensor rng = dev.draw_rng(q, dropout_p, env);
  if (dropout_p > 0.0) p.seed_offset_ptr = rng.template data_ptr<int64_t>();  // the kernels read it on the device
  if (const char* why = cuda_composite_reason(p)) {
    if (log_kernels()) log_kernel(std::string(Dev::kForward) + ": " + why + ", in ATen operations");
    composite_forward(st, q, k, v, mask, opt, rng, false, false);
  } else if (p.len_q > 0 && p.batch * p.heads_q > 0) {
    const at::Tensor* m = st.m4 ? &*st.m4 : nullptr;
    const std::string ran =
        run_forward(p, env, q.options(), dev.fwd(p), Dev::kForward, [&](auto&& fn, const LaunchTensors& extra = {}) {
          dev.launch("forward", LaunchTensors{&st.q4, &st.k4, &st.v4, m, &st.o4, &st.lse} + extra, fn);
        });
    if (log_kernels()) log_kernel(ran);
  }
  finish_forward(st);
  return {st.out, st.lse, rng};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const Dev& dev, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  [[maybe_unused]] auto guard = dev.guard(q);
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  BackwardSetup st = prepare_backward(grad_out, q, k, v, mask, out, lse, rng, opt, mask_grad, grad_lse);
  BwdParams& p = st.p;
  if (const char* why = cuda_composite_reason(p)) {
    if (log_kernels()) log_kernel(std::string(Dev::kBackward) + ": " + why + ", in ATen operations");
    return composite_backward(st, grad_out, q, k, v, mask, rng, opt, mask_grad);
  }
  at::Tensor rng_k;
  if (dropout_p > 0.0) {
    rng_k = dev.rng_for_kernels(rng, q);
    p.seed_offset_ptr = rng_k.template data_ptr<int64_t>();
  }
  p.deterministic = at::globalContext().deterministicAlgorithms();
  if (p.len_q == 0 || p.len_k == 0 || p.batch * p.heads_q == 0) {
    // nothing to attend to: every gradient is zero
    st.dq4.zero_();
    st.dk4.zero_();
    st.dv4.zero_();
  } else {
    const LaunchEnv env = dev.env(q);
    const at::Tensor* m = st.m4 ? &*st.m4 : nullptr;
    const std::string ran = run_backward(
        p, env, q.options(), dev.fwd(p), dev.bwd(p), Dev::kBackward,
        [&](const char* what, const BwdWorkspace& ws, auto&& fn, const LaunchTensors& extra = {}) {
          dev.launch(what,
                     LaunchTensors{&st.q4, &st.k4, &st.v4, &st.o4, &st.g4, &st.lse, &st.dlse, m, &ws.stats,
                                   &ws.dq_accum, &st.dq4, &st.dk4, &st.dv4, &st.dmask_full} + extra,
                     fn);
        });
    if (log_kernels()) log_kernel(ran);
  }
  return finish_backward(st, mask, q);
}

// The attention weights, or with average_heads their mean over the heads (never the per-head ones in memory).
template <class Dev>
at::Tensor weights_op(const Dev& dev, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                      const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                      std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, bool average_heads,
                      double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  [[maybe_unused]] auto guard = dev.guard(q);
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  ProbsSetup st = prepare_probs(q, k, mask, lse, rng, opt, average_heads);
  FwdParams& p = st.p;
  if (cuda_composite_reason(p) != nullptr) {
    composite_probs(st, q, k, mask, opt, rng, average_heads);
    return st.probs;
  }
  at::Tensor rng_k;
  if (dropout_p > 0.0) {
    rng_k = dev.rng_for_kernels(rng, q);
    p.seed_offset_ptr = rng_k.template data_ptr<int64_t>();
  }
  if (st.probs.numel() > 0) {
    const LaunchEnv env = dev.env(q);
    at::Tensor stats = at::empty({2, p.batch * p.heads_q * p.len_q}, q.options().dtype(at::kFloat));
    const at::Tensor* m = st.m4 ? &*st.m4 : nullptr;
    dev.launch("attention_probs", {&st.q4, &st.k4, &st.lse, m, &stats, &st.probs},
               [&] { return launch_probs(p, stats.data_ptr<float>(), st.probs.data_ptr(), env, average_heads); });
  }
  return st.probs;
}

}  // namespace cuda
}  // namespace attention_ext

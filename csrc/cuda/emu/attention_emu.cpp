// Test-only library attention_ext_emu: the CUDA kernels of csrc/cuda/,
// compiled as host C++ against emu/simt.h, run on CPU tensors.
//
// Its ops have the schemas of the internal ops of attention_ext
// (_attention_forward, _attention_forward_weights, _attention_backward,
// attention_probs, _dropout_mask)
// and share their validation and params filling (glue.h), so a test can run
// the CUDA kernels' code on a machine without a GPU and compare it with the
// float64 reference. Like attention_cuda.cpp, this glue is thin: it differs in
// where seeds come from (torch's CPU generator), in registering the tensors'
// byte ranges for the emulator's bounds checks, and in turning emulator faults
// into Python exceptions.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "../../glue.h"
#include "../../varlen.h"
#include "../../schemas.h"
#include "../launch.h"
#include "../ops_glue.h"
#include "../workspace.h"
#include "simt.h"

namespace attention_ext {
namespace cuda {
namespace {

// The emulated device: as many "SMs" as an H100 (sizes the grids of the
// deterministic backward and of the aux kernels as on the GPU).
constexpr int kEmuSms = 132;

const FwdEntry* find_fwd_or_fail(const FwdParams& p) {
  const FwdEntry* e = find_fwd(p.dtype, static_cast<int>(std::max(p.dim_qk, p.dim_v)));
  TORCH_CHECK(e != nullptr, "attention_ext_emu: no forward kernel for this dtype / head dim in this build");
  return e;
}

// An integer from the environment variable `name` in [lo, hi], or `fallback`
// when it is unset or empty; anything else is an error that names it.
int env_int(const char* name, int fallback, int lo, int hi, const char* what) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return fallback;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  TORCH_CHECK(end != e && *end == 0 && v >= lo && v <= hi, name, " must be ", what, ", got '", e, "'");
  return static_cast<int>(v);
}

// ATTENTION_EXT_EMU_CAPTURE=1: attention_kvcache and attention_varlen run as the CUDA glue runs them under
// CUDA-graph capture, their lengths, indices and offsets not read back, so that values out of range reach the
// kernels (which must stay inside the tensors), and the varlen backward refuses them.
bool emu_capturing() { return env_int("ATTENTION_EXT_EMU_CAPTURE", 0, 0, 1, "0 or 1") == 1; }

LaunchEnv make_env(const at::Tensor& q) {
  LaunchEnv env;
  // ATTENTION_EXT_EMU_SMS: the emulated multiprocessor count (persistent grids,
  // the deterministic backward's chunking), default 132 as on an H100
  env.num_sms = env_int("ATTENTION_EXT_EMU_SMS", kEmuSms, 1, 1 << 16, "a multiprocessor count in 1..65536");
  // the emulated device's compute capability: 80 unless ATTENTION_EXT_EMU_ARCH says
  // otherwise (90 runs the Hopper kernels where they cover the call)
  env.arch = env_int("ATTENTION_EXT_EMU_ARCH", 80, 80, 120, "a compute capability such as 80 or 90 (80..120)");
  env.allow_tf32 = q.scalar_type() == at::kFloat &&
                   (at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST ||
                    at::globalContext().allowTF32CuBLAS());
  return env;
}

// Registers the storage of a launch's tensors: the global memory its copies may read (bounds checks) and its
// racecheck of global memory covers.
struct Regions {
  explicit Regions(const LaunchTensors& ts) {
    simt::clear_global_regions();
    for (const at::Tensor* t : ts) {
      if (t->numel() == 0) continue;
      const auto& st = t->storage();
      simt::add_global_region(st.data(), st.nbytes());
    }
  }
  ~Regions() { simt::clear_global_regions(); }
};

// Runs a launcher; emulator faults and launch errors become Python exceptions.
template <typename Fn>
void run(const char* what, Fn&& fn) {
  cudaError_t err;
  try {
    err = fn();
  } catch (const simt::Error& e) {
    TORCH_CHECK(false, "attention_ext_emu: ", what, ": ", e.what());
  }
  TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: ", what, ": launch failed with cudaError ",
              static_cast<int>(err));
}

at::Tensor rng_state(const at::Tensor& rng) {
  TORCH_CHECK_VALUE(rng.defined() && rng.numel() == 2 && rng.scalar_type() == at::kLong,
                    "rng_state must be the int64 tensor of 2 elements returned by the forward");
  return rng.contiguous();
}

// The forward's rng_state, from torch's CPU generator (zeros without dropout).
at::Tensor draw_rng_state(double dropout_p) {
  at::Tensor rng = at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  if (dropout_p <= 0.0) return rng;
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  rng[0] = static_cast<int64_t>(gen->random64());
  rng[1] = static_cast<int64_t>(gen->random64() % 1024) * 4;  // a nonzero offset exercises the counter layout
  return rng;
}

// The emulator as ops_glue.h's device policy: CPU tensors, seeds from torch's CPU generator, the tensors' byte
// ranges registered for the emulator's bounds checks around each launch, emulator faults as Python exceptions.
struct EmuDev {
  static constexpr const char* kForward = "emu forward";
  static constexpr const char* kBackward = "emu backward";
  struct NoGuard {};
  NoGuard guard(const at::Tensor&) const { return {}; }
  LaunchEnv env(const at::Tensor& q) const { return make_env(q); }
  at::Tensor draw_rng(const at::Tensor&, double dropout_p, const LaunchEnv&) const { return draw_rng_state(dropout_p); }
  at::Tensor rng_for_kernels(const at::Tensor& rng, const at::Tensor&) const { return rng_state(rng); }
  const FwdEntry& fwd(const FwdParams& p) const { return *find_fwd_or_fail(p); }
  const BwdEntry& bwd(const BwdParams& p) const {
    const BwdEntry* e = find_bwd(p.dtype, static_cast<int>(std::max(p.dim_qk, p.dim_v)));
    TORCH_CHECK(e != nullptr, "attention_ext_emu: no backward kernel for this dtype / head dim in this build");
    return *e;
  }
  template <class Fn>
  void launch(const char* what, const LaunchTensors& tensors, Fn&& fn) const {
    Regions r(tensors);
    run(what, fn);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_emu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                           double dropout_p, bool is_causal,
                                                           std::optional<double> scale, bool enable_gqa,
                                                           at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return forward_op(EmuDev{}, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_emu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return backward_op(EmuDev{}, grad_out, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window,
                     mask_grad, grad_lse, softcap, alibi_slopes);
}

at::Tensor weights_emu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                       const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                       std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, bool average_heads,
                       double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return weights_op(EmuDev{}, q, k, mask, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, average_heads,
                    softcap, alibi_slopes);
}

at::Tensor probs_emu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                     const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                     std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return weights_emu(q, k, mask, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, false, softcap,
                     alibi_slopes);
}

at::Tensor dropout_mask_emu(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                            double dropout_p) {
  check_dropout_mask_args(rng, batch, heads, len_q, len_k, dropout_p);
  at::Tensor r = rng_state(rng);
  at::Tensor m = at::empty({batch, heads, len_q, len_k}, rng.options().dtype(at::kBool));
  if (m.numel() > 0) {
    run("_dropout_mask", [&] {
      return launch_dropout_mask(r.data_ptr<int64_t>(), batch, heads, len_q, len_k, dropout_p, m.data_ptr<bool>(),
                                 nullptr);
    });
  }
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_weights_emu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool average_heads, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return forward_then_probs(forward_emu, weights_emu, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window,
                            average_heads, softcap, alibi_slopes);
}

// Variable-length sequences as the CUDA backend runs them (attention_cuda.cpp), over the emulated kernels: forward
// and backward in one launch over the packed sequences where packed_in_one_launch says so, else sequence by
// sequence.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_emu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return run_varlen_forward(
      forward_emu, [&] { return draw_rng_state(dropout_p); }, find_fwd_or_fail,
      [&](auto&& fn, const LaunchTensors& extra = {}) {
        EmuDev{}.launch("varlen forward", LaunchTensors{&q, &k, &v} + extra, fn);
      },
      make_env(q), "emu varlen forward", q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa,
      window, softcap, alibi_slopes, !emu_capturing());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_emu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& rng, double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
    at::IntArrayRef window, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<int64_t> max_q,
    std::optional<int64_t> max_k) {
  return run_varlen_backward(
      backward_emu, [](const at::Tensor& r) { return r.contiguous(); }, find_fwd_or_fail,
      [](const BwdParams& p) { return &EmuDev{}.bwd(p); },
      [](const char* what, const BackwardSetup& st, const BwdWorkspace& ws, auto&& fn,
         const LaunchTensors& extra = {}) {
        EmuDev{}.launch(what,
                        LaunchTensors{&st.q4, &st.k4, &st.v4, &st.o4, &st.g4, &st.lse, &st.dlse, &ws.stats,
                                      &ws.dq_accum, &st.dq4, &st.dk4, &st.dv4} + extra,
                        fn);
      },
      make_env(q), "emu varlen backward", grad_out, q, k, v, cu_q, cu_k, out, lse, rng, dropout_p, is_causal, scale,
      enable_gqa, window, grad_lse, softcap, alibi_slopes, max_q, max_k, !emu_capturing());
}

// attention_kvcache as the CUDA backend runs it (run_kvcache_forward), on the emulated kernels.
std::tuple<at::Tensor, at::Tensor> kvcache_emu(const KvCall& call, const AttnOptions& opt) {
  return run_kvcache_forward(
      forward_emu, [](auto&& fn, const LaunchTensors& extra = {}) { EmuDev{}.launch("kvcache forward", extra, fn); },
      make_env(call.q), "emu kvcache forward", call, opt, !emu_capturing());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY(attention_ext_emu, m) {
  m.def(schema::kKvcache);
  m.def(schema::kForward);
  m.def(schema::kForwardWeights);
  m.def(schema::kBackward);
  m.def(schema::kVarlenForward);
  m.def(schema::kVarlenBackward);
  m.def(schema::kProbs);
  m.def(schema::kDropoutMask);
}

TORCH_LIBRARY_IMPL(attention_ext_emu, CPU, m) {
  m.impl("_attention_forward", TORCH_FN(cuda::forward_emu));
  m.impl("attention_kvcache", TORCH_FN(kvcache_kernel<cuda::kvcache_emu>));
  m.impl("_attention_forward_weights", TORCH_FN(cuda::forward_weights_emu));
  m.impl("_attention_backward", TORCH_FN(cuda::backward_emu));
  m.impl("_attention_varlen_forward", TORCH_FN(cuda::varlen_forward_emu));
  m.impl("_attention_varlen_backward", TORCH_FN(cuda::varlen_backward_emu));
  m.impl("attention_probs", TORCH_FN(cuda::probs_emu));
  m.impl("_dropout_mask", TORCH_FN(cuda::dropout_mask_emu));
}

}  // namespace attention_ext

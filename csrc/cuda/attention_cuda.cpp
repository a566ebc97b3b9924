// CUDA backend: thin glue from the ops to the torch-free kernels (the CUDA
// twin of csrc/cpu/attention_cpu.cpp). It validates with the shared glue
// (glue.h), guards the device, allocates outputs and workspaces with the
// caching allocator, fills the params, and launches on the current stream.
// No host synchronisation anywhere (CUDA-graph capturable).
//
// (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// forwards to; ATen/cuda/CUDAContext.h is avoided because it needs the
// cuSPARSE / cuBLAS / cuSOLVER headers, which a bare CUDA toolkit may lack.)
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <sstream>

#include "../glue.h"
#include "../varlen.h"
#include "launch.h"
#include "ops_glue.h"
#include "rng_state.h"
#include "sm90_selftest_glue.h"
#include "workspace.h"

namespace attention_ext {
namespace cuda {
namespace {

const char* dtype_switch_name(DType d) {
  switch (d) {
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat32: return "fp32";
    default: return "?";
  }
}

std::string dims_str(const std::vector<int>& dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

// The error raised when the build switches dropped the kernel a call needs.
[[noreturn]] void compiled_out(bool backward, DType dtype, int head_dim) {
  const std::vector<int> dims = compiled_head_dims(backward, dtype);
  if (dims.empty()) {
    TORCH_CHECK(false, "attention_ext: the CUDA ", backward ? "backward" : "forward", " kernels for dtype ",
                dtype_switch_name(dtype), " were compiled out by the build switch ATTENTION_EXT_DTYPES; rebuild with ",
                "ATTENTION_EXT_DTYPES unset or including ", dtype_switch_name(dtype));
  }
  TORCH_CHECK(false, "attention_ext: no CUDA ", backward ? "backward" : "forward", " kernel for head dim ", head_dim,
              " (max of the query and value head dims) and dtype ", dtype_switch_name(dtype),
              ": this build has head dims ", dims_str(dims),
              " (the rest were compiled out by the build switch ATTENTION_EXT_HEAD_DIMS); rebuild with "
              "ATTENTION_EXT_HEAD_DIMS unset or including a head dim >= ",
              head_dim);
}

// Streaming multiprocessors of a device (a host-side attribute query, no sync).
int num_sms(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return std::max(n, 1);
}

int needed_head_dim(const FwdParams& p) { return static_cast<int>(std::max(p.dim_qk, p.dim_v)); }

const FwdEntry* find_fwd_or_fail(const FwdParams& p) {
  const FwdEntry* e = find_fwd(p.dtype, needed_head_dim(p));
  if (e == nullptr) compiled_out(false, p.dtype, needed_head_dim(p));
  return e;
}

LaunchEnv make_env(const at::Tensor& q) {
  LaunchEnv env;
  env.stream = c10::cuda::getCurrentCUDAStream();
  env.num_sms = num_sms(q.get_device());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  env.arch = 10 * major + minor;
  // float32: TF32 tensor cores only when the user allowed them for matmuls
  // (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision).
  env.allow_tf32 = q.scalar_type() == at::kFloat &&
                   (at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST ||
                    at::globalContext().allowTF32CuBLAS());
  return env;
}


// The int64[2] (seed, offset) on the query's device: the kernels read it there.
at::Tensor rng_on_device(const at::Tensor& rng, const at::Tensor& q) {
  TORCH_CHECK_VALUE(rng.defined() && rng.numel() == 2 && rng.scalar_type() == at::kLong,
                    "rng_state must be the int64 tensor of 2 elements returned by the forward, got ",
                    rng.defined() ? rng.sizes() : at::IntArrayRef{}, " of dtype ",
                    rng.defined() ? rng.scalar_type() : at::kLong);
  at::Tensor r = rng.device() == q.device() ? rng : rng.to(q.device());
  return r.contiguous();
}

// The forward's rng_state: with dropout, Philox (seed, offset) from torch's CUDA generator. Under graph capture
// the state holds device pointers that each replay refreshes: the one-thread kernel unpacks it on the device
// into rng_state, which the attention kernel (and the backward) then read. Zeros without dropout.
at::Tensor draw_rng_state(const at::Tensor& q, double dropout_p, const LaunchEnv& env) {
  if (dropout_p <= 0.0) return at::zeros({2}, q.options().dtype(at::kLong));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(q.get_device()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // our counters are {key column / 4, query row, batch * head, offset}: any
    // distinct offset gives an independent stream, 4 is the generator's unit
    state = gen->philox_cuda_state(4);
  }
  at::Tensor rng = at::empty({2}, q.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch_write_rng_state(state, rng.data_ptr<int64_t>(), env.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rng;
}

// The GPU as ops_glue.h's device policy.
struct CudaDev {
  static constexpr const char* kForward = "cuda forward";
  static constexpr const char* kBackward = "cuda backward";
  c10::cuda::CUDAGuard guard(const at::Tensor& q) const { return c10::cuda::CUDAGuard(q.device()); }
  LaunchEnv env(const at::Tensor& q) const { return make_env(q); }
  at::Tensor draw_rng(const at::Tensor& q, double dropout_p, const LaunchEnv& env) const {
    return draw_rng_state(q, dropout_p, env);
  }
  at::Tensor rng_for_kernels(const at::Tensor& rng, const at::Tensor& q) const { return rng_on_device(rng, q); }
  const FwdEntry& fwd(const FwdParams& p) const { return *find_fwd_or_fail(p); }
  const BwdEntry& bwd(const BwdParams& p) const {
    const BwdEntry* e = find_bwd(p.dtype, needed_head_dim(p));
    if (e == nullptr) compiled_out(true, p.dtype, needed_head_dim(p));
    return *e;
  }
  template <class Fn>
  void launch(const char*, const LaunchTensors&, Fn&& fn) const {
    C10_CUDA_CHECK(fn());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return forward_op(CudaDev{}, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool mask_grad, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return backward_op(CudaDev{}, grad_out, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa,
                     window, mask_grad, grad_lse, softcap, alibi_slopes);
}

at::Tensor weights_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                        const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                        std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, bool average_heads,
                        double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return weights_op(CudaDev{}, q, k, mask, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, average_heads,
                    softcap, alibi_slopes);
}

at::Tensor probs_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                      const at::Tensor& lse, const at::Tensor& rng, double dropout_p, bool is_causal,
                      std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return weights_cuda(q, k, mask, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, false, softcap,
                      alibi_slopes);
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                             double dropout_p) {
  check_dropout_mask_args(rng, batch, heads, len_q, len_k, dropout_p);
  c10::cuda::CUDAGuard guard(rng.device());
  at::Tensor r = rng.contiguous();
  at::Tensor m = at::empty({batch, heads, len_q, len_k}, rng.options().dtype(at::kBool));
  if (m.numel() > 0) {
    C10_CUDA_CHECK(launch_dropout_mask(r.data_ptr<int64_t>(), batch, heads, len_q, len_k,
                                       dropout_p, m.data_ptr<bool>(),
                                       c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return m;
}

// The Hopper layout self-test (test-only; see hopper/sm90_gemm_selftest.cuh).
at::Tensor sm90_gemm_selftest_cuda(const at::Tensor& a, const at::Tensor& b, int64_t swizzle, bool a_mn_major,
                                   bool b_mn_major, bool a_in_regs) {
  c10::cuda::CUDAGuard guard(a.device());
  TORCH_CHECK_VALUE(b.device() == a.device(), "_sm90_gemm_selftest: a and b must be on the same device");
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, a.get_device()));
  TORCH_CHECK(major == 9 && minor == 0, "_sm90_gemm_selftest needs an sm_90 GPU, got compute capability ", major, ".",
              minor);
  sm90::GemmSetup s = sm90::prepare_sm90_gemm(a, b, swizzle, a_mn_major, b_mn_major, a_in_regs, b.size(1));
  const cudaError_t err =
      launch_sm90_gemm_selftest(s.p, s.n, s.half, s.smem, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorNotSupported,
              "_sm90_gemm_selftest: this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)");
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_weights_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
    bool average_heads, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return forward_then_probs(forward_cuda, weights_cuda, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window,
                            average_heads, softcap, alibi_slopes);
}

// Variable-length sequences: forward and backward in one launch (each kernel) over the packed sequences, or
// sequence by sequence where workspace.h's packed_in_one_launch says so. Offsets on the GPU are read back once
// (a sync) to check them; offsets on the CPU cost no sync. Under CUDA-graph capture both take offsets on the GPU
// unread (checked on the device), given max_seqlen_q / _k.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  c10::cuda::CUDAGuard guard(q.device());
  const LaunchEnv env = make_env(q);
  // under CUDA-graph capture offsets on the GPU cannot be read back: they are checked on the device instead
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  return run_varlen_forward(
      forward_cuda, [&] { return draw_rng_state(q, dropout_p, env); }, find_fwd_or_fail,
      [](auto&& fn, const LaunchTensors& = {}) { CudaDev{}.launch("varlen forward", {}, fn); }, env,
      "cuda varlen forward", q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window,
      softcap, alibi_slopes, !(capturing && (cu_q.is_cuda() || cu_k.is_cuda())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& rng, double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
    at::IntArrayRef window, const std::optional<at::Tensor>& grad_lse, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<int64_t> max_q,
    std::optional<int64_t> max_k) {
  c10::cuda::CUDAGuard guard(q.device());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  return run_varlen_backward(
      backward_cuda, [&](const at::Tensor& r) { return r.to(q.device()).contiguous(); }, find_fwd_or_fail,
      [](const BwdParams& p) { return &CudaDev{}.bwd(p); },
      [](const char* what, const BackwardSetup&, const BwdWorkspace&, auto&& fn, const LaunchTensors& = {}) {
        CudaDev{}.launch(what, {}, fn);
      },
      make_env(q), "cuda varlen backward", grad_out, q, k, v, cu_q, cu_k, out, lse, rng, dropout_p, is_causal, scale,
      enable_gqa, window, grad_lse, softcap, alibi_slopes, max_q, max_k,
      !(capturing && (cu_q.is_cuda() || cu_k.is_cuda())));
}

// attention_kvcache (workspace.h's run_kvcache_forward): the sm80 kernel on the cache in place, or the visible
// cache gathered into one dense call. The lengths are read back and checked (a sync) except under CUDA-graph
// capture, which cannot take one: there the kernels check them (launch_cache_lengths).
std::tuple<at::Tensor, at::Tensor> kvcache_cuda(const KvCall& call, const AttnOptions& opt) {
  c10::cuda::CUDAGuard guard(call.q.device());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  return run_kvcache_forward(
      forward_cuda, [](auto&& fn, const LaunchTensors& = {}) { CudaDev{}.launch("kvcache forward", {}, fn); },
      make_env(call.q), "cuda kvcache forward", call, opt, !capturing);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(attention_ext, CUDA, m) {
  m.impl("_attention_varlen_forward", TORCH_FN(cuda::varlen_forward_cuda));
  m.impl("_attention_varlen_backward", TORCH_FN(cuda::varlen_backward_cuda));
  m.impl("_attention_forward", TORCH_FN(cuda::forward_cuda));
  m.impl("attention_kvcache", TORCH_FN(kvcache_kernel<cuda::kvcache_cuda>));
  m.impl("_attention_forward_weights", TORCH_FN(cuda::forward_weights_cuda));
  m.impl("_attention_backward", TORCH_FN(cuda::backward_cuda));
  m.impl("attention_probs", TORCH_FN(cuda::probs_cuda));
  m.impl("_dropout_mask", TORCH_FN(cuda::dropout_mask_cuda));
  m.impl("_sm90_gemm_selftest", TORCH_FN(cuda::sm90_gemm_selftest_cuda));
}

}  // namespace attention_ext

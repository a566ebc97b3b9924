// Autocast: under torch.autocast, float32 query/key/value run in the autocast
// dtype (like F.scaled_dot_product_attention, which is on autocast's
// lower-precision list). Float masks keep their dtype (float32 masks are accepted).
// attention_kvcache's caches are written in place and keep their dtype, so its
// float32 query and new keys / values run in the caches' dtype when that is
// float16 or bfloat16 (a float32 cache runs in float32).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "kvcache.h"

namespace attention_ext {
namespace {

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor attention_autocast(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                              std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double, bool, std::optional<double>,
                                         bool, at::IntArrayRef, double, const std::optional<at::Tensor>&)>();
  const auto dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat ? at::autocast::cached_cast(dt, t, device) : t;
  };
  // (the ALiBi slopes stay float32, as the ops take them)
  return op.call(cast(q), cast(k), cast(v), mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                 alibi_slopes);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor attention_varlen_autocast(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_q, const at::Tensor& cu_k, std::optional<int64_t> max_q,
                                     std::optional<int64_t> max_k, double dropout_p, bool is_causal,
                                     std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
                                     double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::attention_varlen", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, double,
                                         bool, std::optional<double>, bool, at::IntArrayRef, double,
                                         const std::optional<at::Tensor>&)>();
  const auto dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat ? at::autocast::cached_cast(dt, t, device) : t;
  };
  return op.call(cast(q), cast(k), cast(v), cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa,
                 window, softcap, alibi_slopes);
}

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor> kvcache_autocast(const KvCall& call, const AttnOptions& opt) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  KvCall c = call;
  const at::ScalarType dt = call.key_cache.scalar_type();
  if (dt == at::kHalf || dt == at::kBFloat16) {
    auto cast = [&](const at::Tensor& t) {
      return t.defined() && t.scalar_type() == at::kFloat ? at::autocast::cached_cast(dt, t, device) : t;
    };
    c.q = cast(c.q);
    if (c.appends()) {
      c.key = cast(*c.key);
      c.value = cast(*c.value);
    }
  }
  // (the slopes and rotary tables stay as given: the op takes them in float32)
  return call_kvcache(c, opt);
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, AutocastCPU, m) {
  m.impl("attention", TORCH_FN((attention_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>)));
  m.impl("attention_varlen",
         TORCH_FN((attention_varlen_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>)));
  m.impl("attention_kvcache",
         TORCH_FN((kvcache_kernel<kvcache_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>>)));
}

TORCH_LIBRARY_IMPL(attention_ext, AutocastCUDA, m) {
  m.impl("attention", TORCH_FN((attention_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>)));
  m.impl("attention_varlen",
         TORCH_FN((attention_varlen_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>)));
  m.impl("attention_kvcache",
         TORCH_FN((kvcache_kernel<kvcache_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>>)));
}

}  // namespace attention_ext

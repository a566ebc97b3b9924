// See rng_state.h. Includes only torch's raw, header-only Philox state and its
// device-side unpack (no ATen tensor headers).
// <tuple> first: torch 2.11's UnpackRaw.cuh uses std::tuple without including it.
#include <tuple>

#include <ATen/cuda/PhiloxUtils.cuh>

#include "rng_state.h"

namespace attention_ext {
namespace cuda {
namespace {

__global__ void write_rng_state_kernel(at::PhiloxCudaState state, int64_t* out) {
  const auto so = at::cuda::philox::unpack(state);
  out[0] = static_cast<int64_t>(std::get<0>(so));
  out[1] = static_cast<int64_t>(std::get<1>(so));
}

}  // namespace

cudaError_t launch_write_rng_state(const at::PhiloxCudaState& state, int64_t* out, cudaStream_t stream) {
  write_rng_state_kernel<<<1, 1, 0, stream>>>(state, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attention_ext

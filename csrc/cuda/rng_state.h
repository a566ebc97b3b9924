// Graph-safe dropout seeding: the (seed, offset) of a forward are produced by
// torch's CUDA generator as an at::PhiloxCudaState (plain values in eager
// mode, device pointers + an intra-graph offset under CUDA-graph capture) and
// unpacked ON THE DEVICE by a one-thread kernel into the forward's rng_state
// output (int64[2]). The attention kernels then read seed/offset from that
// device tensor (FwdParams::seed_offset_ptr), so every replay of a captured
// graph uses the fresh values of that replay, and the backward (and
// attention_probs / _dropout_mask) replays the very same mask.
#pragma once

#include <ATen/cuda/PhiloxCudaState.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace attention_ext {
namespace cuda {

// out[0] = seed, out[1] = offset (int64, device memory), on `stream`.
cudaError_t launch_write_rng_state(const at::PhiloxCudaState& state, int64_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace attention_ext

// Declarations of the CPU kernels (instantiated in flash_cpu_<dtype>.cpp).
#pragma once

#include <string>

#include "../attention_params.h"
#include "runtime.h"
#include "vec_ops.h"

namespace attention_ext::cpu {

// weights: nullptr, or the attention weights, written in the same pass: batch x heads_q x len_q x len_k,
// contiguous, or with average_heads batch x len_q x len_k (their mean over the query heads)
template <typename T>
void flash_fwd(const FwdParams& p, T* weights = nullptr, bool average_heads = false);
template <typename T>
void flash_bwd(const BwdParams& p);
// out: batch x heads_q x len_q x len_k, contiguous
template <typename T>
void flash_probs(const FwdParams& p, T* out);

// Settles what the kernels decide once per process (the bf16 product path's calibration, timed on every
// thread), so that it is not first decided inside a parallel region, on one thread.
void warm_up(DType dtype);

// One line naming the kernel path a call takes, for ATTENTION_EXT_LOG_KERNEL:
// "<what>: flash kernel, <dtype> (<product path>), blocks QxK".
std::string describe_kernel(const char* what, const FwdParams& p, bool backward, bool weights = false);

}  // namespace attention_ext::cpu

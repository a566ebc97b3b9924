// Declarations of the CPU kernels (instantiated in flash_cpu_<dtype>.cpp).
#pragma once

#include <string>

#include "../attention_params.h"
#include "runtime.h"
#include "vec_ops.h"

namespace attention_ext::cpu {

template <typename T>
void flash_fwd(const FwdParams& p);
template <typename T>
void flash_bwd(const BwdParams& p);
// out: batch x heads_q x len_q x len_k, contiguous
template <typename T>
void flash_probs(const FwdParams& p, T* out);

// One line naming the kernel path a call takes, for ATTENTION_EXT_LOG_KERNEL:
// "<what>: flash kernel, <dtype> (<product path>), blocks QxK".
std::string describe_kernel(const char* what, const FwdParams& p, bool backward);

}  // namespace attention_ext::cpu

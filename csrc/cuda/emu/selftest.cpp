// Faults the SIMT emulator must catch, as small kernels run through the same
// launch path as the attention kernels (op attention_ext_emu::_selftest, used
// by tests/test_cuda_emu.py to check that each check fires, with its message,
// and that a correct kernel passes).
#include <torch/library.h>

#include <string>

#include "ptx_emu.h"
#include "simt.h"

namespace attention_ext {
namespace cuda {
namespace {

enum Fault : int {
  kClean,
  kDivergentBarrier,
  kDivergentShuffle,
  kLdmatrixOutside,
  kSharedAddressOutside,
  kCpAsyncMisaligned,
  kCpAsyncOutside
};

__global__ void selftest_kernel(int fault, const float* inside, const float* outside, float* out) {
  AE_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x;
  switch (fault) {
    case kClean: {  // a well-formed use of everything checked below
      cp_async16(smem_u32(smem + 16 * (tid % 4)), inside + 4 * (tid % 4), true);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      uint32_t r[4];
      ldsm_x4(smem_u32(smem + 16 * (tid % 4)), r);
      const float x = __shfl_xor_sync(0xffffffffu, static_cast<float>(r[0] & 1u), 1);
      if (tid == 0) out[0] = x;
      break;
    }
    case kDivergentBarrier:
      if (tid < 16) __syncthreads();
      break;
    case kDivergentShuffle:
      if (tid < 16) out[tid] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      break;
    case kLdmatrixOutside: {
      uint32_t r[4];
      ldsm_x4(smem_u32(smem + 64), r);  // one past the 64 bytes of shared memory
      break;
    }
    case kSharedAddressOutside:
      (void)smem_u32(smem + 80);
      break;
    case kCpAsyncMisaligned:
      cp_async16(smem_u32(smem + 8), inside, true);
      break;
    case kCpAsyncOutside:
      cp_async16(smem_u32(smem), outside, true);
      break;
  }
}

void selftest(std::string kind) {
  static const char* kNames[] = {"clean",           "divergent_barrier",     "divergent_shuffle", "ldmatrix_outside",
                                 "shared_outside", "cp_async_misaligned", "cp_async_outside"};
  int fault = -1;
  for (int i = 0; i < 7; ++i)
    if (kind == kNames[i]) fault = i;
  TORCH_CHECK_VALUE(fault >= 0, "_selftest: unknown fault '", kind, "'");
  alignas(16) static float inside[16], outside[16], out[32];
  simt::clear_global_regions();
  simt::add_global_region(inside, sizeof(inside));
  try {
    const cudaError_t err = launch_kernel(selftest_kernel, 1, 32, 64, 64, nullptr, "selftest_kernel", fault,
                                          static_cast<const float*>(inside), static_cast<const float*>(outside),
                                          static_cast<float*>(out));
    simt::clear_global_regions();
    TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: _selftest: launch failed");
  } catch (const simt::Error& e) {
    simt::clear_global_regions();
    TORCH_CHECK(false, "attention_ext_emu: ", e.what());
  }
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(attention_ext_emu, m) { m.def("_selftest(str kind) -> ()", &cuda::selftest); }

}  // namespace attention_ext

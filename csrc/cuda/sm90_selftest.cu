// The GPU launcher of the Hopper layout self-test GEMM (see
// hopper/sm90_gemm_selftest.cuh and attention_ext::_sm90_gemm_selftest).
#include "hopper/sm90_gemm_selftest.cuh"
#include "launch.h"

namespace attention_ext {
namespace cuda {

cudaError_t launch_sm90_gemm_selftest(const sm90::GemmParams& p, int n, bool half, size_t smem,
                                      cudaStream_t stream) {
#if defined(ATTENTION_EXT_SM90A) || defined(ATTENTION_EXT_SIMT_EMU)
  return sm90::run_sm90_gemm(p, n, half, smem, stream);
#else
  (void)p, (void)n, (void)half, (void)smem, (void)stream;
  return cudaErrorNotSupported;  // built without sm_90a code
#endif
}

}  // namespace cuda
}  // namespace attention_ext

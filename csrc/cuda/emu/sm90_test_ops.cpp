// Test-only ops of attention_ext_emu for the Hopper emulation (sm90_emu.h),
// used by tests/test_cuda_emu_sm90.py:
//
//   _sm90_gemm(a, b, swizzle, a_mn_major, b_mn_major, a_in_regs, n) -> D
//       D (64 x n, fp32) = a (64 x K) @ b (K x n), f16 or bf16, by a kernel
//       written as a GPU kernel against hopper/sm90_ptx.cuh: warpgroup 0's
//       first thread loads the A and B tiles with TMA (tensor maps over the
//       inputs stored K-major or MN-major, with the swizzle asked for: 0, 32,
//       64 or 128 bytes) completing on one mbarrier; warpgroup 1 waits on it
//       and runs wgmma over K in k16 steps (A from shared memory or from
//       registers), one commit group per step, waiting with wait_group 1.
//   _sm90_tma_hazard(x, wait) -> y
//       y = x (R x 64, 16-bit) through shared memory: one TMA load, then every
//       thread copies shared memory out, after waiting on the mbarrier only if
//       `wait` (without the wait the late landing leaves NaN behind).
//   _sm90_proxy_hazard(x, fence) -> y
//       y = x (64 x 32, fp32) through shared memory the other way: every
//       thread stores its part of x (generic proxy), then fence.proxy.async
//       only if `fence`, a CTA barrier, and one thread adds the tile to a
//       zeroed y with a TMA reduce-add (async proxy). Without the fence the
//       async proxy reads the CTA's initial fill (NaN).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../hopper/sm90_gemm_selftest.cuh"
#include "../sm90_selftest_glue.h"

namespace attention_ext {
namespace cuda {
namespace {

using namespace sm90;

// Registers the byte ranges the kernels may read (TMA bounds checks).
struct Regions {
  explicit Regions(std::initializer_list<const at::Tensor*> ts) {
    simt::clear_global_regions();
    for (const at::Tensor* t : ts) simt::add_global_region(t->storage().data(), t->storage().nbytes());
  }
  ~Regions() { simt::clear_global_regions(); }
};

at::Tensor sm90_gemm(const at::Tensor& a, const at::Tensor& b, int64_t swizzle, bool a_mn_major, bool b_mn_major,
                     bool a_in_regs, int64_t n) {
  GemmSetup s = prepare_sm90_gemm(a, b, swizzle, a_mn_major, b_mn_major, a_in_regs, n);
  Regions r({&s.a_st, &s.b_st, &s.a_c});
  cudaError_t err;
  try {
    err = run_sm90_gemm(s.p, s.n, s.half, s.smem, nullptr);
  } catch (const simt::Error& e) {
    TORCH_CHECK(false, "attention_ext_emu: _sm90_gemm: ", e.what());
  }
  TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: _sm90_gemm: launch failed");
  return s.out;
}

// ---------------------------------------------------------------------------

__global__ void tma_hazard_kernel(const TmaDesc* d, int rows, int wait, uint16_t* out) {
  AE_DYNAMIC_SMEM(smem);
  const uint32_t base = smem_u32(smem);
  const int tid = threadIdx.x;
  if (tid == 0) {
    mbar_init(base, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(base, rows * 64 * 2);
    tma_load_4d(base + 1024, d, base, 0, 0, 0, 0);
  }
  __syncthreads();  // orders the issue, not the data
  if (wait) mbar_wait(base, 0);
  for (int i = tid; i < rows * 64; i += blockDim.x) {
    uint16_t v;
    std::memcpy(&v, smem + 1024 + 2 * i, 2);
    out[i] = v;
  }
}

at::Tensor sm90_tma_hazard(const at::Tensor& x, bool wait) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == 64 && x.size(0) >= 1 && x.size(0) <= 256 && x.element_size() == 2,
                    "_sm90_tma_hazard: x is R x 64 with 16-bit elements, R <= 256");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  TmaDesc d;
  make_map(&d, xc, 64, static_cast<uint32_t>(x.size(0)), kSwizzleNone);
  Regions r({&xc});
  const int rows = static_cast<int>(x.size(0));
  cudaError_t err;
  try {
    err = launch_kernel(tma_hazard_kernel, 1, 128, 1024 + rows * 128, 1024 + rows * 128, nullptr, "tma_hazard_kernel",
                        static_cast<const TmaDesc*>(&d), rows, static_cast<int>(wait),
                        static_cast<uint16_t*>(out.data_ptr()));
  } catch (const simt::Error& e) {
    TORCH_CHECK(false, "attention_ext_emu: _sm90_tma_hazard: ", e.what());
  }
  TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: _sm90_tma_hazard: launch failed");
  return out;
}

__global__ void proxy_hazard_kernel(const TmaDesc* d, const float* x, int fence) {
  AE_DYNAMIC_SMEM(smem);
  const uint32_t base = smem_u32(smem);
  for (int i = threadIdx.x; i < 64 * 32; i += blockDim.x) {
    std::memcpy(smem + 4 * i, &x[i], 4);  // row-major, 128-byte rows: the unswizzled box
  }
  if (fence) fence_proxy_async();
  __syncthreads();
  if (threadIdx.x == 0) {
    tma_reduce_add_4d(d, base, 0, 0, 0, 0);
    bulk_commit();
    bulk_wait<0>();
  }
}

at::Tensor sm90_proxy_hazard(const at::Tensor& x, bool fence) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == 64 && x.size(1) == 32 && x.scalar_type() == at::kFloat,
                    "_sm90_proxy_hazard: x is 64 x 32 float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros_like(xc);
  TmaDesc d;
  const uint64_t dims[4] = {32, 64, 1, 1};
  const uint64_t strides[3] = {128, 128 * 64, 128 * 64};
  const uint32_t box[4] = {32, 64, 1, 1};
  const char* bad = make_tma_desc_4d(&d, out.data_ptr(), dims, strides, box, kSwizzleNone, 4);
  TORCH_CHECK(bad == nullptr, "_sm90_proxy_hazard: make_tma_desc_4d: ", bad);
  Regions r({&out});
  cudaError_t err;
  try {
    err = launch_kernel(proxy_hazard_kernel, 1, 128, 64 * 128, 64 * 128, nullptr, "proxy_hazard_kernel",
                        static_cast<const TmaDesc*>(&d), static_cast<const float*>(xc.data_ptr()),
                        static_cast<int>(fence));
  } catch (const simt::Error& e) {
    TORCH_CHECK(false, "attention_ext_emu: _sm90_proxy_hazard: ", e.what());
  }
  TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: _sm90_proxy_hazard: launch failed");
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(attention_ext_emu, m) {
  m.def("_sm90_gemm(Tensor a, Tensor b, int swizzle, bool a_mn_major, bool b_mn_major, bool a_in_regs, int n) -> Tensor",
        &cuda::sm90_gemm);
  m.def("_sm90_tma_hazard(Tensor x, bool wait) -> Tensor", &cuda::sm90_tma_hazard);
  m.def("_sm90_proxy_hazard(Tensor x, bool fence) -> Tensor", &cuda::sm90_proxy_hazard);
}

}  // namespace attention_ext

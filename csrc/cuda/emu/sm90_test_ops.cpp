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
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../hopper/sm90_ptx.cuh"

namespace attention_ext {
namespace cuda {
namespace {

using namespace sm90;

// Elements of one swizzle row (the TMA box's inner extent): 16-byte core
// matrix rows without swizzle.
constexpr int span_elems(int sw) { return sw == kSwizzle128B ? 64 : sw == kSwizzle64B ? 32 : sw == kSwizzle32B ? 16 : 8; }

struct GemmParams {
  TmaDesc ta, tb;
  const uint16_t* a_glob;  // 64 x K row-major (the register fragments of wgmma_rs)
  float* out;              // 64 x N
  int K;
  int sw;  // Swizzle
  int a_mn, b_mn, a_regs;
  uint32_t a_off, b_off;  // tile offsets in shared memory
};

// Bytes of an operand tile with `rows` rows (m or n) and K columns as loaded
// below: K-major: ceil(K / E) chunks of rows x E; MN-major: rows / E chunks of K x E.
__host__ __device__ inline uint32_t tile_bytes(int rows, int K, int sw, bool mn_major) {
  const int e = span_elems(sw);
  return mn_major ? static_cast<uint32_t>(rows / e) * K * e * 2 : static_cast<uint32_t>((K + e - 1) / e) * rows * e * 2;
}

// Issues the TMA loads of one operand tile (see tile_bytes).
__device__ inline void load_tile(const TmaDesc* d, uint32_t dst, uint32_t bar, int rows, int K, int sw, bool mn_major) {
  const int e = span_elems(sw);
  if (mn_major) {
    for (int c = 0; c < rows / e; ++c) tma_load_4d(dst + c * K * e * 2, d, bar, c * e, 0, 0, 0);
  } else {
    for (int c = 0; c < (K + e - 1) / e; ++c) tma_load_4d(dst + c * rows * e * 2, d, bar, c * e, 0, 0, 0);
  }
}

// The descriptor of k16 step s of an operand tile (my reading of PTX ISA
// 9.7.15.5.1.2; see sm90_emu.cpp operand_addr):
//   K-major, swizzle span S bytes (E = S / 2 elements): chunk c = 16s / E
//     (rows x S bytes each), start = tile + c * rows * S + (16s % E) * 2,
//     SBO = 8 * S (the next 8 rows), LBO unused (1).
//   K-major, no swizzle: 8-element chunks (rows x 16 bytes each); the step
//     spans chunks 2s and 2s+1: start = tile + 2s * rows * 16, LBO = rows * 16
//     (the second 8 k), SBO = 128 (the next 8 rows).
//   MN-major, swizzle span S: chunks of E mn (K x S bytes each), start =
//     tile + 16s * S, LBO = K * S (the next E mn), SBO = 8 * S (the next 8 k).
//   MN-major, no swizzle: chunks of 8 mn (K x 16 bytes each), start =
//     tile + 16s * 16, LBO = 128 (the next 8 k), SBO = K * 16 (the next 8 mn).
__device__ inline uint64_t step_desc(uint32_t tile, int s, int rows, int K, int sw, bool mn_major) {
  const int e = span_elems(sw), span = 2 * e;
  if (sw == kSwizzleNone) {
    if (mn_major) return make_smem_desc(tile + 16 * s * 16, 128, K * 16, sw);
    return make_smem_desc(tile + 2 * s * rows * 16, rows * 16, 128, sw);
  }
  if (mn_major) return make_smem_desc(tile + 16 * s * span, K * span, 8 * span, sw);
  return make_smem_desc(tile + (16 * s / e) * rows * span + (16 * s % e) * 2, 16, 8 * span, sw);
}

template <int N, typename T>
__device__ inline void mma_step(float (&d)[N / 2], const GemmParams& p, uint32_t base, int s, const uint32_t (&af)[4],
                                int scale_d) {
  const uint64_t db = step_desc(base + p.b_off, s, N, p.K, p.sw, p.b_mn);
  if (p.a_regs) {
    if (p.b_mn) {
      wgmma_rs<N, T, 1>(d, af, db, scale_d);
    } else {
      wgmma_rs<N, T, 0>(d, af, db, scale_d);
    }
    return;
  }
  const uint64_t da = step_desc(base + p.a_off, s, 64, p.K, p.sw, p.a_mn);
  if (p.a_mn && p.b_mn) {
    wgmma_ss<N, T, 1, 1>(d, da, db, scale_d);
  } else if (p.a_mn) {
    wgmma_ss<N, T, 1, 0>(d, da, db, scale_d);
  } else if (p.b_mn) {
    wgmma_ss<N, T, 0, 1>(d, da, db, scale_d);
  } else {
    wgmma_ss<N, T, 0, 0>(d, da, db, scale_d);
  }
}

template <int N, typename T>
__global__ void __launch_bounds__(256, 1) sm90_gemm_kernel(const GemmParams p) {
  AE_DYNAMIC_SMEM(smem);
  const uint32_t base = smem_u32(smem);
  const uint32_t bar = base;
  const int tid = threadIdx.x;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid < 128) {  // producer warpgroup
    setmaxnreg_dec<40>();
    if (tid == 0) {
      tma_prefetch_desc(&p.tb);
      const uint32_t bytes = (p.a_regs ? 0 : tile_bytes(64, p.K, p.sw, p.a_mn)) + tile_bytes(N, p.K, p.sw, p.b_mn);
      mbar_arrive_expect_tx(bar, bytes);
      if (!p.a_regs) load_tile(&p.ta, base + p.a_off, bar, 64, p.K, p.sw, p.a_mn);
      load_tile(&p.tb, base + p.b_off, bar, N, p.K, p.sw, p.b_mn);
    }
    return;
  }
  setmaxnreg_inc<232>();
  const int t = tid - 128, w = t / 32, g = (t % 32) / 4, q = t % 4;
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = __uint_as_float(0x7fc00000u);  // scale-d = 0 must ignore it
  uint32_t af[2][4] = {};
  mbar_wait(bar, 0);
  for (int s = 0; s < p.K / 16; ++s) {
    if (p.a_regs) {  // the m64nNk16 A fragment (PTX ISA 9.7.15.5.1.1.1): warp w, rows 16w..16w+15
      for (int r = 0; r < 4; ++r) {
        const int m = 16 * w + g + 8 * (r % 2), k = 16 * s + 2 * q + 8 * (r / 2);
        af[s % 2][r] = uint32_t(p.a_glob[m * p.K + k]) | (uint32_t(p.a_glob[m * p.K + k + 1]) << 16);
      }
    }
    wgmma_fence();  // orders the fragment writes above before the mma
    mma_step<N, T>(d, p, base, s, af[s % 2], s > 0);
    wgmma_commit();
    wgmma_wait<1>();  // op s-1 done: af[(s+1) % 2] is free again
  }
  wgmma_wait<0>();
  for (int i = 0; i < N / 2; ++i) {
    reg_fence(d[i]);
    const int row = 16 * w + g + 8 * ((i % 4) / 2), col = 8 * (i / 4) + 2 * q + i % 2;
    p.out[row * N + col] = d[i];
  }
}

// Registers the byte ranges the kernels may read (TMA bounds checks).
struct Regions {
  explicit Regions(std::initializer_list<const at::Tensor*> ts) {
    simt::clear_global_regions();
    for (const at::Tensor* t : ts) simt::add_global_region(t->storage().data(), t->storage().nbytes());
  }
  ~Regions() { simt::clear_global_regions(); }
};

void make_map(TmaDesc* d, const at::Tensor& t, uint32_t box0, uint32_t box1, int sw) {
  // t: 2-d, contiguous; dim 0 of the map = t's last dimension
  const uint64_t dims[4] = {static_cast<uint64_t>(t.size(1)), static_cast<uint64_t>(t.size(0)), 1, 1};
  const uint64_t row = static_cast<uint64_t>(t.size(1)) * 2;
  const uint64_t strides[3] = {row, row * t.size(0), row * t.size(0)};
  const uint32_t box[4] = {box0, box1, 1, 1};
  const char* err = make_tma_desc_4d(d, t.data_ptr(), dims, strides, box, sw);
  TORCH_CHECK(err == nullptr, "_sm90_gemm: make_tma_desc_4d: ", err);
}

template <int N, typename T>
cudaError_t launch_gemm(const GemmParams& p, size_t smem) {
  return launch_kernel(sm90_gemm_kernel<N, T>, 1, 256, smem, smem, nullptr, "sm90_gemm_kernel", p);
}

at::Tensor sm90_gemm(const at::Tensor& a, const at::Tensor& b, int64_t swizzle, bool a_mn_major, bool b_mn_major,
                     bool a_in_regs, int64_t n) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(0) == 64 && b.size(0) == a.size(1) && b.size(1) == n,
                    "_sm90_gemm: a is 64 x K, b is K x n");
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type() &&
                        (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16),
                    "_sm90_gemm: a and b are both float16 or both bfloat16");
  const int K = static_cast<int>(a.size(1));
  TORCH_CHECK_VALUE(K % 16 == 0 && K > 0 && K <= 256, "_sm90_gemm: K is a multiple of 16 in 16..256");
  TORCH_CHECK_VALUE(n == 64 || n == 128 || n == 256, "_sm90_gemm: n is 64, 128 or 256");
  TORCH_CHECK_VALUE(swizzle == 0 || swizzle == 32 || swizzle == 64 || swizzle == 128,
                    "_sm90_gemm: swizzle is 0, 32, 64 or 128 (bytes)");
  TORCH_CHECK_VALUE(!(a_in_regs && a_mn_major), "_sm90_gemm: A from registers has no major-ness");
  const int sw = swizzle == 128 ? kSwizzle128B : swizzle == 64 ? kSwizzle64B : swizzle == 32 ? kSwizzle32B : kSwizzleNone;
  const int e = span_elems(sw);
  const int N = static_cast<int>(n);
  // storage: K-major = rows of k; MN-major = rows of m / n
  const at::Tensor a_st = a_mn_major ? a.t().contiguous() : a.contiguous();
  const at::Tensor b_st = b_mn_major ? b.contiguous() : b.t().contiguous();
  const at::Tensor a_c = a.contiguous();
  GemmParams p{};
  make_map(&p.ta, a_st, e, a_mn_major ? K : 64, sw);
  make_map(&p.tb, b_st, e, b_mn_major ? K : N, sw);
  p.a_glob = static_cast<const uint16_t*>(a_c.data_ptr());
  at::Tensor out = at::empty({64, n}, a.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  p.K = K;
  p.sw = sw;
  p.a_mn = a_mn_major;
  p.b_mn = b_mn_major;
  p.a_regs = a_in_regs;
  auto up = [](uint32_t x) { return (x + 1023u) & ~1023u; };
  p.a_off = 1024;
  p.b_off = p.a_off + up(tile_bytes(64, K, sw, a_mn_major));
  const size_t smem = p.b_off + up(tile_bytes(N, K, sw, b_mn_major));
  Regions r({&a_st, &b_st, &a_c});
  cudaError_t err;
  try {
    const bool half = a.scalar_type() == at::kHalf;
    if (N == 64) {
      err = half ? launch_gemm<64, __half>(p, smem) : launch_gemm<64, __nv_bfloat16>(p, smem);
    } else if (N == 128) {
      err = half ? launch_gemm<128, __half>(p, smem) : launch_gemm<128, __nv_bfloat16>(p, smem);
    } else {
      err = half ? launch_gemm<256, __half>(p, smem) : launch_gemm<256, __nv_bfloat16>(p, smem);
    }
  } catch (const simt::Error& e) {
    TORCH_CHECK(false, "attention_ext_emu: _sm90_gemm: ", e.what());
  }
  TORCH_CHECK(err == cudaSuccess, "attention_ext_emu: _sm90_gemm: launch failed");
  return out;
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

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(attention_ext_emu, m) {
  m.def("_sm90_gemm(Tensor a, Tensor b, int swizzle, bool a_mn_major, bool b_mn_major, bool a_in_regs, int n) -> Tensor",
        &cuda::sm90_gemm);
  m.def("_sm90_tma_hazard(Tensor x, bool wait) -> Tensor", &cuda::sm90_tma_hazard);
}

}  // namespace attention_ext

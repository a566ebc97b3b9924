// ATen side of the Hopper layout self-test (hopper/sm90_gemm_selftest.cuh),
// shared by its two hosts: attention_ext::_sm90_gemm_selftest on the GPU
// (attention_cuda.cpp) and attention_ext_emu::_sm90_gemm on the emulator.
#pragma once

#include <ATen/ATen.h>

#include "hopper/sm90_gemm_params.h"

namespace attention_ext {
namespace cuda {
namespace sm90 {

inline void make_map(TmaDesc* d, const at::Tensor& t, uint32_t box0, uint32_t box1, int sw) {
  // t: 2-d, contiguous; dim 0 of the map = t's last dimension
  const uint64_t dims[4] = {static_cast<uint64_t>(t.size(1)), static_cast<uint64_t>(t.size(0)), 1, 1};
  const uint64_t row = static_cast<uint64_t>(t.size(1)) * 2;
  const uint64_t strides[3] = {row, row * t.size(0), row * t.size(0)};
  const uint32_t box[4] = {box0, box1, 1, 1};
  const char* err = make_tma_desc_4d(d, t.data_ptr(), dims, strides, box, sw);
  TORCH_CHECK(err == nullptr, "_sm90_gemm: make_tma_desc_4d: ", err);
}

// The tensors and params of one self-test GEMM: a_st / b_st the K- or
// MN-major copies the tensor maps read, a_c the row-major A of the register
// fragments, out the 64 x n result.
struct GemmSetup {
  at::Tensor a_st, b_st, a_c, out;
  GemmParams p{};
  size_t smem = 0;
  int n = 0;
  bool half = false;
};

inline GemmSetup prepare_sm90_gemm(const at::Tensor& a, const at::Tensor& b, int64_t swizzle, bool a_mn_major,
                                   bool b_mn_major, bool a_in_regs, int64_t n) {
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
  const int sw = swizzle == 128  ? kSwizzle128B
                 : swizzle == 64 ? kSwizzle64B
                 : swizzle == 32 ? kSwizzle32B
                                 : kSwizzleNone;
  const int e = span_elems(sw);
  const int N = static_cast<int>(n);
  GemmSetup s;
  // storage: K-major = rows of k; MN-major = rows of m / n
  s.a_st = a_mn_major ? a.t().contiguous() : a.contiguous();
  s.b_st = b_mn_major ? b.contiguous() : b.t().contiguous();
  s.a_c = a.contiguous();
  GemmParams& p = s.p;
  make_map(&p.ta, s.a_st, e, a_mn_major ? K : 64, sw);
  make_map(&p.tb, s.b_st, e, b_mn_major ? K : N, sw);
  p.a_glob = static_cast<const uint16_t*>(s.a_c.data_ptr());
  s.out = at::empty({64, n}, a.options().dtype(at::kFloat));
  p.out = s.out.data_ptr<float>();
  p.K = K;
  p.sw = sw;
  p.a_mn = a_mn_major;
  p.b_mn = b_mn_major;
  p.a_regs = a_in_regs;
  auto up = [](uint32_t x) { return (x + 1023u) & ~1023u; };
  p.a_off = 1024;
  p.b_off = p.a_off + up(tile_bytes(64, K, sw, a_mn_major));
  s.smem = p.b_off + up(tile_bytes(N, K, sw, b_mn_major));
  s.n = N;
  s.half = a.scalar_type() == at::kHalf;
  return s;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

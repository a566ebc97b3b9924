// Device building blocks shared by the CUDA forward and backward kernels:
// PTX wrappers (cp.async, ldmatrix, mma.sync), the per-element-type MMA traits,
// the warp-level GEMM over shared-memory tiles, the global->shared tile loader,
// and the masking / dropout helpers that work on mma accumulator fragments.
//
// Torch-free: includes only the CUDA headers and the project's params/RNG.
//
// Notation used throughout (PTX ISA, "Matrix fragments for mma.m16n8k16"):
//   lane = threadIdx.x % 32, g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group").
//   An m16n8 fp32 accumulator tile is 4 floats per thread:
//     c[0], c[1] -> (row g,     cols 2t, 2t+1)
//     c[2], c[3] -> (row g + 8, cols 2t, 2t+1)
//   A warp tile of 16*MT rows x 8*NT cols is float acc[MT][NT][4]; element
//   acc[mt][nt][r] sits at row 16*mt + g + 8*(r/2), col 8*nt + 2*t + r%2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(ATTENTION_EXT_SIMT_EMU)
#include "emu/ptx_emu.h"
#endif

#include "../attention_params.h"
#include "../philox.h"

namespace attention_ext {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Logit soft-capping (FwdParams::softcap) of a warp's accumulator tile of scaled scores, before the mask:
// x = cap tanh(x / cap), with tanh(y) = 1 - 2 / (1 + e^{2y}): one exp2 and one division, an absolute error of
// about 1e-7 in tanh for every y (e^{2y} = inf gives 1, 0 gives -1), so about cap * 1e-7 in the score.
// k2 = 2 log2(e) / cap. (Written so that only cap and k2 stay live: the sm80 forwards' spills are unchanged.)
// softcap_tanh(x, k2) = tanh(x / cap), the one form every CUDA kernel's cap takes.
__device__ __forceinline__ float softcap_tanh(float x, float k2) { return 1.f - 2.f / (1.f + exp2f(x * k2)); }
template <int A, int B>
__device__ __forceinline__ void softcap_acc(float (&s)[A][B][4], float cap, float k2) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[a][b][r] = cap * softcap_tanh(s[a][b][r], k2);
}

// ALiBi (FwdParams::alibi_slopes) on a warp's accumulator tile of scores, after the soft cap and before the mask:
// x -= m |i + S - L - j|. d00 = row0 + len_k - len_q - col0, the distance at the tile's element (0, 0) (the
// fragment layout of mask_tile: row 16 mt + g + 8 hr, column 8 nt + 2 t + c), in 32 bits (in 64, the sm80
// backward spilled 4-8 B more). In float: exact below 2^24 keys.
template <int MT, int NT>
__device__ __forceinline__ void alibi_acc(float (&s)[MT][NT][4], float m, int d00, int lane) {
  const float d0 = static_cast<float>(d00 + (lane >> 2) - 2 * (lane & 3));
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          s[mt][nt][2 * hr + c] -= m * fabsf(d0 + static_cast<float>(16 * mt + 8 * hr - 8 * nt - c));
}

// ---------------------------------------------------------------------------
// PTX wrappers
// (emu/ptx_emu.h replaces them, with the same names, in the CPU emulation of
// the kernels: ATTENTION_EXT_SIMT_EMU, see emu/simt.h)

#if !defined(ATTENTION_EXT_SIMT_EMU)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the 16 bytes
// (no global read happens, src only has to be a valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 4-byte async copy (lse / D rows), zero-fill when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N committed groups of this thread are still in flight.
// (Visibility to the other threads still needs a __syncthreads afterwards.)
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix: four 8x8 tiles of 16-bit elements (each tile row = 16 contiguous
// bytes in shared memory). Lanes 8i..8i+7 give the row addresses of tile i;
// register i receives tile i: without .trans lane holds (row g, elements 2t, 2t+1),
// with .trans lane holds (rows 2t and 2t+1, element g), i.e. the transpose.
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// m16n8k8 TF32. A (16x8): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);
// B (8x8): b0 (k = t, n = g), b1 (k = t+4, n = g); C as above.
__device__ __forceinline__ void mma_tf32_1688(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// The dynamic shared memory of a kernel.
#define AE_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

// kernel<<<grid, block, smem, stream>>>(args...), raising the kernel's cap of
// dynamic shared memory to max_smem first when it is above the default 48 KB
// (the cap is the largest variant's, so that concurrent launches with a
// smaller smem never lower it under each other).
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), unsigned grid, unsigned block, size_t smem, size_t max_smem,
                          cudaStream_t stream, const char* /*name*/, const Args&... args) {
  if (max_smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}
#endif  // !ATTENTION_EXT_SIMT_EMU

// ---------------------------------------------------------------------------
// Element types

template <typename T>
struct ElemOps;

template <>
struct ElemOps<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  // two floats -> one 32-bit register of two elements (lo in the low half)
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, sizeof(r));  // a bit cast (no aliasing through a reinterpret_cast)
    return r;
  }
};
template <>
struct ElemOps<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
};
template <>
struct ElemOps<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

// ---------------------------------------------------------------------------
// MMA traits: one tensor-core instruction shape per element type.
//   kK       k extent of one mma
//   A, B     operand fragments ready for the mma (4 and 2 registers)
//   make_a/b turn raw 32-bit words loaded from shared memory (or packed from
//            registers) into fragments; mma accumulates c += a * b.
// fp32 inputs use TF32 tensor cores, either one pass (plain TF32, only when
// the user allowed TF32) or three passes (kPasses = 3): x = big + small with
// big = tf32(x), small = tf32(x - big), and a*b ~= a.big*b.big + a.big*b.small
// + a.small*b.big, which keeps about fp32 accuracy (the a.small*b.small term
// is below fp32 rounding). See README.md.

template <typename Elem, int kPasses = 1>
struct MmaTraits;

template <typename Elem>
struct MmaTraits16 {
  static constexpr int kK = 16;
  struct A {
    uint32_t r[4];
  };
  struct B {
    uint32_t r[2];
  };
  __device__ __forceinline__ static A make_a(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    return A{{r0, r1, r2, r3}};
  }
  __device__ __forceinline__ static B make_b(uint32_t r0, uint32_t r1) { return B{{r0, r1}}; }
};

template <>
struct MmaTraits<__half, 1> : MmaTraits16<__half> {
  using Elem = __half;
  __device__ __forceinline__ static void mma(float (&c)[4], const A& a, const B& b) { mma_f16_16816(c, a.r, b.r); }
};
template <>
struct MmaTraits<__nv_bfloat16, 1> : MmaTraits16<__nv_bfloat16> {
  using Elem = __nv_bfloat16;
  __device__ __forceinline__ static void mma(float (&c)[4], const A& a, const B& b) { mma_bf16_16816(c, a.r, b.r); }
};

template <int kPasses>
struct MmaTraits<float, kPasses> {
  static_assert(kPasses == 1 || kPasses == 3, "TF32 passes must be 1 or 3");
  using Elem = float;
  static constexpr int kK = 8;
  static constexpr bool kSplit = kPasses == 3;
  struct A {
    uint32_t big[4];
    uint32_t small[kSplit ? 4 : 1];
  };
  struct B {
    uint32_t big[2];
    uint32_t small[kSplit ? 2 : 1];
  };
  // x = big + small, each a TF32 value. A finite x that rounds up to infinity keeps its truncated bits
  // in big instead. (For x = +-inf or NaN, small is NaN; mma never adds it: see there.)
  __device__ __forceinline__ static bool finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }
  __device__ __forceinline__ static void split(uint32_t raw, uint32_t& big, uint32_t& small) {
    const float x = __uint_as_float(raw);
    big = to_tf32(x);
    if constexpr (kSplit) {
      if (!finite_bits(big) && finite_bits(raw)) big = raw & 0xFFFFE000u;
      small = to_tf32(x - __uint_as_float(big));
    }
  }
  __device__ __forceinline__ static A make_a(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    A a;
    uint32_t s[4] = {0u, 0u, 0u, 0u};
    split(r0, a.big[0], s[0]);
    split(r1, a.big[1], s[1]);
    split(r2, a.big[2], s[2]);
    split(r3, a.big[3], s[3]);
    if constexpr (kSplit) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a.small[i] = s[i];
    }
    return a;
  }
  __device__ __forceinline__ static B make_b(uint32_t r0, uint32_t r1) {
    B b;
    uint32_t s[2] = {0u, 0u};
    split(r0, b.big[0], s[0]);
    split(r1, b.big[1], s[1]);
    if constexpr (kSplit) {
      b.small[0] = s[0];
      b.small[1] = s[1];
    }
    return b;
  }
  // 3 passes: c + big big, then the two small terms on top. Where c + big big is not finite, an
  // infinity or NaN is among the big parts (or came before), and the small terms must not be added:
  // an infinite operand's small part is NaN, a finite operand's small part times the other's infinite
  // big part is an infinity of either sign (inf - inf = NaN), and a zero small part times it is NaN,
  // where IEEE arithmetic on the float32 values gives the infinity (tests/test_special_values.py,
  // through the emulator). Where it is finite, every big part it met was finite, so are the small terms.
  __device__ __forceinline__ static void mma(float (&c)[4], const A& a, const B& b) {
    mma_tf32_1688(c, a.big, b.big);
    if constexpr (kSplit) {
      float t[4] = {c[0], c[1], c[2], c[3]};
      mma_tf32_1688(t, a.small, b.big);
      mma_tf32_1688(t, a.big, b.small);
#pragma unroll
      for (int i = 0; i < 4; ++i) c[i] = finite_bits(__float_as_uint(c[i])) ? t[i] : c[i];
    }
  }
};

// ---------------------------------------------------------------------------
// Operand fragments from shared memory.
//
// A warp's A operand is a 16*MT x K tile; its element (m, k) is at
//   base[m * ld + k]  when A_KMAJOR (rows of m, k contiguous), else base[k * ld + m].
// The B operand (K x N, "col" layout in mma terms) element (k, n) is at
//   base[n * ld + k]  when B_KMAJOR, else base[k * ld + n].
// Every shared tile row is a multiple of 16 bytes and 16-byte aligned (ldmatrix).
//
// 16-bit types use ldmatrix(.trans) for every layout. fp32 uses ldmatrix for
// the k-contiguous layouts (an 8x8 b16 tile = 8 rows x 4 floats, so lane gets
// the float (row g, col t): exactly the TF32 A/B fragment element) and scalar
// shared loads for the others (ldmatrix cannot transpose 32-bit elements).

template <class M, bool KMAJOR>
__device__ __forceinline__ typename M::A load_a(const typename M::Elem* base, int ld, int m0, int k0, int lane) {
  using Elem = typename M::Elem;
  const int i = lane >> 3, r = lane & 7;
  if constexpr (sizeof(Elem) == 2) {
    uint32_t x[4];
    if constexpr (KMAJOR) {
      // tile i: rows m0 + 8*(i&1) .. +7, cols k0 + 8*(i>>1) .. +7  ->  a[i] in mma order
      ldsm_x4(smem_u32(base + (m0 + r + 8 * (i & 1)) * ld + k0 + 8 * (i >> 1)), x);
    } else {
      // stored [k][m]: tile i = stored rows k0 + 8*(i>>1) .., cols m0 + 8*(i&1) .., transposed
      ldsm_x4_trans(smem_u32(base + (k0 + r + 8 * (i >> 1)) * ld + m0 + 8 * (i & 1)), x);
    }
    return M::make_a(x[0], x[1], x[2], x[3]);
  } else {
    const int g = lane >> 2, t = lane & 3;
    if constexpr (KMAJOR) {
      // tile i: rows m0 + 8*(i&1) .., floats k0 + 4*(i>>1) .. +3  ->  a0 (g,t), a1 (g+8,t), a2 (g,t+4), a3 (g+8,t+4)
      uint32_t x[4];
      ldsm_x4(smem_u32(base + (m0 + r + 8 * (i & 1)) * ld + k0 + 4 * (i >> 1)), x);
      return M::make_a(x[0], x[1], x[2], x[3]);
    } else {
      const float* p0 = base + (k0 + t) * ld + m0 + g;
      const float* p1 = p0 + 4 * ld;
      return M::make_a(__float_as_uint(p0[0]), __float_as_uint(p0[8]), __float_as_uint(p1[0]),
                       __float_as_uint(p1[8]));
    }
  }
}

// Two adjacent n-tiles (n0 .. n0+7 -> b0, n0+8 .. n0+15 -> b1) of the B operand.
template <class M, bool KMAJOR>
__device__ __forceinline__ void load_b2(typename M::B& b0, typename M::B& b1, const typename M::Elem* base, int ld,
                                        int n0, int k0, int lane) {
  using Elem = typename M::Elem;
  const int i = lane >> 3, r = lane & 7;
  if constexpr (sizeof(Elem) == 2) {
    uint32_t x[4];
    if constexpr (KMAJOR) {
      // stored [n][k]: tile i = rows n0 + 8*(i>>1) .., cols k0 + 8*(i&1) ..
      ldsm_x4(smem_u32(base + (n0 + r + 8 * (i >> 1)) * ld + k0 + 8 * (i & 1)), x);
    } else {
      // stored [k][n]: tile i = rows k0 + 8*(i&1) .., cols n0 + 8*(i>>1) .., transposed
      ldsm_x4_trans(smem_u32(base + (k0 + r + 8 * (i & 1)) * ld + n0 + 8 * (i >> 1)), x);
    }
    b0 = M::make_b(x[0], x[1]);
    b1 = M::make_b(x[2], x[3]);
  } else {
    const int g = lane >> 2, t = lane & 3;
    if constexpr (KMAJOR) {
      // tile i: rows n0 + 8*(i>>1) .., floats k0 + 4*(i&1) ..  ->  b0 (k=t, n=g), b1 (k=t+4, n=g)
      uint32_t x[4];
      ldsm_x4(smem_u32(base + (n0 + r + 8 * (i >> 1)) * ld + k0 + 4 * (i & 1)), x);
      b0 = M::make_b(x[0], x[1]);
      b1 = M::make_b(x[2], x[3]);
    } else {
      const float* p0 = base + (k0 + t) * ld + n0 + g;
      const float* p1 = p0 + 4 * ld;
      b0 = M::make_b(__float_as_uint(p0[0]), __float_as_uint(p1[0]));
      b1 = M::make_b(__float_as_uint(p0[8]), __float_as_uint(p1[8]));
    }
  }
}

// acc[MT][NT] += A (16*MT x KDIM) * B (KDIM x 8*NT), both operands in shared memory.
template <class M, int MT, int NT, int KDIM, bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void gemm_ss(float (&acc)[MT][NT][4], const typename M::Elem* sA, int lda,
                                        const typename M::Elem* sB, int ldb, int lane) {
  static_assert(NT % 2 == 0, "B fragments are loaded two n-tiles at a time");
  static_assert(KDIM % M::kK == 0, "k extent must be a multiple of the mma k");
#pragma unroll
  for (int k0 = 0; k0 < KDIM; k0 += M::kK) {
    typename M::A a[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a[mt] = load_a<M, A_KMAJOR>(sA, lda, 16 * mt, k0, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      typename M::B b0, b1;
      load_b2<M, B_KMAJOR>(b0, b1, sB, ldb, 16 * np, k0, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        M::mma(acc[mt][2 * np], a[mt], b0);
        M::mma(acc[mt][2 * np + 1], a[mt], b1);
      }
    }
  }
}

// acc_o[MT][NTO] += P (16*MT x 8*NTP, fp32 accumulators of a previous mma, in
// registers) * V (8*NTP x 8*NTO, stored [k][n] in shared memory: row = key).
// The C layout of two adjacent n-tiles of P is the A layout of one k16 step
// (16-bit types). For TF32 the k8 step kk takes P's n-tile kk as
//   a0 = c0 (g, key 2t), a1 = c2 (g+8, key 2t), a2 = c1 (g, key 2t+1), a3 = c3 (g+8, key 2t+1),
// i.e. k position t <-> key 2t and t+4 <-> key 2t+1; B is loaded with the same
// permutation of k (rows 2t and 2t+1 of V), so the product is unchanged.
template <class M, int MT, int NTP, int NTO>
__device__ __forceinline__ void gemm_rs(float (&acc_o)[MT][NTO][4], const float (&p)[MT][NTP][4],
                                        const typename M::Elem* sV, int ldv, int lane) {
  using Elem = typename M::Elem;
  static_assert(NTO % 2 == 0, "two n-tiles at a time");
  if constexpr (sizeof(Elem) == 2) {
    static_assert(NTP % 2 == 0, "k16 steps");
#pragma unroll
    for (int kk = 0; kk < NTP / 2; ++kk) {
      typename M::A a[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt] = M::make_a(ElemOps<Elem>::pack2(p[mt][2 * kk][0], p[mt][2 * kk][1]),
                          ElemOps<Elem>::pack2(p[mt][2 * kk][2], p[mt][2 * kk][3]),
                          ElemOps<Elem>::pack2(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]),
                          ElemOps<Elem>::pack2(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]));
      }
#pragma unroll
      for (int np = 0; np < NTO / 2; ++np) {
        typename M::B b0, b1;
        load_b2<M, false>(b0, b1, sV, ldv, 16 * np, 16 * kk, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::mma(acc_o[mt][2 * np], a[mt], b0);
          M::mma(acc_o[mt][2 * np + 1], a[mt], b1);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < NTP; ++kk) {
      typename M::A a[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt] = M::make_a(__float_as_uint(p[mt][kk][0]), __float_as_uint(p[mt][kk][2]),
                          __float_as_uint(p[mt][kk][1]), __float_as_uint(p[mt][kk][3]));
      }
      const float* v0 = sV + (8 * kk + 2 * t) * ldv + g;  // key 2t (k position t)
      const float* v1 = v0 + ldv;                          // key 2t+1 (k position t+4)
#pragma unroll
      for (int np = 0; np < NTO / 2; ++np) {
        const typename M::B b0 = M::make_b(__float_as_uint(v0[16 * np]), __float_as_uint(v1[16 * np]));
        const typename M::B b1 = M::make_b(__float_as_uint(v0[16 * np + 8]), __float_as_uint(v1[16 * np + 8]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::mma(acc_o[mt][2 * np], a[mt], b0);
          M::mma(acc_o[mt][2 * np + 1], a[mt], b1);
        }
      }
    }
  }
}

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
}

// ---------------------------------------------------------------------------
// Global -> shared tiles

// True when a (rows x ncols) tile starting at p with the given row stride can
// be copied in 16-byte chunks (every chunk 16-byte aligned and either fully
// inside a row or fully past its end).
template <typename Elem>
__device__ __forceinline__ bool vec16_ok(const Elem* p, int64_t row_stride, int64_t rows, int64_t ncols) {
  constexpr int kEpc = 16 / sizeof(Elem);
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (rows <= 1 || row_stride % kEpc == 0) && (ncols % kEpc == 0);
}

// Copies a ROWS x COLS tile (COLS = the padded head dim) into shared memory
// with row stride LD: element (r, c) = row(r)[c] for r < nrows and c < ncols,
// 0 elsewhere (zero padding of short tiles and of head dims below the
// instantiation's). row(r) is called for r < nrows only (a paged cache looks
// each row's page up); g0 is any valid address, the source of the copies that
// write zeros. vec: cp.async 16-byte chunks (asynchronous: commit and wait),
// else element-wise loads stored synchronously (misaligned inputs). kUnroll =
// false issues the chunks from a loop (a costly row(r): registers).
template <typename Elem, int ROWS, int COLS, int LD, int NTHREADS, bool kUnroll = true, class RowFn>
__device__ __forceinline__ void load_tile_rows(Elem* s, const Elem* g0, RowFn&& row, int nrows, int ncols, bool vec,
                                               int tid) {
  constexpr int kEpc = 16 / sizeof(Elem);
  static_assert(COLS % kEpc == 0, "tile width must be a multiple of 16 bytes");
  constexpr int kCpr = COLS / kEpc;
  constexpr int kTotal = ROWS * kCpr;
  constexpr int kIters = (kTotal + NTHREADS - 1) / NTHREADS;
  if (vec) {
#pragma unroll(kUnroll ? kIters : 1)
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * NTHREADS;
      if (kTotal % NTHREADS == 0 || c < kTotal) {
        const int r = c / kCpr, col = (c % kCpr) * kEpc;
        const bool ok = r < nrows && col < ncols;
        const Elem* src = ok ? row(r) + col : g0;
        cp_async16(smem_u32(s + r * LD + col), src, ok);
      }
    }
  } else {
    // Rare path (misaligned views, odd head dims): not unrolled, so that the
    // compiler does not keep dozens of independent loads in flight (registers).
#pragma unroll 1
    for (int c = tid; c < kTotal; c += NTHREADS) {
      const int r = c / kCpr, col = (c % kCpr) * kEpc;
      union {
        uint4 u;
        Elem e[kEpc];
      } tmp;
      const Elem* src = r < nrows ? row(r) : g0;
#pragma unroll
      for (int e = 0; e < kEpc; ++e) {
        const bool ok = r < nrows && col + e < ncols;
        tmp.e[e] = ok ? src[col + e] : ElemOps<Elem>::from_float(0.f);
      }
      *reinterpret_cast<uint4*>(s + r * LD + col) = tmp.u;
    }
  }
}

// load_tile_rows of rows g + r * row_stride.
template <typename Elem, int ROWS, int COLS, int LD, int NTHREADS>
__device__ __forceinline__ void load_tile(Elem* s, const Elem* g, int64_t row_stride, int nrows, int ncols, bool vec,
                                          int tid) {
  load_tile_rows<Elem, ROWS, COLS, LD, NTHREADS>(
      s, g, [=](int r) { return g + static_cast<int64_t>(r) * row_stride; }, nrows, ncols, vec, tid);
}

// ---------------------------------------------------------------------------
// Masks

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename MaskT>
__device__ __forceinline__ float mask_value(const void* m, int64_t off) {
  if constexpr (sizeof(MaskT) == 1) {  // bool: True = attend
    return static_cast<const uint8_t*>(m)[off] ? 0.f : -kInf;
  } else {
    return ElemOps<MaskT>::to_float(static_cast<const MaskT*>(m)[off]);
  }
}

// Unsigned integer of the mask element's size (raw copies of mask bits).
template <int kBytes>
struct RawOf;
template <>
struct RawOf<1> {
  using type = uint8_t;
};
template <>
struct RawOf<2> {
  using type = uint16_t;
};
template <>
struct RawOf<4> {
  using type = uint32_t;
};

// Bytes per shared row of a staged mask tile of kCols columns: room for fp32
// elements plus 32 bytes, so that rows start 8 banks apart and the 2-element
// reads of a fragment (rows g, cols 2t..2t+1) are conflict-free.
template <int kCols>
constexpr int mask_ld_bytes() {
  return 4 * kCols + 32;
}

// Stages the raw bits of the explicit mask for the tile rows [row0, row0 +
// kRows) x cols [col0, col0 + kCols) into shared memory (row stride
// mask_ld_bytes<kCols>()). Entries outside [0, len_q) x [0, len_k) are zero
// (they are masked by the bounds anyway). Column-contiguous masks whose rows
// are 16-byte aligned are copied with cp.async (commit and wait like the other
// tiles); other layouts (broadcast or strided columns, odd row lengths) are
// read element by element and stored synchronously. Coalesced either way,
// unlike reading the mask straight into the accumulator fragments.
template <typename MaskT, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_mask_tile(unsigned char* sM, const FwdParams& p, int64_t b, int64_t h,
                                               int64_t row0, int64_t col0, int tid) {
  using Raw = typename RawOf<sizeof(MaskT)>::type;
  constexpr int kEsz = sizeof(MaskT), kEpc = 16 / kEsz, kCpr = kCols / kEpc, kLdB = mask_ld_bytes<kCols>();
  static_assert(kCols % kEpc == 0, "mask tile rows are whole 16-byte chunks");
  const Strides4& ms = p.mask_stride;
  const Raw* base = static_cast<const Raw*>(p.mask) + b * ms.b + h * ms.h;
  const int nrows = static_cast<int>(p.len_q - row0 < kRows ? p.len_q - row0 : kRows);
  const int ncols = static_cast<int>(p.len_k - col0 < kCols ? p.len_k - col0 : kCols);
  const bool vec = ms.c == 1 && reinterpret_cast<uintptr_t>(base) % 16 == 0 && (ms.r * kEsz) % 16 == 0 &&
                   (col0 * kEsz) % 16 == 0;
  if (vec) {
    // Not unrolled: cp.async does not block, so unrolling buys nothing but registers.
#pragma unroll 1
    for (int c = tid; c < kRows * kCpr; c += kThreads) {
      {
        const int r = c / kCpr, col = (c % kCpr) * kEpc;
        unsigned char* dst = sM + r * kLdB + col * kEsz;
        const Raw* src = base + (row0 + r) * ms.r + col0 + col;
        if (r < nrows && col + kEpc <= ncols) {
          cp_async16(smem_u32(dst), src, true);
        } else if (r >= nrows || col >= ncols) {
          cp_async16(smem_u32(dst), base, false);  // zero fill
        } else {  // the chunk straddles len_k
          Raw* d = reinterpret_cast<Raw*>(dst);
          for (int e = 0; e < kEpc; ++e) d[e] = col + e < ncols ? src[e] : Raw(0);
        }
      }
    }
  } else {
#pragma unroll 4
    for (int idx = tid; idx < kRows * kCols; idx += kThreads) {
      const int r = idx / kCols, c = idx % kCols;
      const Raw x = (r < nrows && c < ncols) ? base[(row0 + r) * ms.r + (col0 + c) * ms.c] : Raw(0);
      reinterpret_cast<Raw*>(sM + r * kLdB)[c] = x;
    }
  }
}

// Applies the window/causal bounds, the row/column limits and (MaskT not
// void) the staged explicit mask to a warp tile of scaled scores
// (x = q.k * scale): x += mask, x = -inf where the key is not visible.
// Natural units on purpose: a finite mask of finfo.min must stay finite
// (finfo.min * log2(e) would overflow to -inf and wrongly hide the key).
// row0 / col0: global query row / key column of the warp tile's element (0, 0);
// sMw: the staged mask at that element, rows kLdB bytes apart.
// Rows >= len_q are fully masked (they only exist as padding of the last tile).
// The bounds are kept relative to col0 in 32-bit registers (clamped to the tile).
template <typename MaskT, int kLdB, int MT, int NT>
__device__ __forceinline__ void mask_tile(float (&s)[MT][NT][4], const FwdParams& p, int64_t row0, int64_t col0,
                                          const unsigned char* sMw, int lane) {
  const int g = lane >> 2, t = lane & 3;
  constexpr int kW = 8 * NT;  // tile width
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int rl = 16 * mt + g + 8 * hr;
      const int64_t i = row0 + rl;
      int64_t lo = 0, hi = 0;
      if (i < p.len_q) key_range(p, i, lo, hi);
      // visible columns of this row inside the tile: [lo_r, hi_r)
      const int lo_r = static_cast<int>(lo - col0 < 0 ? 0 : (lo - col0 > kW ? kW : lo - col0));
      const int hi_r = static_cast<int>(hi - col0 < 0 ? 0 : (hi - col0 > kW ? kW : hi - col0));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int jr = 8 * nt + 2 * t + c;
          float& x = s[mt][nt][2 * hr + c];
          if (jr < lo_r || jr >= hi_r) {
            x = -kInf;
          } else if constexpr (!std::is_same<MaskT, void>::value) {
            x += mask_value<MaskT>(sMw + rl * kLdB, jr);
          }
        }
      }
    }
  }
}

// sizeof(MaskT), 0 for void (no mask).
template <typename MaskT>
constexpr int mask_esize() {
  if constexpr (std::is_void<MaskT>::value) {
    return 0;
  } else {
    return static_cast<int>(sizeof(MaskT));
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<MaskT>{}) with MaskT the element type of the explicit mask
// (void when there is none): one uniform switch per tile, the per-element
// code inside fn is then specialised for the mask type.
template <typename Fn>
__device__ __forceinline__ void dispatch_mask(const FwdParams& p, Fn&& fn) {
  if (p.mask_kind == MaskKind::kNone) {
    fn(TypeTag<void>{});
  } else {
    switch (p.mask_dtype) {
      case DType::kBool: fn(TypeTag<uint8_t>{}); break;
      case DType::kFloat16: fn(TypeTag<__half>{}); break;
      case DType::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
      default: fn(TypeTag<float>{}); break;
    }
  }
}

// Stages the explicit mask tile, if there is one (see load_mask_tile).
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void stage_mask(unsigned char* sM, const FwdParams& p, int64_t b, int64_t h, int64_t row0,
                                           int64_t col0, int tid) {
  if (p.mask_kind == MaskKind::kNone) return;
  switch (p.mask_dtype) {
    case DType::kBool: load_mask_tile<uint8_t, kRows, kCols, kThreads>(sM, p, b, h, row0, col0, tid); break;
    case DType::kFloat16:
    case DType::kBFloat16: load_mask_tile<__half, kRows, kCols, kThreads>(sM, p, b, h, row0, col0, tid); break;
    default: load_mask_tile<float, kRows, kCols, kThreads>(sM, p, b, h, row0, col0, tid); break;
  }
}

// ---------------------------------------------------------------------------
// Masks: the tiles they hide from every row are never computed
//
// A boolean mask that is false (an additive one that is -inf) over a whole
// (query block, key block) tile makes every P of the tile 0: the tile changes
// no output, statistic or gradient (an additive mask's gradient there is 0,
// which the zero-filled gradient buffer already holds), so the kernels narrow
// their loops to the tiles that hold an element letting its key be seen (key
// padding, a causal or block-diagonal mask passed as a tensor). Only at the two
// ends of a loop, not holes in its middle.
//
// The two narrowing functions run once per loop, before it, and are out of
// line with plain arguments and their results in shared memory: inlined, their
// registers made the forward and backward spill more in the loops (ptxas,
// sm_80: the D = 128 forward from 8 to 54 bytes of spill stores).
// The backward's (narrow_query_blocks) scans the mask in chunks of 1, 2, 4,
// then 8 query blocks from each end, 16 bytes per thread at a time where the
// layout allows, with min / max reductions: a long masked run (the rows above
// the diagonal of a causal mask passed as a tensor) costs a few barriers, not
// one per block. The forward's (narrow_key_tiles) scans a key-padding row in
// one such pass, but other masks one tile per barrier: the chunked version,
// called from the forward, raised the D = 128 forward's spill stores from 10 to
// 148 bytes (ptxas; where they land cannot be seen without a disassembler), so
// it waits for a GPU to tell whether the barriers or the spills cost more.

// The mask as the narrowing reads it: an element hides its key when its bits are `hidden` (a boolean
// mask's false, an additive mask's -inf; anything else, NaN included, may be seen). esize bytes per
// element (1, 2 or 4: bool, fp16 / bf16, fp32), strides in elements.
struct MaskRef {
  const unsigned char* ptr = nullptr;
  Strides4 st;
  int64_t len_q = 0, len_k = 0;
  int esize = 1;
  uint32_t hidden = 0, hidden4 = 0;  // one hidden element; 4 bytes of them
};
__device__ __forceinline__ MaskRef mask_ref(const FwdParams& p) {
  MaskRef m;
  m.ptr = static_cast<const unsigned char*>(p.mask);
  m.st = p.mask_stride;
  m.len_q = p.len_q;
  m.len_k = p.len_k;
  if (p.mask_kind == MaskKind::kAdditive) {
    if (p.mask_dtype == DType::kFloat32) {
      m.esize = 4;
      m.hidden = m.hidden4 = 0xFF800000u;
    } else {
      m.esize = 2;
      m.hidden = p.mask_dtype == DType::kBFloat16 ? 0xFF80u : 0xFC00u;
      m.hidden4 = m.hidden | (m.hidden << 16);
    }
  }
  return m;
}
// Element e (in elements from ptr) of the mask: does it let its key be seen?
__device__ __forceinline__ bool mask_sees(const MaskRef& m, const unsigned char* ptr, int64_t e) {
  const unsigned char* x = ptr + e * m.esize;
  if (m.esize == 1) return *x != 0;
  if (m.esize == 2) return *reinterpret_cast<const uint16_t*>(x) != m.hidden;
  return *reinterpret_cast<const uint32_t*>(x) != m.hidden;
}
// Whether 16 bytes of mask elements let any key be seen.
__device__ __forceinline__ bool chunk_sees(const MaskRef& m, const uint4& x) {
  return x.x != m.hidden4 || x.y != m.hidden4 || x.z != m.hidden4 || x.w != m.hidden4;
}

// Block-wide min of lo and max of hi, first step: a warp-shuffle reduction, then each warp's pair into red
// (2 * kThreads / 32 ints of shared memory) and a barrier; fold_min_max then folds the warps' pairs in.
template <int kThreads>
__device__ __forceinline__ void min_max_to_smem(int& lo, int& hi, int* red, int tid) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int a = __shfl_xor_sync(0xffffffffu, lo, o), c = __shfl_xor_sync(0xffffffffu, hi, o);
    lo = a < lo ? a : lo;
    hi = c > hi ? c : hi;
  }
  constexpr int kWarps = kThreads / 32;
  if ((tid & 31) == 0) {
    red[tid >> 5] = lo;
    red[kWarps + (tid >> 5)] = hi;
  }
  __syncthreads();
}
template <int kThreads>
__device__ __forceinline__ void fold_min_max(int& lo, int& hi, const int* red) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    lo = red[w] < lo ? red[w] : lo;
    hi = red[kWarps + w] > hi ? red[kWarps + w] : hi;
  }
}

// Over the rows [r0, r1) x keys [js, je) of one (batch, head) of the mask
// (`base`: its element (0, 0); a mask that broadcasts over the rows is read as
// one row), the smallest and largest unit holding a true element, a unit being
// kUnit rows (kByRows) or kUnit keys; lo > hi when none. Every thread of the
// CTA calls it and gets the same answer; red: 2 * kThreads / 32 ints of shared
// memory, free again on return.
template <int kUnit, bool kByRows, int kThreads>
__device__ __forceinline__ void scan_mask(const MaskRef& m, const unsigned char* base, const Strides4& ms, int64_t r0,
                                          int64_t r1, int64_t js, int64_t je, int* red, int tid, int& lo, int& hi) {
  if (ms.r == 0) r1 = r0 + 1;
  lo = 0x7fffffff;
  hi = -1;
  auto hit = [&](int64_t r, int64_t j) {
    const int u = static_cast<int>((kByRows ? r : j) / kUnit);
    lo = u < lo ? u : lo;
    hi = u > hi ? u : hi;
  };
  const int64_t nrows = r1 - r0, w = je - js, per = 16 / m.esize;  // elements per 16-byte chunk
  if (ms.c == 1 && reinterpret_cast<uintptr_t>(base + (r0 * ms.r + js) * m.esize) % 16 == 0 &&
      (nrows == 1 || (ms.r * m.esize) % 16 == 0)) {
    const int64_t cpr = (w + per - 1) / per;  // 16-byte chunks per row, the last one maybe partial
#pragma unroll 1
    for (int64_t c = tid; c < nrows * cpr; c += kThreads) {
      const int64_t r = r0 + c / cpr, j = js + (c % cpr) * per;
      const unsigned char* row = base + r * ms.r * m.esize;
      bool any = false;
      if (j + per <= je) {
        any = chunk_sees(m, *reinterpret_cast<const uint4*>(row + j * m.esize));
      } else {
        for (int64_t e = j; e < je; ++e) any = any || mask_sees(m, row, e);
      }
      if (any) hit(r, j);  // a 16-byte chunk lies in one key unit (kUnit is a multiple of 16)
    }
  } else {
#pragma unroll 1
    for (int64_t idx = tid; idx < nrows * w; idx += kThreads) {
      const int64_t r = r0 + idx / w, j = js + idx % w;
      if (mask_sees(m, base, r * ms.r + j * ms.c)) hit(r, j);
    }
  }
  min_max_to_smem<kThreads>(lo, hi, red, tid);
  fold_min_max<kThreads>(lo, hi, red);
  __syncthreads();  // every thread has read red
}

// The units [u_begin, u_end) narrowed to those between the first and the last
// for which any(u0, u1, lo, hi) (a scan of units [u0, u1)) finds a true
// element: chunks of 1, 2, 4, then 8 units from the end, then from the front
// (unless the end's scan already reached it). Empty: u_begin == u_end.
template <class Scan>
__device__ __forceinline__ void narrow_units(int64_t& u_begin, int64_t& u_end, Scan&& scan) {
  int lo = 0, hi = -1;
  int64_t chunk = 1, e = u_end;
  bool found = false, front_done = false;
  while (e > u_begin) {
    const int64_t s0 = e - chunk > u_begin ? e - chunk : u_begin;
    scan(s0, e, lo, hi);
    if (hi >= 0) {
      found = true;
      u_end = static_cast<int64_t>(hi) + 1;
      if (s0 == u_begin) {
        u_begin = lo;
        front_done = true;
      }
      break;
    }
    e = s0;
    chunk = chunk < 8 ? 2 * chunk : 8;
  }
  if (!found) {
    u_end = u_begin;
    return;
  }
  chunk = 1;
  // finds at the latest the unit found above; bounded all the same (a mask
  // written while the kernel reads it must not hang the loop)
  for (int64_t s0 = u_begin; !front_done && s0 < u_end;) {
    const int64_t e1 = s0 + chunk < u_end ? s0 + chunk : u_end;
    scan(s0, e1, lo, hi);
    if (hi >= 0) {
      u_begin = lo;
      front_done = true;
    }
    s0 = e1;
    chunk = chunk < 8 ? 2 * chunk : 8;
  }
}

// Whether the mask of (b, h) has a true element in rows [i0, i0 + nrows) x keys
// [j0, j0 + ncols) (one row when it broadcasts over the rows). Called by every
// thread of the CTA (a barrier); the same answer for all.
template <int kThreads>
__device__ __forceinline__ bool mask_tile_any(const MaskRef& m, int64_t b, int64_t h, int64_t i0, int nrows,
                                              int64_t j0, int ncols, int tid) {
  const Strides4& ms = m.st;
  const unsigned char* base = m.ptr + (b * ms.b + h * ms.h + i0 * ms.r) * m.esize;
  if (ms.r == 0) nrows = 1;
  const int per = 16 / m.esize;  // elements per 16-byte chunk
  const bool vec = ms.c == 1 && reinterpret_cast<uintptr_t>(base + j0 * m.esize) % 16 == 0 &&
                   (nrows == 1 || (ms.r * m.esize) % 16 == 0);
  bool any = false;
  if (vec) {
    const int cpr = (ncols + per - 1) / per;  // 16-byte chunks per row, the last one maybe partial
#pragma unroll 1
    for (int c = tid; c < nrows * cpr && !any; c += kThreads) {
      const int r = c / cpr, col = (c % cpr) * per;
      const unsigned char* row = base + r * ms.r * m.esize;
      if (col + per <= ncols) {
        any = chunk_sees(m, *reinterpret_cast<const uint4*>(row + (j0 + col) * m.esize));
      } else {
        for (int e = col; e < ncols; ++e) any = any || mask_sees(m, row, j0 + e);
      }
    }
  } else {
#pragma unroll 1
    for (int idx = tid; idx < nrows * ncols && !any; idx += kThreads) {
      any = mask_sees(m, base, (idx / ncols) * ms.r + (j0 + idx % ncols) * ms.c);
    }
  }
  return __syncthreads_or(any) != 0;
}

// The key tiles [n_begin, n_end) (kBlockN keys each) of the query rows [i0, i0 +
// nq) of (b, h), narrowed to those holding a true element: out[0], out[1]
// (shared memory; n_begin == n_end when none does). A mask row shared by every
// query row (key padding) is scanned once, all threads at once, with min / max
// reductions through `red` (2 * kThreads / 32 ints of shared memory); other
// masks tile by tile from both ends (one barrier per tile). Every thread of the
// CTA calls it; out and red are written before its last barrier, and red is
// free again on return.
template <int kBlockN, int kThreads>
__device__ __noinline__ void narrow_key_tiles(const MaskRef m, int64_t b, int64_t h, int64_t i0, int nq,
                                              int64_t n_begin, int64_t n_end, int64_t* out, int* red, int tid) {
  const int64_t S = m.len_k;
  const Strides4& ms = m.st;
  // The one-row scan below is a narrower form of scan_mask's (it shares only the reduction,
  // min_max_to_smem / fold_min_max): calling scan_mask from here (rather than from the backward's
  // narrow_query_blocks) raised the forward's spill stores from 10 to 148 bytes (ptxas, sm_80, D = 64 and
  // 128), as the chunked narrowing did.
  if ((ms.r == 0 || nq == 1) && n_end - n_begin > 2 && n_end < (int64_t(1) << 30)) {
    const unsigned char* row = m.ptr + (b * ms.b + h * ms.h + i0 * ms.r) * m.esize;
    const int64_t js = n_begin * kBlockN, je = n_end * kBlockN < S ? n_end * kBlockN : S;
    const int64_t per = 16 / m.esize;  // elements per 16-byte chunk
    int tmin = 0x7fffffff, tmax = -1;  // first and last tile with an element that sees its key
    if (ms.c == 1 && reinterpret_cast<uintptr_t>(row + js * m.esize) % 16 == 0) {
#pragma unroll 1
      for (int64_t j = js + per * static_cast<int64_t>(tid); j < je; j += per * kThreads) {
        bool any;
        if (j + per <= je) {
          any = chunk_sees(m, *reinterpret_cast<const uint4*>(row + j * m.esize));
        } else {
          any = false;
          for (int64_t e = j; e < je; ++e) any = any || mask_sees(m, row, e);
        }
        if (any) {  // a 16-byte chunk lies in one tile (kBlockN is a multiple of 16)
          const int tile = static_cast<int>(j / kBlockN);
          tmin = tile < tmin ? tile : tmin;
          tmax = tile > tmax ? tile : tmax;
        }
      }
    } else {
#pragma unroll 1
      for (int64_t j = js + tid; j < je; j += kThreads) {
        if (mask_sees(m, row, j * ms.c)) {
          const int tile = static_cast<int>(j / kBlockN);
          tmin = tile < tmin ? tile : tmin;
          tmax = tile > tmax ? tile : tmax;
        }
      }
    }
    min_max_to_smem<kThreads>(tmin, tmax, red, tid);
    if (tid == 0) {
      fold_min_max<kThreads>(tmin, tmax, red);
      out[0] = tmax < 0 ? n_begin : tmin;
      out[1] = tmax < 0 ? n_begin : static_cast<int64_t>(tmax) + 1;
    }
    __syncthreads();
    return;
  }
  auto ncols = [&](int64_t n) { return static_cast<int>(S - n * kBlockN < kBlockN ? S - n * kBlockN : kBlockN); };
  while (n_end > n_begin && !mask_tile_any<kThreads>(m, b, h, i0, nq, (n_end - 1) * kBlockN, ncols(n_end - 1), tid))
    --n_end;
  while (n_begin < n_end && !mask_tile_any<kThreads>(m, b, h, i0, nq, n_begin * kBlockN, ncols(n_begin), tid))
    ++n_begin;
  if (tid == 0) {
    out[0] = n_begin;
    out[1] = n_end;
  }
  __syncthreads();
}

// The backward's twin: of the query blocks [mb_begin, mb_begin + nm) (kBlockM
// rows each), those between the first and the last that hold a true element
// for the keys [j0, j0 + nk) in any of the nh heads h0 .. h0 + nh - 1: out[0] =
// first block, out[1] = count (0: the mask hides the keys from every row: a
// mask that broadcasts over the rows is read once). Conventions as
// narrow_key_tiles.
template <int kBlockM, int kThreads>
__device__ __noinline__ void narrow_query_blocks(const MaskRef m, int64_t b, int64_t h0, int64_t nh, int64_t j0,
                                                 int nk, int64_t mb_begin, int64_t nm, int64_t* out, int* red,
                                                 int tid) {
  int64_t mb_end = mb_begin + nm;
  if (mb_end < (int64_t(1) << 30)) {  // block indices in 32 bits
    auto scan = [&](int64_t u0, int64_t u1, int& lo, int& hi) {
      lo = 0x7fffffff;
      hi = -1;
      for (int64_t hh = h0; hh < h0 + nh; ++hh) {
        int l2, h2;
        scan_mask<kBlockM, true, kThreads>(m, m.ptr + (b * m.st.b + hh * m.st.h) * m.esize, m.st, u0 * kBlockM,
                                           u1 * kBlockM < m.len_q ? u1 * kBlockM : m.len_q, j0, j0 + nk, red, tid,
                                           l2, h2);
        lo = l2 < lo ? l2 : lo;
        hi = h2 > hi ? h2 : hi;
      }
    };
    if (m.st.r == 0) {  // the same row for every query (key padding): one look decides for all blocks
      int lo, hi;
      scan(mb_begin, mb_begin + 1, lo, hi);
      if (hi < 0) mb_end = mb_begin;
    } else {
      narrow_units(mb_begin, mb_end, scan);
    }
  }
  if (tid == 0) {
    out[0] = mb_begin;
    out[1] = mb_end - mb_begin;
  }
  __syncthreads();
}

// True when every element of the (rows [i_first, i_last]) x (cols [j0, j0+n))
// tile is visible by the window/causal bounds and inside [0, len_k), so the
// element-wise masking can be skipped (no explicit mask either).
__device__ __forceinline__ bool tile_fully_visible(const FwdParams& p, int64_t i_first, int64_t i_last, int64_t j0,
                                                   int64_t n) {
  if (p.mask_kind != MaskKind::kNone) return false;
  int64_t lo_last, hi_last, lo_first, hi_first;
  key_range(p, i_last, lo_last, hi_last);
  key_range(p, i_first, lo_first, hi_first);
  // lo and hi are non-decreasing in i: the last row has the largest lo, the first the smallest hi
  return lo_last <= j0 && hi_first >= j0 + n;
}

// ---------------------------------------------------------------------------
// Dropout on accumulator fragments
//
// Element (row i, key j) is kept iff bit j%4 of DropoutRng::keep4(bh, i, j/4)
// is set (same counters as the CPU kernels). In an m16n8 fragment the lanes
// t and t^1 hold keys 2t, 2t+1 of the same group of four, for rows g and g+8:
// the even lane draws the four bits of row g, the odd lane those of row g+8,
// and one shuffle gives each lane both.
template <int MT, int NT>
__device__ __forceinline__ void dropout_bits(uint32_t (&bits)[MT][NT], const DropoutRng& rng, uint64_t bh,
                                             int64_t row0, int64_t col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const bool odd = t & 1;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint64_t i = static_cast<uint64_t>(row0 + 16 * mt + g + (odd ? 8 : 0));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint64_t j4 = static_cast<uint64_t>((col0 + 8 * nt) / 4 + (t >> 1));
      const uint32_t mine = rng.keep4(bh, i, j4);
      const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
      const uint32_t row_g = odd ? other : mine, row_g8 = odd ? mine : other;
      const int sh = 2 * (t & 1);
      // bit r of the result: element acc[mt][nt][r] is kept
      bits[mt][nt] = ((row_g >> sh) & 3u) | (((row_g8 >> sh) & 3u) << 2);
    }
  }
}

}  // namespace cuda
}  // namespace attention_ext

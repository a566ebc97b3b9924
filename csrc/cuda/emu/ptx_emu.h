// The PTX wrappers of flash_common.cuh, emulated (see simt.h): same names and
// signatures, each lane's registers as the PTX ISA defines them
// ("Warp-level matrix fragments": mma.m16n8k16 / m16n8k8, ldmatrix).
//   lane = threadIdx.x % 32, g = lane / 4, t = lane % 4
//   m16n8k16 A (16x16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//            B (16x8, col):  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   m16n8k8 tf32 A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B: b0 (k t, n g), b1 (k t+4, n g)
//   C/D (16x8 fp32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
// Lower-numbered 16-bit element of a pair = low half of the register.
#pragma once

#include <cstdint>
#include <cstring>

#include "racecheck.h"
#include "simt.h"

namespace attention_ext {
namespace cuda {

namespace emu_detail {

// (AE_EMU_PLAIN, see simt.h: what the mma / wgmma emulation calls per element.)
// fp16 bits to float, exactly (by hand: cuda_fp16's host conversion would not inline here).
AE_EMU_PLAIN inline float f16_bits(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float x = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&u, &x, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
AE_EMU_PLAIN inline float bf16_bits(uint32_t h) {
  const uint32_t u = (h & 0xffffu) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
// The tensor cores read a TF32 operand from the upper 19 bits of the register.
AE_EMU_PLAIN inline float tf32_bits(uint32_t u) {
  u &= 0xffffe000u;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
AE_EMU_PLAIN inline uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Word w of lane l in a collective's in/out arrays.
AE_EMU_PLAIN inline uint32_t& at(uint32_t* a, int l, int w) { return a[l * simt::kSlot + w]; }
AE_EMU_PLAIN inline uint32_t at(const uint32_t* a, int l, int w) { return a[l * simt::kSlot + w]; }

// kind 0: f16, 1: bf16 (m16n8k16); 2: tf32 (m16n8k8)
template <int kKind>
inline void mma_emu(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const char* what) {
  uint32_t in[10], out[4];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  in[4] = b[0];
  in[5] = b[1];
  for (int i = 0; i < 4; ++i) in[6 + i] = f32_bits(c[i]);
  simt::warp_collective(
      in, 10, out, 4,
      [](const uint32_t* x, uint32_t* o) AE_EMU_PLAIN {
        constexpr int K = kKind == 2 ? 8 : 16;
        float A[16][16], B[16][8];
        for (int m = 0; m < 16; ++m) {
          for (int k = 0; k < K; ++k) {
            if constexpr (kKind == 2) {
              const int lane = (m % 8) * 4 + k % 4, reg = (m >= 8) + 2 * (k >= 4);
              A[m][k] = tf32_bits(at(x, lane, reg));
            } else {
              const int lane = (m % 8) * 4 + (k % 8) / 2, reg = (m >= 8) + 2 * (k >= 8);
              const uint32_t h = at(x, lane, reg) >> (16 * (k % 2));
              A[m][k] = kKind == 0 ? f16_bits(h) : bf16_bits(h);
            }
          }
        }
        for (int k = 0; k < K; ++k) {
          for (int n = 0; n < 8; ++n) {
            if constexpr (kKind == 2) {
              const int lane = n * 4 + k % 4, reg = 4 + (k >= 4);
              B[k][n] = tf32_bits(at(x, lane, reg));
            } else {
              const int lane = n * 4 + (k % 8) / 2, reg = 4 + (k >= 8);
              const uint32_t h = at(x, lane, reg) >> (16 * (k % 2));
              B[k][n] = kKind == 0 ? f16_bits(h) : bf16_bits(h);
            }
          }
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          for (int r = 0; r < 4; ++r) {
            const int m = g + 8 * (r / 2), n = 2 * t + r % 2;
            float cv;
            const uint32_t cb = at(x, l, 6 + r);
            std::memcpy(&cv, &cb, 4);
            double acc = cv;
            for (int k = 0; k < K; ++k) acc += static_cast<double>(A[m][k]) * B[k][n];
            at(o, l, r) = f32_bits(static_cast<float>(acc));
          }
        }
      },
      what);
  for (int i = 0; i < 4; ++i) std::memcpy(&c[i], &out[i], 4);
}

template <bool kTrans>
inline void ldsm_emu(uint32_t addr, uint32_t (&r)[4]) {
  uint32_t out[4];
  simt::warp_collective(
      &addr, 1, out, 4,
      [](const uint32_t* x, uint32_t* o) AE_EMU_PLAIN {
        const unsigned char* smem = simt::dynamic_smem();
        const size_t bytes = simt::dynamic_smem_bytes();
        for (int l = 0; l < 32; ++l) {
          const uint32_t row_addr = at(x, l, 0);
          if (row_addr % 16 != 0 || row_addr + 16 > bytes) {
            throw simt::Error("ldmatrix: lane " + std::to_string(l) + " gives row address " +
                              std::to_string(row_addr) + ", which is not a 16-byte aligned row inside the " +
                              std::to_string(bytes) + " bytes of dynamic shared memory");
          }
        }
        // racecheck: the 32 rows are read by this lane (the warp's last to arrive), once the others arrived
        for (int l = 0; l < 32; ++l) simt::race::access(at(x, l, 0), 16, false, "ldmatrix");
        auto elem = [&](int tile, int row, int col) AE_EMU_PLAIN -> uint32_t {  // 16-bit element of an 8x8 tile
          uint16_t v;
          std::memcpy(&v, smem + at(x, 8 * tile + row, 0) + 2 * col, 2);
          return v;
        };
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          for (int i = 0; i < 4; ++i) {
            uint32_t lo, hi;
            if (kTrans) {
              lo = elem(i, 2 * t, g);
              hi = elem(i, 2 * t + 1, g);
            } else {
              lo = elem(i, g, 2 * t);
              hi = elem(i, g, 2 * t + 1);
            }
            at(o, l, i) = lo | (hi << 16);
          }
        }
      },
      kTrans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

}  // namespace emu_detail

inline uint32_t smem_u32(const void* p) {
  const unsigned char* base = simt::dynamic_smem();
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < base || q > base + simt::dynamic_smem_bytes()) {
    throw simt::Error("shared-memory address outside the launch's dynamic shared memory");
  }
  return static_cast<uint32_t>(q - base);
}
inline void cp_async16(uint32_t dst, const void* src, bool valid) { simt::cp_async(dst, src, 16, valid ? 16 : 0); }
inline void cp_async4(uint32_t dst, const void* src, bool valid) { simt::cp_async(dst, src, 4, valid ? 4 : 0); }
inline void cp_async_commit() { simt::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  simt::cp_async_wait(N);
}
inline void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) { emu_detail::ldsm_emu<false>(addr, r); }
inline void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) { emu_detail::ldsm_emu<true>(addr, r); }
inline void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_detail::mma_emu<0>(c, a, b, "mma.m16n8k16.f16");
}
inline void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_detail::mma_emu<1>(c, a, b, "mma.m16n8k16.bf16");
}
inline void mma_tf32_1688(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_detail::mma_emu<2>(c, a, b, "mma.m16n8k8.tf32");
}
// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline uint32_t to_tf32(float x) {
  uint32_t u = emu_detail::f32_bits(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

}  // namespace cuda
}  // namespace attention_ext

// Tensor maps of the TMA copies (host side). Torch-free.
//
// On the GPU a TmaDesc is the driver's CUtensorMap (128 bytes, 64-byte
// aligned), passed to kernels by value inside a __grid_constant__ params
// struct; make_tma_desc_4d fills it with cuTensorMapEncodeTiled (reached
// through the runtime's driver entry point, so the extension does not link
// libcuda). In the CPU emulation (ATTENTION_EXT_SIMT_EMU) it is a plain struct
// that ../emu/sm90_emu.h reads.
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(ATTENTION_EXT_SIMT_EMU)
#include <cuda.h>
#endif

namespace attention_ext {
namespace cuda {
namespace sm90 {

// Swizzle modes, numbered as the wgmma matrix descriptor encodes them.
enum Swizzle : int { kSwizzleNone = 0, kSwizzle128B = 1, kSwizzle64B = 2, kSwizzle32B = 3 };

#if defined(ATTENTION_EXT_SIMT_EMU)
struct alignas(64) TmaDesc {
  const void* base = nullptr;
  int elem_bytes = 0;
  int rank = 0;
  uint64_t dims[5] = {};          // elements, innermost first
  uint64_t strides[5] = {};       // bytes; strides[0] = elem_bytes
  uint32_t box[5] = {};           // elements per dimension of the copied box
  int swizzle = 0;                // Swizzle of sm90_ptx.cuh (0 none, 1 128B, 2 64B, 3 32B)
};
#else
struct TmaDesc {
  CUtensorMap map;  // 64-byte aligned by its own declaration
};
#endif

// A 4-d tensor map over 16-bit (fp16 / bf16 copies) or 4-byte (fp32, for
// reductions) elements: dims innermost first (dims[0] contiguous),
// strides_bytes[i] the byte stride of dims[i + 1] (multiples of 16), box the
// elements copied per dimension (box[0] * elem_bytes <= the swizzle width),
// swizzle a Swizzle value. Returns nullptr on success, otherwise why the map
// cannot be made (the caller then uses the sm80 kernels).
const char* make_tma_desc_4d(TmaDesc* out, const void* base, const uint64_t dims[4], const uint64_t strides_bytes[3],
                             const uint32_t box[4], int swizzle, int elem_bytes = 2);

// The 4-d map (dim, rows, heads, batch) of a (batch, heads, rows, dim) view of
// 16-bit elements with element strides (r, h, b): its dims and byte strides,
// a size-1 dimension's stride replaced by a harmless one (TMA wants every
// stride a multiple of 16 bytes, even where it is never used). false for
// negative strides.
inline bool tma_view(int64_t st_r, int64_t st_h, int64_t st_b, int64_t batch, int64_t heads, int64_t rows,
                     int64_t dim, uint64_t dims[4], uint64_t strides[3]) {
  if (st_r < 0 || st_h < 0 || st_b < 0) return false;
  dims[0] = static_cast<uint64_t>(dim);
  dims[1] = static_cast<uint64_t>(rows);
  dims[2] = static_cast<uint64_t>(heads);
  dims[3] = static_cast<uint64_t>(batch);
  strides[0] = rows == 1 ? (static_cast<uint64_t>(dim) * 2 + 15) / 16 * 16 : static_cast<uint64_t>(st_r) * 2;
  strides[1] = heads == 1 ? strides[0] * dims[1] : static_cast<uint64_t>(st_h) * 2;
  strides[2] = batch == 1 ? strides[1] * dims[2] : static_cast<uint64_t>(st_b) * 2;
  return true;
}

// The map of packed sequences' rows (total, heads, dim) of 16-bit elements with
// element strides (r, h), whose every sequence ends where a dimension does:
// (dim, r, head, n) at base - R rows + (r + n) rows, r < R = the longest
// sequence's rows, n <= total; row j of sequence [s, e) is (R - (e - s) + j, e),
// inside the map exactly for j < e - s (flash_fwd_sm90.cuh). Its dims, byte
// strides and the shifted base (never read itself: only rows [0, total) are);
// false for negative strides or R < 1.
inline bool tma_view_packed(const void* base, int64_t st_r, int64_t st_h, int64_t heads, int64_t R, int64_t total,
                            int64_t dim, uint64_t dims[4], uint64_t strides[3], const void** shifted) {
  if (st_r < 0 || st_h < 0 || R < 1) return false;
  const uint64_t rs = static_cast<uint64_t>(st_r) * 2;
  dims[0] = static_cast<uint64_t>(dim);
  dims[1] = static_cast<uint64_t>(R);
  dims[2] = static_cast<uint64_t>(heads);
  dims[3] = static_cast<uint64_t>(total) + 1;
  strides[0] = rs;
  strides[1] = heads == 1 ? rs * dims[1] : static_cast<uint64_t>(st_h) * 2;
  strides[2] = rs;
  *shifted = static_cast<const unsigned char*>(base) - static_cast<ptrdiff_t>(rs * dims[1]);
  return true;
}

// cuTensorMapEncodeTiled's requirements (CUDA driver API) on those arguments,
// checked before the driver sees them (and by the emulator, which has no
// driver): nullptr, or the first one violated.
inline const char* check_tma_desc_4d(const void* base, const uint64_t dims[4], const uint64_t strides_bytes[3],
                                     const uint32_t box[4], int swizzle, int elem_bytes) {
  if (elem_bytes != 2 && elem_bytes != 4) return "elements of 2 or 4 bytes only";
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return "base address not 16-byte aligned";
  for (int i = 0; i < 3; ++i) {
    if (strides_bytes[i] % 16 != 0) return "a stride is not a multiple of 16 bytes";
    if (strides_bytes[i] >= (uint64_t(1) << 40)) return "a stride is 2^40 bytes or more";
  }
  for (int i = 0; i < 4; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32)) return "a dimension is 0 or above 2^32";
    if (box[i] == 0 || box[i] > 256) return "a box dimension is 0 or above 256";
  }
  if (swizzle < 0 || swizzle > 3) return "unknown swizzle mode";
  if ((box[0] * static_cast<uint32_t>(elem_bytes)) % 16 != 0) {
    return "the box's inner dimension is not a multiple of 16 bytes";
  }
  const uint32_t span = swizzle == kSwizzle128B ? 128 : swizzle == kSwizzle64B ? 64 : swizzle == kSwizzle32B ? 32 : 0;
  if (span != 0 && box[0] * static_cast<uint32_t>(elem_bytes) > span) {
    return "the box's inner dimension exceeds the swizzle span";
  }
  return nullptr;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

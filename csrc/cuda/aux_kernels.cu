// The small CUDA kernels around the flash kernels: the row statistics of the
// backward, the dQ conversion, attention_probs (its own row statistics, then
// P), and the dropout keep-mask.
// All indexing is int64 and every loop is grid-strided, so tensors beyond
// 2^31 elements work with bounded grids.
#include <algorithm>

#include "flash_common.cuh"
#include "flash_fwd.cuh"
#include "launch.h"
#include "static_switch.h"

namespace attention_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t work_items, int per_block, int num_sms) {
  const int64_t want = ceil_div(work_items, per_block);
  const int64_t cap = static_cast<int64_t>(std::max(num_sms, 1)) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

// Row r of the per-row buffers (stat_rows: (b * heads_q + h) * len_q + i, or for packed sequences
// heads_q * cu_seqlens_q[b] + h * L_b + i): its batch index (0 when packed: rows address the packed tensors), its
// head and its row in q / out / dO (for packed sequences the packed row cu_seqlens_q[b] + i).
struct RowAt {
  int64_t b, h, i;
};
__device__ __forceinline__ RowAt row_at(const FwdParams& p, int64_t r) {
  if (p.cu_seqlens_q == nullptr) {
    const int64_t bh = r / p.len_q;
    return {bh / p.heads_q, bh % p.heads_q, r % p.len_q};
  }
  // the last sequence b with heads_q * cu_seqlens_q[b] <= r (empty sequences before it hold no row)
  int64_t lo = 0, hi = p.batch;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (p.heads_q * p.cu_seqlens_q[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t q0 = p.cu_seqlens_q[lo], len = p.cu_seqlens_q[lo + 1] - q0, local = r - p.heads_q * q0;
  return {0, local / len, q0 + local % len};
}

// Packed rows of the per-row buffers that no sequence holds: before heads_q * cu_seqlens_q[0] or from
// heads_q * cu_seqlens_q[batch] on. Only offsets checked on the device leave any (launch_packed_rows gives the
// sequences it refuses no rows); row_at must not be asked for them.
__device__ __forceinline__ bool row_unheld(const FwdParams& p, int64_t r) {
  return p.cu_seqlens_q != nullptr &&
         (r < p.heads_q * p.cu_seqlens_q[0] || r >= p.heads_q * p.cu_seqlens_q[p.batch]);
}

// shift = lse, logl = 0 and (st.dsum, not st.exact_d) D[r] = sum_e dO[b, h, i, e] * O[b, h, i, e] from the
// saved output (row r at (b, h, i): row_at), less the log-sum-exp's cotangent st.dlse[r]: one warp per row.
template <typename Elem>
__global__ void __launch_bounds__(kThreads) row_stats_init_kernel(const FwdParams p, const FwdStats st) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = stat_rows(p);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  const bool want_d = st.dsum != nullptr && !st.exact_d;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const float lse = static_cast<const float*>(p.lse)[r];
    if (lane == 0) {
      st.shift[r] = lse;
      st.logl[r] = 0.f;
    }
    if (!want_d) continue;
    if (row_unheld(p, r)) {  // (no kernel reads it)
      if (lane == 0) st.dsum[r] = 0.f;
      continue;
    }
    const auto [b, h, i] = row_at(p, r);
    const Elem* o = static_cast<const Elem*>(p.out) + b * p.o_stride.b + h * p.o_stride.h + i * p.o_stride.r;
    const Elem* d = static_cast<const Elem*>(st.dout) + b * st.do_stride.b + h * st.do_stride.h + i * st.do_stride.r;
    float acc = 0.f;
    for (int64_t e = lane; e < p.dim_v; e += 32) acc += ElemOps<Elem>::to_float(o[e]) * ElemOps<Elem>::to_float(d[e]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) st.dsum[r] = st.dlse != nullptr && lse != -kInf ? acc - st.dlse[r] : acc;
  }
}

// dq[b, h, i, e] = scale * (split_0 + split_1 + ...)[r][e] (row r at (b, h, i): row_at), fixed order.
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
    dq_convert_kernel(const BwdParams p, const float* acc, int64_t row_stride, int64_t split_stride, int nsplit) {
  const int64_t E = p.dim_qk;
  const int64_t total = stat_rows(p) * E;
  const float scale = static_cast<float>(p.scale);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t e = idx % E, r = idx / E;
    if (row_unheld(p, r)) continue;  // (its dQ row stays as the glue filled it)
    const auto [b, h, i] = row_at(p, r);
    const float* a = acc + r * row_stride + e;
    float s = 0.f;
    for (int c = 0; c < nsplit; ++c) s += a[c * split_stride];
    Elem* dq = static_cast<Elem*>(p.dq) + b * p.dq_stride.b + h * p.dq_stride.h + i * p.dq_stride.r;
    dq[e] = ElemOps<Elem>::from_float(s * scale);
  }
}

__device__ __forceinline__ float mask_value_any(const FwdParams& p, int64_t off) {
  switch (p.mask_dtype) {
    case DType::kBool: return mask_value<uint8_t>(p.mask, off);
    case DType::kFloat16: return mask_value<__half>(p.mask, off);
    case DType::kBFloat16: return mask_value<__nv_bfloat16>(p.mask, off);
    default: return mask_value<float>(p.mask, off);
  }
}

// attention_probs in two kernels that compute every score the same way (score_tile): probs_stats_kernel
// takes each row's max m and sum l over all its keys, probs_kernel writes P = exp((x - m) - log l) and the
// forward's dropout, P * keep / (1 - p). The forward's log-sum-exp is not used: it comes from the tensor-core
// scores, which differ from these in the last bits, and with |scores| in the hundreds (fp32, large scales)
// exp(x - lse) was then off by ~10x PyTorch's error; normalising over the very scores it exponentiates, each
// row sums to 1 to rounding, whatever the magnitude (and rows masked with finfo.min need no special case).
constexpr int kPT = 32;
using TileBuf = float[kPT][kPT + 1];
// The weights kernels' two tiles live in dynamic shared memory, as every kernel's here (the emulator fills it
// with NaN at each CTA's start and its racecheck watches it).
constexpr size_t kTileSmem = 2 * sizeof(TileBuf);

// The scale, soft cap, ALiBi and masks of a tile: x[r] = scale * acc[r] (soft-capped) - m |i + S - L - j| + mask
// for rows i = i0 + ty + 8 r
// and key j = j0 + tx (-inf where not visible).
__device__ __forceinline__ void score_epilogue(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t j0,
                                               const float (&acc)[4], float (&x)[4]) {
  const int tx = threadIdx.x % kPT, ty = threadIdx.x / kPT;
  const int64_t L = p.len_q, S = p.len_k;
  const int64_t j = j0 + tx;
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty + 8 * r;
    x[r] = -kInf;
    if (i >= L || j >= S) continue;
    int64_t lo, hi;
    key_range(p, i, lo, hi);
    if (j < lo || j >= hi) continue;
    x[r] = acc[r] * scale;
    if (p.softcap > 0.0) {  // (tanh as the flash kernels take it)
      const float cap = static_cast<float>(p.softcap);
      x[r] = cap * softcap_tanh(x[r], 2.f * kLog2e / cap);
    }
    if (p.alibi_slopes != nullptr)  // (the distance in 32 bits: as the flash kernels take it)
      x[r] -= alibi_slope(p, b, h) * fabsf(static_cast<float>(static_cast<int>(i - j + S - L)));
    if (p.mask_kind != MaskKind::kNone) {
      const Strides4& ms = p.mask_stride;
      x[r] += mask_value_any(p, b * ms.b + h * ms.h + i * ms.r + j * ms.c);
    }
  }
}

// x[r] = scale * q_i . k_j + mask for rows i = i0 + ty + 8 r and key j = j0 + tx of one 32 x 32 tile (-inf
// where not visible), q and k staged through shared memory 32 features at a time. fp32: in fp32 FMA (the
// exact fp32 scores, whatever TF32 setting the forward ran with). fp16 / bf16: on the tensor cores, warp w
// computing the 16 x 8 sub-tile (rows 16 (w / 4), keys 8 (w % 4)) with mma.m16n8k16 (products exact in fp32,
// fp32 sums: as accurate as the FMA loop, in another order), its accumulators passed through shared memory to
// the FMA loop's layout. Every thread of the CTA calls it (it synchronises).
template <typename Elem>
__device__ __forceinline__ void score_tile(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t j0,
                                           TileBuf& sq, TileBuf& sk, float (&x)[4]) {
  const int tx = threadIdx.x % kPT, ty = threadIdx.x / kPT;  // ty in [0, 8): rows ty + 8 * r
  const int64_t L = p.len_q, S = p.len_k, E = p.dim_qk, hk = h / (p.heads_q / p.heads_kv);
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (std::is_same<Elem, float>::value) {
    for (int64_t e0 = 0; e0 < E; e0 += kPT) {
      __syncthreads();  // the previous chunk's (or tile's) reads are done
      for (int idx = threadIdx.x; idx < kPT * kPT; idx += kThreads) {
        const int r = idx / kPT, c = idx % kPT;
        const bool okc = e0 + c < E;
        sq[r][c] = (okc && i0 + r < L) ? q[(i0 + r) * p.q_stride.r + e0 + c] : 0.f;
        sk[r][c] = (okc && j0 + r < S) ? k[(j0 + r) * p.k_stride.r + e0 + c] : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kPT; ++c) {
        const float kv = sk[tx][c];
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] = fmaf(sq[ty + 8 * r][c], kv, acc[r]);
      }
    }
  } else {
    static_assert(kThreads == 256 && kPT == 32, "8 warps, one 16 x 8 sub-tile of the 32 x 32 tile each");
    using M = MmaTraits<Elem>;
    constexpr int kLd = kPT + 8;  // Elem per staged row: 80 bytes, so a fragment's 8 rows hit distinct banks
    static_assert(sizeof(Elem) * kPT * kLd <= sizeof(TileBuf), "the staged tile fits the float tile's memory");
    Elem(*q16)[kLd] = reinterpret_cast<Elem(*)[kLd]>(&sq[0][0]);
    Elem(*k16)[kLd] = reinterpret_cast<Elem(*)[kLd]>(&sk[0][0]);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int wr = 16 * (warp / 4), wc = 8 * (warp % 4);
    auto word = [](Elem(*m)[kLd], int row, int col) { return *reinterpret_cast<const uint32_t*>(&m[row][col]); };
    const Elem zero = ElemOps<Elem>::from_float(0.f);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t e0 = 0; e0 < E; e0 += kPT) {
      __syncthreads();  // the previous chunk's (or tile's) reads are done
      for (int idx = threadIdx.x; idx < kPT * kPT; idx += kThreads) {
        const int r = idx / kPT, col = idx % kPT;
        const bool okc = e0 + col < E;
        q16[r][col] = (okc && i0 + r < L) ? q[(i0 + r) * p.q_stride.r + e0 + col] : zero;
        k16[r][col] = (okc && j0 + r < S) ? k[(j0 + r) * p.k_stride.r + e0 + col] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kPT; kk += 16) {
        // A (16 x 16, row-major): (g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8); B (16 x 8, k x n):
        // k rows 2t and 2t + 8 of key n = g, i.e. features 2t, 2t + 8 of k row g (PTX ISA fragment layouts)
        const auto a = M::make_a(word(q16, wr + g, kk + 2 * t), word(q16, wr + g + 8, kk + 2 * t),
                                 word(q16, wr + g, kk + 2 * t + 8), word(q16, wr + g + 8, kk + 2 * t + 8));
        const auto bf = M::make_b(word(k16, wc + g, kk + 2 * t), word(k16, wc + g, kk + 2 * t + 8));
        M::mma(c, a, bf);
      }
    }
    __syncthreads();  // every warp is done with q16 / k16: sq holds the tile's scores next
    // C (16 x 8): (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
    sq[wr + g][wc + 2 * t] = c[0];
    sq[wr + g][wc + 2 * t + 1] = c[1];
    sq[wr + g + 8][wc + 2 * t] = c[2];
    sq[wr + g + 8][wc + 2 * t + 1] = c[3];
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] = sq[ty + 8 * r][tx];
  }
  score_epilogue(p, b, h, i0, j0, acc, x);
}

// shift = m and logl = log(l) of each row over all its keys (shift -inf: no visible key, the row's P is 0;
// NaN: a NaN score, the row's P is NaN, as the forward's output): one CTA per 32 rows, each thread keeps
// an online max / sum of its 4 rows over the key column it owns in every tile, then the warp combines them.
template <typename Elem>
__global__ void __launch_bounds__(kThreads) probs_stats_kernel(const FwdParams p, float* shift, float* logl) {
  AE_DYNAMIC_SMEM(smem_raw);
  TileBuf& sq = reinterpret_cast<TileBuf*>(smem_raw)[0];
  TileBuf& sk = reinterpret_cast<TileBuf*>(smem_raw)[1];
  const int tx = threadIdx.x % kPT, ty = threadIdx.x / kPT;
  const int64_t L = p.len_q, Hq = p.heads_q, nib = ceil_div(L, kPT), njb = ceil_div(p.len_k, kPT);
  for (int64_t blk = blockIdx.x; blk < p.batch * Hq * nib; blk += gridDim.x) {
    const int64_t ib = blk % nib, bh = blk / nib;
    float m[4], l[4];
    bool nan[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) m[r] = -kInf, l[r] = 0.f, nan[r] = false;
    for (int64_t jb = 0; jb < njb; ++jb) {
      float x[4];
      score_tile<Elem>(p, bh / Hq, bh % Hq, ib * kPT, jb * kPT, sq, sk, x);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (x[r] != x[r]) {
          nan[r] = true;
        } else if (x[r] > m[r]) {  // a new maximum (-inf never is one)
          l[r] = (m[r] == -kInf ? 0.f : l[r] * exp2f((m[r] - x[r]) * kLog2e)) + 1.f;
          m[r] = x[r];
        } else if (x[r] != -kInf) {
          l[r] += exp2f((x[r] - m[r]) * kLog2e);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      for (int off = 16; off > 0; off >>= 1) {  // the 32 lanes of a warp are the 32 key columns of its rows
        const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off), l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
        nan[r] = __shfl_xor_sync(0xffffffffu, static_cast<int>(nan[r]), off) != 0 || nan[r];
        const float mm = fmaxf(m[r], m2);
        l[r] = (m[r] == -kInf ? 0.f : l[r] * exp2f((m[r] - mm) * kLog2e)) +
               (m2 == -kInf ? 0.f : l2 * exp2f((m2 - mm) * kLog2e));
        m[r] = mm;
      }
      const int64_t i = ib * kPT + ty + 8 * r;
      if (tx == 0 && i < L) {
        shift[bh * L + i] = nan[r] ? std::numeric_limits<float>::quiet_NaN() : m[r];
        logl[bh * L + i] = m[r] == -kInf ? 0.f : logf(l[r]);
      }
    }
  }
}

// P = exp2(((x - shift) - logl) * log2e) (the differences first, so that finite scores near -FLT_MAX cannot
// overflow, see flash_fwd.cuh), 0 for rows with shift = -inf, then the dropout. Every element is written.
// kAverage (nn.MultiheadAttention's default weights): out is batch x len_q x len_k, the mean of P over the
// query heads, summed in fp32 in the CTA of a (batch, 32 x 32 tile) that walks every head, so that the
// per-head weights (heads_q times larger) never reach memory.
template <typename Elem, bool kAverage>
__global__ void __launch_bounds__(kThreads)
    probs_kernel(const FwdParams p, const float* row_shift, const float* row_logl, Elem* out) {
  AE_DYNAMIC_SMEM(smem_raw);
  TileBuf& sq = reinterpret_cast<TileBuf*>(smem_raw)[0];
  TileBuf& sk = reinterpret_cast<TileBuf*>(smem_raw)[1];
  const int tx = threadIdx.x % kPT, ty = threadIdx.x / kPT;
  const int64_t L = p.len_q, S = p.len_k, Hq = p.heads_q;
  const int64_t nib = ceil_div(L, kPT), njb = ceil_div(S, kPT);
  const int64_t heads_per_tile = kAverage ? Hq : 1;
  const int64_t tiles = p.batch * (Hq / heads_per_tile) * nib * njb;
  const bool dropout = p.dropout_p > 0.f;
  const DropoutRng rng = dropout ? make_rng(p) : DropoutRng();
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t jb = tile % njb, ib = (tile / njb) % nib, bh0 = tile / (njb * nib) * heads_per_tile;
    const int64_t i0 = ib * kPT, j0 = jb * kPT, j = j0 + tx;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t bh = bh0; bh < bh0 + heads_per_tile; ++bh) {
      float x[4];
      score_tile<Elem>(p, bh / Hq, bh % Hq, i0, j0, sq, sk, x);  // every thread: it synchronises
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t i = i0 + ty + 8 * r;
        if (i >= L || j >= S) continue;
        const float sh = row_shift[bh * L + i];
        float pr = sh == -kInf ? 0.f : exp2f(((x[r] - sh) - row_logl[bh * L + i]) * kLog2e);
        if (dropout) pr = rng.keep(static_cast<uint64_t>(bh), static_cast<uint64_t>(i), static_cast<uint64_t>(j))
                              ? pr * rng.inv_keep
                              : 0.f;
        if constexpr (kAverage) {
          sum[r] += pr;
        } else {
          out[(bh * L + i) * S + j] = ElemOps<Elem>::from_float(pr);
        }
      }
    }
    if constexpr (kAverage) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t i = i0 + ty + 8 * r;
        if (i < L && j < S) out[(bh0 / Hq * L + i) * S + j] = ElemOps<Elem>::from_float(sum[r] / static_cast<float>(Hq));
      }
    }
  }
}

// keep-mask[bh, i, j] for j in a group of four (one Philox call).
__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(const int64_t* seed_offset, int64_t rows, int64_t len_q,
                                                              int64_t len_k, double dropout_p, bool* out) {
  const DropoutRng rng(static_cast<uint64_t>(seed_offset[0]), static_cast<uint64_t>(seed_offset[1]), dropout_p);
  const int64_t n4 = ceil_div(len_k, 4);
  const int64_t total = rows * n4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t row = idx / n4, j4 = idx % n4;
    const uint32_t bits = rng.keep4(static_cast<uint64_t>(row / len_q), static_cast<uint64_t>(row % len_q),
                                    static_cast<uint64_t>(j4));
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int64_t j = j4 * 4 + t;
      if (j < len_k) out[row * len_k + j] = (bits >> t) & 1u;
    }
  }
}

// One CTA per (batch, query head): the first and last true key of its mask row.
__global__ void __launch_bounds__(kThreads) key_bounds_kernel(const FwdParams p, int32_t* out) {
  const int64_t bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const unsigned char* row = static_cast<const unsigned char*>(p.mask) + b * p.mask_stride.b + h * p.mask_stride.h;
  const int S = static_cast<int>(p.len_k);
  int lo = 0x7fffffff, hi = 0;  // the first true key, one past the last
  for (int j = threadIdx.x; j < S; j += kThreads) {
    if (row[j * p.mask_stride.c] != 0) {
      lo = j < lo ? j : lo;
      hi = j + 1;  // j grows: this thread's last true key so far
    }
  }
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int a = __shfl_xor_sync(0xffffffffu, lo, o), c = __shfl_xor_sync(0xffffffffu, hi, o);
    lo = a < lo ? a : lo;
    hi = c > hi ? c : hi;
  }
  AE_DYNAMIC_SMEM(smem_raw);
  int* red = reinterpret_cast<int*>(smem_raw);  // 2 * kThreads / 32 ints
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    red[warp] = lo;
    red[kThreads / 32 + warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) {
      lo = red[w] < lo ? red[w] : lo;
      hi = red[kThreads / 32 + w] > hi ? red[kThreads / 32 + w] : hi;
    }
    out[2 * bh] = hi > 0 ? lo : 0;
    out[2 * bh + 1] = hi;
  }
}

// Flash-decoding's merge (p.num_splits > 1, see flash_fwd.cuh): one warp per row. From each share's row max
// m_s and sum l_s: w_s = l_s exp(m_s - M) with M = max m_s, lse = M + log sum w_s, out = sum_s (w_s / sum w) O_s.
// A share with no visible key has m_s = -inf and weight 0; a row with none at all gives 0 and -inf, and a NaN
// in any share (NaN scores) a NaN row and lse, as without splits. A cache call's packed queries
// (FwdParams::cache_lens with cu_seqlens_q): the shares are laid out as for a call of batch element b's rows padded
// to len_q (the longest L_b); row i < L_b goes to packed row cu_seqlens_q[b] + i and to the lse's (Hq, L_b) block at
// Hq * cu_seqlens_q[b], rows past L_b were never written and are skipped.
template <typename Elem>
__global__ void __launch_bounds__(kThreads) fwd_combine_kernel(const FwdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  const int ns = p.num_splits;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t i = r % p.len_q, bh = r / p.len_q, b = bh / p.heads_q, h = bh % p.heads_q;
    int64_t q0 = 0, Lb = p.len_q;  // packed queries: b's first row and its L_b
    if (p.cu_seqlens_q != nullptr) {
      if (!cache_rows_ok(p, b)) continue;  // (launch_cache_lengths made them so; a defence)
      q0 = p.cu_seqlens_q[b];
      Lb = p.cu_seqlens_q[b + 1] - q0;
      if (i >= Lb) continue;  // uniform over the warp
    }
    const float* ms = p.lse_accum + r;              // m_s at ms[s * rows]
    const float* ls = p.lse_accum + ns * rows + r;  // l_s at ls[s * rows]
    float m = -kInf;
    bool nan = false;
    for (int s = 0; s < ns; ++s) {
      nan = nan || ms[s * rows] != ms[s * rows] || ls[s * rows] != ls[s * rows];
      m = fmaxf(m, ms[s * rows]);
    }
    const bool empty = !nan && m == -kInf;
    float sum = 0.f;  // sum_s w_s
    for (int s = 0; s < ns && !empty; ++s)
      sum += ms[s * rows] == -kInf ? 0.f : ls[s * rows] * exp2f((ms[s * rows] - m) * kLog2e);
    if (nan) sum = __uint_as_float(0x7fc00000u);
    const int64_t lse_row = p.cu_seqlens_q != nullptr ? p.heads_q * q0 + h * Lb + i : r;
    if (lane == 0) static_cast<float*>(p.lse)[lse_row] = empty ? -kInf : m + logf(sum);
    Elem* o = static_cast<Elem*>(p.out) + (p.cu_seqlens_q != nullptr ? q0 * p.o_stride.r : b * p.o_stride.b) +
              h * p.o_stride.h + i * p.o_stride.r;
    const float inv = empty ? 0.f : 1.f / sum;
    for (int64_t e = lane; e < p.dim_v; e += 32) {
      float acc = 0.f;
      for (int s = 0; s < ns && !empty; ++s)
        if (ms[s * rows] != -kInf || nan)
          acc += ls[s * rows] * exp2f((ms[s * rows] - m) * kLog2e) * inv * p.o_accum[(s * rows + r) * p.dim_v + e];
      o[e] = ElemOps<Elem>::from_float(acc);
    }
  }
}

// launch.h's CacheLengthsParams: one warp per batch element.
__device__ __forceinline__ int64_t index_at(const void* t, int64_t i, bool is64) {
  return is64 ? static_cast<const int64_t*>(t)[i] : static_cast<const int32_t*>(t)[i];
}
__device__ __forceinline__ int warp_or(int x) {
  for (int o = 16; o > 0; o >>= 1) x |= __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Packed rows cu (batch + 1 offsets into `total` rows), as the warp of sequence b sees them: the first sequence
// j <= b whose rows are out of range (cu[0] != 0, a step down, an end past total, more than `most` rows), else
// b + 1 (uniform over the warp; lanes take j = lane, lane + 32, ..).
__device__ __forceinline__ int first_bad_rows(const int32_t* cu, int64_t b, int64_t total, int64_t most, int lane) {
  int first = static_cast<int>(b) + 1;
  for (int64_t j = lane; j <= b; j += 32) {
    if ((j == 0 && cu[0] != 0) || cu[j + 1] < cu[j] || cu[j + 1] > total || cu[j + 1] - cu[j] > most) {
      first = static_cast<int>(j);
      break;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const int other = __shfl_xor_sync(0xffffffffu, first, o);
    first = other < first ? other : first;
  }
  return first;
}
// Lane 0 writes out[b + 1] (and out[0] for b = 0): cu with every sequence from `first` on given no rows, so that no
// two sequences share a row and none leaves the tensors.
__device__ __forceinline__ void write_rows(const int32_t* cu, int32_t* out, int64_t b, int64_t first, int64_t total,
                                           int lane) {
  if (lane != 0) return;
  const auto clamp = [&](int64_t x) { return static_cast<int32_t>(x < 0 ? 0 : (x > total ? total : x)); };
  out[b + 1] = clamp(cu[first > b ? b + 1 : first]);
  if (b == 0) out[0] = clamp(cu[0]);
}

__global__ void __launch_bounds__(kThreads) cache_lengths_kernel(const CacheLengthsParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; b < p.batch; b += warps) {
    bool ok = true;
    const int32_t* cu = p.cu_seqlens_q;
    if (cu != nullptr) {
      const int first = first_bad_rows(cu, b, p.total_q, p.total_q, lane);
      write_rows(cu, p.cu_out, b, first, p.total_q, lane);
      ok = first > b;
    }
    const int64_t cached = index_at(p.seqlens, b, p.seqlens_64);
    const int64_t len = cached + (p.packed_keys && ok ? cu[b + 1] - cu[b] : p.new_len);
    const int64_t most = p.capacity < 0x7fffffff ? p.capacity : 0x7fffffff;
    ok = ok && cached >= 0 && len <= most;
    if (ok && p.rotary) {  // (the rotary table's rows: kvcache.cpp's rotary clamped the positions into it)
      const int64_t queries = p.rotary_queries < 0 ? cu[b + 1] - cu[b] : p.rotary_queries;
      const int64_t added = len - cached;
      ok = cached + (added > queries ? added : queries) <= p.rotary_rows;
    }
    if (ok && p.batch_idx != nullptr) {
      const int64_t row = index_at(p.batch_idx, b, p.batch_idx_64);
      ok = row >= 0 && row < p.rows;
    }
    if (ok && p.block_table != nullptr) {  // (uniform over the warp)
      const int32_t* pages = p.block_table + b * p.max_pages;
      int bad = 0;
      for (int64_t j = lane; j < ceil_div(len, p.page_size); j += 32) bad |= pages[j] < 0 || pages[j] >= p.rows;
      ok = !warp_or(bad);
    }
    if (lane == 0) p.lens[b] = ok ? static_cast<int32_t>(len) : -1;
  }
}

// launch.h's CacheAppendParams, T the element's bits.
template <typename T>
__global__ void __launch_bounds__(kThreads) cache_append_kernel(const CacheAppendParams p) {
  const int64_t per_head = p.dim_k + p.dim_v, width = p.heads_kv * per_head;
  const bool packed = p.cu != nullptr;
  const int64_t rows = packed ? p.total_q : p.batch * p.new_len;
  const int64_t n = rows * width, step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    const int64_t row = i / width, h = i % width / per_head, e = i % per_head;
    int64_t b, t;
    if (packed) {
      if (row >= p.cu[p.batch]) continue;  // no batch element's (rows refused, or past the last)
      int64_t lo = 0, hi = p.batch;  // the last b with cu[b] <= row: the one whose rows hold it
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (p.cu[mid] <= row) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      b = lo;
      t = row - p.cu[b];
    } else {
      b = row / p.new_len;
      t = row % p.new_len;
    }
    const int64_t len = p.lens[b];
    if (len < 0) continue;  // refused by launch_cache_lengths
    const int64_t pos = len - (packed ? p.cu[b + 1] - p.cu[b] : p.new_len) + t;
    int64_t at_row = b, slot = pos;
    if (p.block_table != nullptr) {
      at_row = p.block_table[b * p.max_pages + pos / p.page_size];
      slot = pos % p.page_size;
    } else if (p.batch_idx != nullptr) {
      at_row = index_at(p.batch_idx, b, p.batch_idx_64);
    }
    const int64_t src_row = packed ? row : b;  // (packed: the row's own t stride, no batch stride)
    const int64_t src_t = packed ? 0 : t;
    if (e < p.dim_k) {
      const T* src = static_cast<const T*>(p.key) + src_row * (packed ? p.k_stride_t : p.k_stride_b) +
                     src_t * p.k_stride_t + h * p.k_stride_h + e * p.k_stride_e;
      static_cast<T*>(p.key_cache)[at_row * p.kc_stride_b + h * p.kc_stride_h + slot * p.kc_stride_s + e] = *src;
    } else {
      const int64_t c = e - p.dim_k;
      const T* src = static_cast<const T*>(p.value) + src_row * (packed ? p.v_stride_t : p.v_stride_b) +
                     src_t * p.v_stride_t + h * p.v_stride_h + c * p.v_stride_e;
      static_cast<T*>(p.value_cache)[at_row * p.vc_stride_b + h * p.vc_stride_h + slot * p.vc_stride_s + c] = *src;
    }
  }
}

// launch.h's PackedRowsParams: one warp per sequence.
__global__ void __launch_bounds__(kThreads) packed_rows_kernel(const PackedRowsParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; b < p.batch; b += warps) {
    // (a sequence refused for its query rows or its key rows gets neither, as do all after it)
    const int first_q = first_bad_rows(p.cu_q, b, p.total_q, p.max_q, lane);
    const int first_k = first_bad_rows(p.cu_k, b, p.total_k, p.max_k, lane);
    const int first = first_q < first_k ? first_q : first_k;
    write_rows(p.cu_q, p.cu_q_out, b, first, p.total_q, lane);
    write_rows(p.cu_k, p.cu_k_out, b, first, p.total_k, lane);
  }
}

template <typename Fn>
cudaError_t by_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat32: return fn(float{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_row_stats(const FwdParams& p, const FwdStats& st, const FwdEntry& fwd, const LaunchEnv& env) {
  const int64_t rows = stat_rows(p);
  if (rows == 0) return cudaSuccess;
  const int grid = grid_for(rows, kThreads / 32, env.num_sms);
  const cudaError_t err = by_dtype(p.dtype, [&](auto tag) {
    using Elem = decltype(tag);
    return launch_kernel(row_stats_init_kernel<Elem>, grid, kThreads, 0, 0, env.stream, "row_stats_init_kernel", p,
                         st);
  });
  if (err != cudaSuccess || p.len_k == 0) return err;
  return fwd.fn(p, &st, env);
}

cudaError_t launch_fwd_combine(const FwdParams& p, const LaunchEnv& env) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  if (rows == 0) return cudaSuccess;
  if (p.num_splits < 2 || p.o_accum == nullptr || p.lse_accum == nullptr ||
      (p.cu_seqlens_q != nullptr && p.cache_lens == nullptr))  // (packed sequences have no split keys)
    return cudaErrorInvalidValue;
  const int grid = grid_for(rows, kThreads / 32, env.num_sms);
  return by_dtype(p.dtype, [&](auto tag) {
    using Elem = decltype(tag);
    return launch_kernel(fwd_combine_kernel<Elem>, grid, kThreads, 0, 0, env.stream, "fwd_combine_kernel", p);
  });
}

cudaError_t launch_cache_lengths(const CacheLengthsParams& p, const LaunchEnv& env) {
  if (p.batch == 0) return cudaSuccess;
  if (p.seqlens == nullptr || p.lens == nullptr || p.page_size < 1 ||
      (p.cu_seqlens_q != nullptr) != (p.cu_out != nullptr) || (p.packed_keys && p.cu_seqlens_q == nullptr) ||
      p.batch > 0x7ffffffe)
    return cudaErrorInvalidValue;
  return launch_kernel(cache_lengths_kernel, grid_for(p.batch, kThreads / 32, env.num_sms), kThreads, 0, 0, env.stream,
                       "cache_lengths_kernel", p);
}

cudaError_t launch_cache_append(const CacheAppendParams& p, const LaunchEnv& env) {
  const int64_t rows = p.cu != nullptr ? p.total_q : p.batch * p.new_len;
  const int64_t n = rows * p.heads_kv * (p.dim_k + p.dim_v);
  if (n == 0 || p.batch == 0) return cudaSuccess;
  if (p.key == nullptr || p.value == nullptr || p.key_cache == nullptr || p.value_cache == nullptr ||
      p.lens == nullptr || p.page_size < 1 || (p.block_table != nullptr && p.max_pages < 1))
    return cudaErrorInvalidValue;
  const int grid = grid_for(n, kThreads, env.num_sms);
  if (p.elem_bytes == 2)
    return launch_kernel(cache_append_kernel<uint16_t>, grid, kThreads, 0, 0, env.stream, "cache_append_kernel", p);
  if (p.elem_bytes == 4)
    return launch_kernel(cache_append_kernel<uint32_t>, grid, kThreads, 0, 0, env.stream, "cache_append_kernel", p);
  return cudaErrorInvalidValue;
}

cudaError_t launch_packed_rows(const PackedRowsParams& p, const LaunchEnv& env) {
  if (p.batch == 0) return cudaSuccess;
  if (p.cu_q == nullptr || p.cu_k == nullptr || p.cu_q_out == nullptr || p.cu_k_out == nullptr ||
      p.batch > 0x7ffffffe)
    return cudaErrorInvalidValue;
  return launch_kernel(packed_rows_kernel, grid_for(p.batch, kThreads / 32, env.num_sms), kThreads, 0, 0, env.stream,
                       "packed_rows_kernel", p);
}

cudaError_t launch_dq_convert(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  const int64_t total = stat_rows(p) * p.dim_qk;
  if (total == 0) return cudaSuccess;
  const int grid = grid_for(total, kThreads, env.num_sms);
  return by_dtype(p.dtype, [&](auto tag) {
    using Elem = decltype(tag);
    return launch_kernel(dq_convert_kernel<Elem>, grid, kThreads, 0, 0, env.stream, "dq_convert_kernel", p,
                         static_cast<const float*>(w.dq_accum), w.dq_row_stride, w.dq_split_stride, w.nsplit);
  });
}

cudaError_t launch_probs(const FwdParams& p, float* row_stats, void* probs, const LaunchEnv& env, bool average_heads) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  const int64_t tiles = p.batch * (average_heads ? 1 : p.heads_q) * ceil_div(p.len_q, kPT) * ceil_div(p.len_k, kPT);
  if (tiles == 0) return cudaSuccess;
  float* shift = row_stats;
  float* logl = row_stats + rows;
  return by_dtype(p.dtype, [&](auto tag) {
    using Elem = decltype(tag);
    const cudaError_t err =
        launch_kernel(probs_stats_kernel<Elem>, grid_for(p.batch * p.heads_q * ceil_div(p.len_q, kPT), 1, env.num_sms),
                      kThreads, kTileSmem, 0, env.stream, "probs_stats_kernel", p, shift, logl);
    if (err != cudaSuccess) return err;
    return BOOL_SWITCH(average_heads, kAverage, [&] {
      return launch_kernel(probs_kernel<Elem, kAverage>, grid_for(tiles, 1, env.num_sms), kThreads, kTileSmem, 0,
                           env.stream,
                           "probs_kernel", p, static_cast<const float*>(shift), static_cast<const float*>(logl),
                           static_cast<Elem*>(probs));
    });
  });
}

cudaError_t launch_key_bounds(const FwdParams& p, int32_t* out, const LaunchEnv& env) {
  const int64_t rows = p.batch * p.heads_q;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff || p.len_k > 0x7fffffff || p.mask_kind != MaskKind::kBool) return cudaErrorInvalidValue;
  return launch_kernel(key_bounds_kernel, static_cast<unsigned>(rows), kThreads, 2 * (kThreads / 32) * sizeof(int), 0,
                       env.stream, "key_bounds_kernel", p, out);
}

cudaError_t launch_dropout_mask(const int64_t* seed_offset, int64_t batch, int64_t heads, int64_t len_q,
                                int64_t len_k, double dropout_p, bool* out, cudaStream_t stream) {
  const int64_t rows = batch * heads * len_q;
  const int64_t total = rows * ceil_div(len_k, 4);
  if (total == 0) return cudaSuccess;
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 65536));
  return launch_kernel(dropout_mask_kernel, static_cast<unsigned>(grid), kThreads, 0, 0, stream, "dropout_mask_kernel",
                       seed_offset, rows, len_q, len_k, dropout_p, out);
}

}  // namespace cuda
}  // namespace attention_ext

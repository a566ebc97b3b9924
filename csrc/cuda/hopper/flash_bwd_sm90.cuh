// Flash-attention backward for Hopper (sm_90a): TMA + mbarrier pipeline,
// wgmma for all five matrix products, producer / consumer warp specialisation.
//
// Head dims 64 and 128 ("key split"): one CTA = one (batch, kv head, block
// of 128 keys), 3 warpgroups:
//   warpgroup 0, the producer (setmaxnreg.dec): one thread loads K and V of
//     the key block once, then Q[m] and dO[m] of every (query head of the GQA
//     group, 64-row query block m) that can see the key block into stage
//     it % kStages, after the consumers released that stage;
//   warpgroups 1 and 2, the consumers (setmaxnreg.inc): 64 keys each, with
//     dK and dV of those keys in registers for the whole loop. Per item, in
//     the transposed ("key-major") orientation, so that dK / dV accumulate in
//     place and P^T, dS^T feed the next products straight from registers:
//       S^T  = K_c Q^T        wgmma m64 n64 (keys x queries), A and B from smem
//       dP^T = V_c dO^T       same
//       P^T  = exp((S^T scale [+ key mask] - shift_i) - logl_i)   (row
//              statistics of launch_row_stats, per query column i; P = 0
//              outside the window / causal bound and past L or S)
//       dS^T = P^T o (dP^T - D_i)
//       dV  += P^T dO         wgmma m64 nD, A = P^T from registers, dO N-major
//       dK  += dS^T Q         same with Q
//       dS^T -> shared memory (the 128-byte swizzle, queries contiguous)
//       dQ_c = dS_c K_c       wgmma m64 nD, A = dS M-major, B = K N-major
//                             (for D = 64 the three last products in one group);
//                             staged in shared memory and added to the fp32 dQ
//                             workspace by TMA reduce-adds (one thread, async,
//                             no per-element atomics)
//     then one arrival per consumer warp releases the stage.
//   The two consumer warpgroups share nothing but the Q / dO stages, so one's
//   element-wise work overlaps the other's products on the tensor cores.
// Head dim 256 ("dim split"): dK and dV of 64 keys x 256 dims would take 256
// registers per thread, so a CTA takes 64 keys and the consumers split the
// head dim: consumer c computes S^T and dP^T for the 64 keys and its half of
// the item's queries (wgmma m64 n32), writes P^T and dS^T to shared memory,
// and after one barrier between the consumers owns dims 128c .. 128c + 127:
// dV_c += P^T dO_c, dK_c += dS^T Q_c (A and B from shared memory) and
// dQ_c = dS K_c, staged in its half of the Q / dO stage and added to the
// workspace by TMA reduce-adds before the stage is released.
// Epilogue: dK *= scale, written with dV from registers.
// dQ = scale * workspace, in the input dtype, by launch_dq_convert.
//
// Shared-memory layouts are those of flash_fwd_sm90.cuh (D/64 panels of
// rows x 128 B, 128-byte swizzle): K / V / Q / dO are K-major operands of
// S^T and dP^T and N-major operands (trans-b) of dV, dK and dQ.
//
// Covered (else the sm80 backward runs): fp16 / bf16, dropout (the shared
// Philox stream), no mask gradient, not deterministic, no mask or a
// key-padding mask, head dims <= the bucket (64, 128 or 256), TMA-compatible
// q / k / v / dO.
//
// Packed sequences (kPacked, attention_varlen): the CTAs are (sequence, kv
// head, key block) over the longest sequence's keys; a CTA whose block lies
// past its sequence's keys returns at once, the others run as a batch-1 call
// of their sequence. Q, dO, K and V are read through the maps of
// packed_operand_desc (flash_fwd_sm90.cuh: a tile overhanging the sequence
// reads zeros, not the next sequence's rows), and the dQ workspace, whose
// rows are the (heads_q, L_b) block of sequence b at heads_q * cu_seqlens_q[b]
// (stat_rows), through a map of the same kind over its (head, sequence)
// blocks of rows: the reduce-adds of rows past L_b are dropped by TMA.
#pragma once

#include "flash_fwd_sm90.cuh"

namespace attention_ext {
namespace cuda {
namespace sm90 {

struct Sm90BwdParams {
  BwdParams p;
  BwdWork w;
  TmaDesc tq, tk, tv, tdo;  // 4-d maps (dim, row, head, batch)
  TmaDesc tdq;              // fp32 map of the dQ workspace (dim, row, head, batch), for the TMA reduce-add
};

template <typename Elem_, int kD_, int kStages_>
struct Sm90BwdConfig {
  using Elem = Elem_;
  static constexpr int kD = kD_;
  // D <= 128: the consumers split the keys (64 each) and each holds dK, dV of
  // its keys over the whole head dim. D = 256: dK and dV of 64 keys over 256
  // dims alone would take 256 registers per thread, so the consumers split
  // the head dim instead (128 each) over the same 64 keys, and share P^T and
  // dS^T through shared memory.
  static constexpr bool kDimSplit = kD > 128;
  static constexpr int kBlockM = 64;                      // queries per item
  static constexpr int kBlockN = kDimSplit ? 64 : 128;    // keys per CTA
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kPanels = kD / 64;
  static constexpr int kWgQueries = kDimSplit ? kBlockM / 2 : kBlockM;  // query columns of S^T, dP^T per consumer
  static constexpr int kWgDims = kDimSplit ? kD / 2 : kD;               // head-dim columns of dK, dV, dQ per consumer
  static constexpr int kNTS = kWgQueries / 8;  // n8 tiles of S^T
  static constexpr int kNTD = kWgDims / 8;     // n8 tiles of dK, dV, dQ
  static constexpr uint32_t kKVBytes = kBlockN * kD * 2;
  static constexpr uint32_t kQBytes = kBlockM * kD * 2;
  static constexpr uint32_t kDSBytes = kBlockN * kBlockM * 2;  // dS^T (or P^T): keys x 64 queries
  // dim split: P^T and dS^T, double-buffered (then one barrier per item
  // orders both the writes and the reuse); else dS^T, once
  static constexpr uint32_t kTileBytes = kDimSplit ? 2 * 2 * kDSBytes : kDSBytes;
  // per consumer, its fp32 dQ partial; the dim split stages dQ in its half of
  // the Q / dO stage instead (a 64-row x 256 staging area does not fit)
  static constexpr uint32_t kDQBytes = kDimSplit ? 0 : kBlockM * kD * 4;
  // per stage, the row statistics of the item's queries (shift, logl, D),
  // copied by the producer's second warp
  static constexpr uint32_t kStatBytes = 3 * kBlockM * 4;
  // the mbarriers, then the dropout generator's key and threshold (16 B), then (packed) the sequence's
  // lengths and first rows (16 B)
  static constexpr uint32_t kBarBytes = 8 * (1 + 2 * kStages) + 32;
  static constexpr size_t kSmem = 2 * size_t(kKVBytes) + 2 * kStages * size_t(kQBytes) + kTileBytes +
                                  2 * size_t(kDQBytes) + kStages * size_t(kStatBytes) + 1024 + kBarBytes;
  // arrivals that fill a stage: the TMA thread's (with the bytes) and the 32
  // of the statistics warp
  static constexpr int kFullArrivals = 1 + 32;
  // releases of a stage: every consumer warp, or (dim split) the thread of
  // each consumer whose dQ reduce has read its half of the stage
  static constexpr int kEmptyArrivals = kDimSplit ? 2 : kConsumerWarps;
  // registers per thread after reallocation: 2 x 128 x 240 + 128 x 32 = 64K
  // (the statistics warp's loop spills at 24)
  static constexpr int kProducerRegs = 32;
  static constexpr int kConsumerRegs = 240;
  // dV, dK and dQ in one wgmma group (else dQ waits for dV, dK): only where
  // the three accumulators (and the A fragments of the key split) fit the
  // consumers' registers
  static constexpr bool kFuseDq = kD <= 64 || kDimSplit;
  static_assert(kD % 64 == 0, "head-dim bucket: whole 64-element panels");
  static_assert(kSmem <= 227 * 1024, "sm_90 shared memory per block");
};

template <typename Elem, int kD>
using Sm90BwdCfg = Sm90BwdConfig<Elem, kD, 2>;

namespace bwd {

// Key-padding mask values (0 or -inf / the additive value) of the thread's
// two key rows for query head h: one value per (batch, head, key).
__device__ __forceinline__ void load_key_mask(const BwdParams& p, int64_t b, int64_t h, const int (&jrow)[2],
                                              float (&kmask)[2]) {
  dispatch_mask(p, [&](auto tag) {
    using MaskT = typename decltype(tag)::type;
    if constexpr (!std::is_same<MaskT, void>::value) {
      const void* mrow = key_mask_row<MaskT>(p, b, h);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int64_t j = jrow[hr];
        kmask[hr] = j < p.len_k ? mask_value<MaskT>(mrow, j * p.mask_stride.c) : 0.f;
      }
    }
  });
}

// S^T -> P^T and dP^T -> dS^T in place; element (key row jrow[hr], query
// column i0 + q, q = qcol0 + 8 nt + 2 t + cc) of the wgmma D fragment, with
// stats = the item's row statistics in shared memory (shift[q], logl[kRows +
// q], D[2 kRows + q]):
//   P^T = exp((S^T scale [+ key mask] - shift_i) - logl_i)   (row statistics
//         of launch_row_stats; 0 outside the window / causal bound, past L
//         or S, and in rows that saw no key)
//   dS^T = P^T o (dP^T - D_i)
// With dropout (kDropout, the keep-bits of dropout_bits_t, keep_scale =
// 1 / (1 - p)), as in the sm80 backward: st becomes P^T o Z (the dV operand,
// scaled by keep_scale once in the epilogue) and dS^T = P^T o (dP^T o Z
// keep_scale - D_i).
// cap > 0 (FwdParams::softcap): S^T scale is soft-capped, cap tanh(S^T scale / cap), before the mask, and
// dS^T is multiplied by the cap's derivative 1 - tanh^2. alibi != 0 (the ALiBi slope of the tile's head): the
// capped score takes -alibi |i + S - L - j| before the mask.
template <int kRows, bool kDropout, int NTS>
__device__ __forceinline__ void softmax_grad(const BwdParams& p, const float* stats, float (&st)[1][NTS][4],
                                             float (&dpt)[1][NTS][4], const int (&jrow)[2],
                                             const float (&kmask)[2], int64_t i0, int qcol0, bool all_visible,
                                             float scale, int t, uint32_t bits, float keep_scale, float cap,
                                             float alibi) {
  const int64_t L = p.len_q, S = p.len_k;
#pragma unroll
  for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int q = qcol0 + 8 * nt + 2 * t + cc;
      const int64_t i = i0 + q;
      const bool row_ok = i < L;
      const float shift_raw = stats[q];
      const float shift = (row_ok && shift_raw != -kInf) ? shift_raw : kInf;
      const float logl = stats[kRows + q];
      const float dsum = stats[2 * kRows + q];
      int64_t lo = 0, hi = S;
      if (!all_visible && row_ok) key_range(p, i, lo, hi);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = 2 * hr + cc;
        const bool vis = all_visible || (row_ok && jrow[hr] >= lo && jrow[hr] < hi);
        float y = st[0][nt][r] * scale, dcap = 1.f;
        if (cap > 0.f) {  // cap tanh(y / cap) before the mask (softcap_acc's formula); dS times 1 - tanh^2
          const float th = softcap_tanh(y, 2.f * kLog2e / cap);
          y = cap * th;
          dcap = 1.f - th * th;
        }
        float x = y + kmask[hr];
        if (alibi != 0.f) x -= alibi * fabsf(static_cast<float>(static_cast<int>(i + S - L) - jrow[hr]));
        const float pv = vis ? exp2f(((x - shift) - logl) * kLog2e) : 0.f;
        if constexpr (kDropout) {
          const bool keep = (bits >> (4 * nt + r)) & 1u;
          st[0][nt][r] = keep ? pv : 0.f;
          dpt[0][nt][r] = pv * ((keep ? dpt[0][nt][r] * keep_scale : 0.f) - dsum) * dcap;
        } else {
          st[0][nt][r] = pv;
          dpt[0][nt][r] = pv * (dpt[0][nt][r] - dsum) * dcap;
        }
      }
    }
  }
}

// Dropout keep-bits of a transposed (keys x queries) wgmma D fragment: the
// element (key jrow0 + g + 8 hr, query i_col0 + 8 nt + 2 t + cc) is kept iff
// bit 4 nt + 2 hr + cc of the result is set (NTS <= 8). As everywhere, the
// decision of (query i, key j) is bit j % 4 of keep4(bh, i, j / 4), so
// the four lanes that share t and g / 4 need the same four draws per n8 tile
// (cc, hr = 0, 1): lane g % 4 = m draws combination m and the four exchange
// them by shuffles (one Philox per lane and tile, as in the forward).
// jrow0 (the warp's first key) is a multiple of 4. The tiles are drawn one
// after the other (not unrolled, the bits packed in one register): unrolled,
// ptxas interleaves the eight Philox chains and the D = 128 consumers spill.
template <int NTS>
__device__ __forceinline__ uint32_t dropout_bits_t(const DropoutRng& rng, uint64_t bh, int64_t jrow0, int64_t i_col0,
                                                   int lane) {
  static_assert(NTS <= 8, "four bits per n8 tile in one 32-bit word");
  const int g = lane >> 2, t = lane & 3, m = g & 3;
  const uint64_t j4 = static_cast<uint64_t>(jrow0 / 4 + (g >> 2) + 2 * (m >> 1));
  uint32_t bits = 0;
#pragma unroll 1
  for (int nt = 0; nt < NTS; ++nt) {
    const uint32_t mine = rng.keep4(bh, static_cast<uint64_t>(i_col0 + 8 * nt + 2 * t + (m & 1)), j4);
    uint32_t b = 0;
#pragma unroll
    for (int combo = 0; combo < 4; ++combo) {
      const uint32_t w = __shfl_sync(0xffffffffu, mine, (((g & ~3) + combo) << 2) | t);
      b |= ((w >> m) & 1u) << (2 * (combo >> 1) + (combo & 1));
    }
    bits |= b << (4 * nt);
  }
  return bits;
}

// A keys x queries fragment (the thread's rows 16 cw + g + 8 hr, columns
// col0 + 8 nt + 2 t, + 1) into a tile of 64 rows x 128 B in the 128-byte
// swizzle (16-byte chunk index ^= row % 8), the layout of a K-major wgmma
// operand (keys = M) and of an M-major one (queries = M).
template <typename Elem, int NTS>
__device__ __forceinline__ void store_kq_tile(unsigned char* tile, const float (&x)[1][NTS][4], int col0, int cw,
                                              int g, int t) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = 16 * cw + g + 8 * hr;
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      const int byte = 2 * (col0 + 8 * nt + 2 * t);
      const int sw = r * 128 + ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15));
      *reinterpret_cast<uint32_t*>(tile + sw) = ElemOps<Elem>::pack2(x[0][nt][2 * hr], x[0][nt][2 * hr + 1]);
    }
  }
}

// A dQ fragment (64 queries x 8 NTD dims) as the fp32 map's boxes expect it:
// box(k) = the generic address of the box of dims 32k .. 32k + 31, 64 rows x
// 128 B in the 128-byte swizzle (pairs of columns: 8 bytes inside one
// 16-byte chunk).
template <int NTD, class Box>
__device__ __forceinline__ void stage_dq(const float (&acc)[1][NTD][4], Box box, int cw, int g, int t) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = 16 * cw + g + 8 * hr;
#pragma unroll
    for (int nt = 0; nt < NTD; ++nt) {
      const int col = 8 * nt + 2 * t;
      const int byte = (col & 31) * 4;
      unsigned char* a = box(col >> 5) + r * 128 + ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15));
      float2 v2;
      v2.x = acc[0][nt][2 * hr];
      v2.y = acc[0][nt][2 * hr + 1];
      *reinterpret_cast<float2*>(a) = v2;
    }
  }
}

// dK = scale * sum dS^T Q and dV = dv_scale * sum P^T dO of the thread's key rows,
// head-dim columns col0 + 8 nt + 2 t, + 1.
template <typename Elem, int NTD>
__device__ __forceinline__ void store_dk_dv(const BwdParams& p, int64_t b, int64_t hk, const int (&jrow)[2],
                                            int col0, const float (&acc_dk)[1][NTD][4],
                                            const float (&acc_dv)[1][NTD][4], float scale, float dv_scale, int t) {
  const int E = static_cast<int>(p.dim_qk), Ev = static_cast<int>(p.dim_v);
  Elem* dk = static_cast<Elem*>(p.dk) + b * p.dk_stride.b + hk * p.dk_stride.h;
  Elem* dv = static_cast<Elem*>(p.dv) + b * p.dv_stride.b + hk * p.dv_stride.h;
  const bool pair_dk = reinterpret_cast<uintptr_t>(dk) % (2 * sizeof(Elem)) == 0 && p.dk_stride.r % 2 == 0;
  const bool pair_dv = reinterpret_cast<uintptr_t>(dv) % (2 * sizeof(Elem)) == 0 && p.dv_stride.r % 2 == 0;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t j = jrow[hr];
    if (j < p.len_k) {
      Elem* dkrow = dk + j * p.dk_stride.r;
      Elem* dvrow = dv + j * p.dv_stride.r;
#pragma unroll
      for (int nt = 0; nt < NTD; ++nt) {
        const int col = col0 + 8 * nt + 2 * t;
        store_pair(dkrow + col, acc_dk[0][nt][2 * hr] * scale, acc_dk[0][nt][2 * hr + 1] * scale, col < E,
                   col + 1 < E, pair_dk);
        store_pair(dvrow + col, acc_dv[0][nt][2 * hr] * dv_scale, acc_dv[0][nt][2 * hr + 1] * dv_scale, col < Ev,
                   col + 1 < Ev, pair_dv);
      }
    }
  }
}

}  // namespace bwd

// kDropout / kPacked: compiled separately so that the common case carries no
// RNG state or sequence offsets in the consumers' registers.
template <class Cfg, bool kDropout, bool kPacked>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_bwd_sm90_kernel(const __grid_constant__ Sm90BwdParams P) {
#if defined(AE_SM90_BODY)
  using Elem = typename Cfg::Elem;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int NTS = Cfg::kNTS, NTD = Cfg::kNTD, kPanels = Cfg::kPanels;
  constexpr bool kDimSplit = Cfg::kDimSplit;
  const BwdParams& pc = P.p;  // the call's params (packed: len_q / len_k the longest sequence's)
  const BwdWork& w = P.w;

  AE_DYNAMIC_SMEM(smem_raw);
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sK = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (sK - raw);  // generic pointer of sK
  auto gen = [&](uint32_t a) { return smem + (a - sK); };
  const uint32_t sV = sK + Cfg::kKVBytes;
  const uint32_t sQ0 = sV + Cfg::kKVBytes;             // kStages x Q tiles
  const uint32_t sdO0 = sQ0 + kStages * Cfg::kQBytes;  // kStages x dO tiles
  const uint32_t sTiles = sdO0 + kStages * Cfg::kQBytes;  // dS^T (key split); 2 x (P^T, dS^T) (dim split)
  const uint32_t sdQ = sTiles + Cfg::kTileBytes;           // 2 x the consumers' dQ partials (key split)
  const uint32_t sStat0 = sdQ + 2 * Cfg::kDQBytes;        // kStages x the item's row statistics
  const uint32_t sBar = sStat0 + kStages * Cfg::kStatBytes;
  const uint32_t bar_kv = sBar;
  auto bar_full = [&](int s) { return sBar + 8u * (1 + s); };
  auto bar_empty = [&](int s) { return sBar + 8u * (1 + kStages + s); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

  const int64_t Hq = pc.heads_q, Hkv = pc.heads_kv, G = Hq / Hkv;
  const int64_t nkb = ceil_div(pc.len_k, kBlockN);
  const int64_t kb = static_cast<int64_t>(blockIdx.x) % nkb;
  const int64_t bhk = static_cast<int64_t>(blockIdx.x) / nkb;
  const int64_t hk = bhk % Hkv;
  // packed: from here on the CTA's sequence is the call, of batch 1 (b = 0): its lengths and its dropout
  // stream (seed, offset + sequence); q0 / k0 its first query / key row (the consumers take theirs from
  // seq_words: params_now)
  BwdParams seq;
  int64_t q0 = 0, k0 = 0;
  if constexpr (kPacked) {
    const int64_t sb = bhk / Hkv;
    q0 = pc.cu_seqlens_q[sb];
    k0 = pc.cu_seqlens_k[sb];
    seq = pc;
    seq.batch = 1;
    seq.len_q = pc.cu_seqlens_q[sb + 1] - q0;
    seq.len_k = pc.cu_seqlens_k[sb + 1] - k0;
    seq.offset = pc.offset + static_cast<uint64_t>(sb);
    if (pc.seed_offset_ptr != nullptr) seq.seed_offset_ptr = pc.seed_offset_ptr + 2 * sb;
    seq.cu_seqlens_q = seq.cu_seqlens_k = nullptr;
    if (kb * kBlockN >= seq.len_k) return;  // the block lies past this sequence's keys (uniform over the CTA)
  }
  const BwdParams& p = kPacked ? seq : pc;
  const int64_t L = p.len_q, S = p.len_k;
  const int64_t b = kPacked ? 0 : bhk / Hkv;
  const int64_t j0 = kb * kBlockN;
  const int nk = static_cast<int>(S - j0 < kBlockN ? S - j0 : kBlockN);
  // Query rows that see at least one key of [j0, j0 + nk).
  int64_t ib, ie;
  query_range(p, j0, j0 + nk, ib, ie);
  const int64_t mb_begin = ib / kBlockM;
  int64_t nm = ie > ib ? ceil_div(ie, kBlockM) - mb_begin : 0;
  if (p.key_bounds != nullptr) {  // a key-padding mask that hides these keys from every head of the group
    bool seen = false;
    for (int64_t gi = 0; gi < G; ++gi) {
      const int32_t* kbnd = p.key_bounds + 2 * (b * Hq + hk * G + gi);
      seen = seen || (kbnd[0] < j0 + nk && kbnd[1] > j0);
    }
    if (!seen) nm = 0;  // no item: dK = dV = 0
  }
  const int n_items = static_cast<int>(G * nm);

  if (tid == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full(s), Cfg::kFullArrivals);
      mbar_init(bar_empty(s), Cfg::kEmptyArrivals);
    }
    mbar_fence_init();
  }
  uint32_t* rng_words = reinterpret_cast<uint32_t*>(gen(sBar + 8u * (1 + 2 * kStages)));
  // packed: the sequence's L, S, q0, k0, which the consumers read again where needed rather than keep in
  // registers through their loop (the D = 128 ones spilled them)
  int32_t* seq_words = reinterpret_cast<int32_t*>(rng_words + 4);
  if (kPacked && tid == 64) {
    seq_words[0] = static_cast<int32_t>(L);
    seq_words[1] = static_cast<int32_t>(S);
    seq_words[2] = static_cast<int32_t>(q0);
    seq_words[3] = static_cast<int32_t>(k0);
  }
  if (kDropout && tid == 32) {
    // The consumers rebuild the generator from these words at every item
    // (shared-memory loads the compiler cannot hoist out of the loop): a
    // DropoutRng kept in registers through the loop made the D = 128
    // consumers spill.
    const DropoutRng r = make_rng(p);
    rng_words[0] = r.k0;
    rng_words[1] = r.k1;
    rng_words[2] = r.off_lo;
    rng_words[3] = static_cast<uint32_t>(r.threshold);  // < 2^32: p > 0
  }
  __syncthreads();  // the last CTA-wide barrier: the roles split here

  if (wg == 0) {
    // ---- producer -------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0 && n_items > 0) {
      // TMA rows (r, n): ordinary (row, batch); packed as packed_operand_desc's maps want them
      const int hk32 = static_cast<int>(hk);
      const int kr = static_cast<int>(kPacked ? pc.len_k - S + j0 : j0), kn = static_cast<int>(kPacked ? k0 + S : b);
      const int qr0 = static_cast<int>(kPacked ? pc.len_q - L : 0), qn = static_cast<int>(kPacked ? q0 + L : b);
      mbar_arrive_expect_tx(bar_kv, 2 * Cfg::kKVBytes);
#pragma unroll
      for (int pn = 0; pn < kPanels; ++pn) {
        tma_load_4d(sK + pn * (kBlockN * 128), &P.tk, bar_kv, 64 * pn, kr, hk32, kn);
        tma_load_4d(sV + pn * (kBlockN * 128), &P.tv, bar_kv, 64 * pn, kr, hk32, kn);
      }
      for (int it = 0; it < n_items; ++it) {
        const int s = it % kStages;
        const uint32_t phase = static_cast<uint32_t>(it / kStages) & 1u;
        const int h32 = static_cast<int>(hk * G + it / nm);
        const int i0 = static_cast<int>((mb_begin + it % nm) * kBlockM);
        mbar_wait(bar_empty(s), phase ^ 1u);
        mbar_arrive_expect_tx(bar_full(s), 2 * Cfg::kQBytes);
#pragma unroll
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_4d(sQ0 + s * Cfg::kQBytes + pn * (kBlockM * 128), &P.tq, bar_full(s), 64 * pn, qr0 + i0, h32, qn);
          tma_load_4d(sdO0 + s * Cfg::kQBytes + pn * (kBlockM * 128), &P.tdo, bar_full(s), 64 * pn, qr0 + i0, h32,
                      qn);
        }
      }
    } else if (warp == 1 && n_items > 0) {
      // The second warp copies each item's row statistics (shift, logl and D
      // of its 64 queries; 0 past L, where the consumers ignore them) into
      // the stage, so that the consumers read them from shared memory right
      // after their S^T product instead of waiting on global loads there.
      for (int it = 0; it < n_items; ++it) {
        const int s = it % kStages;
        const uint32_t phase = static_cast<uint32_t>(it / kStages) & 1u;
        // the item's rows: (b * Hq + h) * L + i, packed Hq * q0 + h * L + i (stat_rows)
        const int64_t row0 = (kPacked ? Hq * q0 : b * Hq * L) + (hk * G + it / nm) * L;
        const int64_t i0 = (mb_begin + it % nm) * kBlockM;
        float* dst = reinterpret_cast<float*>(gen(sStat0 + s * Cfg::kStatBytes));
        mbar_wait(bar_empty(s), phase ^ 1u);
#pragma unroll
        for (int r = lane; r < kBlockM; r += 32) {
          const bool ok = i0 + r < L;
          const int64_t idx = row0 + i0 + r;
          dst[r] = ok ? w.row_shift[idx] : 0.f;
          dst[kBlockM + r] = ok ? w.row_logl[idx] : 0.f;
          dst[2 * kBlockM + r] = ok ? w.dsum[idx] : 0.f;
        }
        mbar_arrive(bar_full(s));  // release: the stores above before the consumers' acquire
      }
    }
    return;
  }

  // ---- consumers ----------------------------------------------------------
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  // the call's params as the consumers use them: packed, the sequence's, from seq_words (volatile shared-memory
  // loads, issued where they stand)
  auto params_now = [&] {
    if constexpr (kPacked) {
      const volatile int32_t* sw = seq_words;
      BwdParams ps = pc;
      ps.batch = 1;
      ps.len_q = sw[0];
      ps.len_k = sw[1];
      ps.dk = static_cast<Elem*>(pc.dk) + static_cast<int64_t>(sw[3]) * pc.dk_stride.r;
      ps.dv = static_cast<Elem*>(pc.dv) + static_cast<int64_t>(sw[3]) * pc.dv_stride.r;
      return ps;
    } else {
      return pc;
    }
  };
  const int c = wg - 1;     // key split: keys 64c .. 64c + 63; dim split: head dims c kWgDims ..
  const int cw = warp & 3;  // warp in the warpgroup: key rows 16 cw .. 16 cw + 15 of its 64
  const int g = lane >> 2, t = lane & 3;
  const float scale = static_cast<float>(pc.scale);
  const int key0 = kDimSplit ? 0 : 64 * c;  // the warpgroup's first key in the block
  const float keep_scale = kDropout ? static_cast<float>(DropoutRng::inv_keep_of(pc.dropout_p)) : 1.f;

  float acc_dk[1][NTD][4], acc_dv[1][NTD][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // the two key rows of this thread and their key-padding mask values
  int jrow[2];  // 32-bit: the launcher checks S < 2^31
  float kmask[2] = {0.f, 0.f};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) jrow[hr] = static_cast<int>(j0) + key0 + 16 * cw + g + 8 * hr;

  if (n_items > 0) mbar_wait(bar_kv, 0);
  for (int it = 0; it < n_items; ++it) {
    const int s = it % kStages;
    const uint32_t phase = static_cast<uint32_t>(it / kStages) & 1u;
    // 32-bit (the launcher checks L, Hq < 2^31): registers are scarce here
    const int h = static_cast<int>(hk * G + it / nm);
    const int i0 = static_cast<int>((mb_begin + it % nm) * kBlockM);
    const uint32_t sQ = sQ0 + s * Cfg::kQBytes, sdO = sdO0 + s * Cfg::kQBytes;

    // S^T = K_c Q^T and dP^T = V_c dO^T: 64 keys (the warpgroup's, or the
    // block's) x kWgQueries queries (the item's, or the warpgroup's half)
    const uint32_t sKc = sK + key0 * 128, sVc = sV + key0 * 128;
    const uint32_t qoff = kDimSplit ? c * (Cfg::kWgQueries * 128) : 0;  // 1024-byte aligned: the swizzle atom
    const int qcol0 = kDimSplit ? c * Cfg::kWgQueries : 0;  // the thread's first query column in the item
    // dropout keep-bits, drawn before the products (their temporaries then do
    // not coexist with the S^T / dP^T accumulators) by a generator rebuilt
    // from shared memory (kept in registers through the loop, its state made
    // the D = 128 consumers spill)
    uint32_t bits = 0;
    if constexpr (kDropout) {
      DropoutRng rng;
      rng.k0 = rng_words[0];
      rng.k1 = rng_words[1];
      rng.off_lo = rng_words[2];
      rng.threshold = rng_words[3];
      bits = bwd::dropout_bits_t<NTS>(rng, static_cast<uint64_t>(b * Hq + h), j0 + key0 + 16 * cw, i0 + qcol0, lane);
    }
    float st[1][NTS][4], dpt[1][NTS][4];
    mbar_wait(bar_full(s), phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = static_cast<uint32_t>(kk & 3) * 32u;  // k16 step inside the 64-element panel
      const uint64_t da = make_smem_desc(sKc + (kk >> 2) * (kBlockN * 128) + off, 16, 1024, kSwizzle128B);
      const uint64_t db = make_smem_desc(sQ + (kk >> 2) * (kBlockM * 128) + qoff + off, 16, 1024, kSwizzle128B);
      wgmma_ss<Cfg::kWgQueries, Elem, 0, 0>(flat(st), da, db, kk > 0 ? 1 : 0);
    }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = static_cast<uint32_t>(kk & 3) * 32u;
      const uint64_t da = make_smem_desc(sVc + (kk >> 2) * (kBlockN * 128) + off, 16, 1024, kSwizzle128B);
      const uint64_t db = make_smem_desc(sdO + (kk >> 2) * (kBlockM * 128) + qoff + off, 16, 1024, kSwizzle128B);
      wgmma_ss<Cfg::kWgQueries, Elem, 0, 0>(flat(dpt), da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence_all(st);
    reg_fence_all(dpt);

    // key-padding mask values, loaded here rather than before the products
    // (fewer registers live across them)
    const BwdParams pi = params_now();
    if (pi.mask_kind != MaskKind::kNone) bwd::load_key_mask(pi, b, h, jrow, kmask);
    const bool all_visible =
        i0 + kBlockM <= pi.len_q && tile_fully_visible(pi, i0, i0 + kBlockM - 1, j0, kBlockN);
    bwd::softmax_grad<kBlockM, kDropout>(pi, reinterpret_cast<const float*>(gen(sStat0 + s * Cfg::kStatBytes)), st,
                                         dpt, jrow, kmask, i0, qcol0, all_visible, scale, t, bits, keep_scale,
                                         kPacked ? 0.f : static_cast<float>(pc.softcap),  // (packed: no cap)
                                         kPacked ? 0.f : alibi_slope(pc, b, h));          // (nor ALiBi)

    float acc_dq[1][NTD][4];
    if constexpr (!kDimSplit) {
      // ---- key split: P^T (and dS^T) are A fragments from registers --------
      // With dropout, dK reads dS^T from shared memory instead (16 registers
      // fewer in the products: as a fragment, the D = 128 variant spilled
      // 28 B, this way 8 B).
      constexpr bool kDsFromSmem = kDropout;
      uint32_t pa[NTS / 2][4], dsa[kDsFromSmem ? 1 : NTS / 2][4];
#pragma unroll
      for (int kk = 0; kk < NTS / 2; ++kk) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            pa[kk][2 * half + hr] = ElemOps<Elem>::pack2(st[0][2 * kk + half][2 * hr], st[0][2 * kk + half][2 * hr + 1]);
            if constexpr (!kDsFromSmem) {
              dsa[kk][2 * half + hr] =
                  ElemOps<Elem>::pack2(dpt[0][2 * kk + half][2 * hr], dpt[0][2 * kk + half][2 * hr + 1]);
            }
          }
        }
      }
      // dS^T to shared memory (this warpgroup's 64 keys x 64 queries) for dQ
      // (M-major A) and, with dropout, dK (K-major A).
      // The previous item's dQ product, the last reader, completed before the
      // barrier that ended that item.
      const uint32_t sdSc = sTiles + c * (64 * 128);
      bwd::store_kq_tile<Elem>(gen(sdSc), dpt, 0, cw, g, t);
      fence_proxy_async();  // the generic-proxy stores, before wgmma reads them
      // the previous item's dQ reduce has read sdQ_c (its issuing thread
      // waits), so that the stores below may overwrite it once every thread is
      // past the barrier
      if ((tid & 127) == 0) bulk_wait_read<0>();
      named_barrier_sync(1 + c, 128);  // every thread of the warpgroup wrote its part of dS

      //   dV += P^T dO, dK += dS^T Q   (A from registers (dS^T from shared memory with
      //                                 dropout); B N-major: 16 queries = 2048 B per k16
      //                                 step, LBO = the 64-row panel stride)
      //   dQ_c = dS_c K_c              (A = dS, 64 queries x 64 keys, M-major; B = K_c N-major)
      reg_fence_all(acc_dv);
      reg_fence_all(acc_dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < NTS / 2; ++kk) {
        const uint64_t db = make_smem_desc(sdO + kk * 2048, kBlockM * 128, 1024, kSwizzle128B);
        wgmma_rs<kD, Elem, 1>(flat(acc_dv), pa[kk], db, 1);
      }
#pragma unroll
      for (int kk = 0; kk < NTS / 2; ++kk) {
        const uint64_t db = make_smem_desc(sQ + kk * 2048, kBlockM * 128, 1024, kSwizzle128B);
        if constexpr (kDsFromSmem) {
          const uint64_t da = make_smem_desc(sdSc + kk * 32, 16, 1024, kSwizzle128B);
          wgmma_ss<kD, Elem, 0, 1>(flat(acc_dk), da, db, 1);
        } else {
          wgmma_rs<kD, Elem, 1>(flat(acc_dk), dsa[kk], db, 1);
        }
      }
      if constexpr (!Cfg::kFuseDq) {
        // D = 128: dK, dV, dQ and the A fragments together exceed the 240
        // registers (ptxas serialises and spills): finish dV, dK first
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence_all(acc_dv);
        reg_fence_all(acc_dk);
        wgmma_fence();
      }
#pragma unroll
      for (int kk = 0; kk < 64 / 16; ++kk) {
        const uint64_t da = make_smem_desc(sdSc + kk * 2048, 64 * 128, 1024, kSwizzle128B);
        const uint64_t db = make_smem_desc(sKc + kk * 2048, kBlockN * 128, 1024, kSwizzle128B);
        wgmma_ss<kD, Elem, 1, 1>(flat(acc_dq), da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();  // every read of the stage and of sdS is done
      reg_fence_all(acc_dq);
      reg_fence_all(acc_dv);
      reg_fence_all(acc_dk);
      if (lane == 0) mbar_arrive(bar_empty(s));

      // dQ_c to its staging area, then one thread adds it to the dQ workspace
      // with TMA reduce-adds (elements past L are skipped by TMA)
      const uint32_t sdQc = sdQ + c * Cfg::kDQBytes;
      auto dq_box = [&](int k) { return sdQc + k * (kBlockM * 128); };  // shared address of box k
      bwd::stage_dq(acc_dq, [&](int k) { return gen(dq_box(k)); }, cw, g, t);
      fence_proxy_async();  // the stores, before the async proxy (TMA) reads them
      // every thread wrote its part of dQ_c, and is past its dQ product (the
      // next item rewrites sdS)
      named_barrier_sync(1 + c, 128);
      if ((tid & 127) == 0) {
#pragma unroll
        for (int k = 0; k < kD / 32; ++k) {
          if constexpr (kPacked) {
            const volatile int32_t* sw = seq_words;
            const int Ls = sw[0], q0s = sw[2];
            tma_reduce_add_4d(&P.tdq, dq_box(k), 32 * k, static_cast<int>(pc.len_q) - Ls + i0, 0,
                              static_cast<int>(Hq * q0s + (h + 1) * Ls));
          } else {
            tma_reduce_add_4d(&P.tdq, dq_box(k), 32 * k, static_cast<int>(i0), static_cast<int>(h),
                              static_cast<int>(b));
          }
        }
        bulk_commit();
      }
    } else {
      // ---- dim split: P^T and dS^T through shared memory -------------------
      // Each warpgroup writes its 32 query columns of both; the barrier below
      // publishes them. Double buffering makes that barrier enough for the
      // reuse too: a warpgroup writes buffer it % 2 again at item it + 2, after
      // the barrier of item it + 1, which the other passed only after its
      // products of item it had completed.
      const uint32_t sP = sTiles + (it & 1) * (2 * Cfg::kDSBytes), sdS = sP + Cfg::kDSBytes;
      bwd::store_kq_tile<Elem>(gen(sP), st, qcol0, cw, g, t);
      bwd::store_kq_tile<Elem>(gen(sdS), dpt, qcol0, cw, g, t);
      fence_proxy_async();                 // the generic-proxy stores, before wgmma reads them
      named_barrier_sync(3, 256);          // both consumers wrote their halves

      // This warpgroup's head dims c kWgDims .. (two 64-dim panels, 2c and 2c + 1):
      //   dV_c += P^T dO_c, dK_c += dS^T Q_c   (A: 64 keys x 64 queries, K-major,
      //                                         B N-major, 2048 B per k16 step)
      //   dQ_c = dS K_c                        (A = dS M-major; B = K_c N-major)
      const uint32_t pan = 2 * c;
      reg_fence_all(acc_dv);
      reg_fence_all(acc_dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        const uint64_t da = make_smem_desc(sP + kk * 32, 16, 1024, kSwizzle128B);
        const uint64_t db = make_smem_desc(sdO + pan * (kBlockM * 128) + kk * 2048, kBlockM * 128, 1024, kSwizzle128B);
        wgmma_ss<Cfg::kWgDims, Elem, 0, 1>(flat(acc_dv), da, db, 1);
      }
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        const uint64_t da = make_smem_desc(sdS + kk * 32, 16, 1024, kSwizzle128B);
        const uint64_t db = make_smem_desc(sQ + pan * (kBlockM * 128) + kk * 2048, kBlockM * 128, 1024, kSwizzle128B);
        wgmma_ss<Cfg::kWgDims, Elem, 0, 1>(flat(acc_dk), da, db, 1);
      }
      static_assert(Cfg::kFuseDq, "dim split: dV, dK and dQ in one wgmma group (no A fragments in registers)");
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint64_t da = make_smem_desc(sdS + kk * 2048, 64 * 128, 1024, kSwizzle128B);
        const uint64_t db = make_smem_desc(sK + pan * (kBlockN * 128) + kk * 2048, kBlockN * 128, 1024, kSwizzle128B);
        wgmma_ss<Cfg::kWgDims, Elem, 1, 1>(flat(acc_dq), da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence_all(acc_dq);
      reg_fence_all(acc_dv);
      reg_fence_all(acc_dk);

      // dQ_c staged in this warpgroup's half of the stage, Q panels 2c, 2c + 1
      // then dO panels 2c, 2c + 1 (8 KB each, one fp32 box of 32 dims): since
      // the barrier above only this warpgroup reads them, and its products
      // are complete. One thread adds the boxes to the dQ workspace, waits
      // until TMA has read them and releases the stage.
      auto dq_box = [&](int k) { return (k < 2 ? sQ : sdO) + (pan + (k & 1)) * (kBlockM * 128); };
      bwd::stage_dq(acc_dq, [&](int k) { return gen(dq_box(k)); }, cw, g, t);
      fence_proxy_async();
      named_barrier_sync(1 + c, 128);  // every thread wrote its part of dQ_c
      if ((tid & 127) == 0) {
#pragma unroll
        for (int k = 0; k < Cfg::kWgDims / 32; ++k) {
          if constexpr (kPacked) {
            const volatile int32_t* sw = seq_words;
            const int Ls = sw[0], q0s = sw[2];
            tma_reduce_add_4d(&P.tdq, dq_box(k), c * Cfg::kWgDims + 32 * k, static_cast<int>(pc.len_q) - Ls + i0, 0,
                              static_cast<int>(Hq * q0s + (h + 1) * Ls));
          } else {
            tma_reduce_add_4d(&P.tdq, dq_box(k), c * Cfg::kWgDims + 32 * k, static_cast<int>(i0),
                              static_cast<int>(h), static_cast<int>(b));
          }
        }
        bulk_commit();
        bulk_wait_read<0>();
        mbar_arrive(bar_empty(s));
      }
    }
  }
  if ((tid & 127) == 0) bulk_wait<0>();  // the reduces are complete before the CTA (and its shared memory) ends

  bwd::store_dk_dv<Elem>(params_now(), b, hk, jrow, kDimSplit ? c * Cfg::kWgDims : 0, acc_dk, acc_dv, scale, keep_scale,
                         t);
#endif  // AE_SM90_BODY
}

// Launches the kernel, or returns cudaErrorNotSupported without launching
// when the call is outside what it covers (the caller runs the sm80 kernel).
template <class Cfg, bool kDropout, bool kPacked>
cudaError_t launch_bwd_sm90(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  if (!covers_mask(p) || p.dim_qk > Cfg::kD || p.dim_v > Cfg::kD || p.dmask != nullptr || w.deterministic || w.nsplit != 1 || w.dq_row_stride != Cfg::kD) {
    return cudaErrorNotSupported;
  }
  if (p.len_q > 0x7fffffff || p.len_k > 0x7fffffff || p.heads_q > 0x7fffffff || p.batch > 0x7fffffff) {
    return cudaErrorNotSupported;
  }
  // (the packed variants have no cap and no ALiBi)
  if (kPacked && (p.softcap > 0.0 || p.alibi_slopes != nullptr)) return cudaErrorNotSupported;
  const int64_t blocks = ceil_div(p.len_k, Cfg::kBlockN) * p.batch * p.heads_kv;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorNotSupported;
  Sm90BwdParams P;
  P.p = p;
  P.w = w;
  if (kPacked) {
    if (p.mask_kind != MaskKind::kNone || p.total_q > 0x7ffffffe || p.total_k > 0x7ffffffe ||
        p.heads_q * p.total_q > 0x7ffffffe) {
      return cudaErrorNotSupported;
    }
    if (packed_operand_desc(&P.tq, p.q, p.q_stride, p.heads_q, p.len_q, p.total_q, p.dim_qk, Cfg::kBlockM) != nullptr ||
        packed_operand_desc(&P.tdo, p.dout, p.do_stride, p.heads_q, p.len_q, p.total_q, p.dim_v, Cfg::kBlockM) !=
            nullptr ||
        packed_operand_desc(&P.tk, p.k, p.k_stride, p.heads_kv, p.len_k, p.total_k, p.dim_qk, Cfg::kBlockN) != nullptr ||
        packed_operand_desc(&P.tv, p.v, p.v_stride, p.heads_kv, p.len_k, p.total_k, p.dim_v, Cfg::kBlockN) != nullptr) {
      return cudaErrorNotSupported;
    }
    // dQ workspace: the (heads_q, L_b) blocks of rows of kD floats, one per sequence (stat_rows). The block of
    // (head h, sequence [s, e)) ends at row n = Hq s + (h + 1) L_b; row i of it is (r, n) = (R - L_b + i, n) at
    // base - R rows + (r + n) rows (R the longest sequence), inside the map exactly for i < L_b
    const uint64_t row = static_cast<uint64_t>(Cfg::kD) * 4;
    const uint64_t R = static_cast<uint64_t>(p.len_q);
    const uint64_t dims[4] = {static_cast<uint64_t>(Cfg::kD), R, 1, static_cast<uint64_t>(p.heads_q * p.total_q) + 1};
    const uint64_t strides[3] = {row, row * R, row};
    const uint32_t box[4] = {32, Cfg::kBlockM, 1, 1};
    const void* base = reinterpret_cast<const unsigned char*>(w.dq_accum) - static_cast<ptrdiff_t>(row * R);
    if (make_tma_desc_4d(&P.tdq, base, dims, strides, box, kSwizzle128B, 4) != nullptr) return cudaErrorNotSupported;
  } else if (make_operand_desc(&P.tq, p.q, p.q_stride, p.batch, p.heads_q, p.len_q, p.dim_qk, Cfg::kBlockM) != nullptr ||
             make_operand_desc(&P.tdo, p.dout, p.do_stride, p.batch, p.heads_q, p.len_q, p.dim_v, Cfg::kBlockM) !=
                 nullptr ||
             make_operand_desc(&P.tk, p.k, p.k_stride, p.batch, p.heads_kv, p.len_k, p.dim_qk, Cfg::kBlockN) !=
                 nullptr ||
             make_operand_desc(&P.tv, p.v, p.v_stride, p.batch, p.heads_kv, p.len_k, p.dim_v, Cfg::kBlockN) !=
                 nullptr) {
    return cudaErrorNotSupported;
  }
  if (!kPacked) {  // dQ workspace: rows (b * Hq + h) * L + i of kD floats
    const uint64_t row = static_cast<uint64_t>(Cfg::kD) * 4;
    const uint64_t dims[4] = {static_cast<uint64_t>(Cfg::kD), static_cast<uint64_t>(p.len_q),
                              static_cast<uint64_t>(p.heads_q), static_cast<uint64_t>(p.batch)};
    const uint64_t strides[3] = {row, row * dims[1], row * dims[1] * dims[2]};
    const uint32_t box[4] = {32, Cfg::kBlockM, 1, 1};
    if (make_tma_desc_4d(&P.tdq, w.dq_accum, dims, strides, box, kSwizzle128B, 4) != nullptr) {
      return cudaErrorNotSupported;
    }
  }
  return launch_kernel(flash_bwd_sm90_kernel<Cfg, kDropout, kPacked>, static_cast<unsigned>(blocks), Cfg::kThreads,
                       Cfg::kSmem, Cfg::kSmem, env.stream, "flash_bwd_sm90_kernel", P);
}

template <typename Elem, int kD>
cudaError_t run_bwd_sm90(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  return BOOL_SWITCH(p.dropout_p > 0.0, kDropout, [&] {
    if (p.cu_seqlens_q != nullptr) return launch_bwd_sm90<Sm90BwdCfg<Elem, kD>, kDropout, true>(p, w, env);
    return launch_bwd_sm90<Sm90BwdCfg<Elem, kD>, kDropout, false>(p, w, env);
  });
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

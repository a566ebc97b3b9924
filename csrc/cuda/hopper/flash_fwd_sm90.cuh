// Flash-attention forward for Hopper (sm_90a): TMA loads into a multi-stage
// shared-memory pipeline on mbarriers, wgmma for both matrix products,
// producer / consumer warp specialisation with register reallocation.
//
// Persistent: one CTA per multiprocessor walks output tiles (batch, query
// head, block of 128 query rows), longest causal blocks first; 3 warpgroups:
//   warpgroup 0, the producer: gives its registers away (setmaxnreg.dec) and
//     one thread issues every TMA copy: Q once, then K[n] and V[n] of each
//     visible key tile into stage n % kStages, each after the consumers
//     released the previous tile's K (bar_k_empty) or V (bar_v_empty);
//   warpgroups 1 and 2, the consumers: 64 query rows each (setmaxnreg.inc),
//     in rounds: round it issues S[it] = Q K[it]^T (wgmma m64 n128 k16, A and
//     B from shared memory) together with O += P[it-1] V[it-1] (wgmma m64 nD
//     k16, P from registers: the D fragment of two n8 tiles of S is the A
//     fragment of one k16 step; V N-major), waits for S[it] only, releases
//     K[it], runs the scale / masks / online softmax of S[it] (each row in
//     the 4 lanes of a quad, the layout of the sm80 kernel with one 16-row
//     m-tile per warp) while P V is in flight, then waits for it, releases
//     V[it-1], rescales O and packs P[it] (intra-warpgroup pipelining);
//     the two consumers take turns issuing their products (ping-pong on two
//     named barriers), so one's softmax overlaps the other's products;
//   and write O and the log-sum-exp from registers.
// Shared memory: Q (128 x D), kStages x K (128 x D), kStages x V (128 x D),
// each stored as D/64 panels of rows x 128 bytes in the 128-byte swizzle that
// TMA writes and wgmma reads (PTX ISA "Shared Memory Matrix Layout":
// K-major atoms of 8 rows x 64 elements; LBO unused, SBO = 1024 bytes between
// 8-row groups; a k16 step inside a panel advances the start address by 32 B).
// V is read N-major (trans-b): atoms of 64 head-dim elements x 8 keys, SBO =
// 1024 B between 8-key groups, LBO = the panel stride (64 head-dim elements
// further), a k16 step = 16 keys = 2048 B.
//
// Covered (the dispatcher in registry.cpp falls back to the sm80 kernels
// otherwise): fp16 / bf16, no mask or a key-padding mask (one row of bool /
// additive values per (batch, head), broadcast over the queries; for a boolean
// one the glue passes FwdParams::key_bounds and the key tiles outside its span
// of true keys are never loaded), head dims <= the bucket (64,
// 128 or 256; zero-filled by TMA past E / Ev), any window / causal bound, GQA / MQA,
// dropout, q / k / v / out with 16-byte aligned bases and strides (TMA).
//
// Packed sequences (kPacked, FwdParams::cu_seqlens_q: attention_varlen) in
// the same launch: the tiles are (sequence, head, query block) over the
// longest sequence (blocks past a sequence's end have nothing to do), and
// each tile reads its sequence's offsets and lengths. TMA zero-fills only past
// the end of a tensor, so that a tile that overhangs its sequence reads zeros
// rather than the next sequence's rows (whose values may be inf or NaN: 0 x
// inf in P V would reach this sequence), the maps of packed q, k and v are
// made so that every sequence ends where a dimension does: rows (dim, r, head,
// n) at address base - R rows + (r + n) rows, R the longest sequence. Row j of
// a sequence [s, e) is (r, n) = (R - (e - s) + j, e): r < R exactly for its own
// rows, and r >= 0 for all of them (packed_operand_desc).
#pragma once

#include "../flash_fwd.cuh"
#include "../static_switch.h"
#include "sm90_ptx.cuh"

namespace attention_ext {
namespace cuda {
namespace sm90 {

struct Sm90FwdParams {
  FwdParams p;
  TmaDesc tq, tk, tv;  // 4-d maps (dim, row, head, batch) of q, k, v
};

template <typename Elem_, int kD_, int kBlockN_, int kStages_>
struct Sm90FwdConfig {
  using Elem = Elem_;
  static constexpr int kD = kD_;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 rows
  static constexpr int kBlockN = kBlockN_;  // keys per tile (S is m64 n kBlockN per consumer)
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kPanels = kD / 64;
  static constexpr int kNTS = kBlockN / 8;  // n8 tiles of S per thread row pair
  static constexpr int kNTO = kD / 8;
  static constexpr uint32_t kQBytes = kBlockM * kD * 2;
  static constexpr uint32_t kKVBytes = kBlockN * kD * 2;
  static constexpr uint32_t kBarBytes = 8 * (2 + 4 * kStages);
  // + 1024: the dynamic shared memory is re-aligned to the 1024-byte swizzle atom
  static constexpr size_t kSmem = size_t(kQBytes) + 2 * kStages * size_t(kKVBytes) + 1024 + kBarBytes;
  // registers per thread after reallocation: 2 x 128 x 240 + 128 x 32 = 64K
  // (the producer's tile loop needs more than 24 without spilling)
  static constexpr int kProducerRegs = 32;
  static constexpr int kConsumerRegs = 240;
  static_assert(kD % 64 == 0, "head-dim bucket: whole 64-element panels");
  static_assert(kSmem <= 227 * 1024, "sm_90 shared memory per block");
};

template <int N>
__device__ __forceinline__ float (&flat(float (&a)[1][N][4]))[4 * N] {
  return reinterpret_cast<float(&)[4 * N]>(a);
}

// The key-padding mask row of (batch b, head h): one MaskT per key at stride
// mask_stride.c, the same for every query row.
template <typename MaskT>
__device__ __forceinline__ const void* key_mask_row(const FwdParams& p, int64_t b, int64_t h) {
  return static_cast<const unsigned char*>(p.mask) +
         (b * p.mask_stride.b + h * p.mask_stride.h) * static_cast<int64_t>(sizeof(MaskT));
}

// kDropout / kMask / kPacked: compiled separately so that the common case
// carries no RNG state, mask pointer or sequence offsets in the consumers' 240
// registers.
template <class Cfg, bool kDropout, bool kMask, bool kPacked>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_fwd_sm90_kernel(const __grid_constant__ Sm90FwdParams P) {
#if defined(AE_SM90_BODY)
  static_assert(!(kPacked && kMask), "packed sequences come without a mask");
  using Elem = typename Cfg::Elem;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int NTS = Cfg::kNTS, NTO = Cfg::kNTO, kPanels = Cfg::kPanels;
  const FwdParams& pc = P.p;  // the call's params (packed: len_q / len_k the longest sequence's)

  AE_DYNAMIC_SMEM(smem_raw);
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023u) & ~1023u;
  const uint32_t sK0 = sQ + Cfg::kQBytes;
  const uint32_t sV0 = sK0 + kStages * Cfg::kKVBytes;
  const uint32_t sBar = sV0 + kStages * Cfg::kKVBytes;
  const uint32_t bar_q = sBar, bar_q_empty = sBar + 8;
  auto bar_k = [&](int s) { return sBar + 8u * (2 + s); };
  auto bar_v = [&](int s) { return sBar + 8u * (2 + kStages + s); };
  auto bar_k_empty = [&](int s) { return sBar + 8u * (2 + 2 * kStages + s); };
  auto bar_v_empty = [&](int s) { return sBar + 8u * (2 + 3 * kStages + s); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

  // 32-bit tile arithmetic (the launcher checks that L, S, B, H and the tile
  // count fit): 64-bit divisions would cost the 32-register producer spills
  // (the head counts are read from the params where used rather than computed once before the roles split:
  // values live across the split cost the packed variants spills)
  auto heads = [&] { return static_cast<int>(pc.heads_q); };
  auto batch_heads = [&] { return static_cast<int>(pc.batch) * heads(); };
  const int total = static_cast<int>(ceil_div(pc.len_q, kBlockM)) * batch_heads();  // tiles (batch, head, query block)

  // Persistent grid: CTA x takes tiles x, x + gridDim, ... of a longest-first
  // order (the last query blocks, which see the most keys under a causal mask,
  // come first for every (batch, head)), so the static round-robin hands out
  // the big causal tiles before the small ones.
  // A tile's TMA coordinates: Q rows (qr, qn) (its row and batch coordinates),
  // key tile j0 at rows (kr0 + j0, kn); ordinary calls (i0, b) and (j0, b),
  // packed ones as the maps of packed_operand_desc want them. L / S: the
  // sequence's lengths (ordinary: the call's).
  struct Tile {
    int bh, b, h, hk, i0, n_begin, nq, n_tiles;
    int qr, qn, kr0, kn;
    int L, S;
  };
  auto tile_at = [&](int id) {
    Tile T;
    const int mb = static_cast<int>(ceil_div(pc.len_q, kBlockM)) - 1 - id / batch_heads();
    T.bh = id % batch_heads();
    T.b = T.bh / heads();
    T.h = T.bh % heads();
    T.hk = T.h / static_cast<int>(pc.heads_q / pc.heads_kv);
    T.i0 = mb * kBlockM;
    if constexpr (kPacked) {
      const int q0 = pc.cu_seqlens_q[T.b], q1 = pc.cu_seqlens_q[T.b + 1];
      const int k0 = pc.cu_seqlens_k[T.b], k1 = pc.cu_seqlens_k[T.b + 1];
      T.L = q1 - q0;
      T.S = k1 - k0;
      T.qr = static_cast<int>(pc.len_q) - T.L + T.i0;
      T.qn = q1;
      T.kr0 = static_cast<int>(pc.len_k) - T.S;
      T.kn = k1;
      if (T.i0 >= T.L) {  // past the end of this sequence
        T.nq = T.n_begin = T.n_tiles = 0;
        return T;
      }
    } else {
      T.L = static_cast<int>(pc.len_q);
      T.S = static_cast<int>(pc.len_k);
      T.qr = T.i0;
      T.qn = T.b;
      T.kr0 = 0;
      T.kn = T.b;
    }
    T.nq = T.L - T.i0 < kBlockM ? T.L - T.i0 : kBlockM;
    // Union of the visible key ranges of the block's rows (bounds are monotone in i).
    int64_t lo0, hi0, lo1, hi1;
    key_range(pc, T.S, T.i0, lo0, hi0);
    key_range(pc, T.S, T.i0 + T.nq - 1, lo1, hi1);
    const int64_t jlo = lo0, jhi = hi1 > lo0 ? hi1 : lo0;
    T.n_begin = static_cast<int>(jlo / kBlockN);
    T.n_tiles = static_cast<int>(jhi > jlo ? ceil_div(jhi, kBlockN) - T.n_begin : 0);
    if (kMask && pc.key_bounds != nullptr) {
      // a key-padding mask: only the tiles of its span of true keys (32-bit, one 8-byte load: the
      // consumers of the dropout variants have no register to spare)
      const int2 kb = *reinterpret_cast<const int2*>(pc.key_bounds + 2 * T.bh);
      const int nb = kb.x / kBlockN, ne = kb.y > kb.x ? (kb.y + kBlockN - 1) / kBlockN : nb;
      const int b0 = T.n_begin > nb ? T.n_begin : nb;
      const int e0 = T.n_begin + T.n_tiles < ne ? T.n_begin + T.n_tiles : ne;
      T.n_begin = b0;
      T.n_tiles = e0 > b0 ? e0 - b0 : 0;
    }
    return T;
  };

  if (tid == 0) {
    mbar_init(bar_q, 1);
    mbar_init(bar_q_empty, Cfg::kConsumerWarps);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_k(s), 1);
      mbar_init(bar_v(s), 1);
      mbar_init(bar_k_empty(s), Cfg::kConsumerWarps);
      mbar_init(bar_v_empty(s), Cfg::kConsumerWarps);
    }
    mbar_fence_init();
  }
  __syncthreads();  // the last CTA-wide barrier: the roles split here

  // Pipeline positions, counted over the CTA's whole sequence of tiles in both
  // roles: kv = key tiles loaded so far (stage kv % kStages, phase
  // (kv / kStages) & 1), qi = query blocks loaded so far (tiles that see a key).
  if (wg == 0) {
    // ---- producer -------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0) {
      tma_prefetch_desc(&P.tq);
      tma_prefetch_desc(&P.tk);
      tma_prefetch_desc(&P.tv);
      uint32_t kv = 0;  // wraps modulo 2^32: kStages divides it, stages and phases stay right
      uint32_t qi = 0;
      for (int id = static_cast<int>(blockIdx.x); id < total; id += static_cast<int>(gridDim.x)) {
        const Tile T = tile_at(id);
        if (T.n_tiles == 0) continue;
        mbar_wait(bar_q_empty, (qi & 1u) ^ 1u);  // the consumers are done with the previous block's Q
        mbar_arrive_expect_tx(bar_q, Cfg::kQBytes);
#pragma unroll
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_4d(sQ + pn * (kBlockM * 128), &P.tq, bar_q, 64 * pn, T.qr, T.h, T.qn);
        }
        for (int it = 0; it < T.n_tiles; ++it, ++kv) {
          const int s = static_cast<int>(kv % kStages);
          const uint32_t phase = (kv / kStages) & 1u;
          const int j0 = (T.n_begin + it) * kBlockN;
          mbar_wait(bar_k_empty(s), phase ^ 1u);  // the S product of the stage's previous tile is done
          mbar_arrive_expect_tx(bar_k(s), Cfg::kKVBytes);
#pragma unroll
          for (int pn = 0; pn < kPanels; ++pn) {
            tma_load_4d(sK0 + s * Cfg::kKVBytes + pn * (kBlockN * 128), &P.tk, bar_k(s), 64 * pn, T.kr0 + j0, T.hk,
                        T.kn);
          }
          mbar_wait(bar_v_empty(s), phase ^ 1u);  // ... and its P V product
          mbar_arrive_expect_tx(bar_v(s), Cfg::kKVBytes);
#pragma unroll
          for (int pn = 0; pn < kPanels; ++pn) {
            tma_load_4d(sV0 + s * Cfg::kKVBytes + pn * (kBlockN * 128), &P.tv, bar_v(s), 64 * pn, T.kr0 + j0, T.hk,
                        T.kn);
          }
        }
        ++qi;
      }
    }
    return;
  }

  // ---- consumers ----------------------------------------------------------
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int c = wg - 1;             // consumer warpgroup: query rows 64c .. 64c + 63 of the block
  const int cw = warp & 3;          // warp in the warpgroup: rows 16 cw .. 16 cw + 15
  const int g = lane >> 2, t = lane & 3;

  constexpr bool dropout = kDropout;
  // packed: the threshold only (each sequence's key words are set per tile, tile_rng)
  const DropoutRng rng_call = !dropout ? DropoutRng() : kPacked ? DropoutRng(0, 0, pc.dropout_p) : make_rng(pc);
  const float scale = static_cast<float>(pc.scale);
  uint32_t kv = 0;  // as in the producer
  uint32_t qi = 0;

#pragma unroll 1
  for (int id = static_cast<int>(blockIdx.x); id < total; id += static_cast<int>(gridDim.x)) {
    const Tile T = tile_at(id);
    // packed: the tile's sequence is a call of batch 1 (sequence_params without the pointers: the epilogue
    // moves those), with its dropout stream (seed, offset + b). The consumers of D = 256 have no register to
    // spare through the loop, so nothing of the sequence is kept: the masks take its keys' count
    // (seq_params) and the dropout its generator (tile_rng), each read again where needed (load_here: L1
    // hits, never hoisted into registers); its query rows past its end are rows the epilogue does not write
    // (TMA filled them with zeros), so len_q stays the call's.
    auto seq_params = [&] {
      FwdParams seq = pc;
      if constexpr (kPacked) {
        const int sb = (id % batch_heads()) / heads();
        seq.len_k = load_here(pc.cu_seqlens_k + sb + 1) - load_here(pc.cu_seqlens_k + sb);
      }
      return seq;
    };
    auto tile_rng = [&] {
      if constexpr (kPacked) {
        const int sb = (id % batch_heads()) / heads();
        uint64_t seed = pc.seed, offset = pc.offset + static_cast<uint64_t>(sb);
        if (pc.seed_offset_ptr != nullptr) {
          seed = static_cast<uint64_t>(load_here(pc.seed_offset_ptr + 2 * sb));
          offset = static_cast<uint64_t>(load_here(pc.seed_offset_ptr + 2 * sb + 1));
        }
        // the key words only: the threshold comes from the call's generator (no double arithmetic per tile)
        DropoutRng r = rng_call;
        r.set_key(seed, offset);
        return r;
      } else {
        return rng_call;
      }
    };
    // 64-bit for the offsets; packed: (batch, head) = (0, h) of the sequence
    const int64_t bh = kPacked ? T.h : T.bh, b = kPacked ? 0 : T.b, h = T.h, i0 = T.i0, n_begin = T.n_begin;
    const int nq = T.nq, n_tiles = T.n_tiles;
    const int64_t wrow0 = i0 + 64 * c + 16 * cw;

    float acc_o[1][NTO][4];
    zero_acc(acc_o);
    float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};
    float sacc[1][NTS][4];     // S of the newest tile, then its P (fp32)
    uint32_t pa[NTS / 2][4];   // P of the previous tile: the A fragments of its P V product

    // S = Q K[stage]^T, issued (not waited for).
    auto issue_s = [&](int s) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t off = static_cast<uint32_t>(kk & 3) * 32u;  // k16 step inside the 64-element panel
        const uint64_t da =
            make_smem_desc(sQ + (kk >> 2) * (kBlockM * 128) + c * (64 * 128) + off, 16, 1024, kSwizzle128B);
        const uint64_t db = make_smem_desc(sK0 + s * Cfg::kKVBytes + (kk >> 2) * (kBlockN * 128) + off, 16, 1024,
                                           kSwizzle128B);
        wgmma_ss<kBlockN, Elem, 0, 0>(flat(sacc), da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    // O += P V[stage] with P = pa, issued (not waited for).
    auto issue_pv = [&](int s) {
#pragma unroll
      for (int kk = 0; kk < NTS / 2; ++kk) {
        const uint64_t db = make_smem_desc(sV0 + s * Cfg::kKVBytes + kk * 2048, kBlockN * 128, 1024, kSwizzle128B);
        wgmma_rs<kD, Elem, 1>(flat(acc_o), pa[kk], db, 1);
      }
      wgmma_commit();
    };
    auto fence_s = [&] { reg_fence_all(sacc); };
    auto fence_o = [&] { reg_fence_all(acc_o); };
    // S of tile j0 -> P in sacc (scale, masks, online softmax, dropout); returns
    // through alpha the factor by which O and l must be rescaled.
    auto softmax = [&](int64_t j0, float (&alpha)[2]) {
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) sacc[0][nt][r] *= scale;
      if constexpr (!kPacked) {  // soft cap and ALiBi before the masks (the packed variants have no register to
                                 // spare, and packed calls take no ALiBi)
        if (pc.softcap > 0.0) {
          const float cap = static_cast<float>(pc.softcap);
          softcap_acc(sacc, cap, 2.f * kLog2e / cap);
        }
        if (pc.alibi_slopes != nullptr)
          alibi_acc(sacc, alibi_slope(pc, b, h), static_cast<int>(wrow0 - j0 + pc.len_k - pc.len_q), lane);
      }
      const FwdParams p = seq_params();
      if (!tile_fully_visible(p, i0, i0 + nq - 1, j0, kBlockN)) {
        mask_tile<void, 0>(sacc, p, wrow0, j0, nullptr, lane);
        if constexpr (kMask) {
          // a key-padding mask (the same for every query row: zero row stride),
          // read per column straight from global memory (L1 / L2 resident)
          dispatch_mask(p, [&](auto tag) {
            using MaskT = typename decltype(tag)::type;
            if constexpr (!std::is_same<MaskT, void>::value) {
              const void* mrow = key_mask_row<MaskT>(p, b, h);
#pragma unroll
              for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                  const int64_t j = j0 + 8 * nt + 2 * t + cc;
                  const float m = j < p.len_k ? mask_value<MaskT>(mrow, j * p.mask_stride.c) : 0.f;
                  sacc[0][nt][cc] += m;
                  sacc[0][nt][2 + cc] += m;
                }
              }
            }
          });
        }
      }
      // Online softmax (as in the sm80 kernel: differences before the log2(e)
      // factor, m = -inf rows subtract 0).
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = row_max[hr];
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) mx = fmaxf(mx, fmaxf(sacc[0][nt][2 * hr], sacc[0][nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -kInf ? 0.f : mx;
        alpha[hr] = exp2f((row_max[hr] - m_use) * kLog2e);
        row_max[hr] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            const float e = exp2f((sacc[0][nt][2 * hr + cc] - m_use) * kLog2e);
            sacc[0][nt][2 * hr + cc] = e;
            sum += e;
          }
        }
        row_sum[hr] = row_sum[hr] * alpha[hr] + sum;
      }
      if constexpr (dropout) {
        uint32_t bits[1][NTS];
        dropout_bits(bits, tile_rng(), static_cast<uint64_t>(bh), wrow0, j0, lane);
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) sacc[0][nt][r] = ((bits[0][nt] >> r) & 1u) ? sacc[0][nt][r] : 0.f;
      }
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        acc_o[0][nt][0] *= alpha[0];
        acc_o[0][nt][1] *= alpha[0];
        acc_o[0][nt][2] *= alpha[1];
        acc_o[0][nt][3] *= alpha[1];
      }
    };
    auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < NTS / 2; ++kk) {
        pa[kk][0] = ElemOps<Elem>::pack2(sacc[0][2 * kk][0], sacc[0][2 * kk][1]);
        pa[kk][1] = ElemOps<Elem>::pack2(sacc[0][2 * kk][2], sacc[0][2 * kk][3]);
        pa[kk][2] = ElemOps<Elem>::pack2(sacc[0][2 * kk + 1][0], sacc[0][2 * kk + 1][1]);
        pa[kk][3] = ElemOps<Elem>::pack2(sacc[0][2 * kk + 1][2], sacc[0][2 * kk + 1][3]);
      }
    };

    // Ping-pong: the two consumers take turns issuing their products (named
    // barriers 1 + c, 256 threads: this warpgroup's sync + the other's arrive),
    // so that one's softmax runs while the other's products occupy the tensor
    // cores. Rounds per warpgroup: n_tiles + 1 (S of tile 0; S of tile it with
    // P V of tile it - 1; P V of the last tile). Warpgroup 1 opens the first
    // turn of warpgroup 0 and skips its arrival of the last round, so every
    // barrier instance gets exactly 256 threads.
    const int rounds = n_tiles > 0 ? n_tiles + 1 : 0;
    int round = 0;
    auto turn_begin = [&] { named_barrier_sync(1 + c, 256); };
    auto turn_end = [&] {
      if (!(c == 1 && round == rounds - 1)) named_barrier_arrive(1 + (1 - c), 256);
      ++round;
    };
    if (c == 1 && rounds > 0) named_barrier_arrive(1, 256);

    // Intra-warpgroup pipelining: the S product of tile it is issued together
    // with the P V product of tile it - 1, and the softmax of tile it runs while
    // that P V product is still in flight; O is rescaled once it has landed.
    //   round 0:        S[0];                       softmax(S[0])
    //   round it:       S[it], P[it-1] V[it-1];     wait S; softmax(S[it]); wait P V; rescale O
    //   round n_tiles:  P[last] V[last]
    auto stage = [&](int it) { return static_cast<int>((kv + static_cast<uint32_t>(it)) % kStages); };
    auto phase = [&](int it) { return ((kv + static_cast<uint32_t>(it)) / kStages) & 1u; };
    if (n_tiles > 0) {
      mbar_wait(bar_q, qi & 1u);
      mbar_wait(bar_k(stage(0)), phase(0));
      turn_begin();
      wgmma_fence();
      issue_s(stage(0));
      turn_end();
      wgmma_wait<0>();
      fence_s();
      if (lane == 0) mbar_arrive(bar_k_empty(stage(0)));
      float alpha[2];
      softmax(n_begin * kBlockN, alpha);  // O = 0: nothing to rescale
      pack_p();
    }
#pragma unroll 1
    for (int it = 1; it < n_tiles; ++it) {
      const int s = stage(it), sp = stage(it - 1);
      mbar_wait(bar_k(s), phase(it));
      mbar_wait(bar_v(sp), phase(it - 1));
      turn_begin();
      fence_o();
      wgmma_fence();
      issue_s(s);
      issue_pv(sp);
      turn_end();
      wgmma_wait<1>();  // S[it] has landed (K[it] is free); P V of tile it - 1 may still run
      fence_s();
      if (lane == 0) mbar_arrive(bar_k_empty(s));
      float alpha[2];
      softmax((n_begin + it) * kBlockN, alpha);
      wgmma_wait<0>();  // P V of tile it - 1 done: V[it - 1] is free, O can be rescaled, pa rewritten
      fence_o();
      if (lane == 0) mbar_arrive(bar_v_empty(sp));
      rescale_o(alpha);
      pack_p();
    }
    if (n_tiles > 0) {
      const int sp = stage(n_tiles - 1);
      mbar_wait(bar_v(sp), phase(n_tiles - 1));
      turn_begin();
      fence_o();
      wgmma_fence();
      issue_pv(sp);
      turn_end();
      wgmma_wait<0>();
      fence_o();
      if (lane == 0) {
        mbar_arrive(bar_v_empty(sp));
        mbar_arrive(bar_q_empty);  // the block's last S product read Q long before
      }
      kv += static_cast<uint32_t>(n_tiles);
      ++qi;
    }

    // Epilogue: normalise, write O and the log-sum-exp.
    // packed: the sequence's rows of out, and its (heads_q, L) block of the log-sum-exp (its offsets read
    // again rather than kept in registers through the loop)
    int64_t q0 = 0, L = pc.len_q;
    if constexpr (kPacked) {
      const int sb = (id % batch_heads()) / heads();
      q0 = load_here(pc.cu_seqlens_q + sb);
      L = load_here(pc.cu_seqlens_q + sb + 1) - q0;
    }
    Elem* o = static_cast<Elem*>(pc.out) + q0 * pc.o_stride.r + b * pc.o_stride.b + h * pc.o_stride.h;
    const bool pair_ok = reinterpret_cast<uintptr_t>(o) % (2 * sizeof(Elem)) == 0 && pc.o_stride.r % 2 == 0;
    float* lse = static_cast<float*>(pc.lse) + pc.heads_q * q0 + bh * L;
    const float keep_scale = dropout ? static_cast<float>(DropoutRng::inv_keep_of(pc.dropout_p)) : 1.f;
    const int Ev = static_cast<int>(pc.dim_v);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = row_sum[hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t i = wrow0 + g + 8 * hr;
      // the row saw no key; a NaN sum (NaN scores) is not that: its output and lse are NaN, so that the
      // backward's P is NaN too, as PyTorch's gradients are
      const bool empty = l == 0.f;
      const float inv = empty ? 0.f : keep_scale / l;
      if (t == 0 && i < L) lse[i] = empty ? -kInf : row_max[hr] + logf(l);
      if (i < L) {
        Elem* orow = o + i * pc.o_stride.r;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const int col = 8 * nt + 2 * t;
          store_pair(orow + col, acc_o[0][nt][2 * hr] * inv, acc_o[0][nt][2 * hr + 1] * inv, col < Ev, col + 1 < Ev,
                     pair_ok);
        }
      }
    }
  }  // tiles
#endif  // AE_SM90_BODY
}

// ---------------------------------------------------------------------------
// Host side.

// TMA map of a (batch, heads, rows, dim) tensor (tma_view): box (64,
// box_rows, 1, 1), 128-byte swizzle.
inline const char* make_operand_desc(TmaDesc* d, const void* base, const Strides4& st, int64_t batch, int64_t heads,
                                     int64_t rows, int64_t dim, uint32_t box_rows) {
  uint64_t dims[4], strides[3];
  if (!tma_view(st.r, st.h, st.b, batch, heads, rows, dim, dims, strides)) return "negative stride";
  const uint32_t box[4] = {64, box_rows, 1, 1};
  return make_tma_desc_4d(d, base, dims, strides, box, kSwizzle128B);
}

// The map of packed sequences' rows (tma_view_packed), box (64, box_rows, 1, 1).
inline const char* packed_operand_desc(TmaDesc* d, const void* base, const Strides4& st, int64_t heads, int64_t R,
                                       int64_t total, int64_t dim, uint32_t box_rows) {
  uint64_t dims[4], strides[3];
  const void* shifted = nullptr;
  if (!tma_view_packed(base, st.r, st.h, heads, R, total, dim, dims, strides, &shifted)) {
    return "negative stride or no rows";
  }
  const uint32_t box[4] = {64, box_rows, 1, 1};
  return make_tma_desc_4d(d, shifted, dims, strides, box, kSwizzle128B);
}

// Masks the kernel reads: none, or a key-padding mask (bool or additive, the
// same for every query row).
inline bool covers_mask(const FwdParams& p) {
  return p.mask_kind == MaskKind::kNone || p.mask_stride.r == 0 || p.len_q == 1;
}

// Launches the kernel, or returns cudaErrorNotSupported without launching
// when the call is outside what it covers (the caller runs the sm80 kernel).
template <class Cfg, bool kDropout, bool kMask, bool kPacked>
cudaError_t launch_fwd_sm90(const FwdParams& p, const LaunchEnv& env) {
  const int64_t blocks = ceil_div(p.len_q, Cfg::kBlockM) * p.batch * p.heads_q;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorNotSupported;
  Sm90FwdParams P;
  P.p = p;
  if (kPacked) {
    // packed: k / v rows hold the sequences' keys; a sequence without keys still has its rows written (0, -inf)
    const int64_t R_k = p.len_k > 0 ? p.len_k : 1;
    if (packed_operand_desc(&P.tq, p.q, p.q_stride, p.heads_q, p.len_q, p.total_q, p.dim_qk, Cfg::kBlockM) != nullptr ||
        packed_operand_desc(&P.tk, p.k, p.k_stride, p.heads_kv, R_k, p.total_k, p.dim_qk, Cfg::kBlockN) != nullptr ||
        packed_operand_desc(&P.tv, p.v, p.v_stride, p.heads_kv, R_k, p.total_k, p.dim_v, Cfg::kBlockN) != nullptr) {
      return cudaErrorNotSupported;
    }
  } else if (make_operand_desc(&P.tq, p.q, p.q_stride, p.batch, p.heads_q, p.len_q, p.dim_qk, Cfg::kBlockM) != nullptr ||
             make_operand_desc(&P.tk, p.k, p.k_stride, p.batch, p.heads_kv, p.len_k, p.dim_qk, Cfg::kBlockN) != nullptr ||
             make_operand_desc(&P.tv, p.v, p.v_stride, p.batch, p.heads_kv, p.len_k, p.dim_v, Cfg::kBlockN) != nullptr) {
    return cudaErrorNotSupported;
  }
  // persistent: one CTA per multiprocessor (the shared memory and the 384 x 168
  // registers of a CTA leave room for no second one), each walking its tiles
  const int64_t grid = blocks < env.num_sms ? blocks : (env.num_sms > 0 ? env.num_sms : 1);
  return launch_kernel(flash_fwd_sm90_kernel<Cfg, kDropout, kMask, kPacked>, static_cast<unsigned>(grid), Cfg::kThreads,
                       Cfg::kSmem, Cfg::kSmem, env.stream, "flash_fwd_sm90_kernel", P);
}

// Keys per tile, by head dim: the consumers' 240 registers hold S (kBlockN / 2),
// P of the previous tile (kBlockN / 4) and O (D / 2) at once, plus the
// softmax's and the dropout's state: 128 for D = 64; 112 for D = 128 (96 with
// dropout); 64 for D = 256 (48 with a mask; O alone is 128 registers). test_hopper_build.py
// holds every variant to 0 bytes of spills. Stages: 4 for D = 64, else 2.
template <typename Elem, int kD>
cudaError_t run_fwd_sm90(const FwdParams& p, const LaunchEnv& env) {
  if (!covers_mask(p) || p.dim_qk > kD || p.dim_v > kD) return cudaErrorNotSupported;
  if (p.len_q > 0x7fffffff || p.len_k > 0x7fffffff || p.heads_q > 0x7fffffff || p.batch > 0x7fffffff) {
    return cudaErrorNotSupported;  // TMA coordinates and the tile arithmetic are 32-bit
  }
  return BOOL_SWITCH(p.dropout_p > 0.0, kDropout, [&] {
    if (p.cu_seqlens_q != nullptr) {  // packed sequences (no mask, no soft cap, no ALiBi)
      if (p.mask_kind != MaskKind::kNone || p.softcap > 0.0 || p.alibi_slopes != nullptr || p.total_q > 0x7ffffffe ||
          p.total_k > 0x7ffffffe) {
        return cudaErrorNotSupported;
      }
      constexpr int kBlockN = kD <= 64 ? 128 : kD <= 128 ? (kDropout ? 96 : 112) : 64;
      using Cfg = Sm90FwdConfig<Elem, kD, kBlockN, (kD <= 64 ? 4 : 2)>;
      return launch_fwd_sm90<Cfg, kDropout, false, true>(p, env);
    }
    return BOOL_SWITCH(p.mask_kind != MaskKind::kNone, kMask, [&] {
      constexpr int kBlockN = kD <= 64 ? 128 : kD <= 128 ? (kDropout ? 96 : 112) : (kMask ? 48 : 64);
      using Cfg = Sm90FwdConfig<Elem, kD, kBlockN, (kD <= 64 ? 4 : 2)>;
      return launch_fwd_sm90<Cfg, kDropout, kMask, false>(p, env);
    });
  });
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

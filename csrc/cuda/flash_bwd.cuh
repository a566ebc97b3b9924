// Flash-attention backward on tensor cores (fp16 / bf16 / fp32 via TF32).
//
// One CTA = one (batch, kv head, chunk of key blocks of kBlockN keys). For a
// key block it keeps K and V in shared memory and dK, dV in registers, and
// walks every (query head of the GQA group, query block of kBlockM rows) that
// can see the key block (the causal/window bounds skip the others, and a
// mask those at either end that it hides from the key block):
//
//   phase 1 (warp grid WsM x WsN over kBlockM x kBlockN):
//     S = Q K^T, dP = dO V^T; x = S*scale soft-capped (cap tanh(x / cap)) when p.softcap > 0, - m |i + S - L - j|
//     (ALiBi) + mask;
//     P = exp2(((x - shift) - logl) * log2e)
//     with the row statistics of launch_row_stats (shift = lse, logl = 0 but
//     for rows of huge |lse|; shift = -inf, a row that saw no key, gives P = 0),
//     dropout keep-bits Z, dS = P o (dP o Z/(1-p) - D) with D = rowsum(dO o O), times the cap's
//     derivative 1 - tanh^2 when soft-capped. The cap comes first, in a pass over the scores before ALiBi and
//     the mask that also folds dropout, D and the cap's derivative into dP (cap_first); with a float mask's
//     gradient that pass leaves dP o Z/(1-p) - D in dmask, which the P loop multiplies by P (dmask is dS before
//     the cap's derivative); the packed kernel has no cap (its D = 64 fp16 spill loads grew 592 -> 772 B with
//     it);
//     [dmask = dS to global, but for a cap: above]; P o Z and dS go to shared memory (input dtype).
//   phase 2 (warp grid WkvM x WkvN over kBlockN x kD):
//     dV += (P o Z)^T dO, dK += dS^T Q
//   phase 3 (warp grid WqM x WqN over kBlockM x kD):
//     dQ_part = dS K, added to the fp32 dQ workspace (atomics, or plain
//     read-modify-write into this chunk's private split when deterministic).
// Epilogue: dK *= scale, dV *= 1/(1-p), stored in the input dtype.
// dQ = scale * sum of the splits is written by launch_dq_convert.
// Packed sequences (kPacked, FwdParams::cu_seqlens_q): the CTAs of (b, kv head, chunk) take sequence b's
// params and workspace block (sequence_params, sequence_work) and run as a batch-1 call.
//
// Barriers per (head, query block) item:
//   (A) wait Q/dO/shift/logl/D of the item; barrier -> visible; phase 3 of the
//       previous item done reading sdS (phase 1 rewrites it)
//   (B) sP/sdS complete before phase 2 reads them
//   (C) phase 2 done reading sQ/sdO -> prefetch the next item's Q/dO/shift/logl/D,
//       which lands while phase 3 runs (phase 3 reads only sdS and sK).
#pragma once

#include "flash_common.cuh"
#include "flash_fwd.cuh"
#include "launch.h"

namespace attention_ext {
namespace cuda {

template <typename Elem_, int kD_, int kBlockM_, int kBlockN_, int kWarps_, int kWsM_, int kWsN_, int kWkvM_,
          int kWkvN_, int kWqM_, int kWqN_, int kPasses_ = 1>
struct BwdConfig {
  using Elem = Elem_;
  using Mma = MmaTraits<Elem, kPasses_>;
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWsM = kWsM_, kWsN = kWsN_, kWkvM = kWkvM_, kWkvN = kWkvN_, kWqM = kWqM_, kWqN = kWqN_;
  // per-warp tile shapes (16-row m-tiles x 8-col n-tiles)
  static constexpr int MT_S = kBlockM / (16 * kWsM), NT_S = kBlockN / (8 * kWsN);
  static constexpr int MT_KV = kBlockN / (16 * kWkvM), NT_KV = kD / (8 * kWkvN);
  static constexpr int MT_Q = kBlockM / (16 * kWqM), NT_Q = kD / (8 * kWqN);
  static constexpr int kPadElems = 16 / static_cast<int>(sizeof(Elem));  // +16 bytes per row (see FwdConfig)
  static constexpr int kLd = kD + kPadElems;       // rows of sK, sV, sQ, sdO
  static constexpr int kLdP = kBlockN + kPadElems;  // rows of sP, sdS
  static constexpr size_t kSmem = (size_t(2 * kBlockN + 2 * kBlockM) * kLd + size_t(2 * kBlockM) * kLdP) *
                                      sizeof(Elem) +
                                  3 * kBlockM * sizeof(float);

  static_assert(kWsM * kWsN <= kWarps && kWkvM * kWkvN == kWarps && kWqM * kWqN == kWarps, "warp grids");
  static_assert(MT_S * 16 * kWsM == kBlockM && NT_S * 8 * kWsN == kBlockN, "S warp grid must tile the block");
  static_assert(MT_KV * 16 * kWkvM == kBlockN && NT_KV * 8 * kWkvN == kD, "dKV warp grid must tile the block");
  static_assert(MT_Q * 16 * kWqM == kBlockM && NT_Q * 8 * kWqN == kD, "dQ warp grid must tile the block");
  static_assert(NT_S % 2 == 0 && NT_KV % 2 == 0 && NT_Q % 2 == 0, "n-tiles come in pairs");
  static_assert(kBlockM <= kThreads, "one thread per query row loads shift, logl and D");
  static_assert(kBlockM >= 2 * kWarps, "sLogl holds the mask narrowing's reduction scratch");
  static_assert(kSmem <= 99 * 1024, "must fit the 99 KB of sm_86/sm_89 (L4) shared memory");
  static constexpr int kMaskLdB = mask_ld_bytes<kBlockN>();
  static_assert(size_t(kBlockM) * kMaskLdB <= 2 * size_t(kBlockM) * kLdP * sizeof(Elem),
                "the staged mask tile must fit in the sP + sdS space it aliases");
};

// Sequence b of a packed call (FwdParams::cu_seqlens_q) as a backward of its own, of batch 1: sequence_params
// of the forward plus dO, dQ, dK, dV moved to its first rows, and the per-row buffers of the workspace to its
// (heads_q, L_b) block.
template <typename Elem>
__device__ __forceinline__ BwdParams sequence_params(const BwdParams& p, int64_t b) {
  BwdParams s = p;
  static_cast<FwdParams&>(s) = sequence_params<Elem>(static_cast<const FwdParams&>(p), b);
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  s.dout = static_cast<const Elem*>(p.dout) + q0 * p.do_stride.r;
  s.dq = static_cast<Elem*>(p.dq) + q0 * p.dq_stride.r;
  s.dk = static_cast<Elem*>(p.dk) + k0 * p.dk_stride.r;
  s.dv = static_cast<Elem*>(p.dv) + k0 * p.dv_stride.r;
  return s;
}
__device__ __forceinline__ BwdWork sequence_work(const BwdWork& w, const BwdParams& p, int64_t b) {
  BwdWork s = w;
  const int64_t r0 = p.heads_q * p.cu_seqlens_q[b];
  s.dq_accum += r0 * w.dq_row_stride;
  s.dsum += r0;
  s.row_shift += r0;
  s.row_logl += r0;
  return s;
}

// kPacked: a packed call, a kernel of its own (as the forward's, for the ordinary kernel's registers).
template <class Cfg, bool kPacked>
__global__ void __launch_bounds__(Cfg::kThreads) flash_bwd_kernel(const BwdParams p_call, const BwdWork w_call) {
  using Elem = typename Cfg::Elem;
  using M = typename Cfg::Mma;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kLd = Cfg::kLd, kLdP = Cfg::kLdP;
  constexpr int MT_S = Cfg::MT_S, NT_S = Cfg::NT_S, MT_KV = Cfg::MT_KV, NT_KV = Cfg::NT_KV;
  constexpr int MT_Q = Cfg::MT_Q, NT_Q = Cfg::NT_Q;

  AE_DYNAMIC_SMEM(smem_raw);
  Elem* sK = reinterpret_cast<Elem*>(smem_raw);  // kBlockN x kLd: keys of the key block
  Elem* sV = sK + kBlockN * kLd;                 // kBlockN x kLd: values of the key block
  Elem* sQ = sV + kBlockN * kLd;                 // kBlockM x kLd: queries of the current item
  Elem* sdO = sQ + kBlockM * kLd;                // kBlockM x kLd: dO of the current item
  Elem* sP = sdO + kBlockM * kLd;                // kBlockM x kLdP: P o Z (dropout keep), [query][key]
  Elem* sdS = sP + kBlockM * kLdP;               // kBlockM x kLdP: dS, [query][key]
  // kBlockM rows x kMaskLdB bytes, aliasing sP and sdS: the raw explicit mask
  // of the current tile, between (A) and (M2) of phase 1
  unsigned char* sMask = reinterpret_cast<unsigned char*>(sP);
  float* sShift = reinterpret_cast<float*>(sdS + kBlockM * kLdP);  // kBlockM: shift of the item's rows
  float* sLogl = sShift + kBlockM;                                  // kBlockM: logl of the item's rows
  float* sD = sLogl + kBlockM;                                      // kBlockM: D of the item's rows

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const int64_t Hq = p_call.heads_q, Hkv = p_call.heads_kv, G = Hq / Hkv;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) % w_call.nchunks;
  const int64_t bhk = static_cast<int64_t>(blockIdx.x) / w_call.nchunks;
  const int64_t hk = bhk % Hkv;
  // packed sequences: from here on the CTA's sequence is the call (batch 1); the chunks cover the longest
  // sequence's key blocks, so a chunk past the end of this one has nothing to do
  BwdParams seq;
  BwdWork seq_w;
  if constexpr (kPacked) {
    seq = sequence_params<Elem>(p_call, bhk / Hkv);
    seq_w = sequence_work(w_call, p_call, bhk / Hkv);
  }
  const BwdParams& p = kPacked ? seq : p_call;
  const BwdWork& w = kPacked ? seq_w : w_call;
  const int64_t b = kPacked ? 0 : bhk / Hkv;
  const int64_t L = p.len_q, S = p.len_k;
  const int64_t nkb = ceil_div(S, kBlockN);
  const int64_t kb_begin = chunk * w.kb_per_chunk;
  const int64_t kb_end = kb_begin + w.kb_per_chunk < nkb ? kb_begin + w.kb_per_chunk : nkb;
  float* dq_acc = w.dq_accum + (w.deterministic ? chunk * w.dq_split_stride : 0);

  const int E = static_cast<int>(p.dim_qk), Ev = static_cast<int>(p.dim_v);
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
  const bool vec_k = vec16_ok(k, p.k_stride.r, S, E);
  const bool vec_v = vec16_ok(v, p.v_stride.r, S, Ev);
  Elem* dk = static_cast<Elem*>(p.dk) + b * p.dk_stride.b + hk * p.dk_stride.h;
  Elem* dv = static_cast<Elem*>(p.dv) + b * p.dv_stride.b + hk * p.dv_stride.h;
  const bool pair_dk = reinterpret_cast<uintptr_t>(dk) % (2 * sizeof(Elem)) == 0 && p.dk_stride.r % 2 == 0;
  const bool pair_dv = reinterpret_cast<uintptr_t>(dv) % (2 * sizeof(Elem)) == 0 && p.dv_stride.r % 2 == 0;

  const bool dropout = p.dropout_p > 0.f;
  const DropoutRng rng = dropout ? make_rng(p) : DropoutRng();
  const float keep_scale = dropout ? rng.inv_keep : 1.f;
  const float scale = static_cast<float>(p.scale);
  // A soft cap is applied to the scaled scores before ALiBi and the mask, as in the forward (a float mask and
  // ALiBi add to the capped score). The packed kernel takes no soft-capped call.
  const bool cap_first = !kPacked && p.softcap > 0.0;

  // warp coordinates in the three warp grids
  const bool s_active = warp < Cfg::kWsM * Cfg::kWsN;
  const int ws_m = warp % Cfg::kWsM, ws_n = warp / Cfg::kWsM;
  const int wkv_m = warp % Cfg::kWkvM, wkv_n = warp / Cfg::kWkvM;
  const int wq_m = warp % Cfg::kWqM, wq_n = warp / Cfg::kWqM;

  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * kBlockN;
    const int nk = static_cast<int>(S - j0 < kBlockN ? S - j0 : kBlockN);
    // Query rows that see at least one key of [j0, j0 + nk): row i sees key j
    // iff i - left <= j <= i + right.
    int64_t ib, ie;
    query_range(p, j0, j0 + nk, ib, ie);
    int64_t mb_begin = ib / kBlockM;
    int64_t nm = ie > ib ? ceil_div(ie, kBlockM) - mb_begin : 0;
    // A mask: only the query blocks between the first and the last that hold an
    // element of this key block that lets its key be seen (true, or not -inf; in
    // any head of the group); none if the mask hides the keys from every row
    // (padding): dK = dV = 0 (and a float mask's gradient stays 0 there).
    if (p.mask_kind != MaskKind::kNone && nm > 0) {
      // sShift and sLogl are free: every warp passed (C) of this CTA's last
      // item, and the barrier below precedes the next load_item
      int64_t* bounds = reinterpret_cast<int64_t*>(sShift);
      narrow_query_blocks<kBlockM, kThreads>(mask_ref(p), b, hk * G, p.mask_stride.h == 0 ? 1 : G, j0, nk,
                                             mb_begin, nm, bounds, reinterpret_cast<int*>(sLogl), tid);
      mb_begin = bounds[0];
      nm = bounds[1];
    }
    const int64_t n_items = G * nm;

    // Issues the async loads of item `it` (query head hk*G + it/nm, query
    // block mb_begin + it%nm): Q, dO, and the rows' shift, logl and D.
    auto load_item = [&](int64_t it) {
      const int64_t h = hk * G + it / nm;
      const int64_t i0 = (mb_begin + it % nm) * kBlockM;
      const int nq = static_cast<int>(L - i0 < kBlockM ? L - i0 : kBlockM);
      const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
      const Elem* dO = static_cast<const Elem*>(p.dout) + b * p.do_stride.b + h * p.do_stride.h;
      load_tile<Elem, kBlockM, kD, kLd, kThreads>(sQ, q + i0 * p.q_stride.r, p.q_stride.r, nq, E,
                                                  vec16_ok(q, p.q_stride.r, L, E), tid);
      load_tile<Elem, kBlockM, kD, kLd, kThreads>(sdO, dO + i0 * p.do_stride.r, p.do_stride.r, nq, Ev,
                                                  vec16_ok(dO, p.do_stride.r, L, Ev), tid);
      if (tid < kBlockM) {
        const bool ok = tid < nq;
        const int64_t row = (b * Hq + h) * L + i0 + (ok ? tid : 0);
        cp_async4(smem_u32(sShift + tid), w.row_shift + row, ok);
        cp_async4(smem_u32(sLogl + tid), w.row_logl + row, ok);
        cp_async4(smem_u32(sD + tid), w.dsum + row, ok);
      }
    };

    // Every warp finished the previous key block (phase 3 reads sK and sdS)
    // before sK / sV / sQ / sdO are refilled.
    __syncthreads();
    if (n_items > 0) {
      load_tile<Elem, kBlockN, kD, kLd, kThreads>(sK, k + j0 * p.k_stride.r, p.k_stride.r, nk, E, vec_k, tid);
      load_tile<Elem, kBlockN, kD, kLd, kThreads>(sV, v + j0 * p.v_stride.r, p.v_stride.r, nk, Ev, vec_v, tid);
      load_item(0);
    }
    cp_async_commit();

    float acc_dk[MT_KV][NT_KV][4], acc_dv[MT_KV][NT_KV][4];
    zero_acc(acc_dk);
    zero_acc(acc_dv);

    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t h = hk * G + it / nm;
      const int64_t i0 = (mb_begin + it % nm) * kBlockM;
      const int nq = static_cast<int>(L - i0 < kBlockM ? L - i0 : kBlockM);
      const int64_t bh = b * Hq + h;

      cp_async_wait<0>();
      __syncthreads();  // (A)

      // ---- phase 1: P and dS of this warp's part of the kBlockM x kBlockN tile
      // The explicit mask of the tile (if any) is staged in the sP/sdS space:
      // free since (A) (phase 3 of the previous item was its last reader); the
      // copy lands while the S and dP products run.
      const bool has_mask = p.mask_kind != MaskKind::kNone;
      if (has_mask) {
        stage_mask<kBlockM, kBlockN, kThreads>(sMask, p, b, h, i0, j0, tid);
        cp_async_commit();
      }
      const int rs0 = ws_m * 16 * MT_S, cs0 = ws_n * 8 * NT_S;  // tile-local origin of the warp's part
      float s[MT_S][NT_S][4], dp[MT_S][NT_S][4];
      zero_acc(s);
      zero_acc(dp);
      if (s_active) {
        gemm_ss<M, MT_S, NT_S, kD, true, true>(s, sQ + rs0 * kLd, kLd, sK + cs0 * kLd, kLd, lane);
        gemm_ss<M, MT_S, NT_S, kD, true, true>(dp, sdO + rs0 * kLd, kLd, sV + cs0 * kLd, kLd, lane);
      }
      if (has_mask) {
        cp_async_wait<0>();
        __syncthreads();  // (M1) the staged mask is visible
      }
      if (s_active) {
#pragma unroll
        for (int mt = 0; mt < MT_S; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[mt][nt][r] *= scale;
        // dropout's keep-bits (they depend on the position alone): the cap's pass below takes them
        uint32_t bits[MT_S][NT_S];
        if (dropout) dropout_bits(bits, rng, static_cast<uint64_t>(bh), i0 + rs0, j0 + cs0, lane);
        // a float mask's gradient with a cap: dmask is dS before the cap's derivative, P o (dP o Z/(1-p) - D); the
        // cap's pass leaves its second factor in dmask's rows, which the P loop multiplies by P
        float* const dm_cap = cap_first && p.dmask != nullptr ? static_cast<float*>(p.dmask) : nullptr;
        if (cap_first) {  // the cap before ALiBi and the mask; dP o Z/(1-p) - D and the cap's derivative folded
          const float cap = static_cast<float>(p.softcap), k2 = 2.f * kLog2e / cap;
#pragma unroll
          for (int mt = 0; mt < MT_S; ++mt)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
              const int rl = rs0 + 16 * mt + g + 8 * hr;
              const float Drow = sD[rl];
#pragma unroll
              for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                  const int r = 2 * hr + c;
                  const float th = softcap_tanh(s[mt][nt][r], k2);
                  s[mt][nt][r] = cap * th;
                  float dpv = dp[mt][nt][r];
                  if (dropout) dpv = (bits[mt][nt] >> r) & 1u ? dpv * keep_scale : 0.f;
                  dpv -= Drow;
                  const int col = cs0 + 8 * nt + 2 * t + c;
                  if (dm_cap != nullptr && rl < nq && col < nk) dm_cap[(bh * L + i0 + rl) * S + j0 + col] = dpv;
                  dp[mt][nt][r] = dpv * (1.f - th * th);
                }
            }
        }
        if constexpr (!kPacked) {  // ALiBi before the mask
          if (p.alibi_slopes != nullptr)
            alibi_acc(s, alibi_slope(p, b, h), static_cast<int>(i0 - j0 + S - L) + rs0 - cs0, lane);
        }
        if (!tile_fully_visible(p, i0, i0 + nq - 1, j0, kBlockN)) {
          dispatch_mask(p, [&](auto tag) {
            using MaskT = typename decltype(tag)::type;
            mask_tile<MaskT, Cfg::kMaskLdB>(s, p, i0 + rs0, j0 + cs0,
                                            sMask + rs0 * Cfg::kMaskLdB + cs0 * mask_esize<MaskT>(), lane);
          });
        }
#pragma unroll
        for (int mt = 0; mt < MT_S; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int rl = rs0 + 16 * mt + g + 8 * hr;
            const float shift_raw = sShift[rl];
            // rows past len_q and rows that saw no key (shift = -inf): P = exp2(x - inf) = 0
            const float shift_r = (rl < nq && shift_raw != -kInf) ? shift_raw : kInf;
            const float logl_r = sLogl[rl];
            const float Drow = sD[rl];
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int r = 2 * hr + c;
                const float pv = exp2f(((s[mt][nt][r] - shift_r) - logl_r) * kLog2e);
                float dpv = dp[mt][nt][r];
                float pz = pv;
                if (dropout) {
                  const bool keep = (bits[mt][nt] >> r) & 1u;
                  if (!cap_first) dpv = keep ? dpv * keep_scale : 0.f;
                  pz = keep ? pv : 0.f;
                }
                s[mt][nt][r] = pz;  // P o Z (dV operand)
                dp[mt][nt][r] = cap_first ? pv * dpv : pv * (dpv - Drow);  // dS
                const int col = cs0 + 8 * nt + 2 * t + c;
                if (dm_cap != nullptr && rl < nq && col < nk) {
                  float& dm = dm_cap[(bh * L + i0 + rl) * S + j0 + col];
                  dm *= pv;
                }
              }
            }
          }
        }
        if (p.dmask != nullptr && !cap_first) {  // gradient of the additive mask = dS (before the scale)
          float* dm = static_cast<float*>(p.dmask);
          const bool pair_dm = S % 2 == 0;
#pragma unroll
          for (int mt = 0; mt < MT_S; ++mt) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
              const int rl = rs0 + 16 * mt + g + 8 * hr;
              if (rl < nq) {
                float* row = dm + (bh * L + i0 + rl) * S + j0;
#pragma unroll
                for (int nt = 0; nt < NT_S; ++nt) {
                  const int c = cs0 + 8 * nt + 2 * t;
                  store_pair(row + c, dp[mt][nt][2 * hr], dp[mt][nt][2 * hr + 1], c < nk, c + 1 < nk, pair_dm);
                }
              }
            }
          }
        }
      }
      // (M2) every warp has read its mask values before sP / sdS overwrite them
      if (has_mask) __syncthreads();
      if (s_active) {
        // P o Z and dS to shared memory, [query][key] (pairs of adjacent keys)
#pragma unroll
        for (int mt = 0; mt < MT_S; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int rl = rs0 + 16 * mt + g + 8 * hr;
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
              const int c = cs0 + 8 * nt + 2 * t;
              store_pair(sP + rl * kLdP + c, s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1], true, true, true);
              store_pair(sdS + rl * kLdP + c, dp[mt][nt][2 * hr], dp[mt][nt][2 * hr + 1], true, true, true);
            }
          }
        }
      }
      __syncthreads();  // (B)

      // ---- phase 2: dV += (P o Z)^T dO, dK += dS^T Q  (A = [key][query] view of sP / sdS)
      {
        const int r0 = wkv_m * 16 * MT_KV, c0 = wkv_n * 8 * NT_KV;
        gemm_ss<M, MT_KV, NT_KV, kBlockM, false, false>(acc_dv, sP + r0, kLdP, sdO + c0, kLd, lane);
        gemm_ss<M, MT_KV, NT_KV, kBlockM, false, false>(acc_dk, sdS + r0, kLdP, sQ + c0, kLd, lane);
      }
      __syncthreads();  // (C) sQ / sdO / sShift / sLogl / sD are free
      if (it + 1 < n_items) load_item(it + 1);
      cp_async_commit();

      // ---- phase 3: dQ += dS K
      {
        float acc_dq[MT_Q][NT_Q][4];
        zero_acc(acc_dq);
        const int r0 = wq_m * 16 * MT_Q, c0 = wq_n * 8 * NT_Q;
        gemm_ss<M, MT_Q, NT_Q, kBlockN, true, false>(acc_dq, sdS + r0 * kLdP, kLdP, sK + c0, kLd, lane);
#pragma unroll
        for (int mt = 0; mt < MT_Q; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int rl = r0 + 16 * mt + g + 8 * hr;
            if (rl < nq) {
              float* row = dq_acc + (bh * L + i0 + rl) * w.dq_row_stride;
#pragma unroll
              for (int nt = 0; nt < NT_Q; ++nt) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                  const int col = c0 + 8 * nt + 2 * t + c;
                  if (col < E) {
                    // deterministic: this CTA alone owns the split, and the
                    // same thread owns this element for every key block
                    if (w.deterministic) {
                      row[col] += acc_dq[mt][nt][2 * hr + c];
                    } else {
                      atomicAdd(row + col, acc_dq[mt][nt][2 * hr + c]);
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
    cp_async_wait<0>();

    // ---- epilogue: dK = scale * sum dS^T Q, dV = 1/(1-p) * sum (P o Z)^T dO
    {
      const int r0 = wkv_m * 16 * MT_KV, c0 = wkv_n * 8 * NT_KV;
#pragma unroll
      for (int mt = 0; mt < MT_KV; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int rl = r0 + 16 * mt + g + 8 * hr;
          if (rl < nk) {
            Elem* dkrow = dk + (j0 + rl) * p.dk_stride.r;
            Elem* dvrow = dv + (j0 + rl) * p.dv_stride.r;
#pragma unroll
            for (int nt = 0; nt < NT_KV; ++nt) {
              const int c = c0 + 8 * nt + 2 * t;
              store_pair(dkrow + c, acc_dk[mt][nt][2 * hr] * scale, acc_dk[mt][nt][2 * hr + 1] * scale, c < E,
                         c + 1 < E, pair_dk);
              store_pair(dvrow + c, acc_dv[mt][nt][2 * hr] * keep_scale, acc_dv[mt][nt][2 * hr + 1] * keep_scale,
                         c < Ev, c + 1 < Ev, pair_dv);
            }
          }
        }
      }
    }
  }
}

template <class Cfg>
cudaError_t launch_bwd(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  const int64_t blocks = static_cast<int64_t>(w.nchunks) * p.batch * p.heads_kv;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (p.cu_seqlens_q != nullptr) {
    if (p.cu_seqlens_k == nullptr || p.mask_kind != MaskKind::kNone || p.softcap > 0.0 || p.alibi_slopes != nullptr)
      return cudaErrorInvalidValue;
    return launch_kernel(flash_bwd_kernel<Cfg, true>, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem,
                         Cfg::kSmem, env.stream, "flash_bwd_kernel (packed)", p, w);
  }
  return launch_kernel(flash_bwd_kernel<Cfg, false>, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem,
                       Cfg::kSmem, env.stream, "flash_bwd_kernel", p, w);
}

}  // namespace cuda
}  // namespace attention_ext

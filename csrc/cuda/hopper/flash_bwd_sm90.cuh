// Flash-attention backward for Hopper (sm_90a): TMA + mbarrier pipeline,
// wgmma for all five matrix products, producer / consumer warp specialisation.
//
// One CTA = one (batch, kv head, block of 128 keys), 3 warpgroups:
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
//   Epilogue: dK *= scale, written with dV from registers.
// The two consumer warpgroups share nothing but the Q / dO stages, so one's
// element-wise work overlaps the other's products on the tensor cores.
// dQ = scale * workspace, in the input dtype, by launch_dq_convert.
//
// Shared-memory layouts are those of flash_fwd_sm90.cuh (D/64 panels of
// rows x 128 B, 128-byte swizzle): K / V / Q / dO are K-major operands of
// S^T and dP^T and N-major operands (trans-b) of dV, dK and dQ.
//
// Covered (else the sm80 backward runs): fp16 / bf16, no dropout, no mask
// gradient, not deterministic, no mask or a key-padding mask, head dims <=
// the bucket (64 or 128), TMA-compatible q / k / v / dO.
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
  static constexpr int kBlockM = 64;   // queries per item
  static constexpr int kBlockN = 128;  // keys per CTA: 2 consumer warpgroups x 64
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kPanels = kD / 64;
  static constexpr int kNTS = kBlockM / 8;  // n8 tiles of S^T (query columns)
  static constexpr int kNTD = kD / 8;       // n8 tiles of dK, dV, dQ
  static constexpr uint32_t kKVBytes = kBlockN * kD * 2;
  static constexpr uint32_t kQBytes = kBlockM * kD * 2;
  static constexpr uint32_t kDSBytes = kBlockN * kBlockM * 2;  // dS^T: 128 keys x 64 queries
  static constexpr uint32_t kDQBytes = kBlockM * kD * 4;        // per consumer: its fp32 dQ partial
  static constexpr uint32_t kBarBytes = 8 * (1 + 2 * kStages);
  static constexpr size_t kSmem =
      2 * size_t(kKVBytes) + 2 * kStages * size_t(kQBytes) + kDSBytes + 2 * size_t(kDQBytes) + 1024 + kBarBytes;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // dV, dK and dQ in one wgmma group (else dQ waits for dV, dK): only where
  // the three accumulators and the A fragments fit the consumers' registers
  static constexpr bool kFuseDq = kD <= 64;
  static_assert(kD % 64 == 0, "head-dim bucket: whole 64-element panels");
  static_assert(kSmem <= 227 * 1024, "sm_90 shared memory per block");
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_bwd_sm90_kernel(const __grid_constant__ Sm90BwdParams P) {
#if defined(AE_SM90_BODY)
  using Elem = typename Cfg::Elem;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int NTS = Cfg::kNTS, NTD = Cfg::kNTD, kPanels = Cfg::kPanels;
  const BwdParams& p = P.p;
  const BwdWork& w = P.w;

  AE_DYNAMIC_SMEM(smem_raw);
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sK = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (sK - raw);  // generic pointer of sK
  const uint32_t sV = sK + Cfg::kKVBytes;
  const uint32_t sQ0 = sV + Cfg::kKVBytes;                    // kStages x Q tiles
  const uint32_t sdO0 = sQ0 + kStages * Cfg::kQBytes;         // kStages x dO tiles
  const uint32_t sdS = sdO0 + kStages * Cfg::kQBytes;         // dS^T, 128 keys x 64 queries
  const uint32_t sdQ = sdS + Cfg::kDSBytes;                   // 2 x the consumers' dQ partials
  const uint32_t sBar = sdQ + 2 * Cfg::kDQBytes;
  const uint32_t bar_kv = sBar;
  auto bar_full = [&](int s) { return sBar + 8u * (1 + s); };
  auto bar_empty = [&](int s) { return sBar + 8u * (1 + kStages + s); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

  const int64_t L = p.len_q, S = p.len_k, Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  const int64_t nkb = ceil_div(S, kBlockN);
  const int64_t kb = static_cast<int64_t>(blockIdx.x) % nkb;
  const int64_t bhk = static_cast<int64_t>(blockIdx.x) / nkb;
  const int64_t b = bhk / Hkv, hk = bhk % Hkv;
  const int64_t j0 = kb * kBlockN;
  const int nk = static_cast<int>(S - j0 < kBlockN ? S - j0 : kBlockN);
  // Query rows that see at least one key of [j0, j0 + nk).
  int64_t ib, ie;
  query_range(p, j0, j0 + nk, ib, ie);
  const int64_t mb_begin = ib / kBlockM;
  const int64_t nm = ie > ib ? ceil_div(ie, kBlockM) - mb_begin : 0;
  const int n_items = static_cast<int>(G * nm);

  if (tid == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full(s), 1);
      mbar_init(bar_empty(s), Cfg::kConsumerWarps);
    }
    mbar_fence_init();
  }
  __syncthreads();  // the last CTA-wide barrier: the roles split here

  if (wg == 0) {
    // ---- producer -------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0 && n_items > 0) {
      const int b32 = static_cast<int>(b), hk32 = static_cast<int>(hk);
      mbar_arrive_expect_tx(bar_kv, 2 * Cfg::kKVBytes);
#pragma unroll
      for (int pn = 0; pn < kPanels; ++pn) {
        tma_load_4d(sK + pn * (kBlockN * 128), &P.tk, bar_kv, 64 * pn, static_cast<int>(j0), hk32, b32);
        tma_load_4d(sV + pn * (kBlockN * 128), &P.tv, bar_kv, 64 * pn, static_cast<int>(j0), hk32, b32);
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
          tma_load_4d(sQ0 + s * Cfg::kQBytes + pn * (kBlockM * 128), &P.tq, bar_full(s), 64 * pn, i0, h32, b32);
          tma_load_4d(sdO0 + s * Cfg::kQBytes + pn * (kBlockM * 128), &P.tdo, bar_full(s), 64 * pn, i0, h32, b32);
        }
      }
    }
    return;
  }

  // ---- consumers ----------------------------------------------------------
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int c = wg - 1;     // keys 64c .. 64c + 63 of the block
  const int cw = warp & 3;  // warp in the warpgroup: key rows 16 cw .. 16 cw + 15
  const int g = lane >> 2, t = lane & 3;
  const float scale = static_cast<float>(p.scale);
  const uint32_t sKc = sK + c * (64 * 128), sVc = sV + c * (64 * 128);  // this warpgroup's keys in panel 0
  const uint32_t sdSc = sdS + c * (64 * 128);
  const uint32_t sdQc = sdQ + c * Cfg::kDQBytes;

  float acc_dk[1][NTD][4], acc_dv[1][NTD][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // the two key rows of this thread (block-local 64c + 16cw + g + 8hr) and
  // their key-padding mask values (0 or -inf / the additive value)
  int64_t jrow[2];
  float kmask[2] = {0.f, 0.f};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    jrow[hr] = j0 + 64 * c + 16 * cw + g + 8 * hr;
  }

  if (n_items > 0) mbar_wait(bar_kv, 0);
  for (int it = 0; it < n_items; ++it) {
    const int s = it % kStages;
    const uint32_t phase = static_cast<uint32_t>(it / kStages) & 1u;
    const int64_t h = hk * G + it / nm;
    const int64_t i0 = (mb_begin + it % nm) * kBlockM;
    const int64_t bh = b * Hq + h;
    const uint32_t sQ = sQ0 + s * Cfg::kQBytes, sdO = sdO0 + s * Cfg::kQBytes;

    if (p.mask_kind != MaskKind::kNone) {  // key padding: one value per (batch, head, key)
      dispatch_mask(p, [&](auto tag) {
        using MaskT = typename decltype(tag)::type;
        if constexpr (!std::is_same<MaskT, void>::value) {
          const void* mrow = static_cast<const unsigned char*>(p.mask) +
                             (b * p.mask_stride.b + h * p.mask_stride.h) * static_cast<int64_t>(sizeof(MaskT));
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            kmask[hr] = jrow[hr] < S ? mask_value<MaskT>(mrow, jrow[hr] * p.mask_stride.c) : 0.f;
          }
        }
      });
    }

    // S^T = K_c Q^T and dP^T = V_c dO^T (64 keys x 64 queries each)
    float st[1][NTS][4], dpt[1][NTS][4];
    mbar_wait(bar_full(s), phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = static_cast<uint32_t>(kk & 3) * 32u;  // k16 step inside the 64-element panel
      const uint64_t da = make_smem_desc(sKc + (kk >> 2) * (kBlockN * 128) + off, 16, 1024, kSwizzle128B);
      const uint64_t db = make_smem_desc(sQ + (kk >> 2) * (kBlockM * 128) + off, 16, 1024, kSwizzle128B);
      wgmma_ss<kBlockM, Elem, 0, 0>(flat(st), da, db, kk > 0 ? 1 : 0);
    }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = static_cast<uint32_t>(kk & 3) * 32u;
      const uint64_t da = make_smem_desc(sVc + (kk >> 2) * (kBlockN * 128) + off, 16, 1024, kSwizzle128B);
      const uint64_t db = make_smem_desc(sdO + (kk >> 2) * (kBlockM * 128) + off, 16, 1024, kSwizzle128B);
      wgmma_ss<kBlockM, Elem, 0, 0>(flat(dpt), da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence_all(st);
    reg_fence_all(dpt);

    // P^T and dS^T, element (key row jrow[hr], query column i0 + 8nt + 2t + cc)
    const bool all_visible = i0 + kBlockM <= L && tile_fully_visible(p, i0, i0 + kBlockM - 1, j0, kBlockN);
    uint32_t pa[NTS / 2][4], dsa[NTS / 2][4];
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int64_t i = i0 + 8 * nt + 2 * t + cc;
        const bool row_ok = i < L;
        const int64_t stat = bh * L + (row_ok ? i : 0);
        const float shift_raw = w.row_shift[stat];
        // queries past L and rows that saw no key (shift = -inf): P = 0
        const float shift = (row_ok && shift_raw != -kInf) ? shift_raw : kInf;
        const float logl = w.row_logl[stat];
        const float dsum = w.dsum[stat];
        int64_t lo = 0, hi = S;
        if (!all_visible && row_ok) key_range(p, i, lo, hi);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int r = 2 * hr + cc;
          const bool vis = all_visible || (row_ok && jrow[hr] >= lo && jrow[hr] < hi);
          const float x = st[0][nt][r] * scale + kmask[hr];
          const float pv = vis ? exp2f(((x - shift) - logl) * kLog2e) : 0.f;
          st[0][nt][r] = pv;
          dpt[0][nt][r] = pv * (dpt[0][nt][r] - dsum);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < NTS / 2; ++kk) {
      pa[kk][0] = ElemOps<Elem>::pack2(st[0][2 * kk][0], st[0][2 * kk][1]);
      pa[kk][1] = ElemOps<Elem>::pack2(st[0][2 * kk][2], st[0][2 * kk][3]);
      pa[kk][2] = ElemOps<Elem>::pack2(st[0][2 * kk + 1][0], st[0][2 * kk + 1][1]);
      pa[kk][3] = ElemOps<Elem>::pack2(st[0][2 * kk + 1][2], st[0][2 * kk + 1][3]);
      dsa[kk][0] = ElemOps<Elem>::pack2(dpt[0][2 * kk][0], dpt[0][2 * kk][1]);
      dsa[kk][1] = ElemOps<Elem>::pack2(dpt[0][2 * kk][2], dpt[0][2 * kk][3]);
      dsa[kk][2] = ElemOps<Elem>::pack2(dpt[0][2 * kk + 1][0], dpt[0][2 * kk + 1][1]);
      dsa[kk][3] = ElemOps<Elem>::pack2(dpt[0][2 * kk + 1][2], dpt[0][2 * kk + 1][3]);
    }

    // dS^T to shared memory: key row r (of this warpgroup's 64), queries q, q+1
    // in the 128-byte swizzle (16-byte chunk index ^= r % 8). The previous
    // item's dQ product, the last reader, completed before the barrier that
    // ended that item.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = 16 * cw + g + 8 * hr;
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
        const int byte = 2 * (8 * nt + 2 * t);
        const int sw = r * 128 + ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15));
        *reinterpret_cast<uint32_t*>(smem + (sdSc - sK) + sw) = dsa[nt >> 1][(nt & 1) * 2 + hr];
      }
    }
    fence_proxy_async();                // the generic-proxy stores, before wgmma reads them
    // the previous item's dQ reduce has read sdQ_c (its issuing thread waits), so
    // that the stores below may overwrite it once every thread is past the barrier
    if ((tid & 127) == 0) bulk_wait_read<0>();
    named_barrier_sync(1 + c, 128);     // every thread of the warpgroup wrote its part of dS

    // One group of three products, one wait (D = 64; two groups for D = 128):
    //   dV += P^T dO, dK += dS^T Q   (A from registers; B N-major: 16 queries =
    //                                 2048 B per k16 step, LBO = the 64-row panel stride)
    //   dQ_c = dS_c K_c              (A = dS, 64 queries x 64 keys, M-major; B = K_c N-major)
    float acc_dq[1][NTD][4];
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
      wgmma_rs<kD, Elem, 1>(flat(acc_dk), dsa[kk], db, 1);
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

    // dQ_c to shared memory as the fp32 map's boxes expect them: kD / 32 panels
    // of 64 rows x 128 B in the 128-byte swizzle (pairs of columns: 8 bytes
    // inside one 16-byte chunk), then one thread adds the panels to the dQ
    // workspace with TMA reduce-adds (elements past L are skipped by TMA).
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = 16 * cw + g + 8 * hr;
#pragma unroll
      for (int nt = 0; nt < NTD; ++nt) {
        const int col = 8 * nt + 2 * t;
        const int byte = (col & 31) * 4;
        const uint32_t a = sdQc + (col >> 5) * (kBlockM * 128) + r * 128 +
                           ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15));
        float2 v2;
        v2.x = acc_dq[0][nt][2 * hr];
        v2.y = acc_dq[0][nt][2 * hr + 1];
        *reinterpret_cast<float2*>(smem + (a - sK)) = v2;
      }
    }
    fence_proxy_async();  // the stores, before the async proxy (TMA) reads them
    // every thread wrote its part of dQ_c, and is past its dQ product (the next
    // item rewrites sdS)
    named_barrier_sync(1 + c, 128);
    if ((tid & 127) == 0) {
#pragma unroll
      for (int pn = 0; pn < kD / 32; ++pn) {
        tma_reduce_add_4d(&P.tdq, sdQc + pn * (kBlockM * 128), 32 * pn, static_cast<int>(i0), static_cast<int>(h),
                          static_cast<int>(b));
      }
      bulk_commit();
    }
  }
  if ((tid & 127) == 0) bulk_wait<0>();  // the reduces are complete before the CTA (and its shared memory) ends

  // Epilogue: dK = scale * sum dS^T Q, dV = sum P^T dO.
  const int E = static_cast<int>(p.dim_qk), Ev = static_cast<int>(p.dim_v);
  Elem* dk = static_cast<Elem*>(p.dk) + b * p.dk_stride.b + hk * p.dk_stride.h;
  Elem* dv = static_cast<Elem*>(p.dv) + b * p.dv_stride.b + hk * p.dv_stride.h;
  const bool pair_dk = reinterpret_cast<uintptr_t>(dk) % (2 * sizeof(Elem)) == 0 && p.dk_stride.r % 2 == 0;
  const bool pair_dv = reinterpret_cast<uintptr_t>(dv) % (2 * sizeof(Elem)) == 0 && p.dv_stride.r % 2 == 0;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t j = jrow[hr];
    if (j < S) {
      Elem* dkrow = dk + j * p.dk_stride.r;
      Elem* dvrow = dv + j * p.dv_stride.r;
#pragma unroll
      for (int nt = 0; nt < NTD; ++nt) {
        const int col = 8 * nt + 2 * t;
        store_pair(dkrow + col, acc_dk[0][nt][2 * hr] * scale, acc_dk[0][nt][2 * hr + 1] * scale, col < E,
                   col + 1 < E, pair_dk);
        store_pair(dvrow + col, acc_dv[0][nt][2 * hr], acc_dv[0][nt][2 * hr + 1], col < Ev, col + 1 < Ev, pair_dv);
      }
    }
  }
#endif  // AE_SM90_BODY
}

// Launches the kernel, or returns cudaErrorNotSupported without launching
// when the call is outside what it covers (the caller runs the sm80 kernel).
template <class Cfg>
cudaError_t launch_bwd_sm90(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  if (!covers_mask(p) || p.dim_qk > Cfg::kD || p.dim_v > Cfg::kD || p.dropout_p > 0.0 || p.dmask != nullptr ||
      w.deterministic || w.nsplit != 1 || w.dq_row_stride != Cfg::kD) {
    return cudaErrorNotSupported;
  }
  if (p.len_q > 0x7fffffff || p.len_k > 0x7fffffff || p.heads_q > 0x7fffffff || p.batch > 0x7fffffff) {
    return cudaErrorNotSupported;
  }
  const int64_t blocks = ceil_div(p.len_k, Cfg::kBlockN) * p.batch * p.heads_kv;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorNotSupported;
  Sm90BwdParams P;
  P.p = p;
  P.w = w;
  if (make_operand_desc(&P.tq, p.q, p.q_stride, p.batch, p.heads_q, p.len_q, p.dim_qk, Cfg::kBlockM) != nullptr ||
      make_operand_desc(&P.tdo, p.dout, p.do_stride, p.batch, p.heads_q, p.len_q, p.dim_v, Cfg::kBlockM) != nullptr ||
      make_operand_desc(&P.tk, p.k, p.k_stride, p.batch, p.heads_kv, p.len_k, p.dim_qk, Cfg::kBlockN) != nullptr ||
      make_operand_desc(&P.tv, p.v, p.v_stride, p.batch, p.heads_kv, p.len_k, p.dim_v, Cfg::kBlockN) != nullptr) {
    return cudaErrorNotSupported;
  }
  {  // dQ workspace: rows (b * Hq + h) * L + i of kD floats
    const uint64_t row = static_cast<uint64_t>(Cfg::kD) * 4;
    const uint64_t dims[4] = {static_cast<uint64_t>(Cfg::kD), static_cast<uint64_t>(p.len_q),
                              static_cast<uint64_t>(p.heads_q), static_cast<uint64_t>(p.batch)};
    const uint64_t strides[3] = {row, row * dims[1], row * dims[1] * dims[2]};
    const uint32_t box[4] = {32, Cfg::kBlockM, 1, 1};
    if (make_tma_desc_4d(&P.tdq, w.dq_accum, dims, strides, box, kSwizzle128B, 4) != nullptr) {
      return cudaErrorNotSupported;
    }
  }
  return launch_kernel(flash_bwd_sm90_kernel<Cfg>, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem,
                       Cfg::kSmem, env.stream, "flash_bwd_sm90_kernel", P);
}

template <typename Elem, int kD>
cudaError_t run_bwd_sm90(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  return launch_bwd_sm90<Sm90BwdConfig<Elem, kD, 2>>(p, w, env);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext

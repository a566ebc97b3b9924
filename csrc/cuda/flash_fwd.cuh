// Flash-attention forward on tensor cores (mma.sync), one template for
// fp16 / bf16 (m16n8k16) and fp32 (TF32 m16n8k8, 1 or 3 passes).
//
// One CTA = one (batch, query head, block of kBlockM query rows). Each warp
// owns 16*kMT consecutive query rows and the full key tile width, so the
// online softmax needs only quad shuffles. Per key tile:
//   S = Q K^T            (Q and K from shared memory, fp32 accumulators)
//   x = S*scale, soft-capped (cap tanh(x / cap)) when p.softcap > 0, minus the ALiBi bias m |i + S - L - j|
//   x += mask, -inf outside the window / causal bound
//   online softmax: m = max(m, rowmax x), P = exp2((x - m) * log2e),
//   O *= exp2((m_old - m) * log2e), l = l*alpha + rowsum P (before dropout)
//   dropout zeroes P (the 1/(1-p) goes into the final normalisation)
//   O += P V             (P straight from the S accumulators, V from shared)
// Epilogue: O /= l, lse = m + log l; rows that saw no key give O = 0,
// lse = -inf. Split keys (p.num_splits > 1, flash-decoding for grids too small
// to fill the GPU): CTA s of a (batch, head, query block) takes the s-th share
// of its key tiles and writes O / l, m and l of that share in fp32 to
// p.o_accum / p.lse_accum; launch_fwd_combine merges the shares (from m and l,
// not from m + log l, whose rounding at |m| ~ 100s would cost fp32 accuracy).
// Stats mode (st.shift != nullptr, see FwdStats in launch.h): the same loop
// for the backward's row statistics; a CTA with no row of
// |lse| > kExtremeLse (and no exact_d) leaves at once, the others store
// shift = m, logl = log l (and D = dO . O from the fp32 O with exact_d)
// instead of O and lse. Key tiles that the causal/window bounds hide from every row of
// the block are never visited, nor those a boolean (false) or additive (-inf) mask hides from every row
// at either end of the block's key range (narrow_key_tiles); tiles fully
// visible skip the element-wise mask.
//
// Pipeline (FlashAttention-2 style, K and V single-buffered):
//   top of iteration n:   wait K[n]; barrier; issue V[n]
//   S = Q K[n]^T, softmax
//   wait V[n]; barrier;   issue K[n+1]   (every warp is done with K[n])
//   O += P V[n]           (K[n+1] lands meanwhile)
#pragma once

#include "flash_common.cuh"
#include "launch.h"

namespace attention_ext {
namespace cuda {

template <typename Elem_, int kD_, int kBlockN_, int kWarps_, int kMT_, int kPasses_ = 1>
struct FwdConfig {
  using Elem = Elem_;
  using Mma = MmaTraits<Elem, kPasses_>;
  static constexpr int kD = kD_;            // head-dim bucket (q/k and v padded to it)
  static constexpr int kBlockN = kBlockN_;  // keys per tile
  static constexpr int kWarps = kWarps_;
  static constexpr int kMT = kMT_;          // 16-row m-tiles per warp
  static constexpr int kBlockM = 16 * kMT * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  // +16 bytes per shared row: consecutive rows start 16 bytes apart modulo 128,
  // so the 8 row addresses of an ldmatrix hit distinct bank groups.
  static constexpr int kLd = kD + 16 / static_cast<int>(sizeof(Elem));
  static constexpr int kNTS = kBlockN / 8;  // n-tiles of S per warp
  static constexpr int kNTO = kD / 8;       // n-tiles of O per warp
  static constexpr size_t kSmem = size_t(kBlockM + 2 * kBlockN) * kLd * sizeof(Elem);
  static constexpr int kMaskLdB = mask_ld_bytes<kBlockN>();
  static constexpr size_t kSmemMask = size_t(kBlockM) * kMaskLdB;  // only allocated with an explicit mask
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0, "tile sizes");
  static_assert(kSmem + kSmemMask <= 99 * 1024, "must fit the 99 KB of sm_86/sm_89 (L4) shared memory");
};

// Stores two adjacent output elements (cols c, c+1 of a row) if inside.
template <typename Elem>
__device__ __forceinline__ void store_pair(Elem* dst, float x0, float x1, bool ok0, bool ok1, bool pair_ok) {
  if (pair_ok && ok1) {
    if constexpr (sizeof(Elem) == 2) {
      *reinterpret_cast<uint32_t*>(dst) = ElemOps<Elem>::pack2(x0, x1);
    } else {
      *reinterpret_cast<float2*>(dst) = make_float2(x0, x1);
    }
  } else {
    if (ok0) dst[0] = ElemOps<Elem>::from_float(x0);
    if (ok1) dst[1] = ElemOps<Elem>::from_float(x1);
  }
}

__device__ __forceinline__ DropoutRng make_rng(const FwdParams& p) {
  uint64_t seed = p.seed, offset = p.offset;
  if (p.seed_offset_ptr != nullptr) {  // graph-safe: the values of this launch live on the device
    seed = static_cast<uint64_t>(p.seed_offset_ptr[0]);
    offset = static_cast<uint64_t>(p.seed_offset_ptr[1]);
  }
  return DropoutRng(seed, offset, p.dropout_p);
}

// Sequence b of a packed call (FwdParams::cu_seqlens_q) as a call of its own, of batch 1: pointers moved to its
// first rows, its lengths, its block of the log-sum-exp and its dropout stream (the device twin of
// split_sequences in varlen.h).
template <typename Elem>
__device__ __forceinline__ FwdParams sequence_params(const FwdParams& p, int64_t b) {
  FwdParams s = p;
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  s.batch = 1;
  s.len_q = p.cu_seqlens_q[b + 1] - q0;
  s.len_k = p.cu_seqlens_k[b + 1] - k0;
  s.q = static_cast<const Elem*>(p.q) + q0 * p.q_stride.r;
  s.k = static_cast<const Elem*>(p.k) + k0 * p.k_stride.r;
  s.v = static_cast<const Elem*>(p.v) + k0 * p.v_stride.r;
  s.out = static_cast<Elem*>(p.out) + q0 * p.o_stride.r;
  s.lse = static_cast<float*>(p.lse) + p.heads_q * q0;
  s.offset = p.offset + static_cast<uint64_t>(b);
  if (p.seed_offset_ptr != nullptr) s.seed_offset_ptr = p.seed_offset_ptr + 2 * b;
  s.cu_seqlens_q = s.cu_seqlens_k = nullptr;
  return s;
}

// Loads the key or value tile of rows j0 .. j0 + nk - 1 (base: the head's rows, row_stride apart; pages page_stride
// apart) into sm: base's rows, or in the cache variant with a paged cache (FwdParams::block_table) each row from
// its page, so that pages of any size (vLLM's 16) are read in place. The block table row is that of the CTA's batch
// element, found from the launch's parameters pc and blockIdx rather than from values kept live through the loop,
// and the chunks are issued from a loop, not unrolled (registers; benchmarks/NOTES.md 52).
template <bool kCache, class Cfg, typename Elem>
__device__ __forceinline__ void load_kv_tile(Elem* sm, const FwdParams& pc, const Elem* base, int64_t row_stride,
                                             int64_t page_stride, int64_t j0, int nk, int ncols, bool vec, int tid) {
  constexpr int kBlockN = Cfg::kBlockN, kLd = Cfg::kLd, kThreads = Cfg::kThreads, kD = Cfg::kD;
  if constexpr (kCache) {
    if (pc.block_table != nullptr) {
      const int64_t per_b = ceil_div(pc.len_q, Cfg::kBlockM) * pc.heads_q;  // CTAs of a batch element (and split)
      const int64_t b = static_cast<int64_t>(blockIdx.x) % (per_b * pc.batch) / per_b;
      const int page = static_cast<int>(pc.page_size), j = static_cast<int>(j0);
      const int32_t* pages = pc.block_table + b * pc.block_table_stride;
      const auto row = [&](int r) {
        const int jr = j + r;
        return base + static_cast<int64_t>(pages[jr / page]) * page_stride + static_cast<int64_t>(jr % page) * row_stride;
      };
      load_tile_rows<Elem, kBlockN, kD, kLd, kThreads, false>(sm, base, row, nk, ncols, vec, tid);
      return;
    }
  }
  load_tile<Elem, kBlockN, kD, kLd, kThreads>(sm, base + j0 * row_stride, row_stride, nk, ncols, vec, tid);
}

// The batch of the split keys' shares (FwdParams::num_splits): the call's (a packed call of sequences has no split
// keys, and its sequence's params say 1; a cache call's shares, packed queries included, are the call's).
template <int kMode>
__device__ __forceinline__ int64_t split_batch(const FwdParams& p_call) {
  return kMode == 1 ? 1 : p_call.batch;
}

// kMode 1: a packed call (FwdParams::cu_seqlens_q), 2: a cache call (FwdParams::cache_lens), each a kernel of its
// own so that the others keep their registers (selecting the sequence's params at run time cost the fp16 / bf16
// kernels ~120 bytes of spills, and a cache's params in the packed variant up to 290 more).
template <class Cfg, int kMode>
__global__ void __launch_bounds__(Cfg::kThreads) flash_fwd_kernel(const FwdParams p_call, const FwdStats st) {
  constexpr bool kPacked = kMode != 0, kCache = kMode == 2;  // kPacked: a call per sequence (or batch element)
  using Elem = typename Cfg::Elem;
  using M = typename Cfg::Mma;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kLd = Cfg::kLd;
  constexpr int MT = Cfg::kMT, NTS = Cfg::kNTS, NTO = Cfg::kNTO, kThreads = Cfg::kThreads;

  AE_DYNAMIC_SMEM(smem_raw);
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);  // kBlockM x kLd: the block's queries (whole loop)
  Elem* sK = sQ + kBlockM * kLd;                 // kBlockN x kLd: key tile n
  Elem* sV = sK + kBlockN * kLd;                 // kBlockN x kLd: value tile n
  // kBlockM rows x kMaskLdB bytes: raw explicit mask of tile n (when there is one)
  unsigned char* sMask = reinterpret_cast<unsigned char*>(sV + kBlockN * kLd);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const int64_t Hq = p_call.heads_q;
  const int64_t nmb = ceil_div(p_call.len_q, kBlockM);
  // blockIdx.x = split * (nmb * batch * Hq) + cta; split = 0 unless the keys are split (taken again where
  // needed rather than kept live through the loop: registers)
  const int64_t cta = static_cast<int64_t>(blockIdx.x) % (nmb * p_call.batch * Hq);
  const int64_t bh_call = cta / nmb;
  const int64_t mb = nmb - 1 - cta % nmb;  // longest causal blocks first
  const int64_t h = bh_call % Hq, hk = h / (Hq / p_call.heads_kv);
  // packed sequences: from here on the CTA's sequence is the call (batch 1); the grid covers the longest
  // sequence, so a query block past the end of this one has nothing to do
  FwdParams seq;
  // a cache call's batch element refused (cache_keys_ok: its length or cache row out of range, or the length -1
  // that launch_cache_lengths gives one with pages out of range, under graph capture): no key tiles, a NaN output
  // and log-sum-exp (its row sums start NaN)
  bool refused = false;
  if constexpr (kCache) {
    seq = cache_batch_params(p_call, bh_call / Hq, sizeof(Elem), sizeof(float));
    refused = !cache_keys_ok(p_call, bh_call / Hq);
  } else if constexpr (kPacked) {
    seq = sequence_params<Elem>(p_call, bh_call / Hq);
  }
  const FwdParams& p = kPacked ? seq : p_call;
  const int64_t bh = kPacked ? h : bh_call, b = kPacked ? 0 : bh_call / Hq;
  const int64_t L = p.len_q, S = p.len_k;
  const int64_t i0 = mb * kBlockM;
  if constexpr (kPacked)
    if (i0 >= L) return;  // uniform over the CTA
  const int nq = static_cast<int>(L - i0 < kBlockM ? L - i0 : kBlockM);

  const bool stats = st.shift != nullptr;
  if (stats && !st.exact_d) {  // uniform over the CTA: every thread returns or none does
    bool extreme = false;
    for (int r = tid; r < nq; r += kThreads) {
      const float x = static_cast<const float*>(p.lse)[bh * L + i0 + r];
      extreme = extreme || (x != -kInf && fabsf(x) > static_cast<float>(kExtremeLse));
    }
    if (!__syncthreads_or(extreme)) return;
  }
  // the output itself (P V) is needed by the forward and for the exact D only
  const bool need_o = !stats || st.exact_d;

  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
  const int E = static_cast<int>(p.dim_qk), Ev = static_cast<int>(p.dim_v);
  const bool vec_q = vec16_ok(q, p.q_stride.r, L, E);
  bool vec_k = vec16_ok(k, p.k_stride.r, S, E);
  bool vec_v = vec16_ok(v, p.v_stride.r, S, Ev);
  if constexpr (kCache) {
    if (p_call.block_table != nullptr) {  // every page's rows aligned too
      vec_k = vec_k && (p_call.k_stride.b * static_cast<int64_t>(sizeof(Elem))) % 16 == 0;
      vec_v = vec_v && (p_call.v_stride.b * static_cast<int64_t>(sizeof(Elem))) % 16 == 0;
    }
  }

  // Union of the visible key ranges of the block's rows (bounds are monotone in i).
  int64_t lo0, hi0, lo1, hi1;
  key_range(p, i0, lo0, hi0);
  key_range(p, i0 + nq - 1, lo1, hi1);
  const int64_t jlo = lo0, jhi = hi1 > lo0 && !refused ? hi1 : lo0;
  int64_t n_begin = jlo / kBlockN;
  int64_t n_end = jhi > jlo ? ceil_div(jhi, kBlockN) : n_begin;
  // a mask: only the tiles between the first and last element that lets its key be seen (true, or not
  // -inf) (sMask is free until the loop)
  if (p.mask_kind != MaskKind::kNone && n_begin < n_end) {
    int64_t* bounds = reinterpret_cast<int64_t*>(sMask) + 8;  // past the 64 bytes of reduction scratch
    narrow_key_tiles<kBlockN, kThreads>(mask_ref(p), b, h, i0, nq, n_begin, n_end, bounds,
                                        reinterpret_cast<int*>(sMask), tid);
    n_begin = bounds[0];
    n_end = bounds[1];
    __syncthreads();  // read by all before the first mask tile lands there
  }
  if (p.num_splits > 1) {  // this CTA's share of the tiles (possibly none)
    const int64_t split = static_cast<int64_t>(blockIdx.x) / (nmb * split_batch<kMode>(p_call) * Hq);
    const int64_t per = ceil_div(n_end - n_begin, p.num_splits);
    const int64_t s0 = n_begin + split * per < n_end ? n_begin + split * per : n_end;
    n_begin = s0;
    n_end = s0 + per < n_end ? s0 + per : n_end;
  }

  const bool dropout = p.dropout_p > 0.f;
  const DropoutRng rng = dropout ? make_rng(p) : DropoutRng();
  const float scale = static_cast<float>(p.scale);

  float acc_o[MT][NTO][4];
  zero_acc(acc_o);
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -kInf;
    row_sum[mt][0] = row_sum[mt][1] = refused ? kNaN : 0.f;
  }
  const int64_t wrow0 = i0 + warp * 16 * MT;  // query row of this warp's first row
  const Elem* sQw = sQ + warp * 16 * MT * kLd;

  if (n_begin < n_end) {
    load_tile<Elem, kBlockM, kD, kLd, kThreads>(sQ, q + i0 * p.q_stride.r, p.q_stride.r, nq, E, vec_q, tid);
    const int64_t j0 = n_begin * kBlockN;
    const int nk = static_cast<int>(S - j0 < kBlockN ? S - j0 : kBlockN);
    load_kv_tile<kCache, Cfg>(sK, p_call, k, p.k_stride.r, p_call.k_stride.b, j0, nk, E, vec_k, tid);
    stage_mask<kBlockM, kBlockN, kThreads>(sMask, p, b, h, i0, j0, tid);
    cp_async_commit();
  }

  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t j0 = n * kBlockN;
    const int nk = static_cast<int>(S - j0 < kBlockN ? S - j0 : kBlockN);
    // K[n] and mask[n] (and Q) have landed for this thread; the barrier makes every
    // thread's copies visible and guarantees every warp finished O += P V[n-1],
    // so sV can be refilled.
    cp_async_wait<0>();
    __syncthreads();
    if (need_o) {
      load_kv_tile<kCache, Cfg>(sV, p_call, v, p.v_stride.r, p_call.v_stride.b, j0, nk, Ev, vec_v, tid);
    }
    cp_async_commit();

    float s[MT][NTS][4];
    zero_acc(s);
    gemm_ss<M, MT, NTS, kD, true, true>(s, sQw, kLd, sK, kLd, lane);

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) s[mt][nt][r] *= scale;
    if (p.softcap > 0.0) {  // (read per tile from the parameters: no register held across the loop)
      const float cap = static_cast<float>(p.softcap);
      softcap_acc(s, cap, 2.f * kLog2e / cap);
    }
    if constexpr (!kPacked || kCache) {  // (packed sequences take no ALiBi; a cache call's p has its batch's slopes)
      if (p.alibi_slopes != nullptr) alibi_acc(s, alibi_slope(p, b, h), static_cast<int>(wrow0 - j0 + S - L), lane);
    }
    if (!tile_fully_visible(p, i0, i0 + nq - 1, j0, kBlockN)) {
      dispatch_mask(p, [&](auto tag) {
        using MaskT = typename decltype(tag)::type;
        mask_tile<MaskT, Cfg::kMaskLdB>(s, p, wrow0, j0, sMask + warp * 16 * MT * Cfg::kMaskLdB, lane);
      });
    }

    // Online softmax. Each row lives in the 4 lanes of a quad. The differences
    // are taken before the log2(e) factor so that finite scores near
    // -FLT_MAX (finfo.min masks) cannot overflow to -inf.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = row_max[mt][hr];
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row that has seen only -inf so far keeps m = -inf; subtracting 0
        // instead avoids (-inf) - (-inf) = NaN and gives P = 0.
        const float m_use = mx == -kInf ? 0.f : mx;
        const float alpha = exp2f((row_max[mt][hr] - m_use) * kLog2e);
        row_max[mt][hr] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float e = exp2f((s[mt][nt][2 * hr + c] - m_use) * kLog2e);
            s[mt][nt][2 * hr + c] = e;
            sum += e;
          }
        }
        row_sum[mt][hr] = row_sum[mt][hr] * alpha + sum;  // per-lane partial sum, reduced at the end
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          acc_o[mt][nt][2 * hr] *= alpha;
          acc_o[mt][nt][2 * hr + 1] *= alpha;
        }
      }
    }

    if (dropout) {
      uint32_t bits[MT][NTS];
      dropout_bits(bits, rng, static_cast<uint64_t>(bh), wrow0, j0, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) s[mt][nt][r] = ((bits[mt][nt] >> r) & 1u) ? s[mt][nt][r] : 0.f;
    }

    // V[n] landed; the barrier also guarantees every warp is done with sK
    // and sMask, which now receive tile n + 1.
    cp_async_wait<0>();
    __syncthreads();
    if (n + 1 < n_end) {
      const int64_t j1 = j0 + kBlockN;
      const int nk1 = static_cast<int>(S - j1 < kBlockN ? S - j1 : kBlockN);
      load_kv_tile<kCache, Cfg>(sK, p_call, k, p.k_stride.r, p_call.k_stride.b, j1, nk1, E, vec_k, tid);
      stage_mask<kBlockM, kBlockN, kThreads>(sMask, p, b, h, i0, j1, tid);
    }
    cp_async_commit();

    if (need_o) gemm_rs<M, MT, NTS, NTO>(acc_o, s, sV, kLd, lane);
    if constexpr (sizeof(Elem) == 2) {
      // exact D: P V with P = hi + lo in two 16-bit terms (the product above
      // rounded P to Elem), so that O, and D = dO . O, carry the fp32 P the
      // backward uses; in place, to cost the forward no registers
      if (stats && st.exact_d) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[mt][nt][r] -= ElemOps<Elem>::to_float(ElemOps<Elem>::from_float(s[mt][nt][r]));
        gemm_rs<M, MT, NTS, NTO>(acc_o, s, sV, kLd, lane);
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: normalise, write O and the log-sum-exp (stats mode: the row statistics).
  Elem* o = static_cast<Elem*>(p.out) + b * p.o_stride.b + h * p.o_stride.h;
  const bool pair_ok = reinterpret_cast<uintptr_t>(o) % (2 * sizeof(Elem)) == 0 && p.o_stride.r % 2 == 0;
  const bool partial = p.num_splits > 1;
  // first row of this CTA's share in the split buffers: (split * batch * Hq + bh) * Lp (never packed sequences; a
  // cache call's rows by the call's batch and head, Lp rows apart: its len_q, the longest L_b of packed queries)
  const int64_t nb = split_batch<kMode>(p_call), Lp = kCache ? p_call.len_q : L;
  const int64_t part = (static_cast<int64_t>(blockIdx.x) / (nmb * nb * Hq) * nb * Hq + (kCache ? bh_call : bh)) * Lp;
  float* lse = partial ? p.lse_accum + part : static_cast<float*>(p.lse) + bh * L;
  const float keep_scale = dropout ? rng.inv_keep : 1.f;
  // stats mode of a packed call: the sequence's block of the statistics starts at row heads_q * q0, its dO at
  // row q0 (taken here rather than kept live through the loop: registers)
  int64_t st_q0 = 0;
  if constexpr (kMode == 1)
    if (stats) st_q0 = p_call.cu_seqlens_q[static_cast<int64_t>(blockIdx.x) % (nmb * p_call.batch * Hq) / nmb / Hq];
  const int64_t st_row0 = Hq * st_q0;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = row_sum[mt][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t i = wrow0 + 16 * mt + g + 8 * hr;
      // the row saw no key; a NaN sum (NaN scores) is not that: its output and lse are NaN, so that the
      // backward's P is NaN too, as PyTorch's gradients are
      const bool empty = l == 0.f;
      const float inv = empty ? 0.f : keep_scale / l;
      if (stats) {
        if (t == 0 && i < L) {
          st.shift[st_row0 + bh * L + i] = empty ? -kInf : row_max[mt][hr];
          st.logl[st_row0 + bh * L + i] = empty ? 0.f : logf(l);
        }
        if (st.exact_d) {  // D = dO . O with O in fp32 (dropout included: O = sum_j P~_ij V_j)
          const Elem* dorow = static_cast<const Elem*>(st.dout) + b * st.do_stride.b + h * st.do_stride.h +
                              (st_q0 + (i < L ? i : 0)) * st.do_stride.r;
          float d = 0.f;
#pragma unroll
          for (int nt = 0; nt < NTO; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int col = 8 * nt + 2 * t + c;
              if (i < L && col < Ev) d += ElemOps<Elem>::to_float(dorow[col]) * (acc_o[mt][nt][2 * hr + c] * inv);
            }
          }
          d += __shfl_xor_sync(0xffffffffu, d, 1);
          d += __shfl_xor_sync(0xffffffffu, d, 2);
          if (t == 0 && i < L) {
            const int64_t r = st_row0 + bh * L + i;
            st.dsum[r] = st.dlse != nullptr && !empty ? d - st.dlse[r] : d;
          }
        }
        continue;
      }
      if (partial && t == 0 && i < L) {
        lse[i] = empty ? -kInf : row_max[mt][hr];
        lse[p.num_splits * nb * Hq * Lp + i] = l;
      } else if (t == 0 && i < L) {
        lse[i] = empty ? -kInf : row_max[mt][hr] + logf(l);
      }
      if (partial && i < L) {
        float* orow = p.o_accum + (part + i) * Ev;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const int c = 8 * nt + 2 * t;
          store_pair(orow + c, acc_o[mt][nt][2 * hr] * inv, acc_o[mt][nt][2 * hr + 1] * inv, c < Ev, c + 1 < Ev,
                     Ev % 2 == 0);
        }
      } else if (i < L) {
        Elem* orow = o + i * p.o_stride.r;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const int c = 8 * nt + 2 * t;
          store_pair(orow + c, acc_o[mt][nt][2 * hr] * inv, acc_o[mt][nt][2 * hr + 1] * inv, c < Ev, c + 1 < Ev,
                     pair_ok);
        }
      }
    }
  }
}

template <class Cfg>
cudaError_t launch_fwd(const FwdParams& p, const FwdStats* stats, const LaunchEnv& env) {
  if (p.num_splits < 1 || (p.num_splits > 1 && (stats != nullptr || p.o_accum == nullptr || p.lse_accum == nullptr)))
    return cudaErrorInvalidValue;  // split keys: the forward only, into its buffers
  if (p.cu_seqlens_q != nullptr && p.cache_lens == nullptr &&
      (p.num_splits > 1 || p.cu_seqlens_k == nullptr || p.mask_kind != MaskKind::kNone || p.alibi_slopes != nullptr))
    return cudaErrorInvalidValue;  // packed sequences: without split keys, a mask or ALiBi
  if ((p.block_table != nullptr && (p.cache_lens == nullptr || p.page_size < 1)) ||
      (p.cache_lens != nullptr && (stats != nullptr || p.mask_kind != MaskKind::kNone || p.cu_seqlens_k != nullptr)))
    return cudaErrorInvalidValue;  // a cache: the forward alone, without a mask or packed keys
  const int64_t blocks = ceil_div(p.len_q, Cfg::kBlockM) * p.batch * p.heads_q * p.num_splits;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = Cfg::kSmem + (p.mask_kind != MaskKind::kNone ? Cfg::kSmemMask : 0);
  if (p.cache_lens != nullptr)
    return launch_kernel(flash_fwd_kernel<Cfg, 2>, static_cast<unsigned>(blocks), Cfg::kThreads, smem,
                         Cfg::kSmem + Cfg::kSmemMask, env.stream, "flash_fwd_kernel (cache)", p, FwdStats{});
  if (p.cu_seqlens_q != nullptr)
    return launch_kernel(flash_fwd_kernel<Cfg, 1>, static_cast<unsigned>(blocks), Cfg::kThreads, smem,
                         Cfg::kSmem + Cfg::kSmemMask, env.stream, "flash_fwd_kernel (packed)", p,
                         stats != nullptr ? *stats : FwdStats{});
  return launch_kernel(flash_fwd_kernel<Cfg, 0>, static_cast<unsigned>(blocks), Cfg::kThreads, smem,
                       Cfg::kSmem + Cfg::kSmemMask, env.stream, "flash_fwd_kernel", p,
                       stats != nullptr ? *stats : FwdStats{});
}

}  // namespace cuda
}  // namespace attention_ext

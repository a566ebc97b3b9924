// One element type per translation unit (compile time, and parallel builds).
#include "flash_cpu.h"

#include <array>
#include <chrono>

namespace attention_ext::cpu {
template void flash_fwd<bf16>(const FwdParams&, bf16*, bool);
template void flash_bwd<bf16>(const BwdParams&);
template void flash_probs<bf16>(const FwdParams&, bf16*);

namespace {

// Seconds of the fastest of `reps` forward tile steps through Tile (Q loaded,
// then K loaded, S = Q K^T, V loaded, acc += S V: what the forward does per
// (query block, key block) pair, packing or fp32 copies included).
template <typename Tile>
double time_forward_step(Tile& tile, const AVec<bf16>& q, const AVec<bf16>& k, const AVec<bf16>& v, int64_t bq,
                         int64_t bk, int64_t E, AVec<float>& s, AVec<float>& acc, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    tile.load_q(q.data(), E, bq);
    tile.load_k(k.data(), E, bk);
    tile.qk(0.125f, s.data(), bk);
    tile.load_v(v.data(), E, bk);
    tile.pv(s.data(), bk, acc.data());
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count());
  }
  return best;
}

// Which product path is fastest depends on the CPU, not on a flag: the dot-product
// tiles win 1.5x on Zen 4 (NOTES 3: MKL's sgemm runs AVX2 there) and lose ~1.5x
// on an Intel Xeon whose sgemm runs AVX-512 while vdpbf16ps issues at ~0.6x the
// FMA rate (NOTES 7, 8); on a Xeon with AMX (Sapphire Rapids) the AMX tiles and
// MKL's bf16 GEMM (itself on AMX) beat both (NOTES 12), while on Zen 4 MKL's bf16
// GEMM ran at sgemm speed (NOTES 3). So: time one forward tile step of the
// default forward tiles (128 x 512, head dim 64) through every available path
// on every thread at once (as the kernels run: the BLAS single-threaded inside
// the parallel region, cores sharing their caches and ports), fastest of 5
// alternated reps each. ~5-20 ms, once. The fastest wins, except that the
// dot tiles are kept within 10% of the fastest of the BLAS paths (they need no
// fp32 copies of the operands and do not depend on the BLAS).
// Whether this CPU and torch's BLAS have the path (the fp32 BLAS path: always).
bool available(Bf16Path path) {
  switch (path) {
    case Bf16Path::kAmx: return amx_available();
    case Bf16Path::kDot: return bf16_dot_available();
    case Bf16Path::kMkl: return bf16_gemm_available();
    default: return true;
  }
}

Bf16Path calibrate() {
  constexpr int64_t bq = 128, bk = 512, E = 64;
  constexpr int kReps = 5;
  AVec<bf16> q(bq * E), k(bk * E), v(bk * E);  // aligned as the kernels' buffers are
  uint32_t x = 12345u;  // deterministic inputs in [-1, 1)
  auto next = [&x]() {
    x = x * 1664525u + 1013904223u;
    const float f = static_cast<float>(x >> 8) / 8388608.f - 1.f;
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return bf16{static_cast<uint16_t>(b >> 16)};
  };
  for (auto* t : {&q, &k, &v})
    for (auto& e : *t) e = next();
  constexpr int kPaths = 4;
  const Bf16Path paths[kPaths] = {Bf16Path::kAmx, Bf16Path::kDot, Bf16Path::kMkl, Bf16Path::kBlas};
  bool avail[kPaths];
  for (int i = 0; i < kPaths; ++i) avail[i] = available(paths[i]);
  const int64_t nt = std::max(1, num_threads());
  std::vector<std::array<double, kPaths>> t(nt);  // seconds per thread and path
  parallel_for(nt, [&](int64_t i0, int64_t i1) {
    // constructing a tile only allocates: the instructions of a path run in step(), for available paths only
    Bf16AmxTile amx(E, E, bq, bk, false);
    Bf16DotTile dot(E, E, bq, bk, false);
    Bf16GemmTile mkl(E, E, bq, bk, false);
    BlasTile<bf16> blas(E, E, bq, bk, false);
    AVec<float> s(bq * bk), acc(bq * E, 0.f);
    auto step = [&](int i) {
      switch (i) {
        case 0: return time_forward_step(amx, q, k, v, bq, bk, E, s, acc, 1);
        case 1: return time_forward_step(dot, q, k, v, bq, bk, E, s, acc, 1);
        case 2: return time_forward_step(mkl, q, k, v, bq, bk, E, s, acc, 1);
        default: return time_forward_step(blas, q, k, v, bq, bk, E, s, acc, 1);
      }
    };
    // one untimed step each: first-touch of the buffers, the BLAS's lazy setup
    for (int i = 0; i < kPaths; ++i)
      if (avail[i]) step(i);
    for (int64_t th = i0; th < i1; ++th) {
      std::array<double, kPaths> best;
      best.fill(1e30);
      for (int r = 0; r < kReps; ++r)  // alternated, so a burst of machine noise hits every path
        for (int i = 0; i < kPaths; ++i)
          if (avail[i]) best[i] = std::min(best[i], step(i));
      t[th] = best;
    }
  });
  std::array<double, kPaths> sum;
  sum.fill(0.0);
  for (int64_t th = 0; th < nt; ++th)
    for (int i = 0; i < kPaths; ++i) sum[i] += t[th][i];
  int fastest = -1;
  for (int i = 0; i < kPaths; ++i)
    if (avail[i] && i != 1 && (fastest < 0 || sum[i] < sum[fastest])) fastest = i;
  if (avail[1] && sum[1] <= 1.1 * sum[fastest]) return Bf16Path::kDot;
  return paths[fastest];
}

}  // namespace

Bf16Path bf16_path() {
  // A function-local static: initialised once, thread-safely (concurrent first
  // callers wait); if the environment value is bad the initialiser throws and
  // every later call throws the same error again.
  static const Bf16Path path = [] {
    const Bf16Path want = bf16_path_requested();
    if (want == Bf16Path::kAuto) return calibrate();
    return available(want) ? want : Bf16Path::kBlas;  // a forced path the CPU lacks: the fp32 BLAS
  }();
  return path;
}

}  // namespace attention_ext::cpu

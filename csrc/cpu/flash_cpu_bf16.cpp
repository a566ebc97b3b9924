// One element type per translation unit (compile time, and parallel builds).
#include "flash_cpu.h"

#include <chrono>

namespace attention_ext::cpu {
template void flash_fwd<bf16>(const FwdParams&);
template void flash_bwd<bf16>(const BwdParams&);
template void flash_probs<bf16>(const FwdParams&, bf16*);

namespace {

// Seconds of the fastest of `reps` forward tile steps through Tile (Q loaded,
// then K loaded, S = Q K^T, V loaded, acc += S V: what the forward does per
// (query block, key block) pair, packing or fp32 copies included).
template <typename Tile>
double time_forward_step(Tile& tile, const std::vector<bf16>& q, const std::vector<bf16>& k,
                         const std::vector<bf16>& v, int64_t bq, int64_t bk, int64_t E, std::vector<float>& s,
                         std::vector<float>& acc, int reps) {
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

// The dot-product tiles win 1.5x on Zen 4 (NOTES 3: MKL's sgemm runs AVX2
// there) and lose ~1.5x on an Intel Xeon whose sgemm runs AVX-512 while
// vdpbf16ps issues at ~0.6x the FMA rate (NOTES 7, 8), so no CPU flag decides
// it: time one forward tile step of the default forward tiles (128 x 512,
// head dim 64) through both paths on every thread at once (as the kernels run:
// the BLAS single-threaded inside the parallel region, cores sharing their
// caches and ports), fastest of 5 alternated reps each. ~5-10 ms, once.
// Within 10% the dot tiles are kept: they need no fp32 copies of the operands.
bool calibrate_dot() {
  constexpr int64_t bq = 128, bk = 512, E = 64;
  constexpr int kReps = 5;
  std::vector<bf16> q(bq * E), k(bk * E), v(bk * E);
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
  const int64_t nt = std::max(1, num_threads());
  std::vector<double> t_dot(nt, 0.0), t_blas(nt, 0.0);
  parallel_for(nt, [&](int64_t i0, int64_t i1) {
    Bf16DotTile dot(E, E, bq, bk, false);
    BlasTile<bf16> blas(E, E, bq, bk, false);
    std::vector<float> s(bq * bk), acc(bq * E, 0.f);
    // one untimed step each: first-touch of the buffers, MKL's lazy setup
    time_forward_step(dot, q, k, v, bq, bk, E, s, acc, 1);
    time_forward_step(blas, q, k, v, bq, bk, E, s, acc, 1);
    for (int64_t i = i0; i < i1; ++i) {
      double d = 1e30, b = 1e30;
      for (int r = 0; r < kReps; ++r) {  // alternated, so a burst of machine noise hits both
        d = std::min(d, time_forward_step(dot, q, k, v, bq, bk, E, s, acc, 1));
        b = std::min(b, time_forward_step(blas, q, k, v, bq, bk, E, s, acc, 1));
      }
      t_dot[i] = d;
      t_blas[i] = b;
    }
  });
  double sd = 0, sb = 0;
  for (int64_t i = 0; i < nt; ++i) {
    sd += t_dot[i];
    sb += t_blas[i];
  }
  return sd <= 1.1 * sb;
}

}  // namespace

bool bf16_use_dot() {
  // A function-local static: initialised once, thread-safely (concurrent first
  // callers wait); if the environment value is bad the initialiser throws and
  // every later call throws the same error again.
  static const bool use_dot = [] {
    const Bf16Path want = bf16_path_requested();
    if (!bf16_dot_available() || want == Bf16Path::kBlas) return false;
    if (want == Bf16Path::kDot) return true;
    return calibrate_dot();
  }();
  return use_dot;
}

}  // namespace attention_ext::cpu

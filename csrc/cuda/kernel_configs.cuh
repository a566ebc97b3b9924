// Tile configurations per (element type, head-dim bucket), and the launchers
// that the generated instantiation files register (see generate.py).
//
// Constraints every configuration satisfies (static_asserts in the configs):
//   shared memory <= 99 KB, so every kernel also runs on sm_86 / sm_89 (L4);
//   warp tiles of 16-row m-tiles and pairs of 8-column n-tiles.
// Register use and spills per kernel: README.md (nvcc --resource-usage).
#pragma once

#include <type_traits>

#include "flash_bwd.cuh"
#include "flash_fwd.cuh"
#include "launch.h"
#include "static_switch.h"

namespace attention_ext {
namespace cuda {

// ---------------------------------------------------------------------------
// Forward: FwdConfig<Elem, kD, kBlockN, kWarps, kMT (16-row tiles per warp), kPasses>
//   kBlockM = 16 * kMT * kWarps query rows per CTA.

template <typename Elem, int kD, int kPasses>
struct FwdConfigFor;

// fp16 / bf16: 128 query rows (4 warps x 32 rows: each K/V fragment read from
// shared memory feeds two m-tiles), up to head dim 128; 64 rows above.
template <typename Elem, int kD>
struct FwdConfig16 {
  using type = std::conditional_t<
      (kD <= 64), FwdConfig<Elem, kD, 64, 4, 2>,
      std::conditional_t<(kD <= 128), FwdConfig<Elem, kD, 32, 4, 2>,
                         std::conditional_t<(kD <= 192), FwdConfig<Elem, kD, 64, 4, 1>, FwdConfig<Elem, kD, 32, 4, 1>>>>;
};
template <int kD>
struct FwdConfigFor<__half, kD, 1> : FwdConfig16<__half, kD> {};
template <int kD>
struct FwdConfigFor<__nv_bfloat16, kD, 1> : FwdConfig16<__nv_bfloat16, kD> {};

// fp32 (twice the bytes per element): 64 query rows.
template <int kD, int kPasses>
struct FwdConfigFor<float, kD, kPasses> {
  using type = std::conditional_t<
      (kD <= 64), FwdConfig<float, kD, 64, 4, 1, kPasses>,
      std::conditional_t<(kD <= 128), FwdConfig<float, kD, 32, 4, 1, kPasses>, FwdConfig<float, kD, 16, 2, 1, kPasses>>>;
};

// ---------------------------------------------------------------------------
// Backward: BwdConfig<Elem, kD, kBlockM, kBlockN, kWarps, WsM, WsN, WkvM, WkvN, WqM, WqN, kPasses>

template <typename Elem, int kD, int kPasses>
struct BwdConfigFor;

template <typename Elem, int kD>
struct BwdConfig16 {
  using type = std::conditional_t<
      (kD <= 32), BwdConfig<Elem, kD, 64, 128, 8, 2, 4, 4, 2, 4, 2>,
      std::conditional_t<
          (kD <= 64), BwdConfig<Elem, kD, 64, 128, 8, 2, 4, 4, 2, 4, 2>,
          std::conditional_t<
              (kD <= 96), BwdConfig<Elem, kD, 64, 64, 8, 2, 4, 4, 2, 4, 2>,
              std::conditional_t<(kD <= 128), BwdConfig<Elem, kD, 64, 64, 8, 2, 4, 2, 4, 2, 4>,
                                 std::conditional_t<(kD <= 192), BwdConfig<Elem, kD, 32, 64, 8, 2, 4, 2, 4, 2, 4>,
                                                    BwdConfig<Elem, kD, 32, 32, 8, 2, 2, 2, 4, 2, 4>>>>>>;
};
template <int kD>
struct BwdConfigFor<__half, kD, 1> : BwdConfig16<__half, kD> {};
template <int kD>
struct BwdConfigFor<__nv_bfloat16, kD, 1> : BwdConfig16<__nv_bfloat16, kD> {};

template <int kD, int kPasses>
struct BwdConfigFor<float, kD, kPasses> {
  using type = std::conditional_t<
      (kD <= 64), BwdConfig<float, kD, 32, 64, 8, 2, 4, 4, 2, 2, 4, kPasses>,
      std::conditional_t<(kD <= 128), BwdConfig<float, kD, 32, 32, 8, 2, 2, 2, 4, 2, 4, kPasses>,
                         BwdConfig<float, kD, 16, 16, 8, 1, 1, 1, 8, 1, 8, kPasses>>>;
};

// ---------------------------------------------------------------------------
// Launchers registered by the instantiation files. fp32 picks 1 TF32 pass when
// the user allowed TF32, else 3 (fp32 accuracy).

template <typename Elem, int kD>
cudaError_t run_fwd(const FwdParams& p, const FwdStats* stats, const LaunchEnv& env) {
  if constexpr (std::is_same<Elem, float>::value) {
    static_assert(FwdConfigFor<float, kD, 1>::type::kBlockM == FwdConfigFor<float, kD, 3>::type::kBlockM &&
                      FwdConfigFor<float, kD, 1>::type::kBlockN == FwdConfigFor<float, kD, 3>::type::kBlockN,
                  "both fp32 variants must tile alike (plan_fwd_splits reads one FwdEntry)");
    return BOOL_SWITCH(env.allow_tf32, kTF32, [&] {
      return launch_fwd<typename FwdConfigFor<float, kD, kTF32 ? 1 : 3>::type>(p, stats, env);
    });
  } else {
    return launch_fwd<typename FwdConfigFor<Elem, kD, 1>::type>(p, stats, env);
  }
}

template <typename Elem, int kD>
cudaError_t run_bwd(const BwdParams& p, const BwdWork& w, const LaunchEnv& env) {
  if constexpr (std::is_same<Elem, float>::value) {
    static_assert(BwdConfigFor<float, kD, 1>::type::kBlockN == BwdConfigFor<float, kD, 3>::type::kBlockN,
                  "both fp32 variants must chunk the keys alike");
    return BOOL_SWITCH(env.allow_tf32, kTF32, [&] {
      return launch_bwd<typename BwdConfigFor<float, kD, kTF32 ? 1 : 3>::type>(p, w, env);
    });
  } else {
    return launch_bwd<typename BwdConfigFor<Elem, kD, 1>::type>(p, w, env);
  }
}

template <typename Elem, int kD>
constexpr int fwd_block_m() {
  return FwdConfigFor<Elem, kD, 1>::type::kBlockM;
}
template <typename Elem, int kD>
constexpr int fwd_block_n() {
  return FwdConfigFor<Elem, kD, 1>::type::kBlockN;
}
template <typename Elem, int kD>
constexpr int bwd_block_n() {
  return BwdConfigFor<Elem, kD, 1>::type::kBlockN;
}

}  // namespace cuda
}  // namespace attention_ext

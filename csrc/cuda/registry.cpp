// Registry of the compiled CUDA kernel instantiations (see launch.h). Filled
// by static initializers of the generated fwd_/bwd_hdim<D>_<dtype>.cu files
// when the library is loaded; read by the glue afterwards.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "hopper/tma_desc.h"
#include "launch.h"

namespace attention_ext {
namespace cuda {
namespace {

// Function-local statics: constructed on first use, so the registration order
// of the translation units does not matter.
std::vector<FwdEntry>& fwd_table() {
  static std::vector<FwdEntry> table;
  return table;
}
std::vector<BwdEntry>& bwd_table() {
  static std::vector<BwdEntry> table;
  return table;
}
std::vector<Sm90FwdEntry>& fwd_sm90_table() {
  static std::vector<Sm90FwdEntry> table;
  return table;
}
std::vector<BwdEntry>& bwd_sm90_table() {
  static std::vector<BwdEntry> table;
  return table;
}

// Whether TMA can read a (batch, heads, rows, dim) view: the checks of
// cuTensorMapEncodeTiled on the map the launchers will build, so that the
// backward's row statistics and workspace are only ever made for the kernel
// that then runs (a launcher still declines if the driver itself rejects a map).
bool tma_readable(const void* base, const Strides4& st, int64_t batch, int64_t heads, int64_t rows, int64_t dim) {
  uint64_t dims[4], strides[3];
  if (!sm90::tma_view(st.r, st.h, st.b, batch, heads, rows, dim, dims, strides)) return false;
  const uint32_t box[4] = {64, 64, 1, 1};
  return sm90::check_tma_desc_4d(base, dims, strides, box, sm90::kSwizzle128B, 2) == nullptr;
}

// ATTENTION_EXT_DISABLE_SM90=1: the sm80 kernels even on an sm_90 device.
bool sm90_switched_off() {
  const char* off = std::getenv("ATTENTION_EXT_DISABLE_SM90");
  return off != nullptr && std::strcmp(off, "1") == 0;
}

// Whether TMA can read packed sequences' rows (total, heads, dim) through the
// map the launchers will build (sm90::tma_view_packed; R: the longest
// sequence's rows, at least 1).
bool tma_readable_packed(const void* base, const Strides4& st, int64_t heads, int64_t R, int64_t total, int64_t dim) {
  uint64_t dims[4], strides[3];
  const void* shifted = nullptr;
  if (!sm90::tma_view_packed(base, st.r, st.h, heads, std::max<int64_t>(R, 1), total, dim, dims, strides, &shifted)) {
    return false;
  }
  const uint32_t box[4] = {64, 64, 1, 1};
  return sm90::check_tma_desc_4d(shifted, dims, strides, box, sm90::kSwizzle128B, 2) == nullptr;
}

// The calls the Hopper kernels may take (the launchers check the head dims),
// packed sequences included.
bool sm90_eligible(const FwdParams& p, const LaunchEnv& env) {
  if (env.arch != 90) return false;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.cu_seqlens_q != nullptr) {
    if (p.mask_kind != MaskKind::kNone || p.len_q > 0x7fffffff || p.len_k > 0x7fffffff ||
        p.total_q > 0x7ffffffe || p.total_k > 0x7ffffffe || p.heads_q > 0x7fffffff || p.batch > 0x7fffffff) {
      return false;
    }
    if (!tma_readable_packed(p.q, p.q_stride, p.heads_q, p.len_q, p.total_q, p.dim_qk) ||
        !tma_readable_packed(p.k, p.k_stride, p.heads_kv, p.len_k, p.total_k, p.dim_qk) ||
        !tma_readable_packed(p.v, p.v_stride, p.heads_kv, p.len_k, p.total_k, p.dim_v)) {
      return false;
    }
    return !sm90_switched_off();
  }
  // explicit masks: only key padding (broadcast over the query rows)
  if (p.mask_kind != MaskKind::kNone && p.mask_stride.r != 0 && p.len_q != 1) return false;
  if (p.len_q > 0x7fffffff || p.len_k > 0x7fffffff || p.heads_q > 0x7fffffff || p.batch > 0x7fffffff) {
    return false;  // TMA coordinates and the tile arithmetic are 32-bit
  }
  if (!tma_readable(p.q, p.q_stride, p.batch, p.heads_q, p.len_q, p.dim_qk) ||
      !tma_readable(p.k, p.k_stride, p.batch, p.heads_kv, p.len_k, p.dim_qk) ||
      !tma_readable(p.v, p.v_stride, p.batch, p.heads_kv, p.len_k, p.dim_v)) {
    return false;
  }
  return !sm90_switched_off();
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat32: return "fp32";
    default: return "?";
  }
}

template <typename Entry>
const Entry* find_in(const std::vector<Entry>& table, DType dtype, int min_head_dim) {
  const Entry* best = nullptr;
  for (const Entry& e : table) {
    if (e.dtype == dtype && e.head_dim >= min_head_dim && (best == nullptr || e.head_dim < best->head_dim)) best = &e;
  }
  return best;
}

}  // namespace

bool register_fwd(const FwdEntry& e) {
  fwd_table().push_back(e);
  return true;
}
bool register_bwd(const BwdEntry& e) {
  bwd_table().push_back(e);
  return true;
}
bool register_fwd_sm90(const Sm90FwdEntry& e) {
  fwd_sm90_table().push_back(e);
  return true;
}

const Sm90FwdEntry* find_fwd_sm90(const FwdParams& p, const LaunchEnv& env) {
  // No soft cap in the packed Hopper forward (its consumers have no register to spare: the cap cost them 4-16 B
  // of spills): the sm80 kernel, which fuses it, takes packed soft-capped calls.
  if (!sm90_eligible(p, env) || (p.softcap > 0.0 && p.cu_seqlens_q != nullptr)) return nullptr;
  return find_in(fwd_sm90_table(), p.dtype, static_cast<int>(std::max(p.dim_qk, p.dim_v)));
}

bool register_bwd_sm90(const BwdEntry& e) {
  bwd_sm90_table().push_back(e);
  return true;
}

const BwdEntry* find_bwd_sm90(const BwdParams& p, const LaunchEnv& env) {
  // (no soft cap in the packed Hopper backward either: the sm80 kernel takes those calls sequence by sequence)
  if (!sm90_eligible(p, env) || p.dmask != nullptr || p.deterministic) return nullptr;
  if (p.softcap > 0.0 && p.cu_seqlens_q != nullptr) return nullptr;
  if (p.cu_seqlens_q != nullptr) {
    if (p.heads_q * p.total_q > 0x7ffffffe ||  // the dQ workspace map's row coordinates
        !tma_readable_packed(p.dout, p.do_stride, p.heads_q, p.len_q, p.total_q, p.dim_v)) {
      return nullptr;
    }
  } else if (!tma_readable(p.dout, p.do_stride, p.batch, p.heads_q, p.len_q, p.dim_v)) {
    return nullptr;
  }
  return find_in(bwd_sm90_table(), p.dtype, static_cast<int>(std::max(p.dim_qk, p.dim_v)));
}

std::string describe_kernel_sm90(const char* what, int head_dim, DType dtype) {
  return std::string(what) + ": sm90a wgmma + TMA kernel (warp-specialised), head-dim bucket " +
         std::to_string(head_dim) + ", " + dtype_name(dtype);
}

const FwdEntry* find_fwd(DType dtype, int min_head_dim) { return find_in(fwd_table(), dtype, min_head_dim); }
const BwdEntry* find_bwd(DType dtype, int min_head_dim) { return find_in(bwd_table(), dtype, min_head_dim); }

int plan_fwd_splits(const FwdParams& p, const FwdEntry& e, int num_sms) {
  const int64_t tiles = (p.len_k + e.block_n - 1) / std::max(e.block_n, 1);
  const int64_t ctas = (p.len_q + e.block_m - 1) / std::max(e.block_m, 1) * p.batch * p.heads_q;
  if (ctas == 0 || ctas >= num_sms || tiles < 8) return 1;
  // about two CTAs per SM, each with at least 4 key tiles of its own, at most 64 shares
  const int64_t want = (2 * static_cast<int64_t>(num_sms) + ctas - 1) / ctas;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, tiles / 4, 64})));
}

BwdWork plan_bwd_work(const BwdParams& p, const BwdEntry& e, int num_sms, bool deterministic) {
  BwdWork w;
  const int64_t rows = stat_rows(p);
  const int64_t nkb = (p.len_k + e.block_n - 1) / e.block_n;
  w.deterministic = deterministic;
  w.dq_row_stride = e.head_dim;
  w.dq_split_stride = rows * e.head_dim;
  if (deterministic) {
    // Key blocks split in chunks, one CTA per chunk and a private dQ split
    // each (summed in a fixed order): enough CTAs to fill the GPU twice, at
    // most 8 splits of workspace.
    const int64_t bhk = std::max<int64_t>(1, p.batch * p.heads_kv);
    const int64_t want = (2 * static_cast<int64_t>(std::max(num_sms, 1)) + bhk - 1) / bhk;
    int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>({want, nkb, 8}));
    const int64_t per = (nkb + nchunks - 1) / nchunks;
    nchunks = (nkb + per - 1) / per;
    w.nchunks = static_cast<int>(nchunks);
    w.kb_per_chunk = static_cast<int>(per);
  } else {
    w.nchunks = static_cast<int>(nkb);
    w.kb_per_chunk = 1;
  }
  w.nsplit = deterministic ? w.nchunks : 1;
  return w;
}

FwdStats bwd_row_stats(const BwdParams& p, float* buf) {
  const int64_t rows = stat_rows(p);
  FwdStats st;
  st.shift = buf;
  st.logl = buf + rows;
  st.dsum = buf + 2 * rows;
  st.dout = p.dout;
  st.do_stride = p.do_stride;
  st.exact_d = p.dmask != nullptr && p.dtype != DType::kFloat32;
  st.dlse = static_cast<const float*>(p.dlse);
  return st;
}

std::string describe_kernel(const char* what, int head_dim, DType dtype, const LaunchEnv& env, const BwdWork* w) {
  std::string s = std::string(what) + ": sm80 mma.sync kernel, head-dim bucket " + std::to_string(head_dim) + ", ";
  if (dtype == DType::kFloat32) {
    s += env.allow_tf32 ? "fp32 (TF32)" : "fp32 (3xTF32)";
  } else {
    s += dtype_name(dtype);
  }
  if (w != nullptr) {
    s += w->deterministic ? ", deterministic (" + std::to_string(w->nsplit) + " dQ splits)" : ", dQ atomics";
  }
  return s;
}

std::vector<int> compiled_head_dims(bool backward, DType dtype) {
  std::vector<int> dims;
  if (backward) {
    for (const BwdEntry& e : bwd_table())
      if (e.dtype == dtype) dims.push_back(e.head_dim);
  } else {
    for (const FwdEntry& e : fwd_table())
      if (e.dtype == dtype) dims.push_back(e.head_dim);
  }
  std::sort(dims.begin(), dims.end());
  return dims;
}

}  // namespace cuda
}  // namespace attention_ext

// Registry of the compiled CUDA kernel instantiations (see launch.h). Filled
// by static initializers of the generated fwd_/bwd_hdim<D>_<dtype>.cu files
// when the library is loaded; read by the glue afterwards.
#include <algorithm>

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
const FwdEntry* find_fwd(DType dtype, int min_head_dim) { return find_in(fwd_table(), dtype, min_head_dim); }
const BwdEntry* find_bwd(DType dtype, int min_head_dim) { return find_in(bwd_table(), dtype, min_head_dim); }

BwdWork plan_bwd_work(const BwdParams& p, const BwdEntry& e, int num_sms, bool deterministic) {
  BwdWork w;
  const int64_t rows = p.batch * p.heads_q * p.len_q;
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

FwdStats probs_row_stats(const FwdParams& p, float* buf) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  FwdStats st;
  st.shift = buf;
  st.logl = buf + rows;
  return st;
}

FwdStats bwd_row_stats(const BwdParams& p, float* buf) {
  FwdStats st = probs_row_stats(p, buf);
  st.dsum = buf + 2 * p.batch * p.heads_q * p.len_q;
  st.dout = p.dout;
  st.do_stride = p.do_stride;
  st.exact_d = p.dmask != nullptr && p.dtype != DType::kFloat32;
  return st;
}

std::string describe_kernel(const char* what, int head_dim, DType dtype, const LaunchEnv& env, const BwdWork* w) {
  std::string s = std::string(what) + ": sm80 mma.sync kernel, head-dim bucket " + std::to_string(head_dim) + ", ";
  switch (dtype) {
    case DType::kFloat16: s += "fp16"; break;
    case DType::kBFloat16: s += "bf16"; break;
    case DType::kFloat32: s += env.allow_tf32 ? "fp32 (TF32)" : "fp32 (3xTF32)"; break;
    default: s += "?"; break;
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

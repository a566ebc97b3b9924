#include "varlen.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <type_traits>

namespace attention_ext {

namespace {

void check_offsets_tensor(const at::Tensor& cu, const char* name, const at::Tensor& cu_q) {
  TORCH_CHECK_VALUE(cu.defined(), name, " must be a tensor");
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, name,
                   " must be int32 or int64 (batch + 1 sequence offsets), got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.sym_size(0) >= 1, name,
                    " must be 1-D with batch + 1 >= 1 offsets (0, len_0, len_0 + len_1, ...), got shape ",
                    cu.sym_sizes());
  TORCH_CHECK_VALUE(cu.sym_size(0) == cu_q.sym_size(0), name, " has ", cu.sym_size(0),
                    " offsets but cu_seqlens_q has ", cu_q.sym_size(0), "; both need batch + 1");
}

void check_values(const std::vector<int64_t>& o, const char* name, int64_t total, const char* tensor,
                  std::optional<int64_t> max_len, const char* max_name) {
  TORCH_CHECK_VALUE(o.front() == 0, name, "[0] must be 0, got ", o.front());
  int64_t longest = 0;
  for (size_t b = 0; b + 1 < o.size(); ++b) {
    TORCH_CHECK_VALUE(o[b + 1] >= o[b], name, " must not decrease, but ", name, "[", b + 1, "] = ", o[b + 1],
                      " < ", name, "[", b, "] = ", o[b]);
    longest = std::max(longest, o[b + 1] - o[b]);
  }
  TORCH_CHECK_VALUE(o.back() == total, name, "[-1] must be the number of rows of ", tensor, " (", total, "), got ",
                    o.back());
  if (max_len.has_value())
    TORCH_CHECK_VALUE(longest <= *max_len, max_name, " is ", *max_len, " but ", name, " holds a sequence of length ",
                      longest);
}

template <typename P>
void move_common(P& p, const VarlenOffsets& off, int64_t b, size_t es, size_t acc_es) {
  auto at_row = [](auto* ptr, int64_t row, int64_t stride, size_t bytes) {
    return offset_by(ptr, row * stride, bytes);
  };
  const int64_t rq = off.q[b], rk = off.k[b];
  p.q = at_row(p.q, rq, p.q_stride.r, es);
  p.k = at_row(p.k, rk, p.k_stride.r, es);
  p.v = at_row(p.v, rk, p.v_stride.r, es);
  p.out = at_row(p.out, rq, p.o_stride.r, es);
  p.lse = at_row(p.lse, p.heads_q * rq, 1, acc_es);
  if constexpr (std::is_same_v<P, BwdParams>) p.dlse = at_row(p.dlse, p.heads_q * rq, 1, acc_es);
  p.len_q = off.len_q(b);
  p.len_k = off.len_k(b);
  p.offset += static_cast<uint64_t>(b);
  if (p.alibi_slopes != nullptr) p.alibi_slopes += b * p.alibi_stride_b;  // its row, read as batch 0
  if constexpr (std::is_same_v<P, BwdParams>) {
    p.dout = at_row(p.dout, rq, p.do_stride.r, es);
    p.dq = at_row(p.dq, rq, p.dq_stride.r, es);
    p.dk = at_row(p.dk, rk, p.dk_stride.r, es);
    p.dv = at_row(p.dv, rk, p.dv_stride.r, es);
  }
}

size_t elem_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 4;
  }
}

template <typename P>
std::vector<P> split(const P& whole, const VarlenOffsets& off) {
  TORCH_INTERNAL_ASSERT(whole.batch == 1 && whole.mask == nullptr, "split_sequences takes one packed call");
  const size_t es = elem_size(whole.dtype), acc_es = whole.dtype == DType::kFloat64 ? 8 : 4;
  std::vector<P> ps(off.batch(), whole);
  for (int64_t b = 0; b < off.batch(); ++b) move_common(ps[b], off, b, es, acc_es);
  return ps;
}

}  // namespace

void check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, const AttnOptions& opt) {
  TORCH_CHECK_VALUE(q.defined() && k.defined() && v.defined(), "query, key and value must be tensors");
  TORCH_CHECK_VALUE(q.dim() == 3, "query must be packed as (total_q, heads, E) for variable-length attention, got ",
                    q.dim(), " dimensions with shape ", q.sym_sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, "key must be packed as (total_k, heads_kv, E) for variable-length attention, got ",
                    k.dim(), " dimensions with shape ", k.sym_sizes());
  TORCH_CHECK_VALUE(v.dim() == 3, "value must be packed as (total_k, heads_kv, Ev) for variable-length attention, got ",
                    v.dim(), " dimensions with shape ", v.sym_sizes());
  check_inputs(heads_first(q), heads_first(k), heads_first(v), std::nullopt, without_alibi(opt));
  check_offsets_tensor(cu_q, "cu_seqlens_q", cu_q);
  if (opt.has_alibi()) {  // (heads,) or (batch, heads): one row per sequence
    const at::Tensor& a = *opt.alibi_slopes;
    check_alibi_slopes(a, q);
    const bool ok = (a.dim() == 1 && a.sym_size(0) == q.sym_size(1)) ||
                    (a.dim() == 2 && a.sym_size(0) == cu_q.sym_size(0) - 1 && a.sym_size(1) == q.sym_size(1));
    TORCH_CHECK_VALUE(ok, "alibi_slopes of packed sequences must have shape (heads,) = (", q.sym_size(1),
                      ",) or (batch, heads) = (", cu_q.sym_size(0) - 1, ", ", q.sym_size(1), "), got ", a.sym_sizes());
  }
  check_offsets_tensor(cu_k, "cu_seqlens_k", cu_q);
  check_index_device(cu_q, "cu_seqlens_q", q);
  check_index_device(cu_k, "cu_seqlens_k", q);
}

void check_varlen_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v,
                                  const at::Tensor& cu_q, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& rng, double dropout_p, const std::optional<at::Tensor>& grad_lse) {
  check_output_and_grad(grad_out, out, {q.sym_size(0), q.sym_size(1), v.sym_size(2)}, q);
  const std::vector<c10::SymInt> lsz{q.sym_size(0) * q.sym_size(1)};
  check_same_shape(lse, "logsumexp", lsz, q);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "logsumexp must be ", acc, " (as returned by the forward), got ",
                   lse.scalar_type());
  check_grad_lse(grad_lse, lse, q);
  if (dropout_p > 0.0) {
    const std::vector<c10::SymInt> rsz{cu_q.sym_size(0) - 1, 2};
    TORCH_CHECK_VALUE(rng.defined() && rng.sym_sizes().equals(rsz) && rng.scalar_type() == at::kLong,
                      "rng_state must be the int64 (batch, 2) tensor returned by the varlen forward");
  }
}

VarlenOffsets prepare_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                             const at::Tensor& cu_k, const AttnOptions& opt, std::optional<int64_t> max_q,
                             std::optional<int64_t> max_k) {
  check_varlen_inputs(q, k, v, cu_q, cu_k, opt);
  return read_offsets(cu_q, cu_k, q.size(0), k.size(0), max_q, max_k);
}

VarlenOffsets read_offsets(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q, int64_t total_k,
                           std::optional<int64_t> max_q, std::optional<int64_t> max_k) {
  VarlenOffsets off;
  off.q = host_int64(cu_q);
  off.k = host_int64(cu_k);
  check_values(off.q, "cu_seqlens_q", total_q, "query", max_q, "max_seqlen_q");
  check_values(off.k, "cu_seqlens_k", total_k, "key", max_k, "max_seqlen_k");
  return off;
}

namespace {

// The kernels' offsets are int32.
void check_packed_rows(const at::Tensor& q, const at::Tensor& k) {
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(q.size(0) <= kMaxRows && k.size(0) <= kMaxRows, "attention_varlen on ", q.device(),
                    " takes at most 2^31 - 1 packed rows, got ", q.size(0), " queries and ", k.size(0), " keys");
}

// The params of the whole packed call (batch 1, every token) made those of a packed launch: batch = the
// sequences, len_q / len_k the longest of them; unread offsets (read_values = false) take max_q / max_k for those,
// cut to the totals (no sequence is longer than its tensor: the launch is no larger than that).
void set_packed(FwdParams& p, const VarlenOffsets& off, const at::Tensor& cu_q, const at::Tensor& cu_k,
                int64_t total_q, int64_t total_k, bool read_values, std::optional<int64_t> max_q,
                std::optional<int64_t> max_k) {
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.total_q = total_q;
  p.total_k = total_k;
  if (!read_values) {
    p.batch = cu_q.size(0) - 1;
    p.len_q = std::min(*max_q, total_q);
    p.len_k = std::min(*max_k, total_k);
    return;
  }
  p.batch = off.batch();
  p.len_q = p.len_k = 0;
  for (int64_t b = 0; b < off.batch(); ++b) {
    p.len_q = std::max(p.len_q, off.len_q(b));
    p.len_k = std::max(p.len_k, off.len_k(b));
  }
}

// The offsets as the kernels take them: int32 on the query's device. Unread int64 offsets are clamped first, so
// that none out of range wraps into range.
at::Tensor kernel_offsets(const at::Tensor& cu, const at::Tensor& q, int64_t total, bool read_values) {
  const at::Tensor t = read_values || cu.scalar_type() == at::kInt ? cu : cu.clamp(-1, total + 1);
  return t.to(q.device(), at::kInt).contiguous();  // (one copy: device and dtype at once)
}

}  // namespace

void check_capture_maxima(std::optional<int64_t> max_q, std::optional<int64_t> max_k, const char* what) {
  TORCH_CHECK_VALUE(max_q.has_value() && max_k.has_value(), what,
                    " under CUDA-graph capture needs max_seqlen_q and max_seqlen_k: the offsets cannot be read back "
                    "there to find the longest sequences");
  TORCH_CHECK_VALUE(*max_q >= 0 && *max_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ", *max_q, " and ",
                    *max_k);
}

PackedForward prepare_packed_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_q, const at::Tensor& cu_k, const AttnOptions& opt,
                                     std::optional<int64_t> max_q, std::optional<int64_t> max_k, bool read_values) {
  PackedForward s;
  if (read_values) {
    s.off = prepare_varlen(q, k, v, cu_q, cu_k, opt, max_q, max_k);
  } else {
    check_varlen_inputs(q, k, v, cu_q, cu_k, opt);
    check_capture_maxima(max_q, max_k, "attention_varlen");
  }
  check_packed_rows(q, k);
  s.st = prepare_forward(heads_first(q), heads_first(k), heads_first(v), std::nullopt, without_alibi(opt));
  s.st.alibi = set_varlen_alibi(s.st.p, opt);
  s.out = heads_first(s.st.out);
  s.lse = s.st.lse.view({-1});
  s.cu_q = kernel_offsets(cu_q, q, q.size(0), read_values);
  s.cu_k = kernel_offsets(cu_k, q, k.size(0), read_values);
  set_packed(s.st.p, s.off, s.cu_q, s.cu_k, q.size(0), k.size(0), read_values, max_q, max_k);
  return s;
}

at::Tensor set_varlen_alibi(FwdParams& p, const AttnOptions& opt) {
  if (!opt.has_alibi()) return at::Tensor();
  at::Tensor a = opt.alibi_slopes->contiguous();
  p.alibi_slopes = a.data_ptr<float>();
  p.alibi_stride_b = a.dim() == 2 ? a.size(1) : 0;
  p.alibi_stride_h = 1;
  return a;
}

std::optional<at::Tensor> sequence_alibi(const std::optional<at::Tensor>& alibi, int64_t b) {
  if (!alibi.has_value() || !alibi->defined()) return std::nullopt;
  return alibi->dim() == 2 ? alibi->select(0, b) : *alibi;
}

std::optional<at::Tensor> stats_2d(const std::optional<at::Tensor>& t, int64_t heads, int64_t total) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->reshape({heads, total});
}

PackedBackward prepare_packed_backward(const VarlenOffsets& off, const at::Tensor& grad_out, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                                       const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& rng, const AttnOptions& opt,
                                       const std::optional<at::Tensor>& grad_lse, bool read_values,
                                       std::optional<int64_t> max_q, std::optional<int64_t> max_k) {
  if (read_values) {
    TORCH_INTERNAL_ASSERT(off.batch() >= 2, "prepare_packed_backward: at least 2 sequences");
  } else {
    check_capture_maxima(max_q, max_k, "attention_varlen's backward");
  }
  check_packed_rows(q, k);
  PackedBackward s;
  const int64_t Hq = q.size(1);
  // lse as (heads_q, total): its (heads_q, L_b) blocks one after another, which is all prepare_backward needs
  // of it (the pointer; the kernels find each sequence's block); rng row 0 stands for the (batch, 2) rng_state
  s.st = prepare_backward(heads_first(grad_out), heads_first(q), heads_first(k), heads_first(v), std::nullopt,
                          heads_first(out), lse.view({Hq, q.size(0)}), opt.dropout_p > 0.0 ? rng.select(0, 0) : rng,
                          without_alibi(opt), false, stats_2d(grad_lse, Hq, q.size(0)));
  s.st.alibi = set_varlen_alibi(s.st.p, opt);
  s.cu_q = kernel_offsets(cu_q, q, q.size(0), read_values);
  s.cu_k = kernel_offsets(cu_k, q, k.size(0), read_values);
  set_packed(s.st.p, off, s.cu_q, s.cu_k, q.size(0), k.size(0), read_values, max_q, max_k);
  return s;
}

std::vector<FwdParams> split_sequences(const FwdParams& whole, const VarlenOffsets& off) { return split(whole, off); }
std::vector<BwdParams> split_sequences(const BwdParams& whole, const VarlenOffsets& off) { return split(whole, off); }

void fill_empty_forward(const VarlenOffsets& off, const at::Tensor& out, const at::Tensor& lse, int64_t heads_q) {
  for (int64_t b = 0; b < off.batch(); ++b) {
    const int64_t L = off.len_q(b);
    if (L == 0 || off.len_k(b) != 0) continue;
    out.narrow(0, off.q[b], L).zero_();
    lse.narrow(0, heads_q * off.q[b], heads_q * L).fill_(-std::numeric_limits<double>::infinity());
  }
}

void fill_empty_backward(const VarlenOffsets& off, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  for (int64_t b = 0; b < off.batch(); ++b) {
    const int64_t L = off.len_q(b), S = off.len_k(b);
    if (L == 0) {
      dk.narrow(0, off.k[b], S).zero_();
      dv.narrow(0, off.k[b], S).zero_();
    } else if (S == 0) {
      dq.narrow(0, off.q[b], L).zero_();
    }
  }
}

}  // namespace attention_ext

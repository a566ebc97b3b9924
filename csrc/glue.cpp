#include "glue.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <sstream>

namespace attention_ext {

namespace {

std::string shape_str(c10::SymIntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Whether a tensor of sizes s broadcasts to target (numpy rules: right-aligned, each dim 1 or equal).
bool broadcasts_to(c10::SymIntArrayRef s, const std::vector<c10::SymInt>& target) {
  const size_t n = s.size(), r = target.size();
  bool ok = n <= r;
  for (size_t d = 1; ok && d <= n; ++d) ok = s[n - d] == 1 || s[n - d] == target[r - d];
  return ok;
}

}  // namespace

AttnOptions make_options(double dropout_p, bool is_causal, std::optional<double> scale,
                         bool enable_gqa, at::IntArrayRef window_size, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK_VALUE(window_size.size() == 2,
                    "window_size must be a pair (left, right), got ", window_size.size(), " values");
  AttnOptions o;
  o.dropout_p = dropout_p;
  o.is_causal = is_causal;
  o.scale = scale;
  o.enable_gqa = enable_gqa;
  o.window_left = window_size[0];
  o.window_right = window_size[1];
  o.softcap = softcap;
  o.alibi_slopes = alibi_slopes;
  return o;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, const AttnOptions& opt) {
  TORCH_CHECK_VALUE(q.defined() && k.defined() && v.defined(), "query, key and value must be tensors");
  // rank
  TORCH_CHECK_VALUE(q.dim() >= 3, "query must have at least 3 dimensions (..., heads, L, E), got ",
                    q.dim(), " with shape ", shape_str(q.sym_sizes()));
  TORCH_CHECK_VALUE(k.dim() == q.dim(), "key must have the same number of dimensions as query (",
                    q.dim(), "), got ", k.dim(), " with shape ", shape_str(k.sym_sizes()));
  TORCH_CHECK_VALUE(v.dim() == q.dim(), "value must have the same number of dimensions as query (",
                    q.dim(), "), got ", v.dim(), " with shape ", shape_str(v.sym_sizes()));
  // dtype and device
  TORCH_CHECK_TYPE(is_float_dtype(q.scalar_type()),
                   "query must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "key dtype (", k.scalar_type(),
                   ") must match query dtype (", q.scalar_type(), ")");
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "value dtype (", v.scalar_type(),
                   ") must match query dtype (", q.scalar_type(), ")");
  TORCH_CHECK(k.device() == q.device(), "key is on ", k.device(), " but query is on ", q.device(),
              "; query, key and value must be on the same device");
  TORCH_CHECK(v.device() == q.device(), "value is on ", v.device(), " but query is on ", q.device(),
              "; query, key and value must be on the same device");
  // shapes
  const int64_t r = q.dim();
  auto qs = q.sym_sizes(), ks = k.sym_sizes(), vs = v.sym_sizes();
  for (int64_t d = 0; d < r - 3; ++d) {
    TORCH_CHECK_VALUE(ks[d] == qs[d] && vs[d] == qs[d],
                      "query, key and value must have the same batch dimensions, got query ",
                      shape_str(qs), ", key ", shape_str(ks), ", value ", shape_str(vs));
  }
  const c10::SymInt& Hq = qs[r - 3];
  const c10::SymInt& Hkv = ks[r - 3];
  TORCH_CHECK_VALUE(vs[r - 3] == Hkv, "value has ", vs[r - 3], " heads but key has ", Hkv,
                    " (shapes: key ", shape_str(ks), ", value ", shape_str(vs), ")");
  TORCH_CHECK_VALUE(vs[r - 2] == ks[r - 2], "value length (", vs[r - 2], ") must match key length (",
                    ks[r - 2], ") (shapes: key ", shape_str(ks), ", value ", shape_str(vs), ")");
  TORCH_CHECK_VALUE(ks[r - 1] == qs[r - 1], "key head dim (", ks[r - 1], ") must match query head dim (",
                    qs[r - 1], ")");
  // (0 as in SDPA: every score 0, or an empty output; composite.h's zero_head_dim_*)
  TORCH_CHECK_VALUE(qs[r - 1] >= 0 && qs[r - 1] <= 256, "query head dim (size of the last dimension) must be in [0, 256], got ",
                    qs[r - 1]);
  TORCH_CHECK_VALUE(vs[r - 1] >= 0 && vs[r - 1] <= 256, "value head dim (size of the last dimension) must be in [0, 256], got ",
                    vs[r - 1]);
  if (opt.enable_gqa) {
    TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "enable_gqa=True needs the number of query heads (", Hq,
                      ") to be a multiple of the number of key/value heads (", Hkv, ")");
  } else {
    TORCH_CHECK_VALUE(Hq == Hkv, "query has ", Hq, " heads but key/value have ", Hkv,
                      "; pass enable_gqa=True for grouped-query attention");
  }
  // options
  // p = 1 drops every weight (zeros, zero gradients), as PyTorch's SDPA and nn.MultiheadAttention do
  TORCH_CHECK_VALUE(opt.dropout_p >= 0.0 && opt.dropout_p <= 1.0, "dropout_p must be in [0, 1], got ", opt.dropout_p);
  TORCH_CHECK_VALUE(!opt.scale.has_value() || std::isfinite(*opt.scale), "scale must be a finite number or None, got ",
                    opt.scale.value_or(0.0));
  TORCH_CHECK_VALUE(opt.window_left >= -1 && opt.window_right >= -1,
                    "window_size must be (left, right) with each >= 0, or -1 for unbounded, got (",
                    opt.window_left, ", ", opt.window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(opt.softcap) && opt.softcap >= 0.0,
                    "softcap must be a finite number >= 0 (0: no soft-capping), got ", opt.softcap);
  if (opt.has_alibi()) {
    const at::Tensor& a = *opt.alibi_slopes;
    check_alibi_slopes(a, q);
    std::vector<c10::SymInt> target(qs.begin(), qs.end() - 2);  // (..., heads)
    TORCH_CHECK_VALUE(a.dim() >= 1 && a.sym_size(-1) == Hq && broadcasts_to(a.sym_sizes(), target),
                      "alibi_slopes must have shape (heads,) or (..., heads) broadcastable to the query's "
                      "(..., heads) = ", shape_str(target), ", got ", shape_str(a.sym_sizes()));
  }
  // mask
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    const auto mt = m.scalar_type();
    TORCH_CHECK_TYPE(mt == at::kBool || mt == q.scalar_type() || mt == at::kFloat,
                     "attn_mask must be bool, float32 or the query's dtype (", q.scalar_type(), "), got ", mt);
    TORCH_CHECK(m.device() == q.device(), "attn_mask is on ", m.device(), " but query is on ", q.device());
    std::vector<c10::SymInt> target(qs.begin(), qs.end() - 1);
    target.push_back(ks[r - 2]);
    TORCH_CHECK_VALUE(broadcasts_to(m.sym_sizes(), target), "attn_mask of shape ", shape_str(m.sym_sizes()),
                      " is not broadcastable to (..., heads, L, S) = ", shape_str(target));
  }
}

void check_alibi_slopes(const at::Tensor& a, const at::Tensor& q) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
  TORCH_CHECK(a.device() == q.device(), "alibi_slopes is on ", a.device(), " but query is on ", q.device());
}

void check_same_shape(const at::Tensor& t, const char* name, c10::SymIntArrayRef expected,
                      const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor");
  TORCH_CHECK_VALUE(t.sym_sizes().equals(expected), name, " must have shape ", shape_str(expected), ", got ",
                    shape_str(t.sym_sizes()));
  TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but query is on ", q.device());
}

void check_lse(const at::Tensor& lse, const at::Tensor& q) {
  check_same_shape(lse, "logsumexp", q.sym_sizes().slice(0, q.dim() - 1), q);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "logsumexp must be ", acc, " (as returned by the forward), got ",
                   lse.scalar_type());
}

void check_rng_state(const at::Tensor& rng, double dropout_p) {
  if (dropout_p <= 0.0) return;
  TORCH_CHECK_VALUE(rng.defined() && rng.sym_numel() == 2 && rng.scalar_type() == at::kLong,
                    "rng_state must be the int64 tensor of 2 elements returned by the forward");
}

void check_output_and_grad(const at::Tensor& grad_out, const at::Tensor& out, c10::SymIntArrayRef out_shape,
                           const at::Tensor& q) {
  check_same_shape(out, "output", out_shape, q);
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), "output dtype (", out.scalar_type(),
                   ") must match query dtype (", q.scalar_type(), ")");
  check_same_shape(grad_out, "grad_output", out_shape, q);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type(), "grad_output dtype (", grad_out.scalar_type(),
                   ") must match query dtype (", q.scalar_type(), ")");
}

void check_grad_lse(const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse, const at::Tensor& q) {
  if (!grad_lse.has_value() || !grad_lse->defined()) return;
  check_same_shape(*grad_lse, "grad_logsumexp", lse.sym_sizes(), q);
  TORCH_CHECK_TYPE(grad_lse->scalar_type() == lse.scalar_type(), "grad_logsumexp must be ", lse.scalar_type(),
                   " (the dtype of logsumexp), got ", grad_lse->scalar_type());
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                           const at::Tensor& rng, const at::Tensor& q, const at::Tensor& v, double dropout_p,
                           const std::optional<at::Tensor>& grad_lse) {
  auto qs = q.sym_sizes();
  std::vector<c10::SymInt> osz(qs.begin(), qs.end() - 1);
  osz.push_back(v.sym_size(-1));
  check_output_and_grad(grad_out, out, osz, q);
  check_lse(lse, q);
  check_grad_lse(grad_lse, lse, q);
  check_rng_state(rng, dropout_p);
}

void check_dropout_mask_args(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                             double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p > 0.0 && dropout_p <= 1.0, "dropout_p must be in (0, 1], got ", dropout_p);
  check_rng_state(rng, dropout_p);
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 0 && len_q >= 0 && len_k >= 0,
                    "batch, heads, len_q and len_k must be >= 0, got ", batch, ", ", heads, ", ", len_q, ", ", len_k);
}

at::Tensor empty_output(const at::Tensor& q, const c10::SymInt& dim_v) {
  const int64_t r = q.dim();
  std::vector<int64_t> perm(r - 1);
  std::iota(perm.begin(), perm.end(), 0);
  // keep q's order of the non-feature dims (largest stride first, ties in index order)
  std::stable_sort(perm.begin(), perm.end(),
                   [&](int64_t a, int64_t b) { return q.sym_stride(a) > q.sym_stride(b); });
  perm.push_back(r - 1);
  std::vector<c10::SymInt> sizes;
  for (int64_t d : perm) sizes.push_back(d == r - 1 ? dim_v : q.sym_size(d));
  std::vector<int64_t> inv(r);
  for (int64_t i = 0; i < r; ++i) inv[perm[i]] = i;
  return at::empty_symint(sizes, q.options()).permute(inv);
}

at::Tensor empty_lse(const at::Tensor& q) {
  auto s = q.sym_sizes();
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty_symint(s.slice(0, s.size() - 1), q.options().dtype(acc));
}

at::Tensor empty_weights(const at::Tensor& q, const at::Tensor& k, bool average_heads) {
  auto qs = q.sym_sizes();
  std::vector<c10::SymInt> shape(qs.begin(), qs.end() - 3);  // the batch dims
  if (!average_heads) shape.push_back(q.sym_size(-3));
  shape.push_back(q.sym_size(-2));
  shape.push_back(k.sym_size(-2));
  return at::empty_symint(shape, q.options());
}

void poison(const at::Tensor& t) {
  static const bool enabled = [] {
    const char* e = std::getenv("ATTENTION_EXT_POISON");
    return e != nullptr && e[0] == '1';
  }();
  if (enabled && t.defined() && t.numel() > 0 && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

bool log_kernels() {
  const char* e = std::getenv("ATTENTION_EXT_LOG_KERNEL");
  return e != nullptr && e[0] == '1';
}

void log_kernel(const std::string& line) { std::fprintf(stderr, "attention_ext: %s\n", line.c_str()); }

at::Tensor as_4d(const at::Tensor& t) {
  at::Tensor x = t;
  if (x.size(-1) > 1 && x.stride(-1) != 1) x = x.contiguous();
  if (x.dim() == 3) return x.unsqueeze(0);
  if (x.dim() == 4) return x;
  return x.flatten(0, x.dim() - 4);
}

at::Tensor mask_4d(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k) {
  std::vector<int64_t> target(q.sizes().begin(), q.sizes().end() - 1);
  target.push_back(k.size(-2));
  at::Tensor m = mask.expand(target);
  if (m.dim() == 3) return m.unsqueeze(0);
  if (m.dim() == 4) return m;
  return m.flatten(0, m.dim() - 4);
}

void check_index_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device() || t.device().is_cpu(), name, " is on ", t.device(), " but query is on ",
              q.device(), "; put it on the query's device or on the CPU");
}

std::vector<int64_t> host_int64(const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kBool: return DType::kBool;
    default: TORCH_CHECK_TYPE(false, "attention_ext: unsupported dtype ", t);
  }
}

Strides4 strides_of(const at::Tensor& t4) {
  Strides4 s;
  s.b = t4.stride(0);
  s.h = t4.stride(1);
  s.r = t4.stride(2);
  s.c = t4.stride(3);
  return s;
}

FwdParams make_fwd_params(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4,
                          const at::Tensor& o4, const at::Tensor& lse,
                          const std::optional<at::Tensor>& mask4, const AttnOptions& opt) {
  FwdParams p;
  p.q = q4.data_ptr();
  p.k = k4.data_ptr();
  p.v = v4.data_ptr();
  p.out = o4.defined() ? o4.data_ptr() : nullptr;
  p.lse = lse.data_ptr();
  p.q_stride = strides_of(q4);
  p.k_stride = strides_of(k4);
  p.v_stride = strides_of(v4);
  if (o4.defined()) p.o_stride = strides_of(o4);
  p.batch = q4.size(0);
  p.heads_q = q4.size(1);
  p.heads_kv = k4.size(1);
  p.len_q = q4.size(2);
  p.len_k = k4.size(2);
  p.dim_qk = q4.size(3);
  p.dim_v = v4.size(3);
  p.dtype = to_dtype(q4.scalar_type());
  if (mask4.has_value() && mask4->defined()) {
    p.mask = mask4->data_ptr();
    p.mask_stride = strides_of(*mask4);
    p.mask_dtype = to_dtype(mask4->scalar_type());
    p.mask_kind = mask4->scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
  }
  p.scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(p.dim_qk)));
  p.window_left = opt.window_left < 0 ? kNoBound : opt.window_left;
  p.window_right = opt.is_causal ? (opt.window_right < 0 ? 0 : std::min<int64_t>(opt.window_right, 0))
                                 : (opt.window_right < 0 ? kNoBound : opt.window_right);
  p.dropout_p = opt.dropout_p;
  p.softcap = opt.softcap;
  return p;
}

at::Tensor set_alibi(FwdParams& p, const AttnOptions& opt, const at::Tensor& q) {
  if (!opt.has_alibi()) return at::Tensor();
  std::vector<int64_t> target(q.sizes().begin(), q.sizes().end() - 2);  // (..., heads)
  at::Tensor a = opt.alibi_slopes->expand(target);
  a = a.dim() == 1 ? a.unsqueeze(0) : a.reshape({-1, a.size(-1)});
  p.alibi_slopes = a.data_ptr<float>();
  p.alibi_stride_b = a.size(0) == 1 ? 0 : a.stride(0);
  p.alibi_stride_h = a.stride(1);
  return a;
}

std::optional<at::Tensor> mask4_of(const std::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k) {
  if (!mask.has_value() || !mask->defined()) return std::nullopt;
  return mask_4d(*mask, q, k);
}

BackwardSetup prepare_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& rng, const AttnOptions& opt, bool mask_grad,
                               const std::optional<at::Tensor>& grad_lse) {
  check_inputs(q, k, v, mask, opt);
  check_backward_inputs(grad_out, out, lse, rng, q, v, opt.dropout_p, grad_lse);
  BackwardSetup s;
  s.dq = at::empty_like(q);
  s.dk = at::empty_like(k);
  s.dv = at::empty_like(v);
  poison(s.dq);
  poison(s.dk);
  poison(s.dv);
  s.q4 = as_4d(q);
  s.k4 = as_4d(k);
  s.v4 = as_4d(v);
  s.o4 = as_4d(out);
  s.g4 = as_4d(grad_out);
  s.dq4 = as_4d(s.dq);
  s.dk4 = as_4d(s.dk);
  s.dv4 = as_4d(s.dv);
  s.lse = lse.contiguous();
  s.m4 = mask4_of(mask, q, k);
  BwdParams& p = s.p;
  static_cast<FwdParams&>(p) = make_fwd_params(s.q4, s.k4, s.v4, s.o4, s.lse, s.m4, opt);
  s.alibi = set_alibi(p, opt, q);
  p.dout = s.g4.data_ptr();
  p.do_stride = strides_of(s.g4);
  p.dq = s.dq4.data_ptr();
  p.dk = s.dk4.data_ptr();
  p.dv = s.dv4.data_ptr();
  p.dq_stride = strides_of(s.dq4);
  p.dk_stride = strides_of(s.dk4);
  p.dv_stride = strides_of(s.dv4);
  if (grad_lse.has_value() && grad_lse->defined()) {
    s.dlse = grad_lse->contiguous();
    p.dlse = s.dlse.data_ptr();
  }
  if (mask_grad && mask.has_value() && mask->defined() && mask->is_floating_point()) {
    // zero: kernels write only the tiles the window / causal bounds let them visit
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    s.dmask_full = at::zeros({p.batch, p.heads_q, p.len_q, p.len_k}, q.options().dtype(acc));
    p.dmask = s.dmask_full.data_ptr();
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    BackwardSetup& s, const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!s.dq4.is_alias_of(s.dq)) s.dq.copy_(s.dq4.view(s.dq.sizes()));
  if (!s.dk4.is_alias_of(s.dk)) s.dk.copy_(s.dk4.view(s.dk.sizes()));
  if (!s.dv4.is_alias_of(s.dv)) s.dv.copy_(s.dv4.view(s.dv.sizes()));
  at::Tensor dmask = s.dmask_full.defined() ? reduce_mask_grad(s.dmask_full, *mask, q) : at::empty({0}, q.options());
  return {s.dq, s.dk, s.dv, dmask};
}

ForwardSetup prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, const AttnOptions& opt) {
  check_inputs(q, k, v, mask, opt);
  ForwardSetup s;
  s.out = empty_output(q, v.sym_size(-1));
  s.lse = empty_lse(q);
  poison(s.out);
  poison(s.lse);
  s.q4 = as_4d(q);
  s.k4 = as_4d(k);
  s.v4 = as_4d(v);
  s.o4 = as_4d(s.out);
  s.m4 = mask4_of(mask, q, k);
  s.p = make_fwd_params(s.q4, s.k4, s.v4, s.o4, s.lse, s.m4, opt);
  s.alibi = set_alibi(s.p, opt, q);
  return s;
}

void finish_forward(ForwardSetup& s) {
  if (!s.o4.is_alias_of(s.out)) s.out.copy_(s.o4.view(s.out.sizes()));
}

ProbsSetup prepare_probs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                         const at::Tensor& lse, const at::Tensor& rng, const AttnOptions& opt, bool average_heads) {
  check_inputs(q, k, k, mask, opt);  // value is not needed: k stands in for it
  check_lse(lse, q);
  check_rng_state(rng, opt.dropout_p);
  ProbsSetup s;
  s.probs = empty_weights(q, k, average_heads);
  poison(s.probs);
  s.q4 = as_4d(q);
  s.k4 = as_4d(k);
  s.lse = lse.contiguous();
  s.m4 = mask4_of(mask, q, k);
  s.p = make_fwd_params(s.q4, s.k4, s.k4, at::Tensor(), s.lse, s.m4, opt);
  s.alibi = set_alibi(s.p, opt, q);
  return s;
}

at::Tensor reduce_mask_grad(const at::Tensor& dmask_full, const at::Tensor& mask, const at::Tensor& q) {
  std::vector<int64_t> full(q.sizes().begin(), q.sizes().end() - 1);
  full.push_back(dmask_full.size(-1));
  return dmask_full.view(full).sum_to_size(mask.sizes()).to(mask.scalar_type());
}

}  // namespace attention_ext

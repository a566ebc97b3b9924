// attention_math: see composite.h.
#include "composite.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <vector>

#include "glue.h"
#include "philox.h"

namespace attention_ext {

at::Tensor band_visibility(const c10::SymInt& len_q, const c10::SymInt& len_k, const AttnOptions& opt,
                           const at::Device& device, int64_t q_offset) {
  if (!opt.is_causal && opt.window_left < 0 && opt.window_right < 0) return at::Tensor();
  const auto idx = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor i = at::arange(c10::Scalar(len_q), idx).unsqueeze(1);
  if (q_offset != 0) i = i + q_offset;
  at::Tensor j = at::arange(c10::Scalar(len_k), idx).unsqueeze(0);
  at::Tensor vis;
  auto both = [&vis](const at::Tensor& t) { vis = vis.defined() ? vis & t : t; };
  if (opt.is_causal) both(j <= i);
  if (opt.window_left >= 0) both(j >= i - opt.window_left);
  if (opt.window_right >= 0) both(j <= i + opt.window_right);
  return vis;
}

namespace {

at::Tensor dropout_keep(const at::Tensor& rng, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                        double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attention_ext::_dropout_mask", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, double)>();
  return op.call(rng, batch, heads, len_q, len_k, dropout_p);
}

// The forward's dropout as a factor on the weights p (..., Hq, L, S): keep / (1 - p_drop) where kept, 0 where
// dropped, in p's dtype; undefined without dropout or for empty weights.
at::Tensor dropout_factor(const std::optional<at::Tensor>& rng, const at::Tensor& p, int64_t len_k,
                          double dropout_p) {
  if (dropout_p <= 0.0 || p.numel() == 0) return at::Tensor();
  TORCH_CHECK_VALUE(rng.has_value() && rng->defined(), "dropout_p > 0 needs the rng_state returned by the forward");
  const int64_t heads_q = p.size(-3), len_q = p.size(-2);
  const int64_t batch = p.numel() / (heads_q * len_q * len_k);
  at::Tensor keep = dropout_keep(*rng, batch, heads_q, len_q, len_k, dropout_p).to(p.device()).view(p.sizes());
  return keep.to(p.scalar_type()) * DropoutRng::inv_keep_of(dropout_p);
}



// fp16 / bf16 in float32, as the kernels accumulate; float32 and float64 as they are
at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Key or value in the accumulation type, its heads repeated for GQA (query head h reads key / value head
// h / (Hq / Hkv)). Sizes as SymInts: the decomposition for exporters traces this with dynamic shapes.
at::Tensor kv_per_query_head(const at::Tensor& t, const at::Tensor& q) {
  const c10::SymInt heads_q = q.sym_size(-3), heads_kv = t.sym_size(-3);
  at::Tensor ta = t.to(acc_type(q));
  return heads_q == heads_kv ? ta : ta.repeat_interleave_symint(heads_q / heads_kv, -3);
}

// The scores and the mask of the composite, shared by the forward and the log-sum-exp.
struct MaskedScores {
  at::Tensor s;     // scale * Q K^T (..., Hq, L, S) in the accumulation type, soft-capped, without the mask
  at::Tensor add;   // one additive mask at its own (broadcast) shape, -inf where hidden, the ALiBi bias included;
                    // undefined for none
  at::Tensor seen;  // (..., L, 1) at the mask's shape: whether the row sees a key; undefined for no mask
};

MaskedScores masked_scores(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                           const AttnOptions& opt) {
  const auto acc = acc_type(q);
  at::Tensor qa = q.to(acc);
  const double sc = opt.scale.has_value() ? *opt.scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  MaskedScores r;
  r.s = at::matmul(qa * sc, kv_per_query_head(k, q).transpose(-2, -1));  // (..., Hq, L, S)
  if (opt.softcap > 0.0) r.s = at::tanh(r.s / opt.softcap) * opt.softcap;

  // One additive mask at its own (broadcast) shape, usually far smaller than the scores: the float mask,
  // -inf at the keys the band or a boolean mask hides.
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  at::Tensor vis = band_visibility(q.sym_size(-2), k.sym_size(-2), opt, q.device());
  if (mask.has_value() && mask->defined()) {
    if (mask->scalar_type() == at::kBool)
      vis = vis.defined() ? vis & *mask : *mask;
    else
      r.add = mask->to(acc);
  }
  if (opt.has_alibi()) {  // -m |i + S - L - j|: query i at position S - L + i of the keys
    const c10::SymInt len_q = q.sym_size(-2), len_k = k.sym_size(-2);
    const auto pos = at::TensorOptions().dtype(acc).device(q.device());
    at::Tensor i = at::arange(c10::Scalar(len_k - len_q), c10::Scalar(len_k), pos).unsqueeze(1);
    at::Tensor j = at::arange(c10::Scalar(len_k), pos).unsqueeze(0);
    at::Tensor bias = opt.alibi_slopes->to(acc).unsqueeze(-1).unsqueeze(-1) * -(i - j).abs();  // (..., Hq, L, S)
    r.add = r.add.defined() ? r.add + bias : bias;
  }
  if (vis.defined()) r.add = at::where(vis, r.add.defined() ? r.add : at::zeros({}, qa.options()), kNegInf);
  if (r.add.defined()) r.seen = (r.add != kNegInf).any(-1, /*keepdim=*/true);
  return r;
}

// Sums a (..., Hq, R, C) gradient over the query heads that share a key / value head: (..., heads_kv, R, C).
at::Tensor sum_over_group(const at::Tensor& t, int64_t heads_kv) {
  const int64_t heads_q = t.size(-3);
  return heads_q == heads_kv ? t : t.unflatten(-3, {heads_kv, heads_q / heads_kv}).sum(-3);
}

std::optional<at::Tensor> rng_if_dropout(const AttnOptions& opt, const at::Tensor& rng) {
  return opt.dropout_p > 0.0 ? std::optional<at::Tensor>(rng) : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& mask, double dropout_p,
                                                  bool is_causal, std::optional<double> scale, bool enable_gqa,
                                                  at::IntArrayRef window, const std::optional<at::Tensor>& rng,
                                                  bool need_weights, bool average_heads, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes) {
  const AttnOptions opt = make_options(dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  check_inputs(q, k, v, mask, opt);
  const bool dropout = dropout_p > 0.0;
  TORCH_CHECK_VALUE(!dropout || (rng.has_value() && rng->defined()),
                    "_attention_math: dropout_p > 0 needs the rng_state returned by the forward");
  if (dropout) check_rng_state(*rng, dropout_p);

  // A row that sees no key gets a mask of 0 (a finite softmax, never NaN, in the forward and the
  // gradients), and its output and weights are zeroed afterwards, on the (L, Ev) output and the head-mean
  // weights where that is smaller than the scores.
  MaskedScores ms = masked_scores(q, k, mask, opt);
  at::Tensor s = ms.s;
  const at::Tensor& seen = ms.seen;
  if (ms.add.defined()) s = s + at::where(seen, ms.add, 0.0);
  at::Tensor p = at::softmax(s, -1);
  if (at::Tensor keep = dropout_factor(rng, p, k.size(-2), dropout_p); keep.defined()) p = p * keep;
  at::Tensor out = at::matmul(p, kv_per_query_head(v, q));
  at::Tensor weights;
  if (need_weights) {
    if (!average_heads) {
      weights = seen.defined() ? p * seen : p;
    } else if (seen.defined() && seen.dim() >= 3 && seen.size(-3) != 1) {  // rows seen per head
      weights = (p * seen).mean(-3);
    } else {
      weights = p.mean(-3);
      if (seen.defined()) weights = weights * (seen.dim() >= 3 ? seen.squeeze(-3) : seen);
    }
    weights = weights.to(q.scalar_type());
  } else {
    weights = at::empty({0}, q.options());
  }
  if (seen.defined()) out = out * seen;
  return {out.to(q.scalar_type()), weights};
}

at::Tensor attention_math_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, bool is_causal, std::optional<double> scale,
                              bool enable_gqa, at::IntArrayRef window, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes) {
  const AttnOptions opt = make_options(0.0, is_causal, scale, enable_gqa, window, softcap, alibi_slopes);
  check_inputs(q, k, v, mask, opt);
  MaskedScores ms = masked_scores(q, k, mask, opt);
  // the kernels' convention: -inf for a row that sees no key. Such a row's logsumexp is taken of zeros, then
  // replaced: its gradient is 0, where logsumexp of all -inf would give NaN (0 * exp(-inf + inf)) to every
  // derivative through it (attention_ext/_lse.py differentiates this twice).
  const at::Tensor s = ms.add.defined() ? ms.s + ms.add : ms.s;
  const double ninf = -std::numeric_limits<double>::infinity();
  const at::Tensor live = (s != ninf).any(-1, /*keepdim=*/true);
  const at::Tensor lse = at::logsumexp(at::where(live, s, 0.0), -1);
  return at::where(live.squeeze(-1), lse, ninf);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_math_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng, const AttnOptions& opt,
    bool mask_grad, const at::Tensor& grad_lse) {
  const auto acc = acc_type(q);
  const double sc = opt.scale.has_value() ? *opt.scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  MaskedScores ms = masked_scores(q, k, mask, opt);
  at::Tensor s = ms.add.defined() ? ms.s + at::where(ms.seen, ms.add, 0.0) : ms.s;
  at::Tensor p = at::softmax(s, -1);
  if (ms.seen.defined()) p = p * ms.seen;  // a row that sees no key: no weights, no gradients
  const at::Tensor keep = dropout_factor(rng, p, k.size(-2), opt.dropout_p);
  at::Tensor g = grad.to(acc);
  at::Tensor dv = sum_over_group(at::matmul((keep.defined() ? p * keep : p).transpose(-2, -1), g), v.size(-3));
  at::Tensor dp = at::matmul(g, kv_per_query_head(v, q).transpose(-2, -1));
  if (keep.defined()) dp = dp * keep;
  at::Tensor d = (p * dp).sum(-1, /*keepdim=*/true);
  if (grad_lse.defined()) d = d - grad_lse.to(acc).unsqueeze(-1);  // d lse / d s = p
  at::Tensor ds = p * (dp - d);
  at::Tensor dmask = at::empty({0}, q.options());
  if (mask_grad && mask.has_value() && mask->defined() && mask->is_floating_point())
    dmask = ds.sum_to_size(mask->sizes()).to(mask->scalar_type());
  // the mask is added after the soft cap: its gradient is dS; the scores' takes the cap's derivative 1 - tanh^2
  if (opt.softcap > 0.0) ds = ds * (1.0 - (ms.s / opt.softcap).square());
  at::Tensor dq = at::matmul(ds, kv_per_query_head(k, q)) * sc;
  at::Tensor dk = sum_over_group(at::matmul(ds.transpose(-2, -1), q.to(acc)), k.size(-3)) * sc;
  const auto t = q.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dmask};
}

at::Tensor composite_forward(ForwardSetup& st, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, const AttnOptions& opt, const at::Tensor& rng,
                             bool need_weights, bool average_heads) {
  const std::vector<int64_t> window{opt.window_left, opt.window_right};
  auto [out, weights] = attention_math(q, k, v, mask, opt.dropout_p, opt.is_causal, opt.scale, opt.enable_gqa, window,
                                       rng_if_dropout(opt, rng), need_weights, average_heads, opt.softcap,
                                       opt.alibi_slopes);
  st.out.copy_(out);
  st.lse.copy_(attention_math_lse(q, k, v, mask, opt.is_causal, opt.scale, opt.enable_gqa, window, opt.softcap,
                                  opt.alibi_slopes));
  return weights;
}

void composite_probs(ProbsSetup& st, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                     const AttnOptions& opt, const at::Tensor& rng, bool average_heads) {
  // the weights do not depend on the value: the key stands in for it
  const std::vector<int64_t> window{opt.window_left, opt.window_right};
  st.probs.copy_(std::get<1>(attention_math(q, k, k, mask, opt.dropout_p, opt.is_causal, opt.scale, opt.enable_gqa,
                                            window, rng_if_dropout(opt, rng), true, average_heads, opt.softcap,
                                            opt.alibi_slopes)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_backward(
    BackwardSetup& st, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& rng, const AttnOptions& opt, bool mask_grad) {
  auto [dq, dk, dv, dmask] =
      attention_math_backward(grad, q, k, v, mask, rng_if_dropout(opt, rng), opt, mask_grad, st.dlse);
  st.dq.copy_(dq);
  st.dk.copy_(dk);
  st.dv.copy_(dv);
  return {st.dq, st.dk, st.dv, dmask};
}

}  // namespace attention_ext

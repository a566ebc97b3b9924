// LibTorch client test of attention_ext, no Python involved.
//
//   attention_ext_cpp_test /path/to/attention_ext/_C*.so [MODEL.pt INPUTS.pt OUT.pkl]
//
// dlopen()s the operator library (it has no Python symbols), looks up
// attention_ext::attention and attention_ext::_attention_forward through the
// c10 dispatcher, runs them on requires_grad tensors, runs the backward through
// LibTorch's autograd engine and compares output, log-sum-exp and gradients
// with a plain LibTorch float64 implementation; decodes through
// attention_ext::attention_kvcache with a paged cache; runs packed sequences through attention_ext::attention_varlen
// forward and backward. Prints PASS and returns 0 when
// everything matches, otherwise prints what failed and returns 1.
//
// With the three optional paths it also runs a TorchScript model saved from
// Python (a converted model: its attention calls the library's ops) the way a
// LibTorch deployment does: torch::jit::load, forward with autograd, gradients
// of the input and of every parameter, then a forward in eval mode without
// grad; the results go to OUT.pkl (torch::jit::pickle_save, read back with
// torch.load) for tests/test_cpp_libtorch.py to check against PyTorch's model.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double, bool, std::optional<double>, bool,
                               at::IntArrayRef, double, const std::optional<at::Tensor>&);
using ForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 double, bool, std::optional<double>, bool,
                                                                 at::IntArrayRef, double,
                                                                 const std::optional<at::Tensor>&);

using KvcacheFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, std::optional<double>, at::IntArrayRef,
    double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
    const std::optional<at::Tensor>&, std::optional<int64_t>, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

using VarlenFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, double, bool,
                            std::optional<double>, bool, at::IntArrayRef, double, const std::optional<at::Tensor>&);

int g_failures = 0;

void fail(const std::string& what) {
  ++g_failures;
  std::cout << "FAIL: " << what << std::endl;
}

void check_close(const std::string& name, const at::Tensor& got, const at::Tensor& want, double rtol, double atol) {
  if (!got.defined() || !want.defined()) {
    fail(name + ": undefined tensor");
    return;
  }
  if (got.sizes() != want.sizes()) {
    std::ostringstream os;
    os << name << ": shape " << got.sizes() << " != " << want.sizes();
    fail(os.str());
    return;
  }
  at::Tensor g = got.detach().to(at::kDouble), w = want.detach().to(at::kDouble);
  if (g.isnan().any().item<bool>()) {
    fail(name + ": NaN");
    return;
  }
  const double err = (g - w).abs().max().item<double>();
  const double tol = atol + rtol * w.abs().max().item<double>();
  std::cout << "  " << name << ": max abs error " << err << " (tolerance " << tol << ")" << std::endl;
  if (!(err <= tol)) fail(name + ": max abs error " + std::to_string(err) + " > " + std::to_string(tol));
}

// Plain LibTorch float64 attention: explicit matmul / soft cap / mask / softmax.
struct Ref {
  at::Tensor out, lse;
};

Ref reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
              bool causal, bool gqa, std::vector<int64_t> window, double softcap = 0.0,
              const std::optional<at::Tensor>& alibi = std::nullopt) {
  at::Tensor q64 = q.to(at::kDouble), k64 = k.to(at::kDouble), v64 = v.to(at::kDouble);
  const int64_t Hq = q.size(-3), L = q.size(-2), S = k.size(-2), E = q.size(-1);
  if (gqa && k.size(-3) != Hq) {
    k64 = k64.repeat_interleave(Hq / k.size(-3), -3);
    v64 = v64.repeat_interleave(Hq / k.size(-3), -3);
  }
  at::Tensor s = at::matmul(q64, k64.transpose(-1, -2)) * (1.0 / std::sqrt(static_cast<double>(E)));
  if (softcap > 0.0) s = at::tanh(s / softcap) * softcap;
  at::Tensor i = at::arange(L).unsqueeze(1), j = at::arange(S).unsqueeze(0);
  // ALiBi: -m_h |i + S - L - j|
  if (alibi.has_value()) s = s - alibi->to(at::kDouble).view({Hq, 1, 1}) * (i + (S - L) - j).abs().to(at::kDouble);
  at::Tensor vis = at::ones({L, S}, at::kBool);
  if (causal) vis = vis & (j <= i);
  if (window[0] >= 0) vis = vis & (j >= i - window[0]);
  if (window[1] >= 0) vis = vis & (j <= i + window[1]);
  if (mask.has_value()) {
    if (mask->scalar_type() == at::kBool) {
      vis = vis & *mask;
    } else {
      s = s + mask->to(at::kDouble);
    }
  }
  s = s.masked_fill(vis.logical_not(), -std::numeric_limits<double>::infinity());
  Ref r;
  r.lse = at::logsumexp(s, -1).detach();
  r.out = at::matmul(at::softmax(s, -1), v64);
  return r;
}

at::Tensor leaf(at::Tensor t) {
  t.set_requires_grad(true);
  return t;
}

struct Case {
  std::string name;
  std::vector<int64_t> qs, ks, vs;
  std::string mask;  // "", "float_grad", "bool_keypad"
  bool causal = false, gqa = false;
  std::vector<int64_t> window{-1, -1};
  double softcap = 0.0;
  bool alibi = false;  // ALiBi slopes 2^-(h + 1) / 2 ... per query head
};

void run_case(const c10::TypedOperatorHandle<AttentionFn>& attention,
              const c10::TypedOperatorHandle<ForwardFn>& forward, const Case& c) {
  std::cout << "case " << c.name << std::endl;
  at::manual_seed(static_cast<uint64_t>(c.name.size()) * 1000003ULL);
  at::Tensor q = leaf(at::randn(c.qs)), k = leaf(at::randn(c.ks)), v = leaf(at::randn(c.vs));
  const int64_t L = c.qs[c.qs.size() - 2], S = c.ks[c.ks.size() - 2];
  std::optional<at::Tensor> mask;
  if (c.mask == "float_grad") {
    mask = leaf(at::randn({L, S}));
  } else if (c.mask == "bool_keypad") {
    at::Tensor m = at::ones({1, 1, S}, at::kBool);
    m.index_put_({0, 0, at::indexing::Slice(S - 3, S)}, false);
    mask = m;
  }

  std::optional<at::Tensor> alibi;
  if (c.alibi) alibi = at::pow(2.0, -at::arange(1, c.qs[c.qs.size() - 3] + 1, at::kFloat) / 2);
  at::Tensor out = attention.call(q, k, v, mask, 0.0, c.causal, std::nullopt, c.gqa, c.window, c.softcap, alibi);
  if (!out.requires_grad()) fail(c.name + ": output does not require grad");
  at::Tensor go = at::randn(out.sizes());
  std::vector<at::Tensor> inputs{q, k, v};
  if (c.mask == "float_grad") inputs.push_back(*mask);
  auto grads = torch::autograd::grad({out}, inputs, {go});

  // reference on detached float64 copies
  std::vector<at::Tensor> rin;
  for (const auto& t : inputs) rin.push_back(leaf(t.detach().to(at::kDouble)));
  std::optional<at::Tensor> rmask = mask;
  if (c.mask == "float_grad") rmask = rin[3];
  Ref r = reference(rin[0], rin[1], rin[2], rmask, c.causal, c.gqa, c.window, c.softcap, alibi);
  auto rgrads = torch::autograd::grad({r.out}, rin, {go.to(at::kDouble)});

  check_close(c.name + " output", out, r.out, 1e-5, 1e-5);
  const char* names[] = {"dq", "dk", "dv", "dmask"};
  for (size_t t = 0; t < grads.size(); ++t) check_close(c.name + " " + names[t], grads[t], rgrads[t], 1e-4, 1e-5);

  // the internal forward op: same output, float32 log-sum-exp, int64[2] rng state
  auto [out2, lse, rng] = forward.call(q.detach(), k.detach(), v.detach(),
                                       mask.has_value() ? std::optional<at::Tensor>(mask->detach()) : std::nullopt,
                                       0.0, c.causal, std::nullopt, c.gqa, c.window, c.softcap, alibi);
  if (!at::equal(out2, out.detach())) fail(c.name + ": _attention_forward output differs from attention");
  if (lse.scalar_type() != at::kFloat) fail(c.name + ": logsumexp is not float32");
  if (rng.scalar_type() != at::kLong || rng.numel() != 2) fail(c.name + ": rng_state is not int64[2]");
  check_close(c.name + " logsumexp", lse, r.lse, 1e-5, 1e-5);
}

// Higher-order and forward-mode derivatives from C++: a gradient penalty (create_graph, then backward; the
// double backward recomputes the attention in ATen operations) against the reference's, and a dual tensor's
// tangent against a central difference of the reference.
void run_higher_order(const c10::TypedOperatorHandle<AttentionFn>& attention) {
  const std::vector<int64_t> no_window{-1, -1};
  at::Tensor q = leaf(at::randn({1, 2, 6, 4}, at::kDouble)), k = leaf(at::randn({1, 2, 7, 4}, at::kDouble));
  at::Tensor v = leaf(at::randn({1, 2, 7, 3}, at::kDouble)), w = at::randn({1, 2, 6, 3}, at::kDouble);
  auto penalty = [&](const at::Tensor& out) {
    at::Tensor gq = torch::autograd::grad({(out * w).sum()}, {q}, {}, /*retain_graph=*/true,
                                          /*create_graph=*/true)[0];
    return torch::autograd::grad({gq.square().sum()}, {q, k, v});
  };
  auto got =
      penalty(attention.call(q, k, v, std::nullopt, 0.0, true, std::nullopt, false, no_window, 0.0, std::nullopt));
  auto want = penalty(reference(q, k, v, std::nullopt, true, false, no_window).out);
  const char* names[] = {"q", "k", "v"};
  for (size_t t = 0; t < 3; ++t)
    check_close(std::string("double backward d") + names[t], got[t], want[t], 1e-9, 1e-11);

  at::Tensor q0 = q.detach(), k0 = k.detach(), v0 = v.detach();
  at::Tensor tq = at::randn_like(q0), tk = at::randn_like(k0), tv = at::randn_like(v0);
  const uint64_t level = torch::autograd::ForwardADLevel::get_next_idx();
  at::Tensor out = attention.call(at::_make_dual(q0, tq, level), at::_make_dual(k0, tk, level),
                                  at::_make_dual(v0, tv, level), std::nullopt, 0.0, true, std::nullopt, false,
                                  no_window, 0.0, std::nullopt);
  at::Tensor tangent = std::get<1>(at::_unpack_dual(out, level));
  torch::autograd::ForwardADLevel::release_idx(level);
  const double eps = 1e-6;
  auto ref = [&](double s) {
    return reference(q0 + s * tq, k0 + s * tk, v0 + s * tv, std::nullopt, true, false, no_window).out;
  };
  if (!tangent.defined()) {
    fail("forward-mode AD: the output has no tangent");
  } else {
    check_close("forward-mode AD tangent", tangent, (ref(eps) - ref(-eps)) / (2 * eps), 1e-7, 1e-8);
  }
}

}  // namespace

// The scripted model: forward(x, None, key_padding_mask) with autograd, then in eval mode without grad.
void run_scripted_model(const std::string& model_path, const std::string& inputs_path, const std::string& out_path) {
  torch::jit::Module model = torch::jit::load(model_path);
  torch::jit::Module inputs = torch::jit::load(inputs_path);
  at::Tensor x = inputs.attr("x").toTensor().detach().requires_grad_(true);
  at::Tensor key_padding_mask = inputs.attr("key_padding_mask").toTensor();
  at::Tensor grad_out = inputs.attr("grad_out").toTensor();
  model.train();
  at::Tensor y = model.forward({x, c10::IValue(), key_padding_mask}).toTensor();
  std::vector<at::Tensor> wrt{x};
  for (const at::Tensor& p : model.parameters()) wrt.push_back(p);
  std::vector<at::Tensor> grads = torch::autograd::grad({y}, wrt, {grad_out});
  model.eval();
  at::Tensor y_eval;
  {
    at::NoGradGuard no_grad;
    y_eval = model.forward({x.detach(), c10::IValue(), key_padding_mask}).toTensor();
  }
  c10::List<at::Tensor> results;
  results.push_back(y.detach());
  results.push_back(y_eval);
  for (const at::Tensor& g : grads) results.push_back(g);
  std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(results));
  std::ofstream out(out_path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) fail("could not write " + out_path);
}

// attention_kvcache from C++: a prefill of 5 positions into empty paged caches, then 4 decoding steps of one, the
// op writing the caches, against one causal attention over the 9 positions (float64); then the same with packed
// queries, each sequence at its own pace.
void run_kvcache(const c10::TypedOperatorHandle<KvcacheFn>& kvcache,
                 const c10::TypedOperatorHandle<AttentionFn>& attention) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor q = at::randn({2, 4, 9, 16}, f64), k = at::randn({2, 2, 9, 16}, f64), v = at::randn({2, 2, 9, 16}, f64);
  const std::vector<int64_t> no_window{-1, -1};
  at::Tensor want = attention.call(q, k, v, std::nullopt, 0.0, true, std::nullopt, true, no_window, 0.0, std::nullopt);
  at::Tensor kc = at::randn({6, 2, 4, 16}, f64), vc = at::randn({6, 2, 4, 16}, f64);  // pages of 4, random
  at::Tensor table = at::tensor(std::vector<int32_t>{5, 0, 3, 1, 4, 2}, at::kInt).view({2, 3});
  at::Tensor lens = at::zeros({2}, at::kInt);
  std::vector<at::Tensor> outs;
  for (int64_t t0 = 0, n = 5; t0 < 9; t0 += n, n = 1) {
    auto rows = [&](const at::Tensor& x) { return x.narrow(2, t0, n); };
    auto [out, lse] = kvcache.call(rows(q), kc, vc, lens, rows(k), rows(v), table, true, std::nullopt, no_window, 0.0,
                                   std::nullopt, std::nullopt, std::nullopt, false, std::nullopt, std::nullopt,
                                   std::nullopt, std::nullopt);
    outs.push_back(out);
    lens += n;
  }
  check_close("attention_kvcache prefill + decoding vs causal attention", at::cat(outs, 2), want, 0.0, 1e-12);
  // packed queries (cu_seqlens_q): the two sequences at their own pace in one call a step (b 0: 5, 1, 1, 1, 1, 0
  // rows; b 1: 3, 2, 1, 1, 1, 1), into fresh random pages
  const std::vector<std::vector<int64_t>> takes{{5, 1, 1, 1, 1, 0}, {3, 2, 1, 1, 1, 1}};
  kc = at::randn({6, 2, 4, 16}, f64);
  vc = at::randn({6, 2, 4, 16}, f64);
  std::vector<int64_t> done{0, 0};
  std::vector<std::vector<at::Tensor>> per(2);
  for (size_t step = 0; step < takes[0].size(); ++step) {
    std::vector<at::Tensor> qs, ks, vs;
    std::vector<int32_t> cu{0};
    for (int64_t b = 0; b < 2; ++b) {
      const int64_t n = takes[b][step];
      auto rows = [&](const at::Tensor& x) { return x.select(0, b).narrow(1, done[b], n).transpose(0, 1); };
      qs.push_back(rows(q));
      ks.push_back(rows(k));
      vs.push_back(rows(v));
      cu.push_back(cu.back() + static_cast<int32_t>(n));
    }
    const at::Tensor sl = at::tensor(std::vector<int32_t>{static_cast<int32_t>(done[0]), static_cast<int32_t>(done[1])},
                                     at::kInt);
    auto [out, lse] = kvcache.call(at::cat(qs), kc, vc, sl, at::cat(ks), at::cat(vs), table, true, std::nullopt,
                                   no_window, 0.0, std::nullopt, std::nullopt, std::nullopt, false,
                                   at::tensor(cu, at::kInt), std::nullopt, std::nullopt, std::nullopt);
    for (int64_t b = 0; b < 2; ++b) {
      per[b].push_back(out.narrow(0, cu[b], takes[b][step]));
      done[b] += takes[b][step];
    }
  }
  for (int64_t b = 0; b < 2; ++b)
    check_close("attention_kvcache packed steps vs causal attention", at::cat(per[b]).transpose(0, 1),
                want.select(0, b), 0.0, 1e-12);
}

// attention_varlen from C++: three packed sequences (query rows 5, 0, 7; key rows 6, 3, 4), causal, GQA, through
// LibTorch's autograd engine (its backward gets the forward's max_seqlen_q / _k), against attention on each sequence
// alone: outputs and the packed gradients (float64; the sequence without a query row gets zero key gradients).
void run_varlen(const c10::TypedOperatorHandle<VarlenFn>& varlen,
                const c10::TypedOperatorHandle<AttentionFn>& attention) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const std::vector<int64_t> lq{5, 0, 7}, lk{6, 3, 4}, no_window{-1, -1};
  at::Tensor q = at::randn({12, 4, 16}, f64).requires_grad_(), k = at::randn({13, 2, 16}, f64).requires_grad_(),
             v = at::randn({13, 2, 8}, f64).requires_grad_();
  const at::Tensor cu_q = at::tensor(std::vector<int32_t>{0, 5, 5, 12}, at::kInt);
  const at::Tensor cu_k = at::tensor(std::vector<int64_t>{0, 6, 9, 13}, at::kLong);
  at::Tensor out = varlen.call(q, k, v, cu_q, cu_k, 7, 6, 0.0, true, std::nullopt, true, no_window, 0.0, std::nullopt);
  const at::Tensor g = at::randn({12, 4, 8}, f64);
  const auto grads = torch::autograd::grad({out}, {q, k, v}, {g});
  std::vector<at::Tensor> want_out, want_dq, want_dk, want_dv;
  for (int64_t b = 0, q0 = 0, k0 = 0; b < 3; q0 += lq[b], k0 += lk[b], ++b) {
    auto heads = [](const at::Tensor& t, int64_t start, int64_t n) {
      return t.detach().narrow(0, start, n).transpose(0, 1).unsqueeze(0).requires_grad_();
    };
    const at::Tensor qs = heads(q, q0, lq[b]), ks = heads(k, k0, lk[b]), vs = heads(v, k0, lk[b]);
    if (lq[b] == 0) {
      want_dk.push_back(at::zeros({lk[b], 2, 16}, f64));
      want_dv.push_back(at::zeros({lk[b], 2, 8}, f64));
      continue;
    }
    const at::Tensor o = attention.call(qs, ks, vs, std::nullopt, 0.0, true, std::nullopt, true, no_window, 0.0,
                                        std::nullopt);
    const auto gs = torch::autograd::grad({o}, {qs, ks, vs}, {g.narrow(0, q0, lq[b]).transpose(0, 1).unsqueeze(0)});
    auto packed = [](const at::Tensor& t) { return t.squeeze(0).transpose(0, 1); };
    want_out.push_back(packed(o.detach()));
    want_dq.push_back(packed(gs[0]));
    want_dk.push_back(packed(gs[1]));
    want_dv.push_back(packed(gs[2]));
  }
  check_close("attention_varlen out vs attention per sequence", out, at::cat(want_out), 0.0, 1e-12);
  check_close("attention_varlen dq", grads[0], at::cat(want_dq), 0.0, 1e-12);
  check_close("attention_varlen dk", grads[1], at::cat(want_dk), 0.0, 1e-12);
  check_close("attention_varlen dv", grads[2], at::cat(want_dv), 0.0, 1e-12);
  // a max_seqlen_q below the longest sequence is refused, as in Python
  try {
    varlen.call(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 6, 6, 0.0, true, std::nullopt, true, no_window, 0.0,
                std::nullopt);
    fail("attention_varlen: max_seqlen_q = 6 below a sequence of 7 did not raise");
  } catch (const c10::ValueError& e) {
    if (std::string(e.what()).find("max_seqlen_q is 6 but cu_seqlens_q holds a sequence of length 7") ==
        std::string::npos)
      fail(std::string("unexpected ValueError message: ") + e.what());
  }
}

int main(int argc, char** argv) {
  if (argc != 2 && argc != 5) {
    std::cerr << "usage: " << argv[0] << " /path/to/attention_ext/_C.so [MODEL.pt INPUTS.pt OUT.pkl]" << std::endl;
    return 2;
  }
  auto& dispatcher = c10::Dispatcher::singleton();
  if (dispatcher.findSchema({"attention_ext::attention", ""}).has_value()) {
    std::cout << "FAIL: attention_ext::attention registered before loading the library" << std::endl;
    return 1;
  }
  void* handle = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    std::cout << "FAIL: dlopen(" << argv[1] << "): " << dlerror() << std::endl;
    return 1;
  }
  try {
    auto attention = dispatcher.findSchemaOrThrow("attention_ext::attention", "").typed<AttentionFn>();
    auto forward = dispatcher.findSchemaOrThrow("attention_ext::_attention_forward", "").typed<ForwardFn>();

    std::vector<Case> cases;
    cases.push_back({"plain_L37_S53_E16_Ev24", {2, 3, 37, 16}, {2, 3, 53, 16}, {2, 3, 53, 24}, ""});
    Case gqa{"gqa_causal_float_mask_grad", {2, 4, 29, 32}, {2, 2, 29, 32}, {2, 2, 29, 8}, "float_grad"};
    gqa.causal = true;
    gqa.gqa = true;
    cases.push_back(gqa);
    cases.push_back({"rank3_bool_key_padding", {2, 17, 8}, {2, 19, 8}, {2, 19, 8}, "bool_keypad"});
    Case win{"window_3_1_S300", {1, 2, 70, 16}, {1, 2, 300, 16}, {1, 2, 300, 16}, ""};
    win.window = {3, 1};
    cases.push_back(win);
    Case cap{"softcap_2_gqa_causal_float_mask_grad", {2, 4, 29, 32}, {2, 2, 29, 32}, {2, 2, 29, 8}, "float_grad"};
    cap.causal = true;
    cap.gqa = true;
    cap.softcap = 2.0;
    cases.push_back(cap);
    Case alibi{"alibi_gqa_L29_S40_bool_key_padding", {2, 4, 29, 32}, {2, 2, 40, 32}, {2, 2, 40, 8}, "bool_keypad"};
    alibi.gqa = true;
    alibi.alibi = true;
    cases.push_back(alibi);
    for (const auto& c : cases) run_case(attention, forward, c);
    run_higher_order(attention);
    run_kvcache(dispatcher.findSchemaOrThrow("attention_ext::attention_kvcache", "").typed<KvcacheFn>(), attention);
    run_varlen(dispatcher.findSchemaOrThrow("attention_ext::attention_varlen", "").typed<VarlenFn>(), attention);

    // errors surface as the c10 exception types (ValueError / TypeError in Python)
    try {
      attention.call(at::randn({1, 2, 3, 4}), at::randn({1, 2, 3, 4}, at::kHalf), at::randn({1, 2, 3, 4}),
                     std::nullopt, 0.0, false, std::nullopt, false, std::vector<int64_t>{-1, -1}, 0.0, std::nullopt);
      fail("dtype mismatch did not raise");
    } catch (const c10::TypeError& e) {
      if (std::string(e.what()).find("key dtype (Half) must match query dtype (Float)") == std::string::npos)
        fail(std::string("unexpected TypeError message: ") + e.what());
    }
    try {
      attention.call(at::randn({1, 4, 3, 4}), at::randn({1, 2, 3, 4}), at::randn({1, 2, 3, 4}), std::nullopt, 0.0,
                     false, std::nullopt, false, std::vector<int64_t>{-1, -1}, 0.0, std::nullopt);
      fail("head mismatch did not raise");
    } catch (const c10::ValueError& e) {
      if (std::string(e.what()).find("pass enable_gqa=True") == std::string::npos)
        fail(std::string("unexpected ValueError message: ") + e.what());
    }
    if (argc == 5) run_scripted_model(argv[2], argv[3], argv[4]);
  } catch (const std::exception& e) {
    std::cout << "FAIL: exception: " << e.what() << std::endl;
    return 1;
  }
  if (g_failures != 0) {
    std::cout << g_failures << " check(s) failed" << std::endl;
    return 1;
  }
  std::cout << "PASS" << std::endl;
  return 0;
}

// Variable-length (packed) sequences: the glue every backend shares for _attention_varlen_forward /
// _attention_varlen_backward (layout in schemas.h). Sequence b of a call is an ordinary attention call of
// batch 1 over rows of the packed tensors, so the kernels run unchanged on per-sequence params:
//   - the CPU runs them in one parallel region (csrc/cpu/attention_cpu.cpp, cpu::run_tasks);
//   - the CUDA backend (and its emulator) runs the forward as one launch of the sm80 kernel over every
//     sequence (prepare_packed_forward below; FwdParams::cu_seqlens_q) or, where a Hopper kernel covers
//     long sequences, sequence by sequence (varlen_forward_by_sequence); the backward likewise
//     (prepare_packed_backward, or varlen_backward_by_sequence through its own backward).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <vector>

#include "glue.h"

namespace attention_ext {

// Shapes, dtypes and devices (SymInt-safe: the Meta kernels call it too). Raises errors naming the argument.
void check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, const AttnOptions& opt);
// logsumexp (flat, Hq * total_q) and grad_logsumexp (optional, the same), output and grad_output
// (total_q, Hq, Ev), rng_state (batch, 2).
void check_varlen_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v,
                                  const at::Tensor& cu_q, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& rng, double dropout_p, const std::optional<at::Tensor>& grad_lse);

// The ALiBi slopes of a packed call ((heads,) or (batch, heads), checked by check_varlen_inputs) in p as
// (1 or batch, heads) rows (alibi_stride_b 0 or heads); returns the tensor p points into (undefined without
// them). split_sequences moves each sequence's pointer to its row.
at::Tensor set_varlen_alibi(FwdParams& p, const AttnOptions& opt);
// Sequence b's slopes (heads,), for a dense call of that sequence alone; nullopt without ALiBi.
std::optional<at::Tensor> sequence_alibi(const std::optional<at::Tensor>& alibi, int64_t b);

// An optional flat (Hq * total_q) per-row tensor (grad_logsumexp) as (Hq, total_q), as prepare_backward takes
// the packed logsumexp; nullopt stays nullopt.
std::optional<at::Tensor> stats_2d(const std::optional<at::Tensor>& t, int64_t heads, int64_t total);

// The offsets read on the host (a copy, and so a device sync, when they live on a GPU) and checked: they start
// at 0, never decrease and end at the total; max_seqlen_* (when given) bound the lengths.
struct VarlenOffsets {
  std::vector<int64_t> q, k;  // batch + 1 each
  int64_t batch() const { return static_cast<int64_t>(q.size()) - 1; }
  int64_t len_q(int64_t b) const { return q[b + 1] - q[b]; }
  int64_t len_k(int64_t b) const { return k[b + 1] - k[b]; }
};
VarlenOffsets read_offsets(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q, int64_t total_k,
                           std::optional<int64_t> max_q = std::nullopt, std::optional<int64_t> max_k = std::nullopt);

// check_varlen_inputs, then read_offsets: what every backend's varlen forward and backward start with.
VarlenOffsets prepare_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                             const at::Tensor& cu_k, const AttnOptions& opt,
                             std::optional<int64_t> max_q = std::nullopt, std::optional<int64_t> max_k = std::nullopt);

// (heads, total, dim) view of a (total, heads, dim) packed tensor: what the ops' (..., H, L, E) glue takes.
inline at::Tensor heads_first(const at::Tensor& t) { return t.transpose(0, 1); }

// Per-sequence params from the params of the whole packed call (batch 1, rows = every token): pointers moved
// to sequence b's first row, its lengths, and Philox offset + b. Backward params move the gradients too.
std::vector<FwdParams> split_sequences(const FwdParams& whole, const VarlenOffsets& off);
std::vector<BwdParams> split_sequences(const BwdParams& whole, const VarlenOffsets& off);

// Sequences the kernels never see: no query row (nothing to compute forward; zero key gradients) or no key
// (zero output, logsumexp -inf, zero query gradients). The glue writes those rows itself.
void fill_empty_forward(const VarlenOffsets& off, const at::Tensor& out, const at::Tensor& lse, int64_t heads_q);
void fill_empty_backward(const VarlenOffsets& off, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

// The packed call as one launch (the CUDA sm80 forward and its emulator; FwdParams::cu_seqlens_q): the checked
// offsets, the outputs (out (total_q, Hq, Ev) in q's memory order and lse (Hq * total_q), poisoned), the
// offsets as int32 on the query's device, and params with batch = the sequences and len_q / len_k = the longest
// of them. Sequences without a query row have no CTA; those without a key get output 0 and lse -inf from the
// kernel itself.
struct PackedForward {
  VarlenOffsets off;
  ForwardSetup st;
  at::Tensor out, lse, cu_q, cu_k;
};
// Under CUDA-graph capture the longest sequences cannot be found from the offsets: max_seqlen_q / _k (given,
// >= 0) stand for them. what names the op in the error.
void check_capture_maxima(std::optional<int64_t> max_q, std::optional<int64_t> max_k, const char* what);

// read_values = false (CUDA-graph capture, which cannot read the offsets back): off stays empty, max_q and max_k
// must be given and stand for the longest sequences (at most total_q / total_k), and the offsets are the kernels'
// to check (cuda::launch_packed_rows).
PackedForward prepare_packed_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_q, const at::Tensor& cu_k, const AttnOptions& opt,
                                     std::optional<int64_t> max_q, std::optional<int64_t> max_k,
                                     bool read_values = true);

// _attention_varlen_forward through a backend's forward (fwd has _attention_forward's signature), into the
// packed call's outputs as prepare_packed_forward made them (its offsets read and checked once): one call per
// sequence on views of the packed tensors, each result copied into out / lse. Returns (out, lse, rng_state
// (batch, 2)).
template <typename Fwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_by_sequence(
    Fwd&& fwd, PackedForward& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
    bool is_causal, std::optional<double> scale, bool enable_gqa, at::IntArrayRef window, double softcap,
    const std::optional<at::Tensor>& alibi) {
  const VarlenOffsets& off = s.off;
  const int64_t Hq = q.size(1);
  at::Tensor rng = at::zeros({off.batch(), 2}, q.options().dtype(at::kLong));
  fill_empty_forward(off, s.out, s.lse, Hq);
  for (int64_t b = 0; b < off.batch(); ++b) {
    const int64_t L = off.len_q(b), S = off.len_k(b);
    if (L == 0 || S == 0) continue;
    auto [o, l, r] = fwd(heads_first(q.narrow(0, off.q[b], L)), heads_first(k.narrow(0, off.k[b], S)),
                         heads_first(v.narrow(0, off.k[b], S)), std::nullopt, dropout_p, is_causal, scale, enable_gqa,
                         window, softcap, sequence_alibi(alibi, b));
    s.out.narrow(0, off.q[b], L).copy_(heads_first(o));
    s.lse.narrow(0, Hq * off.q[b], Hq * L).copy_(l.reshape({-1}));
    rng.select(0, b).copy_(r.reshape({-1}));
  }
  finish_forward(s.st);
  return {s.out, s.lse, rng};
}

// A head dim of 0 (query and key, or value) of packed (total, heads, dim) tensors: every backend runs such a call
// sequence by sequence through its dense ops, which take it in ATen operations (composite.h; no kernel has an
// instantiation for it). Sequence b's dropout state is its own draw, row b of the rng_state, which the backward
// replays. (False for tensors of another rank: those are left to the validation.)
inline bool varlen_zero_head_dim(const at::Tensor& q, const at::Tensor& v) {
  return q.dim() == 3 && v.dim() == 3 && (q.size(2) == 0 || v.size(2) == 0);
}
// The CUDA ops' (and the emulator's) twin: head dims of 0 and float64, which their dense ops take in ATen
// operations (cuda_composite, composite.h), go sequence by sequence.
inline bool varlen_cuda_by_sequence(const at::Tensor& q, const at::Tensor& v) {
  return varlen_zero_head_dim(q, v) || q.scalar_type() == at::kDouble;
}

// The packed backward as one launch (the CUDA sm80 backward and its emulator; FwdParams::cu_seqlens_q): the
// setup of prepare_backward over the (heads, total, dim) views of the packed tensors (gradients poisoned), the
// offsets as int32 on the query's device, and params with batch = the sequences, len_q / len_k = the longest of
// them and total_q. The caller has checked the inputs (check_varlen_backward_inputs) and read the offsets, at
// least 2 sequences; or (read_values = false, CUDA-graph capture) not read them, as prepare_packed_forward: off is
// then unused, max_q / max_k must be given, and the offsets are the kernels' to check. The rng_state pointer is
// left to the backend (sequence b reads row b).
struct PackedBackward {
  BackwardSetup st;
  at::Tensor cu_q, cu_k;
};
PackedBackward prepare_packed_backward(const VarlenOffsets& off, const at::Tensor& grad_out, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                                       const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& rng, const AttnOptions& opt,
                                       const std::optional<at::Tensor>& grad_lse, bool read_values = true,
                                       std::optional<int64_t> max_q = std::nullopt,
                                       std::optional<int64_t> max_k = std::nullopt);

// _attention_varlen_backward through a backend's backward (_attention_backward's signature), sequence by
// sequence on views of the packed tensors, into dq, dk, dv (packed like q, k, v; the offsets read once by the
// caller).
template <typename Bwd>
void varlen_backward_by_sequence(Bwd&& bwd, const VarlenOffsets& off, const at::Tensor& grad_out,
                                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& rng, const at::Tensor& dq,
                                 const at::Tensor& dk, const at::Tensor& dv, double dropout_p, bool is_causal,
                                 std::optional<double> scale, bool enable_gqa, at::IntArrayRef window,
                                 const std::optional<at::Tensor>& grad_lse, double softcap,
                                 const std::optional<at::Tensor>& alibi) {
  const int64_t Hq = q.size(1);
  fill_empty_backward(off, dq, dk, dv);
  for (int64_t b = 0; b < off.batch(); ++b) {
    const int64_t L = off.len_q(b), S = off.len_k(b);
    if (L == 0 || S == 0) continue;
    auto rows = [&](const at::Tensor& t, int64_t start, int64_t n) { return heads_first(t.narrow(0, start, n)); };
    auto stats = [&](const at::Tensor& t) { return t.narrow(0, Hq * off.q[b], Hq * L).view({Hq, L}); };
    std::optional<at::Tensor> gl;
    if (grad_lse.has_value() && grad_lse->defined()) gl = stats(*grad_lse);
    auto [gq, gk, gv, gm] =
        bwd(rows(grad_out, off.q[b], L), rows(q, off.q[b], L), rows(k, off.k[b], S), rows(v, off.k[b], S),
            std::nullopt, rows(out, off.q[b], L), stats(lse), rng.select(0, b), dropout_p, is_causal, scale,
            enable_gqa, window, false, gl, softcap, sequence_alibi(alibi, b));
    dq.narrow(0, off.q[b], L).copy_(heads_first(gq));
    dk.narrow(0, off.k[b], S).copy_(heads_first(gk));
    dv.narrow(0, off.k[b], S).copy_(heads_first(gv));
  }
}

}  // namespace attention_ext

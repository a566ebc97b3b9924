// Schemas of attention_ext's internal ops, in one place: csrc/ops.cpp defines
// them in the one TORCH_LIBRARY block of the extension, and the test-only
// library of the emulated CUDA kernels (csrc/cuda/emu/attention_emu.cpp)
// defines its twins with the very same signatures.
#pragma once

namespace attention_ext {
namespace schema {

inline constexpr const char* kForward =
    "_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
    "bool is_causal, float? scale, bool enable_gqa, int[2] window_size, float softcap=0.0, "
    "Tensor? alibi_slopes=None) -> (Tensor output, Tensor logsumexp, Tensor rng_state)";
inline constexpr const char* kBackward =
    "_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
    "Tensor output, Tensor logsumexp, Tensor rng_state, float dropout_p, bool is_causal, float? scale, "
    "bool enable_gqa, int[2] window_size, bool attn_mask_requires_grad, Tensor? grad_logsumexp=None, "
    "float softcap=0.0, Tensor? alibi_slopes=None) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask)";
// The forward that also returns the attention weights (..., Hq, L, S), dropout applied, or with
// average_heads their mean over the query heads (..., L, S): what MultiheadAttention's need_weights=True
// needs, on the CPU without attention_probs' second pass over Q K^T.
inline constexpr const char* kForwardWeights =
    "_attention_forward_weights(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
    "bool is_causal, float? scale, bool enable_gqa, int[2] window_size, bool average_heads, float softcap=0.0, "
    "Tensor? alibi_slopes=None) -> (Tensor output, Tensor logsumexp, Tensor rng_state, Tensor weights)";
inline constexpr const char* kProbs =
    "attention_probs(Tensor query, Tensor key, Tensor? attn_mask, Tensor logsumexp, Tensor rng_state, "
    "float dropout_p=0.0, bool is_causal=False, float? scale=None, bool enable_gqa=False, "
    "int[2] window_size=[-1, -1], float softcap=0.0, Tensor? alibi_slopes=None) -> Tensor";
// The same attention in plain ATen operations, differentiable to any order (csrc/composite.h): what attention
// runs for forward-mode AD and under torch.func transforms, and what its double backward recomputes.
// weights: the probabilities (after dropout) or their head mean, with need_weights; else an empty tensor.
inline constexpr const char* kMath =
    "_attention_math(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, bool is_causal, "
    "float? scale, bool enable_gqa, int[2] window_size, Tensor? rng_state, bool need_weights=False, "
    "bool average_heads=False, float softcap=0.0, Tensor? alibi_slopes=None) "
    "-> (Tensor output, Tensor weights)";
// The fused forward's log-sum-exp in ATen operations (float32 / float64, -inf for rows that see no key): with
// _attention_math, the decomposition of the fused forwards for exporters that need plain ATen (ONNX).
inline constexpr const char* kMathLse =
    "_attention_math_lse(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, "
    "float? scale, bool enable_gqa, int[2] window_size, float softcap=0.0, Tensor? alibi_slopes=None) -> Tensor";
// Variable-length (packed) sequences, FlashAttention's varlen layout: query (total_q, Hq, E), key
// (total_k, Hkv, E), value (total_k, Hkv, Ev); sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of
// the query and cu_seqlens_k[b] .. cu_seqlens_k[b + 1] of key and value (int32 or int64, batch + 1 offsets
// from 0 to the total). Masks (is_causal, window_size) are per sequence, top-left aligned as in attention;
// alibi_slopes (float32, (heads,) or (batch, heads)) counts each sequence's own distances.
// logsumexp is float32 (float64 for float64), flat: sequence b's (Hq, L_b) block, row-major, starts at
// Hq * cu_seqlens_q[b]. rng_state is int64 (batch, 2): the Philox seed and offset of each sequence.
// The backward's max_seqlen_q / _k are the forward's: needed only to capture it with the offsets on a GPU.
inline constexpr const char* kVarlenForward =
    "_attention_varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int? max_seqlen_q, int? max_seqlen_k, float dropout_p, bool is_causal, float? scale, bool enable_gqa, "
    "int[2] window_size, float softcap=0.0, Tensor? alibi_slopes=None) "
    "-> (Tensor output, Tensor logsumexp, Tensor rng_state)";
inline constexpr const char* kVarlenBackward =
    "_attention_varlen_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, Tensor output, Tensor logsumexp, Tensor rng_state, float dropout_p, bool is_causal, "
    "float? scale, bool enable_gqa, int[2] window_size, Tensor? grad_logsumexp=None, float softcap=0.0, "
    "Tensor? alibi_slopes=None, int? max_seqlen_q=None, int? max_seqlen_k=None) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)";
// New queries (B, Hq, L, E) against a key / value cache, FlashAttention's flash_attn_with_kvcache (csrc/kvcache.h):
// key_cache / value_cache (B, Hkv, S_max, E / Ev), or paged (num_pages, Hkv, page_size, E / Ev) with block_table
// (B, max_pages) int32; cache_seqlens (B,) int32 / int64 positions filled; key / value (B, Hkv, L_new, E / Ev)
// written into the caches at cache_seqlens[b] onwards first (the caches are mutated); batch b then attends to its
// first cache_seqlens[b] + L_new positions with the queries as the last L of them (causal, windows and ALiBi
// bottom-right aligned). Any GQA group. rotary_cos / rotary_sin (seqlen_ro, rotary_dim / 2): the rotary embedding
// applied to the query and the new keys first; cache_leftpad (B,): each batch element's first cached position
// (KvCall, kvcache.h). Returns the output (B, Hq, L, Ev) and the
// log-sum-exp (B, Hq, L). No gradient (inference).
inline constexpr const char* kKvcache =
    "attention_kvcache(Tensor query, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor cache_seqlens, "
    "Tensor? key=None, Tensor? value=None, Tensor? block_table=None, bool is_causal=False, float? scale=None, "
    "int[2] window_size=[-1, -1], float softcap=0.0, Tensor? alibi_slopes=None, Tensor? rotary_cos=None, "
    "Tensor? rotary_sin=None, bool rotary_interleaved=False, Tensor? cu_seqlens_q=None, int? max_seqlen_q=None, "
    "Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None) -> (Tensor output, Tensor logsumexp)";
inline constexpr const char* kDropoutMask =
    "_dropout_mask(Tensor rng_state, int batch, int heads, int len_q, int len_k, float dropout_p) -> Tensor";

// Test-only: the Hopper layout self-test GEMM (csrc/cuda/hopper/sm90_gemm_selftest.cuh),
// D (64 x n, fp32) = a (64 x K) @ b (K x n) through TMA and wgmma; CUDA on sm_90 only.
inline constexpr const char* kSm90GemmSelftest =
    "_sm90_gemm_selftest(Tensor a, Tensor b, int swizzle, bool a_mn_major, bool b_mn_major, bool a_in_regs) "
    "-> Tensor";

}  // namespace schema
}  // namespace attention_ext

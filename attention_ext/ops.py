"""Python entry points of the operators (thin wrappers over torch.ops.attention_ext)."""
from typing import Optional, Sequence, Tuple

import torch

from . import _loader

_loader.load()
_ops = torch.ops.attention_ext


def _window(window_size) -> list:
    if window_size is None:
        return [-1, -1]
    if isinstance(window_size, int) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right) or None, got {window_size!r}")
    for x in window_size:  # a count of keys: 1.5 or True is a mistake, not a window of 1
        if isinstance(x, (bool, float)) or (isinstance(x, torch.Tensor) and x.is_floating_point()):
            raise TypeError(f"window_size must hold two ints (left, right), got {window_size!r}")
    return [int(window_size[0]), int(window_size[1])]


def _causal_bias(attn_mask, is_causal, query, key, window):
    """PyTorch's causal biases (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``, which
    ``F.scaled_dot_product_attention`` accepts as ``attn_mask``) as the op's own arguments:
    ``(attn_mask, is_causal, window)``; anything else is returned as it is. Such a bias is not a mask (its
    storage is uninitialised): read as one it would give garbage. Upper-left is ``is_causal``; lower-right
    (key j seen by query i when j <= i + S - L) is a window's right bound of S - L, or, when L > S, its
    boolean mask (the first L - S rows see no key and give 0, as in PyTorch)."""
    bias_cls = getattr(getattr(getattr(torch.nn, "attention", None), "bias", None), "CausalBias", None)
    if bias_cls is None or not isinstance(attn_mask, bias_cls):
        return attn_mask, is_causal, window
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")
    if query.dim() < 2 or key.dim() < 2:
        raise ValueError(f"attn_mask is a causal bias, which needs query and key of at least 2 dims (..., L, E), got "
                         f"query of shape {tuple(query.shape)} and key of shape {tuple(key.shape)}")
    L, S = query.shape[-2], key.shape[-2]
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
        raise ValueError(f"attn_mask is a causal bias for {attn_mask.seq_len_q} queries and {attn_mask.seq_len_kv} "
                         f"keys, but query has length {L} and key {S}")
    variant = attn_mask.variant.name
    if variant == "UPPER_LEFT":
        return None, True, window
    if variant != "LOWER_RIGHT":
        raise ValueError(f"attn_mask: unknown CausalBias variant {attn_mask.variant!r}")
    if L > S:
        return torch.ones(L, S, dtype=torch.bool, device=query.device).tril(S - L), False, window
    right = S - L if window[1] < 0 else min(window[1], S - L)
    return None, False, [window[0], right]


def _constant_slopes(alibi_slopes, op):
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"alibi_slopes: {op} has no gradient with respect to the ALiBi slopes (as "
                         "FlashAttention); pass alibi_slopes.detach()")


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    window_size: Optional[Sequence[int]] = None,
    sinks: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
):
    """softmax(query @ key^T * scale + mask) @ value, fused, differentiable.

    Semantics of ``torch.nn.functional.scaled_dot_product_attention``: inputs
    (..., heads, L, E) / (..., heads_kv, S, E) / (..., heads_kv, S, Ev); a boolean
    ``attn_mask`` is True where attention is allowed, a float one is added to
    the scores, either broadcastable to (..., heads, L, S); ``is_causal`` is
    top-left aligned; ``window_size=(left, right)`` keeps keys j with
    i - left <= j <= i + right (-1: unbounded). A query row that sees no key
    returns 0 (and zero gradient). ``softcap > 0`` soft-caps the scaled scores
    before the mask, x -> softcap * tanh(x / softcap) (Gemma 2's
    attn_logit_softcapping, FlashAttention's softcap). ``attn_mask`` may also be one of PyTorch's
    causal biases, ``torch.nn.attention.bias.causal_upper_left(L, S)`` (the
    same as ``is_causal``) or ``causal_lower_right(L, S)`` (bottom-right
    aligned: query i sees keys j <= i + S - L), as SDPA takes them.

    ``alibi_slopes`` (float32, (heads,) or (..., heads) broadcastable to the
    query's (..., heads); FlashAttention's ALiBi) adds -m_h * |i + S - L - j|
    to the scores after the soft cap, before the mask: the queries are the
    last L of the S key positions, so a decoding step sees the distances its
    prompt saw. No gradient flows to the slopes (as in FlashAttention).
    Nested tensors take (heads,) or (batch, heads).

    ``sinks`` (one logit per query head, gpt-oss's attention sinks) joins
    every row's softmax without a value: the row's weights shrink by
    exp(sink) / (sum_j exp(s_ij) + exp(sink)); differentiable, sinks
    included (attention_ext/_sinks.py).

    ``return_lse=True`` returns ``(output, lse)``: lse (..., heads, L),
    float32 (float64 for float64), is log sum_j exp(s_ij) of the scores
    before dropout (the sink's term included with sinks; -inf for a row
    that sees no key), differentiable like the output (attention_ext/_lse.py),
    for merging partial attentions: out = sum_c exp(lse_c - lse) out_c.
    """
    _constant_slopes(alibi_slopes, "attention")
    if query.is_nested or key.is_nested or value.is_nested:
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported with nested (variable-length) tensors: each sequence's "
                             "own length bounds its keys; use is_causal or window_size for more")
        return nested_attention(query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                enable_gqa=enable_gqa, window_size=window_size, sinks=sinks, return_lse=return_lse,
                                softcap=softcap, alibi_slopes=alibi_slopes)
    window = _window(window_size)
    attn_mask, is_causal, window = _causal_bias(attn_mask, is_causal, query, key, window)
    if sinks is not None:
        from ._sinks import attention_with_sinks
        out, lse, _ = attention_with_sinks(query, key, value, attn_mask, sinks, float(dropout_p), bool(is_causal),
                                           scale, bool(enable_gqa), window, need_lse=return_lse,
                                           softcap=float(softcap), alibi=alibi_slopes)
        return (out, lse) if return_lse else out
    if return_lse:
        from ._lse import attention_lse
        return attention_lse(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale, bool(enable_gqa),
                             window, float(softcap), alibi_slopes)
    return _ops.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                          alibi_slopes)


def attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    window_size: Optional[Sequence[int]] = None,
    sinks: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
):
    """Attention over variable-length sequences packed without padding (FlashAttention's varlen layout),
    differentiable.

    query (total_q, heads, E), key (total_k, heads_kv, E), value (total_k, heads_kv, Ev); sequence b is rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of the query and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of key and
    value (int32 or int64 offsets, batch + 1 of them, from 0 to the totals). Each sequence attends only to its
    own keys, with :func:`attention`'s semantics (``is_causal`` top-left aligned per sequence, windows,
    GQA, dropout, ``softcap``, ``alibi_slopes`` (heads,) or (batch, heads) with each sequence's own distances).
    ``max_seqlen_*`` are optional and, when given, checked. Returns (total_q, heads, Ev).
    On CUDA, offsets on the GPU are read back to the host (a sync): pass them on the CPU to avoid it. Under
    CUDA-graph capture the forward takes GPU offsets unread when ``max_seqlen_q`` and ``max_seqlen_k`` are given
    (one launch; the offsets checked on the device: from the first sequence whose rows are out of range on, rows
    come out NaN); so does the backward (it gets the forward's maxima; NaN gradient rows from the first such
    sequence on). ALiBi, ``softcap`` (backward only), float64 and a head dim of 0 run sequence by sequence and
    refuse capture with GPU offsets.
    ``sinks``: one logit per query head, as in :func:`attention` (first-order gradients).
    ``return_lse=True`` returns ``(output, lse)``, lse (total_q, heads) laid out as the query (float32, float64
    for float64; -inf for a row that sees no key), differentiable like the output (first order), as
    :func:`attention`'s.
    """
    _constant_slopes(alibi_slopes, "attention_varlen")
    if sinks is not None:
        from ._sinks import varlen_with_sinks
        out, lse = varlen_with_sinks(query, key, value, cu_seqlens_q, cu_seqlens_k, sinks, max_seqlen_q,
                                     max_seqlen_k, float(dropout_p), bool(is_causal), scale, bool(enable_gqa),
                                     _window(window_size), need_lse=return_lse, softcap=float(softcap),
                                     alibi=alibi_slopes)
        return (out, lse) if return_lse else out
    if return_lse:
        from ._lse import varlen_lse
        return varlen_lse(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          float(dropout_p), bool(is_causal), scale, bool(enable_gqa), _window(window_size),
                          float(softcap), alibi_slopes)
    return _ops.attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 dropout_p, is_causal, scale, enable_gqa, _window(window_size), softcap, alibi_slopes)


def merge_attention(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Merges attentions of the same queries over disjoint sets of keys into the attention over all of them:
    ``(out, lse)`` with lse = log sum_c exp(lse_c) and out = sum_c exp(lse_c - lse) out_c, from the
    ``(output, lse)`` pairs of ``return_lse=True`` calls (split-key, cascade or ring attention; dense or packed
    layouts: each output has one more trailing dim than its lse). Differentiable (to any order), in the lse's
    dtype; out comes back in the outputs' dtype. A row with lse -inf in every part (it saw no key) gives 0 and
    -inf, as one call would."""
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"merge_attention needs as many outputs as lses, at least one; got {len(outputs)} "
                         f"outputs and {len(lses)} lses")
    for i, (o, l_) in enumerate(zip(outputs, lses)):
        if o.shape[:-1] != l_.shape or o.shape != outputs[0].shape:
            raise ValueError(f"merge_attention: output {i} has shape {tuple(o.shape)} and lse {i} "
                             f"{tuple(l_.shape)}; every output must have output 0's shape {tuple(outputs[0].shape)} "
                             f"and its lse that shape without the last dim")
    lse = torch.stack(list(lses)).to(torch.promote_types(lses[0].dtype, torch.float32))
    m = lse.amax(0).detach()  # a shift only: lse and its gradient (each part's share) do not depend on it
    live = m != -torch.inf
    zero, one = (torch.full((), x, dtype=lse.dtype, device=lse.device) for x in (0.0, 1.0))
    e = torch.exp(lse - torch.where(live, m, zero))  # 0 for a part that saw no key
    s = torch.where(live, e.sum(0), one)
    total = torch.where(live, torch.where(live, m, zero) + torch.log(s), torch.full_like(m, -torch.inf))
    w = e / s  # (parts, ...): each part's share of the row
    out = sum(wc.unsqueeze(-1) * o.to(lse.dtype) for wc, o in zip(w, outputs))
    return out.to(outputs[0].dtype), total


def _packed(t: torch.Tensor, name: str):
    """(values (total, heads, E), offsets) of a jagged nested tensor (batch, heads, ragged length, E)."""
    if not t.is_nested or t.layout != torch.jagged:
        raise ValueError(f"{name} must be a nested tensor with layout=torch.jagged like the others, got "
                         f"{'a strided nested tensor' if t.is_nested else 'a dense tensor'}")
    if t.dim() != 4 or t._ragged_idx != 2:
        raise ValueError(f"{name} must be a jagged nested tensor of shape (batch, heads, ragged length, E), "
                         f"as scaled_dot_product_attention takes it, got shape {tuple(t.shape)} with the ragged "
                         f"dimension at {t._ragged_idx}")
    t = t.transpose(1, 2)  # (batch, ragged length, heads, E): values are (total, heads, E)
    if t._lengths is not None:  # a view with holes between the sequences: pack it
        t = t.contiguous()
    return t.values(), t.offsets()


def nested_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     window_size=None, sinks=None, return_lse=False, softcap=0.0, alibi_slopes=None):
    """:func:`attention` for jagged nested tensors (batch, heads, ragged length, E), the variable-length
    inputs ``F.scaled_dot_product_attention`` accepts: computed by :func:`attention_varlen` on their packed
    values, returned as a jagged nested tensor (batch, heads, ragged length of query, Ev); with
    ``return_lse``, and the log-sum-exp as one (batch, heads, ragged length of query)."""
    q, cu_q = _packed(query, "query")
    k, cu_k = _packed(key, "key")
    v, cu_v = _packed(value, "value")
    # (a data-dependent check: left out under torch.compile, where different totals still raise in the op)
    if cu_v is not cu_k and not torch.compiler.is_compiling() and not torch.equal(cu_v, cu_k):
        raise ValueError("key and value must have the same sequence lengths")
    res = attention_varlen(q, k, v, cu_q, cu_k, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                           enable_gqa=enable_gqa, window_size=window_size, sinks=sinks, return_lse=return_lse,
                           softcap=softcap, alibi_slopes=alibi_slopes)
    nested = [torch.nested.nested_tensor_from_jagged(t, offsets=cu_q).transpose(1, 2)
              for t in (res if return_lse else (res,))]
    return tuple(nested) if return_lse else nested[0]


def attention_kvcache(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cache_seqlens,
    key: Optional[torch.Tensor] = None,
    value: Optional[torch.Tensor] = None,
    *,
    block_table: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Sequence[int]] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    rotary_interleaved: bool = False,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """New queries against a key / value cache, for decoding and chunked prefill (FlashAttention's
    ``flash_attn_with_kvcache``, in this project's (batch, heads, seq, dim) layout). Inference only: no gradient.

    ``query`` (B, Hq, L, E). ``key_cache`` / ``value_cache`` (B, Hkv, S_max, E) / (..., Ev), or, with
    ``block_table`` (B, max_pages) int32, a paged cache (num_pages, Hkv, page_size, E) / (..., Ev) whose
    position j of batch b is row j % page_size of page block_table[b, j // page_size] (a vLLM-style
    (num_pages, page_size, Hkv, E) buffer works through ``.transpose(1, 2)``; any strides with a unit-stride last
    dim). ``cache_seqlens`` (an int or a (B,) int32 / int64 tensor) is how many positions of each batch's cache are
    filled. ``key`` / ``value`` (B, Hkv, L_new, E / Ev), when given, are first written into the caches in place at
    positions cache_seqlens[b] .. cache_seqlens[b] + L_new - 1 (cache_seqlens itself is not changed). Batch b then
    attends to its first S_b = cache_seqlens[b] + L_new positions, the L queries being the last L of them:
    ``is_causal`` lets query i see positions up to i + S_b - L (bottom-right, as FlashAttention), and
    ``window_size`` and ALiBi's distances count from that position too. Any GQA group (Hq a multiple of Hkv).

    ``rotary_cos`` / ``rotary_sin`` (seqlen_ro, rotary_dim / 2), as FlashAttention takes them, apply the rotary
    embedding to the query and the new keys first (the keys are stored rotated): new key t of batch b at position
    cache_seqlens[b] + t, query i at cache_seqlens[b] + i with ``is_causal`` or a window, else every query at
    cache_seqlens[b]; the first rotary_dim features, as (x_j, x_{j + rotary_dim / 2}) pairs (GPT-NeoX, Llama) or,
    with ``rotary_interleaved``, (x_{2j}, x_{2j + 1}) pairs (GPT-J).

    Packed queries (continuous batching: prefill chunks and decoding steps of several sequences in one call): with
    ``cu_seqlens_q`` (B + 1,) int32, ``query`` is (total_q, Hq, E) and batch element b's L_b query rows are rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1; ``key`` / ``value``, when given, are (total_q, Hkv, E / Ev), the
    same rows being b's L_b new positions (so S_b = cache_seqlens[b] + L_b). The rules above hold per batch element
    with L_b for L. ``max_seqlen_q``, when given, must bound every L_b (checked); on CUDA it sizes the launch when
    the lengths are not read back (CUDA-graph capture). The output is (total_q, Hq, Ev), the log-sum-exp
    (total_q, Hq).

    Under CUDA-graph capture the lengths and indices are not read back and checked; the kernels check them on the
    device: a batch element whose cache_seqlens, cache row, pages or cu_seqlens_q rows are out of range gets NaN
    rows (output and log-sum-exp) and its new keys are not written, the others get their results, and nothing
    outside the caches is read or written.

    ``cache_batch_idx`` (B,) int32 / int64 (contiguous caches only, FlashAttention's argument of that name): batch
    element b's cache is row cache_batch_idx[b] of ``key_cache`` / ``value_cache``, which may then hold any number
    of rows (a pool of cache slots that requests come and go from, beam search reading a shared prefix); rows not
    named are neither read nor written. Two batch elements may share a row when nothing is appended.

    ``cache_leftpad`` (B,) int32 / int64 (contiguous caches only, FlashAttention's argument of that name): batch
    element b's cache starts at position cache_leftpad[b] (0 <= cache_leftpad[b] <= cache_seqlens[b]), as in a
    left-padded batch of prompts: it attends to positions cache_leftpad[b] .. S_b - 1 only, and the causal and window
    bounds and ALiBi's distances count from there (as if the padding were not in the cache). ``cache_seqlens`` and
    the positions new keys are written to still count from 0, and so do the rotary positions (FlashAttention's rule).

    ``sinks`` (Hq,) (one logit per query head, gpt-oss's attention sinks, as in :func:`attention`) joins every
    row's softmax without a value: each row's output is scaled by sigmoid(lse - sink) after the kernels ran, and the
    returned log-sum-exp includes the sink's term (a row that sees no position gives 0, and lse = sink).

    Returns the output (B, Hq, L, Ev), and with ``return_lse=True`` also the float32 log-sum-exp (B, Hq, L) for
    merging with other partial attentions (:func:`merge_attention`). The fused kernels read the cache in place,
    pages of any size included (on CUDA float64 gathers the visible cache into one fused call first).
    """
    if isinstance(cache_seqlens, int):
        batch = query.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=query.device)
    if sinks is not None:  # checked before the caches are written
        from ._sinks import check_sinks, with_sinks
        check_sinks(sinks, query if cu_seqlens_q is None or query.dim() < 2 else query.transpose(0, 1))
    out, lse = _ops.attention_kvcache(query, key_cache, value_cache, cache_seqlens, key, value, block_table,
                                      bool(is_causal), scale, _window(window_size), float(softcap), alibi_slopes,
                                      rotary_cos, rotary_sin, bool(rotary_interleaved), cu_seqlens_q, max_seqlen_q,
                                      cache_batch_idx, cache_leftpad)
    if sinks is not None:
        out, lse, _ = with_sinks(out, lse, sinks, return_lse, packed=cu_seqlens_q is not None)
    return (out, lse) if return_lse else out


def attention_forward(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window_size=None,
    softcap=0.0, alibi_slopes=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-differentiable forward: (output, logsumexp float32 (..., heads, L), rng_state int64[2])."""
    return _ops._attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                   _window(window_size), softcap, alibi_slopes)


def attention_backward(
    grad_output, query, key, value, output, logsumexp, rng_state, attn_mask=None, dropout_p=0.0,
    is_causal=False, scale=None, enable_gqa=False, window_size=None, attn_mask_requires_grad=False,
    grad_logsumexp=None, softcap=0.0, alibi_slopes=None,
):
    """(grad_query, grad_key, grad_value, grad_attn_mask) from the forward's saved tensors; with grad_logsumexp
    (logsumexp's shape and dtype) the gradient through the log-sum-exp as well, in the same pass."""
    return _ops._attention_backward(
        grad_output, query, key, value, attn_mask, output, logsumexp, rng_state, dropout_p, is_causal, scale,
        enable_gqa, _window(window_size), attn_mask_requires_grad, grad_logsumexp, softcap, alibi_slopes,
    )


def attention_probs(
    query, key, logsumexp, attn_mask=None, rng_state=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False, window_size=None, softcap=0.0, alibi_slopes=None,
) -> torch.Tensor:
    """Attention weights (..., heads, L, S) recomputed from q and k, normalised with the forward's
    log-sum-exp on the CPU and with row sums of the recomputed scores on CUDA (with the forward's
    dropout applied when ``rng_state`` and ``dropout_p`` are given)."""
    if rng_state is None:
        if dropout_p > 0:
            raise ValueError("attention_probs: dropout_p > 0 needs the rng_state returned by the forward")
        rng_state = torch.zeros(2, dtype=torch.int64, device=query.device)
    return _ops.attention_probs(query, key, attn_mask, logsumexp, rng_state, dropout_p, is_causal, scale, enable_gqa,
                                _window(window_size), softcap, alibi_slopes)

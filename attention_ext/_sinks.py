"""Attention sinks: one learned logit per query head that joins every row's softmax without a value
(gpt-oss's ``sinks``, transformers' ``s_aux``):

    p'_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(sink_h)),   out'_i = sum_j p'_ij v_j

The fused kernels need no change. Row i's weights are the plain softmax's scaled by
w_i = Z_i / (Z_i + exp(sink_h)) = sigmoid(lse_i - sink_h), with lse_i the forward's log-sum-exp, so
out' = w * out. By the chain rule through out and lse, with r_i = g_i . out_i and c_i = w_i (1 - w_i) r_i:

* the plain fused backward with grad_output w * g gives dv and most of dq, dk and the mask's gradient;
* lse adds c_i * d lse_i, where d lse_i / d s_ij = p_ij: c_i scale (P K)_i to dq_i, scale (P^T (c * Q))_j to
  dk_j and c_i p_ij to the mask. P K is a fused forward with K as the value, P^T (c * Q) the value gradient
  of a fused backward with grad_output c * Q (no L x S matrix either way), c * P the probabilities
  (attention_probs, only when the mask needs a gradient, which is L x S then anyway);
* the sink's gradient is -sum over the rows of c.

The backward's own row term D = rowsum(grad_output * output) cannot carry the lse term: the CPU backward
recomputes D from its tiles. A row that sees no key (lse = -inf) gives 0, as without sinks.

Packed sequences (attention_varlen) use the same algebra on the varlen ops, the log-sum-exp gathered from
their flat layout; they have first-order gradients only, as attention_varlen itself.

Higher-order and forward-mode derivatives, and the weights, come from the ATen composite
(``_attention_math`` and ``_attention_math_lse``, scaled the same way), its dropout mask replayed from the
fused forward's rng_state.
"""
from typing import List, Optional

import torch

_ops = torch.ops.attention_ext


def check_sinks(sinks: torch.Tensor, query: torch.Tensor) -> None:
    heads = query.shape[-3] if query.dim() >= 3 else None
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or (heads is not None and sinks.shape[0] != heads):
        got = f"shape {tuple(sinks.shape)}" if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be a 1-D tensor with one logit per query head ({heads}), got {got}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
    if sinks.device != query.device:
        raise ValueError(f"sinks is on {sinks.device} but query is on {query.device}")


def row_scale(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """w = sigmoid(lse - sink) per row, (..., Hq, L) in lse's dtype (float32, float64 for float64); 0 where lse
    is -inf (a row that sees no key), whatever the sink."""
    x = lse - sinks.to(lse.dtype)[:, None]
    return torch.where(lse == -torch.inf, torch.zeros((), dtype=lse.dtype, device=lse.device), torch.sigmoid(x))


def _scaled(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (t.to(w.dtype) * w.unsqueeze(-1)).to(t.dtype)


def composite(q, k, v, mask, sinks, dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
              window: List[int], rng: Optional[torch.Tensor], need_weights: bool = False):
    """(out', weights') in ATen operations, differentiable to any order (weights' empty without need_weights)."""
    out, weights = _ops._attention_math(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, rng,
                                        need_weights, False)
    lse = _ops._attention_math_lse(q, k, v, mask, is_causal, scale, enable_gqa, window)
    w = row_scale(lse, sinks)
    return _scaled(out, w), (_scaled(weights, w) if need_weights else weights)


def _fused_grads(g, q, k, v, mask, sinks, out, lse, rng, w, dropout_p, is_causal, scale, enable_gqa, window,
                 mask_grad):
    """(dq, dk, dv, dmask, dsinks) from the fused kernels (see the module docstring); dmask empty unless
    mask_grad."""
    dq, dk, dv, dmask = _ops._attention_backward(_scaled(g, w), q, k, v, mask, out, lse, rng, dropout_p,
                                                 is_causal, scale, enable_gqa, window, mask_grad)
    c = (g.to(w.dtype) * out.to(w.dtype)).sum(-1) * w * (1 - w)  # dL / d lse, (..., Hq, L)
    sc = scale if scale is not None else (q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0)
    plain = (0.0, is_causal, scale, enable_gqa, window)
    pk = _ops._attention_forward(q, k, k, mask, *plain)[0]  # (P K)_i
    dq = (dq.to(c.dtype) + (sc * c).unsqueeze(-1) * pk.to(c.dtype)).to(dq.dtype)
    ptcq = _ops._attention_backward(_scaled(q, c), q, k, k, mask, pk, lse, rng, *plain, False)[2]  # P^T (c Q)
    dk = (dk.to(c.dtype) + sc * ptcq.to(c.dtype)).to(dk.dtype)
    if mask_grad:
        p = _ops.attention_probs(q, k, mask, lse, rng, *plain)
        dmask = (dmask.to(c.dtype) + (c.unsqueeze(-1) * p.to(c.dtype)).sum_to_size(mask.shape)).to(dmask.dtype)
    dsinks = (-c.transpose(-1, -2).reshape(-1, c.shape[-2]).sum(0)).to(sinks.dtype)
    return dq, dk, dv, dmask, dsinks


class _SinkAttentionBackward(torch.autograd.Function):
    """The fused gradients; differentiating them again (double backward) recomputes the composite."""
    generate_vmap_rule = True

    @staticmethod
    def forward(g, q, k, v, mask, sinks, out, lse, rng, w, dropout_p, is_causal, scale, enable_gqa, window,
                mask_grad):
        return _fused_grads(g, q, k, v, mask, sinks, out, lse, rng, w, dropout_p, is_causal, scale, enable_gqa,
                            window, mask_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, q, k, v, mask, sinks, _, _, rng, _, *opts = inputs
        ctx.save_for_backward(g, q, k, v, mask, sinks, rng)
        ctx.opts = opts

    @staticmethod
    def backward(ctx, gdq, gdk, gdv, gdmask, gdsinks):
        from ._transforms import _composite_grads
        g, q, k, v, mask, sinks, rng = ctx.saved_tensors
        dropout_p, is_causal, scale, enable_gqa, window, mask_grad = ctx.opts
        create_graph = torch.is_grad_enabled()

        def leaf(t):
            return t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
        with torch.enable_grad():
            gi, qi, ki, vi, si = leaf(g), leaf(q), leaf(k), leaf(v), leaf(sinks)
            mi = leaf(mask) if mask_grad else mask
            o, _ = composite(qi, ki, vi, mi, si, dropout_p, is_causal, scale, enable_gqa, window, rng)
            wrt = [qi, ki, vi, si] + ([mi] if mask_grad else [])
            first = torch.autograd.grad(o, wrt, gi, create_graph=True, allow_unused=True)
            cot = [gdq, gdk, gdv, gdsinks] + ([gdmask] if mask_grad else [])
            second = _composite_grads([gi] + wrt, first, cot, create_graph)
        dmask = second[5] if mask_grad else None
        return (second[0], second[1], second[2], second[3], dmask, second[4]) + (None,) * 10


class _SinkAttention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, sinks, dropout_p, is_causal, scale, enable_gqa, window):
        out, lse, rng = _ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window)
        w = row_scale(lse, sinks)
        return _scaled(out, w), lse, rng, w, out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, sinks, *opts = inputs
        _, lse, rng, w, out = output
        ctx.save_for_backward(q, k, v, mask, sinks, out, lse, rng, w)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse, rng, w, out)

    @staticmethod
    def backward(ctx, g, _glse, _grng, _gw, _gout):
        q, k, v, mask, sinks, out, lse, rng, w = ctx.saved_tensors
        mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        if g is None:
            g = torch.zeros_like(out)
        dq, dk, dv, dmask, dsinks = _SinkAttentionBackward.apply(g, q, k, v, mask, sinks, out, lse, rng, w,
                                                                 *ctx.opts, mask_grad)
        return dq, dk, dv, (dmask if mask_grad else None), dsinks, None, None, None, None, None


def attention_with_sinks(q, k, v, mask, sinks, dropout_p: float, is_causal: bool, scale: Optional[float],
                         enable_gqa: bool, window: List[int], need_weights: bool = False):
    """(out', weights' or None)."""
    from ._transforms import _fused_applies

    check_sinks(sinks, q)
    # (torch.compile traces the autograd function; the transform check is for eager torch.func / forward AD)
    if need_weights or (not torch.compiler.is_compiling() and not _fused_applies((q, k, v, mask, sinks))):
        rng = None
        if dropout_p > 0:
            rng = _ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window)[2]
        out, weights = composite(q, k, v, mask, sinks, dropout_p, is_causal, scale, enable_gqa, window, rng,
                                 need_weights)
        return out, (weights if need_weights else None)
    return _SinkAttention.apply(q, k, v, mask, sinks, dropout_p, is_causal, scale, enable_gqa, window)[0], None


def eager(q, k, v, mask, sinks, dropout_p: float, is_causal: bool, scale: Optional[float]):
    """(out', weights') in plain tensor operations, for inputs the kernels do not take (a head dim above 256, a
    device without kernels), as transformers' eager attention computes them (the sink's column joins the
    softmax, then is dropped; dropout after)."""
    check_sinks(sinks, q)
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * sc
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), -torch.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else s + mask
    sink = sinks.to(s.dtype).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    p = torch.nn.functional.dropout(p, p=dropout_p, training=dropout_p > 0).to(v.dtype)
    return torch.matmul(p, v), p


# --------------------------------------------------------------------------- packed sequences
def _varlen_rows(lse: torch.Tensor, cu_q: torch.Tensor, total: int, heads: int) -> torch.Tensor:
    """Index of (token t, head h) in the varlen forward's flat log-sum-exp, (total, heads): sequence b's
    (heads, L_b) block is row-major from heads * cu_q[b]."""
    cu = cu_q.to(device=lse.device, dtype=torch.long)
    t = torch.arange(total, device=lse.device)
    b = torch.searchsorted(cu[1:], t, right=True)
    start, length = cu[b], cu[b + 1] - cu[b]
    h = torch.arange(heads, device=lse.device)
    return heads * start[:, None] + h[None, :] * length[:, None] + (t - start)[:, None]


class _VarlenSinkAttention(torch.autograd.Function):
    """attention_varlen with sinks: the dense function's algebra on the packed layout (no mask there)."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, sinks, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window):
        out, lse, rng = _ops._attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal,
                                                       scale, enable_gqa, window)
        lse_th = lse[_varlen_rows(lse, cu_q, q.shape[0], q.shape[1])]  # (total, Hq)
        w = row_scale(lse_th.transpose(0, 1), sinks).transpose(0, 1)   # (total, Hq)
        return _scaled(out, w), lse, rng, w, out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, sinks, *opts = inputs
        _, lse, rng, w, out = output
        ctx.save_for_backward(q, k, v, cu_q, cu_k, sinks, out, lse, rng, w)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse, rng, w, out)

    @staticmethod
    def backward(ctx, g, _glse, _grng, _gw, _gout):
        q, k, v, cu_q, cu_k, sinks, out, lse, rng, w = ctx.saved_tensors
        if g is None:
            g = torch.zeros_like(out)
        dq, dk, dv, dsinks = _VarlenSinkBackward.apply(g, q, k, v, cu_q, cu_k, sinks, out, lse, rng, w, *ctx.opts)
        return dq, dk, dv, None, None, dsinks, None, None, None, None, None, None, None


class _VarlenSinkBackward(torch.autograd.Function):
    """The packed gradients; like attention_varlen's, they cannot be differentiated again."""

    @staticmethod
    def forward(g, q, k, v, cu_q, cu_k, sinks, out, lse, rng, w, max_q, max_k, dropout_p, is_causal, scale,
                enable_gqa, window):
        dq, dk, dv = _ops._attention_varlen_backward(_scaled(g, w), q, k, v, cu_q, cu_k, out, lse, rng, dropout_p,
                                                     is_causal, scale, enable_gqa, window)
        c = (g.to(w.dtype) * out.to(w.dtype)).sum(-1) * w * (1 - w)  # dL / d lse, (total, Hq)
        sc = scale if scale is not None else (q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0)
        plain = (max_q, max_k, 0.0, is_causal, scale, enable_gqa, window)
        pk, _, _ = _ops._attention_varlen_forward(q, k, k, cu_q, cu_k, *plain)  # (P K) per token
        dq = (dq.to(c.dtype) + (sc * c).unsqueeze(-1) * pk.to(c.dtype)).to(dq.dtype)
        ptcq = _ops._attention_varlen_backward(_scaled(q, c), q, k, k, cu_q, cu_k, pk, lse, rng, *plain[2:])[2]
        dk = (dk.to(c.dtype) + sc * ptcq.to(c.dtype)).to(dk.dtype)
        return dq, dk, dv, (-c.sum(0)).to(sinks.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("attention_ext.attention_varlen does not support double backward (differentiating its "
                           "gradients); use create_graph=False")


def varlen_with_sinks(q, k, v, cu_q, cu_k, sinks, max_q, max_k, dropout_p: float, is_causal: bool,
                      scale: Optional[float], enable_gqa: bool, window: List[int]) -> torch.Tensor:
    if q.dim() != 3:
        raise ValueError(f"query must be (total_q, heads, E) for attention_varlen, got shape {tuple(q.shape)}")
    check_sinks(sinks, q.transpose(0, 1))
    return _VarlenSinkAttention.apply(q, k, v, cu_q, cu_k, sinks, max_q, max_k, dropout_p, is_causal, scale,
                                      enable_gqa, window)[0]

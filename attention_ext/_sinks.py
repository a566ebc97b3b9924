"""Attention sinks: one learned logit per query head that joins every row's softmax without a value
(gpt-oss's ``sinks``, transformers' ``s_aux``):

    p'_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(sink_h)),   out'_i = sum_j p'_ij v_j

The fused kernels need no change. Row i's weights are the plain softmax's scaled by
w_i = Z_i / (Z_i + exp(sink_h)) = sigmoid(lse_i - sink_h), with lse_i the forward's log-sum-exp, so
out' = w * out: a few elementwise operations on the output and the log-sum-exp of attention with a
differentiable lse (_lse.py), through which autograd takes every gradient, the sinks' included. A row that sees
no key (lse = -inf) gives 0, as without sinks.

Packed sequences (attention_varlen) use the same algebra on the varlen ops, the log-sum-exp gathered from
their flat layout; they have first-order gradients only, as attention_varlen itself.
"""
from typing import List, Optional

import torch

from . import _lse

_ops = torch.ops.attention_ext


def _scaled(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """t (..., n, d) times w (..., n) per row, in w's dtype, back in t's."""
    return (t.to(w.dtype) * w.unsqueeze(-1)).to(t.dtype)


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
    is -inf (a row that sees no key), whatever the sink, with no NaN in its gradient either."""
    live = lse != -torch.inf
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    x = torch.where(live, lse - sinks.to(lse.dtype)[:, None], zero)
    return torch.where(live, torch.sigmoid(x), zero)


def attention_with_sinks(q, k, v, mask, sinks, dropout_p: float, is_causal: bool, scale: Optional[float],
                         enable_gqa: bool, window: List[int], need_weights: bool = False, need_lse: bool = False):
    """(out', lse' or None, weights' or None), lse' = log(exp(lse) + exp(sink)) the log of the row's whole
    denominator."""
    check_sinks(sinks, q)
    weights = None
    if need_weights:
        out, lse, weights = _lse.composite(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window,
                                           need_weights=True)
    else:
        out, lse = _lse.attention_lse(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window)
    w = row_scale(lse, sinks)
    lse_s = torch.logaddexp(lse, sinks.to(lse.dtype)[:, None]) if need_lse else None
    return _scaled(out, w), lse_s, (_scaled(weights, w) if need_weights else None)


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
        c = (g.to(w.dtype) * out.to(w.dtype)).sum(-1) * w * (1 - w)  # dL / d lse, (total, Hq)
        glse = torch.empty_like(lse)
        glse[_varlen_rows(lse, cu_q, q.shape[0], q.shape[1])] = c.to(lse.dtype)
        dq, dk, dv = _ops._attention_varlen_backward(_scaled(g, w), q, k, v, cu_q, cu_k, out, lse, rng, dropout_p,
                                                     is_causal, scale, enable_gqa, window, glse)
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

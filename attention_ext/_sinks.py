"""Attention sinks: one learned logit per query head that joins every row's softmax without a value
(gpt-oss's ``sinks``, transformers' ``s_aux``):

    p'_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(sink_h)),   out'_i = sum_j p'_ij v_j

Row i's weights are the plain softmax's scaled by w_i = Z_i / (Z_i + exp(sink_h)) = sigmoid(lse_i - sink_h),
with lse_i the forward's log-sum-exp, so out' = w * out: a few elementwise operations on the output and the
log-sum-exp of attention with a differentiable lse (_lse.py), through which autograd takes every gradient, the
sinks' included (the lse's cotangent goes into the one fused backward). A row that sees no key (lse = -inf)
gives 0, as without sinks.

Packed sequences (attention_varlen) use the same algebra on attention_varlen's (out, lse); they have
first-order gradients only, as attention_varlen itself. attention_kvcache uses it on its (out, lse), dense or
packed (no gradient reaches the op; one reaches the sinks through this algebra).
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
                         enable_gqa: bool, window: List[int], need_weights: bool = False, need_lse: bool = False,
                         softcap: float = 0.0, alibi: Optional[torch.Tensor] = None):
    """(out', lse' or None, weights' or None), lse' = log(exp(lse) + exp(sink)) the log of the row's whole
    denominator."""
    check_sinks(sinks, q)
    weights = None
    if need_weights:
        out, lse, weights = _lse.composite(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window,
                                           need_weights=True, softcap=softcap, alibi=alibi)
    else:
        out, lse = _lse.attention_lse(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                      alibi)
    return with_sinks(out, lse, sinks, need_lse, weights=weights)


def eager(q, k, v, mask, sinks, dropout_p: float, is_causal: bool, scale: Optional[float], softcap: float = 0.0):
    """(out', weights') in plain tensor operations, for inputs the kernels do not take (a head dim above 256, a
    device without kernels), as transformers' eager attention computes them (the sink's column joins the
    softmax, then is dropped; dropout after)."""
    if sinks is not None:
        check_sinks(sinks, q)
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * sc
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), -torch.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else s + mask
    if sinks is None:  # (soft-capped attention without sinks, hf.py)
        p = torch.softmax(s.float(), dim=-1).to(s.dtype)
    else:
        sink = sinks.to(s.dtype).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    p = torch.nn.functional.dropout(p, p=dropout_p, training=dropout_p > 0).to(v.dtype)
    return torch.matmul(p, v), p


# --------------------------------------------------------------------------- packed sequences
def varlen_with_sinks(q, k, v, cu_q, cu_k, sinks, max_q, max_k, dropout_p: float, is_causal: bool,
                      scale: Optional[float], enable_gqa: bool, window: List[int], need_lse: bool = False,
                      softcap: float = 0.0, alibi: Optional[torch.Tensor] = None):
    """(out', lse' or None) of packed sequences: the dense algebra on attention_varlen's (out, lse), lse laid out
    as (total_q, Hq)."""
    if q.dim() != 3:
        raise ValueError(f"query must be (total_q, heads, E) for attention_varlen, got shape {tuple(q.shape)}")
    check_sinks(sinks, q.transpose(0, 1))
    out, lse = _lse.varlen_lse(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window,
                               softcap, alibi)
    out, lse, _ = with_sinks(out, lse, sinks, need_lse, packed=True)
    return out, lse


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, need_lse: bool, packed: bool = False,
               weights: Optional[torch.Tensor] = None):
    """(out', lse' or None, weights' or None) from an attention's out and lse (and weights, scaled per row like
    the output): lse (..., Hq, L), or packed (total_q, Hq)."""
    if packed:
        w = row_scale(lse.transpose(0, 1), sinks).transpose(0, 1)
        sink = sinks.to(lse.dtype)[None, :]
    else:
        w = row_scale(lse, sinks)
        sink = sinks.to(lse.dtype)[:, None]
    return (_scaled(out, w), torch.logaddexp(lse, sink) if need_lse else None,
            None if weights is None else _scaled(weights, w))

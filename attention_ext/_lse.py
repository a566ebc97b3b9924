"""Attention with a differentiable log-sum-exp: ``(out, lse)`` whose gradients flow through both, on the fused
kernels (``attention_ext.attention(..., return_lse=True)``; attention sinks are built on it, _sinks.py).

lse_i = log sum_j exp(s_ij) is what merging partial attentions needs (split keys, ring or cascade attention:
out = sum_c exp(lse_c - lse) out_c), and its gradient reaches the scores as d lse_i / d s_ij = p_ij. With c_i
the cotangent of lse_i, dS = P o (dP - D + c): the fused backward takes c as its grad_logsumexp and subtracts it
from its row term D = rowsum(dO o O), in every kernel, so an lse gradient costs no extra pass (and a float
mask's gradient, dS itself, carries it too). lse is of the scores before dropout (-inf for a row that sees no
key, whose c is ignored).

Double backward and forward-mode AD recompute the ATen composite (``_attention_math`` and
``_attention_math_lse``), its dropout mask replayed from the fused forward's rng_state.
"""
from typing import List, Optional

import torch

_ops = torch.ops.attention_ext


def fused_grads(g, c, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                alibi, mask_grad):
    """(dq, dk, dv, dmask) from the fused backward for cotangent g of out and c of lse (None: none); dmask empty
    unless mask_grad."""
    return _ops._attention_backward(g, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa,
                                    window, mask_grad, None if c is None else c.to(lse.dtype), softcap, alibi)


def composite(q, k, v, mask, dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
              window: List[int], rng: Optional[torch.Tensor] = None, need_weights: bool = False,
              softcap: float = 0.0, alibi: Optional[torch.Tensor] = None):
    """(out, lse, weights) in ATen operations, differentiable to any order (weights empty without need_weights).
    Without rng, dropout's mask is drawn by the fused forward."""
    if rng is None and dropout_p > 0:
        rng = _ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                      alibi)[2]
    out, weights = _ops._attention_math(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, rng,
                                        need_weights, False, softcap, alibi)
    lse = _ops._attention_math_lse(q, k, v, mask, is_causal, scale, enable_gqa, window, softcap, alibi)
    return out, lse, weights


class _AttentionLseBackward(torch.autograd.Function):
    """The fused gradients; differentiating them again (double backward) recomputes the composite."""
    generate_vmap_rule = True

    @staticmethod
    def forward(g, c, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                alibi, mask_grad):
        return fused_grads(g, c, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window,
                           softcap, alibi, mask_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, c, q, k, v, mask, _, _, rng, *opts = inputs
        ctx.save_for_backward(g, c, q, k, v, mask, rng)
        ctx.opts = opts

    @staticmethod
    def backward(ctx, gdq, gdk, gdv, gdmask):
        from ._transforms import _composite_grads
        g, c, q, k, v, mask, rng = ctx.saved_tensors
        dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi, mask_grad = ctx.opts
        create_graph = torch.is_grad_enabled()

        def leaf(t):
            return t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
        with torch.enable_grad():
            gi, qi, ki, vi = leaf(g), leaf(q), leaf(k), leaf(v)
            ci = leaf(c) if c is not None else None
            mi = leaf(mask) if mask_grad else mask
            o, _ = _ops._attention_math(qi, ki, vi, mi, dropout_p, is_causal, scale, enable_gqa, window, rng,
                                        False, False, softcap, alibi)
            wrt = [qi, ki, vi] + ([mi] if mask_grad else [])
            ys, gys, cots = [o], [gi], [gi]
            if ci is not None:  # (rows that see no key: no lse gradient, as in the fused one)
                lse = _ops._attention_math_lse(qi, ki, vi, mi, is_causal, scale, enable_gqa, window, softcap, alibi)
                live = lse != -torch.inf
                ys.append(torch.where(live, lse, torch.zeros((), dtype=lse.dtype, device=lse.device)))
                gys.append(torch.where(live, ci, torch.zeros((), dtype=ci.dtype, device=ci.device)))
                cots.append(ci)
            first = torch.autograd.grad(ys, wrt, gys, create_graph=True, allow_unused=True)
            cot = [gdq, gdk, gdv] + ([gdmask] if mask_grad else [])
            second = _composite_grads(cots + wrt, first, cot, create_graph)
        dg, dc = second[0], (second[1] if ci is not None else None)
        rest = second[len(cots):]
        dmask = rest[3] if mask_grad else None
        return (dg, dc, rest[0], rest[1], rest[2], dmask) + (None,) * 11


class _AttentionLse(torch.autograd.Function):
    """(out, lse, rng) of the fused forward. Also the function torch.func transforms take for attention
    (_transforms.py), where lse is unused: no cotangent, the plain fused backward."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi=None):
        return _ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                       alibi)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, *opts = inputs
        out, lse, rng = output
        ctx.save_for_backward(q, k, v, mask, out, lse, rng)
        ctx.opts = opts
        ctx.mark_non_differentiable(rng)
        ctx.set_materialize_grads(False)  # an unused lse: no cotangent, no extra kernels

    @staticmethod
    def backward(ctx, g, c, _grng):
        q, k, v, mask, out, lse, rng = ctx.saved_tensors
        mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        if g is None:
            g = torch.zeros_like(out)
        dq, dk, dv, dmask = _AttentionLseBackward.apply(g, c, q, k, v, mask, out, lse, rng, *ctx.opts, mask_grad)
        return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None, None


def attention_lse(q, k, v, mask, dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
                  window: List[int], softcap: float = 0.0, alibi: Optional[torch.Tensor] = None):
    """(out, lse), both differentiable: the fused kernels, or the composite under forward-mode AD and nested
    torch.func transforms. alibi: ALiBi slopes (constants: no gradient)."""
    from ._transforms import _fused_applies

    if not torch.compiler.is_compiling() and not _fused_applies((q, k, v, mask)):
        out, lse, _ = composite(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap=softcap,
                                alibi=alibi)
        return out, lse
    out, lse, _ = _AttentionLse.apply(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                      alibi)
    return out, lse


# --------------------------------------------------------------------------- packed sequences
_NO_DOUBLE_BACKWARD = ("attention_ext.attention_varlen does not support double backward (differentiating its "
                       "gradients); use create_graph=False")


def varlen_rows(lse: torch.Tensor, cu_q: torch.Tensor, total: int, heads: int) -> torch.Tensor:
    """Index of (token t, head h) in the varlen forward's flat log-sum-exp, (total, heads): sequence b's
    (heads, L_b) block is row-major from heads * cu_q[b]."""
    cu = cu_q.to(device=lse.device, dtype=torch.long)
    t = torch.arange(total, device=lse.device)
    b = torch.searchsorted(cu[1:], t, right=True)
    start, length = cu[b], cu[b + 1] - cu[b]
    h = torch.arange(heads, device=lse.device)
    return heads * start[:, None] + h[None, :] * length[:, None] + (t - start)[:, None]


class _VarlenLse(torch.autograd.Function):
    """attention_varlen's (out, lse) with lse laid out as the query, (total_q, Hq): first-order gradients through
    both, from one varlen backward (the lse cotangent scattered back to the kernels' flat layout)."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                alibi=None):
        out, lse, rng = _ops._attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal,
                                                       scale, enable_gqa, window, softcap, alibi)
        idx = varlen_rows(lse, cu_q, q.shape[0], q.shape[1])
        return out, lse[idx], lse, rng, idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, *opts = inputs
        out, _, lse, rng, idx = output
        ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, rng, idx)
        ctx.opts = [*opts, max_q, max_k]
        ctx.mark_non_differentiable(lse, rng, idx)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, c, *_):
        q, k, v, cu_q, cu_k, out, lse, rng, idx = ctx.saved_tensors
        if g is None and c is None:
            return (None,) * 14
        if g is None:
            g = torch.zeros_like(out)
        glse = None
        if c is not None:
            glse = torch.zeros_like(lse)
            glse[idx] = c.to(lse.dtype)
        dq, dk, dv = _VarlenLseBackward.apply(g, glse, q, k, v, cu_q, cu_k, out, lse, rng, *ctx.opts)
        return (dq, dk, dv) + (None,) * 11


class _VarlenLseBackward(torch.autograd.Function):
    """The packed gradients; like attention_varlen's, they cannot be differentiated again."""

    @staticmethod
    def forward(g, glse, q, k, v, cu_q, cu_k, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, window,
                softcap, alibi=None, max_q=None, max_k=None):
        return _ops._attention_varlen_backward(g, q, k, v, cu_q, cu_k, out, lse, rng, dropout_p, is_causal, scale,
                                               enable_gqa, window, glse, softcap, alibi, max_q, max_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


def varlen_lse(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p: float, is_causal: bool, scale: Optional[float],
               enable_gqa: bool, window: List[int], softcap: float = 0.0, alibi: Optional[torch.Tensor] = None):
    """(out (total_q, Hq, Ev), lse (total_q, Hq)) of packed sequences, both differentiable (first order); the
    varlen forward validates the inputs."""
    out, lse, *_ = _VarlenLse.apply(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa,
                                    window, softcap, alibi)
    return out, lse

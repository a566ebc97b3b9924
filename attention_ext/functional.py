"""Functional drop-ins built on the fused ops.

* :func:`scaled_dot_product_attention` -- same signature and semantics as
  ``torch.nn.functional.scaled_dot_product_attention``, computed by
  ``torch.ops.attention_ext.attention``.
* :func:`use_attention_ext` -- a context manager that routes every call of
  ``torch.nn.functional.scaled_dot_product_attention`` (for models such as
  timm's that call the PyTorch function directly) through it, and restores the
  original function on exit.
* :func:`attention_with_weights` -- the fused output *and* the attention
  probabilities, both differentiable (used by ``MultiheadAttention`` with
  ``need_weights=True`` and by the Hugging Face integration with
  ``output_attentions=True``).

Jagged nested tensors (variable-length batches) run through the varlen op. Inputs
the kernels cannot take (strided nested tensors, a mask with nested tensors, a
device the library has no kernel for, a head dim above 256, a non-float dtype)
are passed on to
PyTorch's own implementation, so a patched model keeps working everywhere.
"""
import contextlib
import functools
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _dtensor, _loader
from . import _transforms
from . import ops as _ops_py

_loader.load()
_ops = torch.ops.attention_ext

# PyTorch's implementation, captured before anything can patch it.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention

_NO_WINDOW = [-1, -1]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_kernel_cache = {}


def has_kernel(device: torch.device) -> bool:
    """True when the compiled library has kernels for ``device``'s type (cpu, cuda, meta, ...)."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    ok = _kernel_cache.get(dev_type)
    if ok is None:
        key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(dev_type)
        ok = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            "attention_ext::_attention_forward", key)
        _kernel_cache[dev_type] = ok
    return ok


for _dev in ("cpu", "cuda", "meta"):  # looked up now, so torch.compile never traces the lookup
    has_kernel(torch.device(_dev))


def supports_tensors(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors' kind (layout, dtype, device), whatever their shapes."""
    if query.is_nested or key.is_nested or value.is_nested:
        return False
    return _kernels_take(query, key, value)


def _kernels_take(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """dtype and device (dense or nested alike)."""
    if query.dtype not in _FLOAT_DTYPES or query.dtype != key.dtype or query.dtype != value.dtype:
        return False
    return has_kernel(query.device)


def _jagged_supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Jagged nested tensors (batch, heads, ragged length, E) the varlen op takes (without a mask)."""
    if not all(t.is_nested and t.layout == torch.jagged and t.dim() == 4 and t._ragged_idx == 2
               for t in (query, key, value)):
        return False
    return query.shape[-1] <= 256 and value.shape[-1] <= 256 and _kernels_take(query, key, value)


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the fused kernels can take these (..., L, E) inputs (else callers fall back to PyTorch)."""
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return False
    if query.shape[-1] > 256 or value.shape[-1] > 256:  # (0 too: as SDPA, in ATen operations)
        return False
    return supports_tensors(query, key, value)


# ---------------------------------------------------------------------------
# attention output + probabilities, both differentiable
# ---------------------------------------------------------------------------
class _AttentionWithWeights(torch.autograd.Function):
    """(output, probs) from one fused op, ``_attention_forward_weights`` (on the CPU one pass: the
    weights come from the forward's own score tiles; on CUDA the forward, then ``attention_probs``).

    The backward of the output is the fused backward kernel; a gradient flowing
    into ``probs`` (when the caller uses the weights in its loss) is
    back-propagated through the softmax (and dropout) on the materialised
    probabilities, which exist anyway.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, average_heads):
        out, lse, rng, probs = _ops._attention_forward_weights(q, k, v, mask, dropout_p, is_causal, scale,
                                                               enable_gqa, _NO_WINDOW, average_heads)
        ctx.save_for_backward(q, k, v, mask, out, lse, rng)
        ctx.opts = (dropout_p, is_causal, scale, enable_gqa, average_heads)
        ctx.set_materialize_grads(False)  # unused weights: no gradient work for them at all
        return out, probs

    @staticmethod
    def backward(ctx, g_out, g_probs):
        q, k, v, mask, out, lse, rng = ctx.saved_tensors
        dropout_p, is_causal, scale, enable_gqa, average_heads = ctx.opts
        mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _math_backward(q, k, v, mask, rng, ctx.opts, g_out, g_probs, mask_grad) + (None,) * 5
        if g_out is not None:
            dq, dk, dv, dmask = _ops._attention_backward(
                g_out, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa, _NO_WINDOW, mask_grad)
        else:  # only the weights are used
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            dmask = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device) if mask_grad else None
        if not mask_grad:
            dmask = None
        if g_probs is not None:
            # d(probs)/d(scores): probs = softmax(s) [* keep / (1 - p)], s = scale * q k^T + mask
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            p = _ops.attention_probs(q, k, mask, lse, rng, 0.0, is_causal, scale, enable_gqa, _NO_WINDOW).to(acc)
            g = g_probs.to(acc)
            if average_heads:  # the mean over the heads: each head's weights get 1 / heads of it
                g = (g / q.shape[-3]).unsqueeze(-3).expand(p.shape)
            if dropout_p > 0:
                lead = p.shape[:-3]
                bsz = 1
                for d in lead:
                    bsz *= d
                heads, len_q, len_k = p.shape[-3:]
                keep = _ops._dropout_mask(rng, bsz, heads, len_q, len_k, dropout_p).to(p.device).view(p.shape)
                g = g * keep.to(acc) * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)  # p = 1: all dropped
            ds = p * (g - (g * p).sum(-1, keepdim=True))
            sc = scale if scale is not None else q.shape[-1] ** -0.5
            hq, hkv = q.shape[-3], k.shape[-3]
            kk = k.to(acc)
            if hq != hkv:
                kk = kk.repeat_interleave(hq // hkv, dim=-3)
            dq = dq + (sc * _dtensor.matmul(ds, kk)).to(dq.dtype)
            dk_h = sc * _dtensor.matmul(ds.transpose(-1, -2), q.to(acc))
            if hq != hkv:
                dk_h = dk_h.unflatten(-3, (hkv, hq // hkv)).sum(-3)
            dk = dk + dk_h.to(dk.dtype)
            if mask_grad:
                dmask = dmask + ds.sum_to_size(mask.shape).to(dmask.dtype)
        return dq, dk, dv, dmask, None, None, None, None, None


def _math_backward(q, k, v, mask, rng, opts, g_out, g_probs, mask_grad):
    """(dq, dk, dv, dmask) recomputed through ``_attention_math`` (plain ATen operations, the forward's dropout
    mask) with a graph, so that they can be differentiated again (the C++ attention's double backward does
    the same)."""
    dropout_p, is_causal, scale, enable_gqa, average_heads = opts
    with torch.enable_grad():
        def leaf(t):  # views stop the gradients at the inputs and keep their graph (see csrc/ops.cpp)
            return t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
        qi, ki, vi = leaf(q), leaf(k), leaf(v)
        mi = leaf(mask) if mask_grad else mask
        out, weights = _ops._attention_math(qi, ki, vi, mi, dropout_p, is_causal, scale, enable_gqa, _NO_WINDOW, rng,
                                            g_probs is not None, average_heads)
        ys = [y for y, g in ((out, g_out), (weights, g_probs)) if g is not None]
        gys = [g for g in (g_out, g_probs) if g is not None]
        wrt = [qi, ki, vi] + ([mi] if mask_grad else [])
        grads = torch.autograd.grad(ys, wrt, gys, create_graph=True, allow_unused=True)
    return tuple(grads) + ((None,) if not mask_grad else ())


def _differentiated(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                        or (attn_mask is not None and attn_mask.requires_grad))


def _fused_weights(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
                   average_heads: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nothing to differentiate: the op alone, without an autograd function's context (as the C++ ops do)."""
    out, _, _, probs = torch.ops.attention_ext._attention_forward_weights(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, [-1, -1], average_heads)
    return out, probs


def _weights_scripted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                      dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
                      average_heads: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_weights`` under TorchScript, which has no Python autograd functions: the fused op when
    nothing is differentiated (inference), else the ATen composite (differentiable; the weights exist in full
    anyway)."""
    if not _differentiated(query, key, value, attn_mask):
        return _fused_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, average_heads)
    return _transforms.composite(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, [-1, -1],
                                 True, average_heads)


def attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    average_heads: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(output, probs)``: the fused attention output and the attention weights
    ``(..., heads, L, S)`` (with the forward's dropout applied, as PyTorch's
    MultiheadAttention returns them), or with ``average_heads`` their mean over
    the heads, ``(..., L, S)`` (averaged in float32). Gradients flow through both."""
    if torch.jit.is_scripting():  # first: TorchScript compiles none of what follows
        return _weights_scripted(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, average_heads)
    if torch.jit.is_tracing():
        # one graph whatever the grad mode (the trace's check re-runs it without grad): the differentiable
        # composite, PyTorch's own need_weights path being unfused too
        return _transforms.composite(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale,
                                     bool(enable_gqa), _NO_WINDOW, True, bool(average_heads))
    if not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                              or _transforms.has_tangent(query, key, value, attn_mask)):
        # torch.func transforms and forward-mode AD: the weights exist in full anyway, so the ATen composite,
        # which every transform goes through (its dropout mask drawn by the fused forward)
        return _transforms.composite(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale,
                                     bool(enable_gqa), _NO_WINDOW, True, bool(average_heads))
    if not _differentiated(query, key, value, attn_mask):
        return _fused_weights(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale,
                              bool(enable_gqa), bool(average_heads))
    return _AttentionWithWeights.apply(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale,
                                       bool(enable_gqa), bool(average_heads))


# ---------------------------------------------------------------------------
# F.scaled_dot_product_attention drop-in
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _torch_rejects_mask_with_causal() -> bool:
    """Recent PyTorch raises for an attn_mask together with is_causal=True; older
    releases (2.11 on CPU, for one) apply both. The drop-in does what the
    installed PyTorch does (the op itself always supports the combination)."""
    t = torch.zeros(1, 1, 1, 1)
    try:
        _torch_sdpa(t, t, t, attn_mask=torch.ones(1, 1, dtype=torch.bool), is_causal=True)
    except RuntimeError:
        return True
    return False


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same signature and semantics (boolean mask True = attend, float mask
    added, broadcastable; top-left causal; dropout applied whenever
    ``dropout_p > 0``, as in PyTorch, ``dropout_p = 1`` giving zeros; batch and head dims broadcast, key / value
    heads repeated under ``enable_gqa``; 2-D inputs), run
    by ``torch.ops.attention_ext.attention``; PyTorch's causal biases
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``) as
    ``attn_mask`` too. Differences: a query row that can
    see no key gives 0 (PyTorch's math path gives NaN). Inputs the kernels
    cannot take are handed to PyTorch's implementation.
    """
    if attn_mask is None and _jagged_supported(query, key, value):
        return _ops_py.nested_attention(query, key, value, dropout_p=float(dropout_p), is_causal=bool(is_causal),
                                        scale=scale, enable_gqa=bool(enable_gqa))
    # PyTorch's causal biases: the op's own causal / window arguments
    attn_mask, is_causal, window = _ops_py._causal_bias(attn_mask, is_causal, query, key, _NO_WINDOW)
    if window != _NO_WINDOW and not supports(query, key, value):  # PyTorch's SDPA takes it as a mask
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
        attn_mask, window = attn_mask.tril(window[1]), _NO_WINDOW
    if not supports(query, key, value) or (
            attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype)):
        # (PyTorch takes a boolean mask, a float32 one or one of the query's dtype and raises its own error for
        # others: a mask converted silently here would fail when the model goes back to SDPA)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    if is_causal and attn_mask is not None and _torch_rejects_mask_with_causal():
        raise RuntimeError("scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    squeeze = query.dim() == 2
    if squeeze:  # (L, E): no heads dim
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    rank = max(query.dim(), key.dim(), value.dim())
    extra = attn_mask.dim() - rank if attn_mask is not None else 0
    if extra > 0 and all(n == 1 for n in attn_mask.shape[:extra]):
        # a mask with more (leading, singleton) dims than the scores: PyTorch's result keeps the scores' rank
        attn_mask = attn_mask.reshape(attn_mask.shape[extra:])
    if not (query.dim() == key.dim() == value.dim()) or not (
            query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        # broadcast the leading batch dims (views, no copies)
        query, key, value = (t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) for t in (query, key, value))
        lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        query = query.expand(*lead, *query.shape[-3:])
        key = key.expand(*lead, *key.shape[-3:])
        value = value.expand(*lead, *value.shape[-3:])
    heads = _heads_for_kernels(query, key, value, bool(enable_gqa))
    if heads is None:  # heads PyTorch cannot combine either: its own error
        out = _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    else:
        query, key, value, enable_gqa = heads
        out = _ops.attention(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale, enable_gqa,
                             window)
    return out.squeeze(0) if squeeze else out


def _heads_for_kernels(query, key, value, enable_gqa):
    """(query, key, value, enable_gqa) with head counts the op takes (key and value alike, the query's a
    multiple of theirs), or None where PyTorch's SDPA raises too. SDPA broadcasts the heads dim like any batch
    dim (a size of 1 stretches: key / value with one head serve every query head, a one-head query meets every
    key head), and with enable_gqa repeats the key and the value heads, each by its own factor, up to the
    query's. One key / value head becomes grouped-query attention (no copies); other sizes of 1 are expanded
    (views, zero stride); key and value heads that differ under enable_gqa are repeated (copies)."""
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk == hv and (hq == hk or (enable_gqa and hk > 0 and hq % hk == 0)):
        return query, key, value, enable_gqa  # the common case: as they are
    if enable_gqa and hq != hk and hq != hv:
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            return None
        key, value = key.repeat_interleave(hq // hk, dim=-3), value.repeat_interleave(hq // hv, dim=-3)
        return query, key, value, False
    try:
        (h,) = torch.broadcast_shapes((hq,), (hk,), (hv,))
    except RuntimeError:
        return None
    if hq == h and hk == hv == 1:
        return query, key, value, True
    return tuple(t.expand(*t.shape[:-3], h, *t.shape[-2:]) for t in (query, key, value)) + (enable_gqa,)


_patch_lock = threading.RLock()
_patch_depth = 0
_patch_saved = None


@contextlib.contextmanager
def use_attention_ext():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through
    :func:`scaled_dot_product_attention` inside the ``with`` block.

    Patches the attribute of ``torch.nn.functional`` (how timm, Hugging Face's
    "sdpa" implementation and ``torch.nn.MultiheadAttention`` itself look the
    function up, at call time) and restores the original on exit, also when
    the block raises. Re-entrant. Code that bound the function to a name of
    its own before the block (``from torch.nn.functional import
    scaled_dot_product_attention``) is not affected.
    """
    global _patch_depth, _patch_saved
    with _patch_lock:
        if _patch_depth == 0:
            _patch_saved = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = scaled_dot_product_attention
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                F.scaled_dot_product_attention = _patch_saved
                _patch_saved = None

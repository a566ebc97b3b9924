"""attention under torch.func transforms: the fused kernels where they apply, the ATen composite elsewhere.

C++ autograd functions cannot run under torch.func, so without this module every differentiating
transform takes the composite `_attention_math` (csrc/composite.cpp), which holds the L x S scores. Here:

* batching rules (`torch.library.register_vmap`) for the internal ops `_attention_forward`,
  `_attention_backward` and `_dropout_mask`: the vmapped dimension becomes one more leading batch
  dimension of a single fused call (an unbatched operand is expanded, with zero strides where the kernels
  can read them), instead of one call per sample. They keep vmap's `randomness`: "error" raises for
  dropout, "different" draws each sample's mask from its own rows of one call, "same" replays one seed for
  every sample;
* a Python autograd function over those ops (`_lse._AttentionLse`, `generate_vmap_rule=True`), which
  functorch can transform: grad, vjp, jacrev and vmap(grad(...)) (per-sample gradients) run the fused
  forward and backward, batched;
* a kernel of `attention_ext::attention` for functorch's front dispatch key, so that the op itself (as
  nn.MultiheadAttention's replacement, the functional drop-in and the transformers integration call it)
  takes that function under any transform. Forward-mode AD (jvp, jacfwd) and nested differentiation
  (hessian, grad of grad) run the composite, which has every derivative.

Outside torch.func nothing here runs: ordinary autograd stays in the C++ autograd function.
"""
from typing import List, Optional, Tuple

import torch

from . import _lse

_ops = torch.ops.attention_ext
_lib = torch.library.Library("attention_ext", "IMPL")  # kept alive: the registrations below belong to it

_RANDOMNESS_ERROR = ("vmap: called random operation while in randomness error mode. Please either use the "
                     "'same' or 'different' randomness flags on vmap or perform the randomness operation out "
                     "of vmap")


# --------------------------------------------------------------------------- batching rules
def _front(t, bdim, size):
    """t with the vmapped dimension in front: moved there, or expanded (zero stride) when t has none."""
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _front_mask(mask, bdim, size, out_rank, expand):
    """A mask in front layout that broadcasts against (size, *output): batched masks get singleton dims
    after the vmapped one up to the output's rank; unbatched ones broadcast as they are, or are expanded
    when each sample needs its own gradient."""
    if mask is None:
        return None
    if bdim is None:
        if not expand:
            return mask
        mask = mask.expand(size, *mask.shape)
    else:
        mask = mask.movedim(bdim, 0)
    pad = out_rank - (mask.dim() - 1)
    return mask.reshape(size, *([1] * pad), *mask.shape[1:]) if pad > 0 else mask


def _unfront_mask(dmask, mask, bdim):
    """The mask gradient of a front-layout mask back to (size, *mask's own shape)."""
    logical = mask.shape if bdim is None else mask.movedim(bdim, 0).shape[1:]
    return dmask.reshape(dmask.shape[0], *logical)


def _per_sample(op, size, in_dims, args, nout):
    """op once per sample (each batched argument's slice), outputs stacked along dim 0."""
    outs = []
    for b in range(size):
        sl = [a.select(d, b) if d is not None and a is not None else a for a, d in zip(args, in_dims)]
        outs.append(op(*sl))
    return tuple(torch.stack([o[i] for o in outs]) for i in range(nout))


def _generator(device):
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _forward_vmap(info, in_dims, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap=0.0,
                  alibi_slopes=None):
    size = info.batch_size
    if dropout_p > 0 and info.randomness == "error":
        raise RuntimeError(_RANDOMNESS_ERROR)
    if dropout_p > 0 and info.randomness == "same":
        # one seed for every sample: the generator's state restored before each sample's call
        gen = _generator(q.device)
        state = gen.get_state()

        def one(q, k, v, mask, alibi):
            gen.set_state(state)
            return _ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                                           softcap, alibi)

        ad = in_dims[10] if len(in_dims) > 10 else None
        out, lse, rng = _per_sample(one, size, tuple(in_dims[:4]) + (ad,), (q, k, v, mask, alibi_slopes), 3)
        return (out, lse, rng), (0, 0, 0)  # a batched rng_state marks the per-sample layout (_backward_vmap)
    qd, kd, vd, md = in_dims[:4]
    q, k, v = _front(q, qd, size), _front(k, kd, size), _front(v, vd, size)
    mask = _front_mask(mask, md, size, q.dim() - 1, expand=False)
    # (the slopes (..., heads) broadcast to the front-layout query's (size, ..., heads) as a mask to its scores)
    alibi = _front_mask(alibi_slopes, in_dims[10] if len(in_dims) > 10 else None, size, q.dim() - 3, expand=False)
    out, lse, rng = _ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                                            softcap, alibi)
    return (out, lse, rng), (0, 0, None)


def _backward_vmap(info, in_dims, grad, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale, enable_gqa,
                   window_size, mask_grad, grad_logsumexp=None, softcap=0.0, alibi_slopes=None):
    size = info.batch_size
    gd, qd, kd, vd, md, od, ld, rd = in_dims[:8]
    cd = in_dims[14] if len(in_dims) > 14 else None
    ad = in_dims[16] if len(in_dims) > 16 else None
    # With dropout, one call over the folded batch replays the forward's masks only if the forward was that
    # very fold (its output batched, one rng_state); otherwise (a per-sample rng_state from randomness="same",
    # or cotangents vmapped over an unbatched forward) each sample runs against its own forward.
    if dropout_p > 0 and (rd is not None or od is None or ld is None):
        def one(grad, q, k, v, mask, out, lse, rng, glse, alibi):
            return _ops._attention_backward(grad, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale,
                                            enable_gqa, window_size, mask_grad, glse, softcap, alibi)

        dq, dk, dv, dmask = _per_sample(one, size, tuple(in_dims[:8]) + (cd, ad),
                                        (grad, q, k, v, mask, out, lse, rng, grad_logsumexp, alibi_slopes), 4)
        return (dq, dk, dv, dmask), (0, 0, 0, 0 if mask_grad else None)
    mask_f = _front_mask(mask, md, size, q.dim() - (0 if qd is None else 1), expand=mask_grad)
    grad, q, k, v = _front(grad, gd, size), _front(q, qd, size), _front(k, kd, size), _front(v, vd, size)
    out, lse = _front(out, od, size), _front(lse, ld, size)
    glse = None if grad_logsumexp is None else _front(grad_logsumexp, cd, size)
    alibi = _front_mask(alibi_slopes, ad, size, q.dim() - 3, expand=False)
    dq, dk, dv, dmask = _ops._attention_backward(grad, q, k, v, mask_f, out, lse, rng, dropout_p, is_causal, scale,
                                                 enable_gqa, window_size, mask_grad, glse, softcap, alibi)
    if mask_grad:
        return (dq, dk, dv, _unfront_mask(dmask, mask, md)), (0, 0, 0, 0)
    return (dq, dk, dv, dmask), (0, 0, 0, None)


def _dropout_mask_vmap(info, in_dims, rng, batch, heads, len_q, len_k, dropout_p):
    size = info.batch_size
    if in_dims[0] is None:  # one draw over the folded batch, as _forward_vmap's call made it
        keep = _ops._dropout_mask(rng, size * batch, heads, len_q, len_k, dropout_p)
        return keep.view(size, batch, heads, len_q, len_k), 0
    (keep,) = _per_sample(lambda r: (_ops._dropout_mask(r, batch, heads, len_q, len_k, dropout_p),), size,
                          in_dims[:1], (rng,), 1)
    return keep, 0


torch.library.register_vmap("attention_ext::_attention_forward", _forward_vmap, lib=_lib)
torch.library.register_vmap("attention_ext::_attention_backward", _backward_vmap, lib=_lib)
torch.library.register_vmap("attention_ext::_dropout_mask", _dropout_mask_vmap, lib=_lib)


# --------------------------------------------------------------------------- the autograd function
def _composite_grads(inputs, outputs, grads, create_graph):
    """Vector-Jacobian product of `outputs` (built from views of `inputs`) with `grads`."""
    ys = [y for y, g in zip(outputs, grads) if g is not None and y is not None and y.requires_grad]
    gys = [g for y, g in zip(outputs, grads) if g is not None and y is not None and y.requires_grad]
    if not ys:
        return [None] * len(inputs)
    return list(torch.autograd.grad(ys, inputs, gys, create_graph=create_graph, allow_unused=True))


# --------------------------------------------------------------------------- routing under torch.func
_Transform = torch._C._functorch.TransformType


def has_tangent(*tensors) -> bool:
    """Whether a forward-mode AD level is open and an input is a dual tensor carrying a tangent."""
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def composite(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
              dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool, window_size: List[int],
              need_weights: bool = False, average_heads: bool = False,
              softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, weights) of `_attention_math`, its dropout mask drawn by the fused forward (TorchScript-able:
    the converted MultiheadAttention's differentiable weights path under torch.jit.script)."""
    rng: Optional[torch.Tensor] = None
    if dropout_p > 0:
        rng = _ops._attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                      window_size, softcap, alibi_slopes)[2]
    return _ops._attention_math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                                rng, need_weights, average_heads, softcap, alibi_slopes)


def _fused_applies(tensors):
    """Whether the fused function can serve the running transforms: at most one level that differentiates
    (reverse mode), no forward-mode AD, no functionalization."""
    stack = [i.key() for i in torch._C._functorch.get_interpreter_stack() or ()]
    if sum(1 for t in stack if t == _Transform.Grad) > 1 or any(
            t in (_Transform.Jvp, _Transform.Functionalize) for t in stack):
        return False
    return not has_tangent(*tensors)


def _attention_under_transforms(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                enable_gqa=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    window_size = list(window_size)
    # ALiBi: the composite, which differentiates the slopes too when a transform asks for them (the fused function
    # gives them no gradient, and under torch.func nothing tells which inputs a transform differentiates)
    if alibi_slopes is not None:
        return composite(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                         softcap=softcap, alibi_slopes=alibi_slopes)[0]
    if _fused_applies((query, key, value, attn_mask)):
        return _lse._AttentionLse.apply(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                        window_size, softcap)[0]
    return composite(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                     softcap=softcap)[0]


_lib.impl("attention", _attention_under_transforms, "FuncTorchDynamicLayerFrontMode")

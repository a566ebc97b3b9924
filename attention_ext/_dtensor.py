"""Sharding rules of the fused ops for DTensor (tensor parallelism, sharded batches, sharded queries).

With DTensor inputs, ``attention`` (its autograd function runs above DTensor) reaches the internal ops
``_attention_forward`` / ``_attention_backward`` (and ``_attention_forward_weights``, ``attention_probs``,
``_dropout_mask``) with DTensors, and DTensor needs to know which placements each op can run on locally.
These rules say it, for one mesh dimension (DTensor combines them over every dimension of the mesh):

* replicated: everything replicated (what any input can be redistributed to);
* a batch dimension sharded: query, key, value, output, log-sum-exp and gradients sharded alike;
* the heads sharded (tensor parallelism): the same, when the key/value heads split as the query heads
  do (no GQA, or key/value heads divisible by the mesh size, so that each rank keeps whole groups);
* the query length sharded (no causal mask, no window: those depend on a query's absolute position):
  query, output, log-sum-exp and dq sharded, key and value replicated, dk / dv partial sums.

A mask follows the query: sharded where it has that dimension in full, replicated where it broadcasts
there, and its gradient is then a partial sum. Averaged head weights of sharded heads are a partial mean
(even shards only). ``rng_state`` is replicated. Packed sequences (``_attention_varlen_*``) run replicated.

Dropout draws each rank's mask from that rank's own generator, as PyTorch's DTensor SDPA does: ranks that
share a seed drop the same positions of their local shards.

Registered when ``torch.distributed.tensor`` is first imported (never imported by this module itself:
it costs about a second), through ``torch.distributed.tensor.experimental.register_sharding``.
"""
import sys

import torch

from ._import_hooks import when_imported

_ops = torch.ops.attention_ext


def matmul(x, y):
    """x @ y for (..., m, k) and (..., k, n) with the same batch dims, DTensors too. torch 2.11's DTensor folds
    the batch dims into one for the product and can fold a sharded dim only where it comes first (2.14 folds
    either): a DTensor sharded on a later batch dim, such as the heads of (batch, heads, L, S), has that dim
    moved to the front for the product and back after it."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(x, dtensor.DTensor) and x.dim() > 3:
        sharded = {p.dim % x.dim() for p in x.placements if p.is_shard()} & set(range(x.dim() - 2))
        if len(sharded) == 1 and 0 not in sharded:
            (d,) = sharded
            return torch.matmul(x.movedim(d, 0), y.movedim(d, 0)).movedim(0, d)
    return torch.matmul(x, y)


def _window_free(is_causal, window_size):
    return not is_causal and (window_size is None or list(window_size) == [-1, -1])


def _heads_split(q, k, enable_gqa):
    """The heads dim can be sharded: query and key/value heads split into matching groups on every rank."""
    hq, hkv = q.shape[-3], k.shape[-3]
    return hq == hkv or (enable_gqa and hkv % q.mesh.size() == 0)


def _mask_at(mask, rank, d):
    """mask's placement when dim d of the (..., H, L, S) broadcast shape of rank `rank` is sharded."""
    from torch.distributed.tensor import Replicate, Shard
    if mask is None:
        return None
    md = d - (rank - mask.ndim)
    return Shard(md) if md >= 0 and mask.shape[md] != 1 else Replicate()


def _mask_grad_at(mask, rank, d, wants):
    """The mask gradient's placement: sharded as the mask, or a partial sum where the mask broadcasts."""
    from torch.distributed.tensor import Partial, Replicate
    if not wants:
        return Replicate()  # an empty tensor
    placement = _mask_at(mask, rank, d)
    return Partial() if placement == Replicate() else placement


def _rules(q, k, mask, is_causal, enable_gqa, window_size):
    """[(dim of q sharded or None, key/value sharded alike?)] of the placements the ops accept. Shapes the ops
    refuse get the replicated rule only: the op then raises its own error on them."""
    n = q.ndim
    rules = [(None, None)]
    if n < 3 or k.ndim != n or tuple(k.shape[:-3]) != tuple(q.shape[:-3]) or (mask is not None and mask.ndim > n):
        return rules
    rules += [(d, True) for d in range(n - 3)]
    if _heads_split(q, k, enable_gqa):
        rules.append((n - 3, True))
    if _window_free(is_causal, window_size):
        rules.append((n - 2, False))
    return rules


def _alibi_at(alibi, n, d):
    """The placement of ALiBi slopes (..., heads) for query shard dim d (None: no slopes)."""
    from torch.distributed.tensor import Replicate, Shard
    if alibi is None:
        return None
    if d == n - 3:
        return Shard(alibi.ndim - 1)
    k = d - (n - 2 - alibi.ndim)  # the slopes' own dim for batch dim d, right-aligned
    return Shard(k) if k >= 0 and alibi.shape[k] != 1 else Replicate()


def _alibi_rules(rules, n, alibi):
    """ALiBi's distances count from the query's first row: no shards along the query length."""
    return rules if alibi is None else [r for r in rules if r[0] != n - 2]


def _forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap=0.0,
             alibi_slopes=None, weights=None):
    from torch.distributed.tensor import Partial, Replicate, Shard
    R = Replicate()
    n = query.ndim
    out = []
    for d, kv_too in _alibi_rules(_rules(query, key, attn_mask, is_causal, enable_gqa, window_size), n,
                                  alibi_slopes):
        if d is None:
            outs, ins = [R, R, R], [R, R, R, None if attn_mask is None else R, None if alibi_slopes is None else R]
            w = R
        else:
            kv = Shard(d) if kv_too else R
            outs, ins = [Shard(d), Shard(d), R], [Shard(d), kv, kv, _mask_at(attn_mask, n, d),
                                                  _alibi_at(alibi_slopes, n, d)]
            w = Shard(d)
            if weights == "average" and d == n - 3:  # the mean over the query heads
                if query.shape[-3] % query.mesh.size():
                    continue
                w = Partial("avg")
            elif weights == "average" and d == n - 2:
                w = Shard(n - 3)
        out.append((outs + ([w] if weights else []), ins))
    return out


def _backward(grad_output, query, key, value, attn_mask, output, logsumexp, rng_state, dropout_p, is_causal, scale,
              enable_gqa, window_size, attn_mask_requires_grad, grad_logsumexp=None, softcap=0.0, alibi_slopes=None):
    from torch.distributed.tensor import Partial, Replicate, Shard
    R = Replicate()
    n = query.ndim
    wants = (attn_mask is not None and attn_mask_requires_grad and attn_mask.tensor_meta is not None
             and attn_mask.tensor_meta.dtype.is_floating_point)
    out = []
    for d, kv_too in _alibi_rules(_rules(query, key, attn_mask, is_causal, enable_gqa, window_size), n,
                                  alibi_slopes):
        if d is None:
            outs = [R, R, R, R]
            ins = [R, R, R, R, None if attn_mask is None else R, R, R, R, None if grad_logsumexp is None else R,
                   None if alibi_slopes is None else R]
        else:
            s = Shard(d)
            kv, dkv = (s, s) if kv_too else (R, Partial())
            outs = [s, dkv, dkv, _mask_grad_at(attn_mask, n, d, wants)]
            ins = [s, s, kv, kv, _mask_at(attn_mask, n, d), s, s, R, None if grad_logsumexp is None else s,
                   _alibi_at(alibi_slopes, n, d)]
        out.append((outs, ins))
    return out


def _probs(query, key, attn_mask, logsumexp, rng_state, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    from torch.distributed.tensor import Replicate, Shard
    R = Replicate()
    n = query.ndim
    out = []
    for d, kv_too in _alibi_rules(_rules(query, key, attn_mask, is_causal, enable_gqa, window_size), n,
                                  alibi_slopes):
        if d is None:
            out.append(([R], [R, R, None if attn_mask is None else R, R, R, None if alibi_slopes is None else R]))
        else:
            s = Shard(d)
            out.append(([s], [s, s if kv_too else R, _mask_at(attn_mask, n, d), s, R,
                              _alibi_at(alibi_slopes, n, d)]))
    return out


def _replicated(n_out):
    """A rule with every tensor replicated (for ops whose shards would not be independent)."""
    from torch.distributed.tensor import Replicate

    def rule(*args, **kwargs):
        ins = [Replicate() if hasattr(a, "placements") else None for a in list(args) + list(kwargs.values())]
        return [([Replicate()] * n_out, ins)]
    return rule


def _static_from(op, first):
    """The schema's args from `first` on are static: they decide the rule, so DTensor's cache must key on them
    (register_sharding keys only on int args; is_causal, window_size or average_heads would be missed)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
        static_argnum=first, needs_pytree=True)


def _register(_module=None):
    from torch.distributed.tensor.experimental import register_sharding

    def weights_rule(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                     average_heads, softcap=0.0, alibi_slopes=None):
        return _forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
                        alibi_slopes, "average" if average_heads else "heads")

    rules = [
        (_ops._attention_forward.default, _forward, 4),
        (_ops._attention_forward_weights.default, weights_rule, 4),
        (_ops._attention_backward.default, _backward, 8),
        (_ops.attention_probs.default, _probs, 5),
        (_ops._dropout_mask.default, _replicated(1), 1),
        (_ops._attention_varlen_forward.default, _replicated(3), 5),
        (_ops._attention_varlen_backward.default, _replicated(3), 9),
    ]
    for op, rule, first_static in rules:
        register_sharding(op)(rule)
        _static_from(op, first_static)


def register_on_import():
    """Called by ``import attention_ext``: the rules are registered when torch.distributed.tensor is imported."""
    if torch.distributed.is_available():
        when_imported("torch.distributed.tensor", _register, "the sharding rules with DTensor")

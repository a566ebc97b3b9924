"""The fused forwards as plain ATen operations, for the ONNX exporter.

``torch.onnx.export(model, args, dynamo=True)`` exports a ``torch.export`` program, then
decomposes every op it has no ONNX function for, with the table that
``torch.onnx._internal.exporter._decomp.create_onnx_friendly_decomposition_table``
builds. The library's fused forwards are added to that table, and only to it:
``_attention_forward`` (what ``attention`` and the converted ``MultiheadAttention``
run) and ``_attention_forward_weights`` (the ``need_weights=True`` path) become
``_attention_math`` / ``_attention_math_lse``, the ATen composite
(``csrc/composite.cpp``) with the fused ops' semantics (fully masked rows give 0), so
a converted model exports with no extra argument and runs in ONNX Runtime.

Not in ``torch._decomp.decomposition_table``: ``torch.export`` consults that global
table as well, and would trade the fused ops of every exported program (AOTInductor)
for the composite. The exporter's table builder is private; where a torch version
lacks it, nothing is installed and the exporter reports the ops it cannot translate.
Dropout is a training-time op: a graph with ``dropout_p > 0`` raises instead of
exporting a different random mask.
"""
import functools
import torch

_ops = torch.ops.attention_ext


def _no_dropout(dropout_p: float) -> None:
    if dropout_p > 0:
        raise NotImplementedError(
            f"attention_ext: exporting attention with dropout_p={dropout_p} to plain ATen operations (e.g. for "
            "ONNX) is not supported: the dropout mask is drawn by the fused kernel. Export the model in eval "
            "mode (model.eval()), or with dropout_p=0.")


def _decomposed(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, need_weights,
                average_heads, softcap, alibi_slopes=None):
    """(output, logsumexp, rng_state, weights) of the composite; rng_state as the fused forwards return it when
    they draw no dropout mask."""
    _no_dropout(dropout_p)
    out, weights = _ops._attention_math(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, window_size,
                                        None, need_weights, average_heads, softcap, alibi_slopes)
    lse = _ops._attention_math_lse(query, key, value, attn_mask, is_causal, scale, enable_gqa, window_size, softcap,
                                   alibi_slopes)
    return out, lse, torch.zeros(2, dtype=torch.int64, device=query.device), weights


def _attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                       softcap=0.0, alibi_slopes=None):
    return _decomposed(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, False,
                       False, softcap, alibi_slopes)[:3]


def _attention_forward_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                               average_heads, softcap=0.0, alibi_slopes=None):
    return _decomposed(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, True,
                       average_heads, softcap, alibi_slopes)


DECOMPOSITIONS = {
    _ops._attention_forward.default: _attention_forward,
    _ops._attention_forward_weights.default: _attention_forward_weights,
}


def install() -> bool:
    """Adds DECOMPOSITIONS to the ONNX exporter's decomposition table (once); False where this torch has no
    such table builder."""
    try:
        from torch.onnx._internal.exporter import _decomp
    except Exception:  # noqa: BLE001  (a torch without the dynamo-based exporter)
        return False
    make_table = getattr(_decomp, "create_onnx_friendly_decomposition_table", None)
    if make_table is None:
        return False
    if getattr(make_table, "_attention_ext", False):
        return True

    @functools.wraps(make_table)
    def with_attention_ext(*args, **kwargs):
        table = make_table(*args, **kwargs)
        table.update(DECOMPOSITIONS)
        return table

    with_attention_ext._attention_ext = True
    _decomp.create_onnx_friendly_decomposition_table = with_attention_ext
    return True


install()

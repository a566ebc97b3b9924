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
    return [int(window_size[0]), int(window_size[1])]


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
) -> torch.Tensor:
    """softmax(query @ key^T * scale + mask) @ value, fused, differentiable.

    Semantics of ``torch.nn.functional.scaled_dot_product_attention``: inputs
    (..., heads, L, E) / (..., heads_kv, S, E) / (..., heads_kv, S, Ev); a boolean
    ``attn_mask`` is True where attention is allowed, a float one is added to
    the scores, either broadcastable to (..., heads, L, S); ``is_causal`` is
    top-left aligned; ``window_size=(left, right)`` keeps keys j with
    i - left <= j <= i + right (-1: unbounded). A query row that sees no key
    returns 0 (and zero gradient).
    """
    return _ops.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _window(window_size))


def attention_forward(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window_size=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-differentiable forward: (output, logsumexp float32 (..., heads, L), rng_state int64[2])."""
    return _ops._attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _window(window_size))


def attention_backward(
    grad_output, query, key, value, output, logsumexp, rng_state, attn_mask=None, dropout_p=0.0,
    is_causal=False, scale=None, enable_gqa=False, window_size=None, attn_mask_requires_grad=False,
):
    """(grad_query, grad_key, grad_value, grad_attn_mask) from the forward's saved tensors."""
    return _ops._attention_backward(
        grad_output, query, key, value, attn_mask, output, logsumexp, rng_state, dropout_p, is_causal, scale,
        enable_gqa, _window(window_size), attn_mask_requires_grad,
    )


def attention_probs(
    query, key, logsumexp, attn_mask=None, rng_state=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False, window_size=None,
) -> torch.Tensor:
    """Attention weights (..., heads, L, S) recomputed from q and k, normalised with the forward's
    log-sum-exp on the CPU and with row sums of the recomputed scores on CUDA (with the forward's
    dropout applied when ``rng_state`` and ``dropout_p`` are given)."""
    if rng_state is None:
        if dropout_p > 0:
            raise ValueError("attention_probs: dropout_p > 0 needs the rng_state returned by the forward")
        rng_state = torch.zeros(2, dtype=torch.int64, device=query.device)
    return _ops.attention_probs(query, key, attn_mask, logsumexp, rng_state, dropout_p, is_causal, scale, enable_gqa,
                                _window(window_size))

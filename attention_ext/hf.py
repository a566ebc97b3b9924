"""Hugging Face transformers integration: ``attn_implementation="attention_ext"``.

``import attention_ext`` registers this project with transformers' attention
interface (``AttentionInterface``), and with its mask interface
(``AttentionMaskInterface``, transformers >= 4.53: models then build the same
boolean masks as for "sdpa", or none at all when ``is_causal`` covers it), so

    model = AutoModel.from_pretrained(path, attn_implementation="attention_ext")
    model = LlamaForCausalLM(LlamaConfig(..., attn_implementation="attention_ext"))

run their attention through ``torch.ops.attention_ext``. The registration
costs nothing at import: when transformers is installed but not imported yet,
an import hook registers the moment ``transformers.modeling_utils`` (and
``transformers.masking_utils``) are first imported; when transformers is not
installed nothing happens. :func:`register` does it explicitly.

The attention function handles grouped-query attention (fewer key/value heads
than query heads: read in place, never repeated), boolean and additive float
masks, the module's ``is_causal``, ``scaling``, dropout (``dropout`` is 0 in
eval), and returns the attention weights (differentiable, after dropout like
"eager") when the model is asked for them (``output_attentions=True``). Padding-free
packed batches (``cu_seq_lens_q`` / ``cu_seq_lens_k`` from
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``, as for "flash_attention_2")
run through ``attention_varlen``: each sequence attends to itself only. Attention
sinks (``s_aux``, gpt-oss) run through the fused kernels too (attention_ext/_sinks.py;
packed batches through attention_varlen with sinks).
Logit soft-capping (``softcap``, Gemma 2) runs in the fused kernels too (the op's ``softcap``).
``head_mask`` raises: use "eager" for it.
"""
import importlib.util
import sys
import threading
from typing import Optional, Tuple

import torch

from . import _loader, _lse, _sinks
from ._import_hooks import when_imported
from .functional import _torch_sdpa, attention_with_weights, supports

_loader.load()
_ops = torch.ops.attention_ext
NAME = "attention_ext"
_NO_WINDOW = [-1, -1]
_lock = threading.Lock()
_done = {"attention": False, "mask": False}


def _wants_weights(module, kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "output_attentions", False) and kwargs.get("output_attentions") is None:
        return True
    # transformers >= 5 records attention weights through hooks: ask its collector
    oc = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(oc, "_active_collector", None) if oc is not None else None
    if collector is not None:
        try:
            active = collector.get()
        except Exception:  # pragma: no cover - depends on the transformers version
            active = None
        if active:
            return any(k.endswith("attentions") for k in active.keys())
    return False


def _packed_mask(cu_q, cu_k, total_q, total_k, causal, left, device):
    """(1, 1, total_q, total_k) boolean mask of a packed batch: each query row sees its own sequence's keys
    (causal and windowed within the sequence, top-left aligned as attention_varlen)."""
    cu_q, cu_k = cu_q.to(device=device, dtype=torch.long), cu_k.to(device=device, dtype=torch.long)
    seq_q = torch.searchsorted(cu_q[1:], torch.arange(total_q, device=device), right=True)
    seq_k = torch.searchsorted(cu_k[1:], torch.arange(total_k, device=device), right=True)
    i = torch.arange(total_q, device=device) - cu_q[seq_q]  # position within its sequence
    j = torch.arange(total_k, device=device) - cu_k[seq_k]
    mask = seq_q[:, None] == seq_k[None, :]
    if causal:
        mask &= j[None, :] <= i[:, None]
    if left >= 0:
        mask &= j[None, :] >= i[:, None] - left
    return mask[None, None]


def _softcap(kwargs) -> float:
    """The model's logit soft-capping (Gemma 2's attn_logit_softcapping), 0.0 for none."""
    cap = kwargs.get("softcap")
    return 0.0 if cap is None else float(cap)


def _packed_call(module, query, key, value, dropout, scaling, is_causal, kwargs):
    """Padding-free batches (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): one row of
    sequences packed end to end, with their boundaries in ``cu_seq_lens_q`` / ``cu_seq_lens_k``. Each sequence
    then attends to itself only, through attention_varlen (causal per sequence, the model's sliding window).
    Returns ``(output, mask)``: the (1, total, H, Ev) output; or, with ``output_attentions`` (or inputs the
    kernels cannot take), the sequence boundaries as a boolean mask for the dense path, so that no sequence
    sees another's keys there either; ``(None, None)`` when the call is not such a batch."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1 or kwargs.get("position_bias") is not None:
        return None, None
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = list(_NO_WINDOW)
    sliding = kwargs.get("sliding_window")
    if sliding is not None and int(sliding) > 0:  # the last `sliding` positions, the query's own included
        window[0] = int(sliding) - 1
    if _wants_weights(module, kwargs) or not supports(query, key, value):
        return None, _packed_mask(cu_q, cu_k, query.shape[-2], key.shape[-2], causal, window[0], query.device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, E)
    softcap = _softcap(kwargs)
    if kwargs.get("s_aux") is not None:  # attention sinks (gpt-oss)
        out, _ = _sinks.varlen_with_sinks(q, k, v, cu_q, cu_k, kwargs["s_aux"], None, None, float(dropout), causal,
                                          scaling, query.shape[1] != key.shape[1], window, softcap=softcap)
        return out.unsqueeze(0), None
    out = _ops.attention_varlen(q, k, v, cu_q, cu_k, None, None, float(dropout), causal, scaling,
                                query.shape[1] != key.shape[1], window, softcap)
    return out.unsqueeze(0), None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention function transformers calls: ``query`` (B, H, L, E), ``key`` / ``value``
    (B, H_kv, S, E); returns ``(attn_output (B, L, H, Ev), attn_weights (B, H, L, S) or None)``."""
    if kwargs.get("head_mask") is not None:
        raise ValueError("`attention_ext` attention does not support `head_mask`; use attn_implementation='eager' "
                         "for this model")
    softcap = _softcap(kwargs)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    packed_out, packed_mask = _packed_call(module, query, key, value, dropout, scaling, is_causal, kwargs)
    if packed_out is not None:
        return packed_out, None
    if packed_mask is not None:  # a packed batch on the dense path: its boundaries are the mask
        attention_mask, is_causal = packed_mask, False
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] > kv_len:
        attention_mask = attention_mask[:, :, :, :kv_len]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and q_len > 1
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # learned relative bias (T5-style): one additive mask
        bias = position_bias
        if is_causal:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
            bias = bias.masked_fill(~causal, float("-inf"))
            is_causal = False
        if attention_mask is None:
            attention_mask = bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = bias.masked_fill(~attention_mask, float("-inf"))
        else:
            attention_mask = bias + attention_mask
    if (attention_mask is not None and attention_mask.is_floating_point()
            and attention_mask.dtype not in (query.dtype, torch.float32)):
        attention_mask = attention_mask.to(query.dtype)
    gqa = query.shape[-3] != key.shape[-3]
    want_weights = _wants_weights(module, kwargs)
    sinks = kwargs.get("s_aux")  # attention sinks (gpt-oss): one logit per query head

    if softcap > 0 and sinks is None and (want_weights or not supports(query, key, value)):
        if not supports(query, key, value):
            out, weights = _sinks.eager(query, key, value, attention_mask, None, dropout, is_causal, scaling,
                                        softcap)
        else:  # the weights exist in full anyway: the differentiable ATen composite (its dropout drawn fused)
            out, _, weights = _lse.composite(query, key, value, attention_mask, float(dropout), is_causal, scaling,
                                             gqa, list(_NO_WINDOW), need_weights=True, softcap=softcap)
        return out.transpose(1, 2), (weights if want_weights else None)

    if sinks is not None:
        if not supports(query, key, value):
            out, weights = _sinks.eager(query, key, value, attention_mask, sinks, dropout, is_causal, scaling,
                                        softcap)
            return out.transpose(1, 2), (weights if want_weights else None)
        out, _, weights = _sinks.attention_with_sinks(query, key, value, attention_mask, sinks, float(dropout),
                                                      is_causal, scaling, gqa, _NO_WINDOW, want_weights,
                                                      softcap=softcap)
        return out.transpose(1, 2), weights

    if not supports(query, key, value):  # e.g. head dim > 256 or a device without kernels
        if gqa:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
        out = _torch_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
                          scale=scaling)
        return out.transpose(1, 2), None

    if want_weights:
        out, weights = attention_with_weights(query, key, value, attention_mask, dropout, is_causal, scaling, gqa)
    else:
        out = _ops.attention(query, key, value, attention_mask, float(dropout), is_causal, scaling, gqa, _NO_WINDOW,
                             softcap)
        weights = None
    # the kernel lays its output out in the query's order of dims: for the usual
    # q_proj(x).view(B, L, H, E).transpose(1, 2) this transpose is contiguous
    return out.transpose(1, 2), weights


# ---------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------
def _register_attention(modeling_utils) -> None:
    iface = getattr(modeling_utils, "AttentionInterface", None)
    if iface is not None and hasattr(iface, "register"):
        iface.register(NAME, attention_forward)
    else:  # transformers 4.48/4.49: a plain dict
        fns = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
        if fns is None:
            return
        fns[NAME] = attention_forward
    _done["attention"] = True


def _register_mask(masking_utils) -> None:
    iface = getattr(masking_utils, "AttentionMaskInterface", None)
    if iface is None:  # transformers < 4.53: models build additive float masks themselves
        return
    mapping = getattr(iface, "_global_mapping", {})
    sdpa_mask = mapping.get("sdpa") or getattr(masking_utils, "sdpa_mask", None)
    if sdpa_mask is not None:
        iface.register(NAME, sdpa_mask)
        _done["mask"] = True


def register() -> bool:
    """Register ``attn_implementation="attention_ext"`` with transformers (imports it). Idempotent;
    False when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return False
    with _lock:
        import transformers.modeling_utils as mu
        _register_attention(mu)
        try:
            import transformers.masking_utils as mk
        except ImportError:
            mk = None
        if mk is not None:
            _register_mask(mk)
    return _done["attention"]


def register_on_import() -> None:
    """Called by ``import attention_ext``: register now if transformers is already imported, else when
    it is (through an import hook); nothing when transformers is not installed. Never imports it."""
    if "transformers" not in sys.modules:
        try:
            if importlib.util.find_spec("transformers") is None:
                return
        except (ImportError, ValueError):
            return
    what = "with transformers; call attention_ext.hf.register() to retry"
    when_imported("transformers.modeling_utils", _register_attention, what)
    when_imported("transformers.masking_utils", _register_mask, what)

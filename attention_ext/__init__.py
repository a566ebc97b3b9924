"""attention_ext: fused attention operators for PyTorch.

softmax(Q K^T * scale + mask) V as dispatcher-registered ops with fused
forward and backward kernels (CPU, and CUDA when built with it):

    torch.ops.attention_ext.attention(query, key, value, attn_mask=None,
        dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
        window_size=[-1, -1])
    torch.ops.attention_ext.attention_varlen(query, key, value, cu_seqlens_q,
        cu_seqlens_k, ...)   # packed variable-length sequences
    torch.ops.attention_ext.attention_kvcache(query, key_cache, value_cache,
        cache_seqlens, key, value, block_table, ...)   # decoding with a (paged) cache
"""
from . import _loader

_loader.load()  # registers torch.ops.attention_ext.*
from . import _transforms  # noqa: F401  (attention under torch.func: batching rules, fused autograd function)
from . import _decompositions  # noqa: F401  (the fused forwards in ATen ops, for the ONNX exporter)
from .ops import (attention, attention_varlen, attention_kvcache, nested_attention, merge_attention,
                  attention_forward, attention_backward, attention_probs)
from .functional import scaled_dot_product_attention, use_attention_ext, attention_with_weights
from .nn import MultiheadAttention
from .convert import replace_multihead_attention
from . import hf as _hf
from . import _dtensor
from . import debug  # kernel_log(): which kernel ran
from . import viz  # plotting helpers; matplotlib itself is imported only when a plot is drawn

_hf.register_on_import()  # attn_implementation="attention_ext" in transformers (lazily; never imports it)
_dtensor.register_on_import()  # sharding rules for DTensor (when torch.distributed.tensor is imported)

__all__ = ["attention", "attention_varlen", "attention_kvcache", "nested_attention", "merge_attention", "attention_forward",
           "attention_backward", "attention_probs"]
__all__ += ["scaled_dot_product_attention", "use_attention_ext", "attention_with_weights", "MultiheadAttention",
            "replace_multihead_attention"]
__version__ = "0.1.0"

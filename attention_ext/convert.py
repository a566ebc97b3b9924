"""Converting existing models: :func:`replace_multihead_attention`.

Every ``torch.nn.MultiheadAttention`` inside a model becomes an
:class:`attention_ext.MultiheadAttention` *in place*: the module object, its
Parameter objects (device, dtype, ``requires_grad``, optimizer state), buffers
and hooks all stay the very same; only its class changes. (A user subclass of
``nn.MultiheadAttention`` becomes a subclass of both, its own methods first, so
its ``super().forward()`` is the fused one.)

``torch.nn.TransformerEncoderLayer`` (and ``TransformerEncoder``) in eval mode
under ``no_grad`` take a native fast path (``torch._transformer_encoder_layer_fwd``
and the nested-tensor path) that reads the attention's weights directly and
never calls its ``forward``. Converted models must run this project's kernels
there too, so the conversion also

* turns every plain ``nn.TransformerEncoderLayer`` into
  :class:`TransformerEncoderLayer`, a subclass whose ``forward`` always takes
  the regular path through ``self.self_attn`` (same math, same arguments);
  for user subclasses of ``nn.TransformerEncoderLayer`` (which may override
  ``forward`` and call ``super().forward``) it makes the fast-path condition
  fail instead (``activation_relu_or_gelu = 0``: that attribute only selects
  the fused native kernel);
* sets ``use_nested_tensor = False`` on every ``nn.TransformerEncoder`` whose
  layers were converted, so padded batches are not turned into nested tensors
  (the fused kernels take the padding mask instead).
"""
from torch import Tensor, nn
from typing import Optional

from .nn import MultiheadAttention


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without the native fast path: attention always runs
    through ``self.self_attn`` (an :class:`attention_ext.MultiheadAttention` after conversion)."""

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


def replace_multihead_attention(model: nn.Module) -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` in ``model`` (``model`` itself included) for
    :class:`attention_ext.MultiheadAttention` in place, keeping the very same parameters, and
    disable the native encoder fast paths that would bypass it. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            MultiheadAttention.convert(m)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(getattr(m, "self_attn", None), MultiheadAttention):
            if type(m) is nn.TransformerEncoderLayer:
                m.__class__ = TransformerEncoderLayer
            elif not isinstance(m, TransformerEncoderLayer):
                m.activation_relu_or_gelu = 0
        elif isinstance(m, nn.TransformerEncoder):
            layers = getattr(m, "layers", ())
            if any(isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in layers):
                m.use_nested_tensor = False
    return model

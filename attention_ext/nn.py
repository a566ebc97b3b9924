"""``attention_ext.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention``.

It *is* a ``torch.nn.MultiheadAttention`` (a subclass): same constructor,
attributes, parameters (names, shapes, order, initialisation), ``state_dict``
and pickling, so checkpoints load both ways and ``isinstance`` checks keep
working. Only ``forward`` differs: it always runs this project's fused kernels

* one GEMM for the packed q/k/v projection when ``query is key is value``
  (a second for k/v together when only ``key is value``), heads read through
  strides straight from the projection's output (no transposes, no copies),
  the kernel's output read back through strides into the output projection;
* ``key_padding_mask`` and ``attn_mask`` merged into one broadcastable mask:
  ``(N, 1, 1, S)`` for a padding mask alone, ``(N, 1, L, S)`` for a padding
  mask plus a 2-D mask (never ``(N, heads, L, S)`` unless a 3-D mask asks for
  it), nothing at all for a causal mask given with the ``is_causal`` hint;
* ``need_weights=True`` (PyTorch's default, which makes PyTorch fall back to
  an unfused path): output and weights come from one fused op (on the CPU
  the weights are written from the forward's own score tiles; on CUDA they
  are recomputed from its log-sum-exp by ``attention_probs``); both are
  differentiable.

Differences from PyTorch: a query row whose keys are all masked gives 0 (and
zero weights) instead of NaN; with dropout the random mask differs from
PyTorch's (it is drawn by the kernel from torch's generator). Inputs the
kernels cannot take (nested tensors, head dims above 256, a device without
kernels) are handed to ``torch.nn.MultiheadAttention.forward``.
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _loader
from .functional import attention_with_weights, has_kernel, supports_tensors

_loader.load()


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """MHA-convention mask (bool True = ignore, or float) -> float mask to add to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


def _pad_col(mask: Tensor) -> Tensor:
    """Append one key column that is attended (False / 0.0), as PyTorch pads for bias_k / zero attention."""
    return F.pad(mask, [0, 1])


def _flat(t: Tensor) -> Tensor:
    # (A, B, H, D) strided view of the packed projection -> (A, B, E)
    return t if t.dim() == 3 else t.flatten(-2)


def _merge_masks(kpm: Optional[Tensor], am: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Masks in MHA convention (bool True = ignore, float added) -> one mask in the kernel's
    convention (bool True = attend, float added), broadcastable to (N, H, L, S)."""
    if kpm is None and am is None:
        return None
    if kpm is not None and am is not None:
        if kpm.dtype == torch.bool and am.dtype == torch.bool:
            mask = torch.logical_not(torch.logical_or(kpm, am))
        else:
            mask = _additive(kpm, dtype) + _additive(am, dtype)
    elif kpm is not None:
        mask = torch.logical_not(kpm) if kpm.dtype == torch.bool else kpm
    else:
        assert am is not None
        mask = torch.logical_not(am) if am.dtype == torch.bool else am
    if mask.is_floating_point() and mask.dtype != dtype and mask.dtype != torch.float32:
        mask = mask.to(dtype)
    return mask


def _script_kernels_take(query: Tensor, key: Tensor, value: Tensor, cuda_kernels: bool) -> bool:
    """``supports_tensors`` for TorchScript (no Python-side caches there): the compiled library's kernels
    take these tensors' layout, dtype and device."""
    if query.is_nested or key.is_nested or value.is_nested:
        return False
    dt = query.dtype
    if key.dtype != dt or value.dtype != dt:
        return False
    if dt != torch.float32 and dt != torch.float16 and dt != torch.bfloat16 and dt != torch.float64:
        return False
    dev = query.device.type
    return dev == "cpu" or (dev == "cuda" and cuda_kernels)


class MultiheadAttention(torch.nn.MultiheadAttention):
    __doc__ = (__doc__ or "") + "\n\nConstructor arguments: those of torch.nn.MultiheadAttention.\n"
    # TorchScript: constants, so that the branch of the other projection layout is not compiled
    __constants__ = ["batch_first", "_qkv_same_embed_dim", "_cuda_kernels"]
    _cuda_kernels = has_kernel(torch.device("cuda"))  # whether the library was built with CUDA kernels

    @classmethod
    def convert(cls, module: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """Turn a ``torch.nn.MultiheadAttention`` into this class *in place* (the same object,
        the same Parameter objects, hooks and state) and return it."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if isinstance(module, cls):
            return module
        if type(module) is torch.nn.MultiheadAttention:
            module.__class__ = cls
        else:
            # a user subclass keeps its own methods; its super().forward() becomes the fused one
            module.__class__ = _converted_subclass(type(module), cls)
        return module

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():
            if not _script_kernels_take(query, key, value, self._cuda_kernels) or not 1 <= self.head_dim <= 256:
                return self._unfused_scripted(query, key, value, key_padding_mask, need_weights, attn_mask,
                                              average_attn_weights, is_causal)
            batch_first = self.batch_first
        else:
            if not supports_tensors(query, key, value) or not 1 <= self.head_dim <= 256:
                return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                       need_weights=need_weights, attn_mask=attn_mask,
                                       average_attn_weights=average_attn_weights, is_causal=is_causal)
            batch_first = getattr(self, "batch_first", False)  # modules pickled before batch_first existed
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.")
        num_heads, head_dim, embed_dim = self.num_heads, self.head_dim, self.embed_dim

        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        self_attn = query is key and key is value
        kv_same = key is value
        if not is_batched:  # (L, E) -> (L, 1, E): seq-first with one batch entry (views)
            query = query.unsqueeze(1)
            key = query if self_attn else key.unsqueeze(1)
            value = key if kv_same else value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            bf = False
        else:
            bf = batch_first
        seq_dim, batch_dim = (1, 0) if bf else (0, 1)
        tgt_len, bsz, e_q = query.shape[seq_dim], query.shape[batch_dim], query.shape[2]
        src_len = key.shape[seq_dim]

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask.")
        if key.shape[batch_dim] != bsz or value.shape[batch_dim] != bsz:
            raise RuntimeError(f"key and value must have the query's batch size {bsz}, got key {list(key.shape)} "
                               f"and value {list(value.shape)} (batch_first={bf})")
        if e_q != embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {embed_dim}, but got {e_q}")
        if self._qkv_same_embed_dim:
            if list(key.shape) != list(value.shape):
                raise AssertionError(f"key shape {list(key.shape)} does not match value shape {list(value.shape)}")
        elif list(key.shape[:2]) != list(value.shape[:2]):
            raise AssertionError(f"key's sequence and batch dims {list(key.shape[:2])} do not match value's "
                                 f"{list(value.shape[:2])}")

        # ---- input projections: one packed GEMM for self-attention --------------------------------
        # (written for TorchScript too: locals for the Optional biases, _qkv_same_embed_dim a constant there)
        b = self.in_proj_bias
        b_q: Optional[Tensor] = None
        b_k: Optional[Tensor] = None
        b_v: Optional[Tensor] = None
        if b is not None:
            b_q, b_k, b_v = b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attn:
                qkv = F.linear(query, w, b).unflatten(-1, [3, num_heads, head_dim])
                q, k, v = qkv.unbind(-3)  # (A, B, H, D) each, strided views
            elif kv_same:
                w_q, w_kv = w.split([embed_dim, 2 * embed_dim])
                b_kv: Optional[Tensor] = None
                if b is not None:
                    b_kv = b[embed_dim:]
                q = F.linear(query, w_q, b_q)
                kv = F.linear(key, w_kv, b_kv)
                k, v = kv.chunk(2, dim=-1)
            else:
                w_q, w_k, w_v = w.chunk(3)
                q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)

        # ---- 2-D / 3-D attn_mask checks (PyTorch's messages) ------------------------------------
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if list(attn_mask.shape) != [tgt_len, src_len]:
                    raise RuntimeError(f"The shape of the 2D attn_mask is {list(attn_mask.shape)}, but should be "
                                       f"{[tgt_len, src_len]}.")
            elif attn_mask.dim() == 3:
                if list(attn_mask.shape) != [bsz * num_heads, tgt_len, src_len]:
                    raise RuntimeError(f"The shape of the 3D attn_mask is {list(attn_mask.shape)}, but should be "
                                       f"{[bsz * num_heads, tgt_len, src_len]}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        # ---- extra key columns: bias_k/bias_v, zero attention -------------------------------------
        extra = 0
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None or bias_v is not None:
            if bias_k is None or bias_v is None:
                raise AssertionError("bias_k and bias_v must both be set or both be None")
            k, v = _flat(k), _flat(v)
            shape = [bsz, 1, embed_dim] if bf else [1, bsz, embed_dim]
            k = torch.cat([k, bias_k.expand(shape)], dim=seq_dim)
            v = torch.cat([v, bias_v.expand(shape)], dim=seq_dim)
            extra += 1
        if self.add_zero_attn:
            k, v = _flat(k), _flat(v)
            shape = list(k.shape)
            shape[seq_dim] = 1
            k = torch.cat([k, k.new_zeros(shape)], dim=seq_dim)
            v = torch.cat([v, v.new_zeros(shape)], dim=seq_dim)
            extra += 1
        s_len = src_len + extra

        # ---- heads through strides: (A, B, [H, D]) -> (N, H, L, D) --------------------------------
        perm = [0, 2, 1, 3] if bf else [1, 2, 0, 3]
        if q.dim() == 3:
            q = q.unflatten(-1, [num_heads, head_dim])
        if k.dim() == 3:
            k = k.unflatten(-1, [num_heads, head_dim])
        if v.dim() == 3:
            v = v.unflatten(-1, [num_heads, head_dim])
        q, k, v = q.permute(perm), k.permute(perm), v.permute(perm)

        # ---- one broadcastable mask ---------------------------------------------------------------
        use_causal = False
        if is_causal:
            # the hint says attn_mask is the causal mask: use the kernel's causal mode instead of
            # reading it, where that is what PyTorch computes too
            if extra == 0 or (key_padding_mask is None and not need_weights):
                use_causal = True
                attn_mask = None
        kpm = key_padding_mask
        if kpm is not None:
            if extra:
                for _ in range(extra):
                    kpm = _pad_col(kpm)
            if list(kpm.shape) != [bsz, s_len]:
                raise AssertionError(f"expected shape of key_padding_mask to be {[bsz, s_len]}, "
                                     f"but got {list(kpm.shape)}")
            kpm = kpm.view(bsz, 1, 1, s_len)
        am = attn_mask
        if am is not None:
            for _ in range(extra):
                am = _pad_col(am)
            if am.dim() == 3:
                am = am.view(bsz, num_heads, tgt_len, s_len)
        mask = _merge_masks(kpm, am, q.dtype)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = attention_with_weights(q, k, v, mask, dropout_p, use_causal,
                                                  average_heads=average_attn_weights)
        else:
            out = torch.ops.attention_ext.attention(q, k, v, mask, dropout_p, use_causal, None, False, [-1, -1])
            weights = None

        # ---- output projection, reading the kernel's output through strides -----------------------
        # the kernel lays its output out in q's order of dims, so this permute + reshape is a view
        out = out.permute([0, 2, 1, 3] if bf else [2, 0, 1, 3]).reshape(query.shape[0], query.shape[1], embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def _unfused_scripted(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                          need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                          is_causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Under TorchScript (no ``super()`` there), inputs the kernels do not take: PyTorch's unfused
        path, what ``torch.nn.MultiheadAttention.forward`` runs for them."""
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        if self._qkv_same_embed_dim:
            out, weights = F.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
                self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                is_causal=is_causal)
        else:
            out, weights = F.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
                self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask, use_separate_proj_weight=True,
                q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights


_SUBCLASSES = {}


def _converted_subclass(user_cls, base):
    key = (user_cls, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(user_cls.__name__, (user_cls, base),
                                {"__doc__": user_cls.__doc__, "__module__": user_cls.__module__})
    return _SUBCLASSES[key]

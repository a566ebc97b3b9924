"""ONNX export: converted models and the ops export with ``torch.onnx.export(..., dynamo=True)`` and run in
ONNX Runtime.

The exporter decomposes the fused forwards into the ATen composite (attention_ext/_decompositions.py). The
exported graphs run in ONNX Runtime (CPU) and are compared with PyTorch's own modules / SDPA in float64 on
the same weights and inputs, within twice the error PyTorch's float32 module gets (plus a small floor).
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from attention_ext import MultiheadAttention, replace_multihead_attention
from reference import reference_attention

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _export(model, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, args, dynamo=True, verbose=False, **kw)
    proto = prog.model_proto
    onnx.checker.check_model(proto)
    op_types = {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, op_types


def _run(sess, *args):
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]


def _close(got, ref64, ref32, floor=1e-5):
    """got (float32, ONNX Runtime) against the float64 reference, within 2x PyTorch float32's own error."""
    err = (got.double() - ref64).abs().max().item()
    err_torch = (ref32.double() - ref64).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * err_torch + floor, (err, err_torch)


class _SelfAttention(nn.Module):
    def __init__(self, mha, need_weights, average=True):
        super().__init__()
        self.mha, self.need_weights, self.average = mha, need_weights, average

    def forward(self, x, key_padding_mask, attn_mask):
        out, w = self.mha(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                          need_weights=self.need_weights, average_attn_weights=self.average)
        return (out, w) if self.need_weights else out


@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_converted_multihead_attention_exports(need_weights, average):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mine = MultiheadAttention.convert(copy.deepcopy(ref))
    n, length = 3, 9
    x = torch.randn(n, length, 32)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[1, 6:] = True
    kpm[2, 2:] = True
    am = torch.triu(torch.full((length, length), float("-inf")), 1)  # float causal mask
    sess, op_types = _export(_SelfAttention(mine, need_weights, average), (x, kpm, am))
    assert "Softmax" in op_types or "Exp" in op_types
    got = _run(sess, x, kpm, am)
    ref64 = _SelfAttention(copy.deepcopy(ref).double(), need_weights, average)(x.double(), kpm, am.double())
    ref32 = _SelfAttention(ref, need_weights, average)(x, kpm, am)
    if not need_weights:
        got, ref64, ref32 = got, [ref64], [ref32]
    assert len(got) == len(ref64)
    for g, r64, r32 in zip(got, ref64, ref32):
        assert g.shape == r64.shape
        _close(g, r64, r32)


def test_fully_masked_rows_export_as_zero():
    """A row whose keys are all masked: 0 in the exported graph as in the fused kernels (PyTorch's module
    gives NaN there)."""
    torch.manual_seed(0)
    mine = MultiheadAttention(16, 2, batch_first=True, bias=False).eval()
    x = torch.randn(2, 5, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True
    am = torch.zeros(5, 5)
    sess, _ = _export(_SelfAttention(mine, True), (x, kpm, am))
    out, w = _run(sess, x, kpm, am)
    with torch.no_grad():
        out_eager, w_eager = mine(x, x, x, key_padding_mask=kpm, attn_mask=am)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (w[1] == 0).all()
    torch.testing.assert_close(out, out_eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, w_eager, atol=1e-6, rtol=1e-5)


class _Op(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask):
        return torch.ops.attention_ext.attention(q, k, v, mask, **self.kw)


@pytest.mark.parametrize("case", ["causal_gqa_bool", "window_float", "cross_rank3", "alibi_causal_gqa_float"])
def test_op_exports(case):
    """The op itself, with the options SDPA lacks or has: GQA, causal, a sliding window, masks, L != S, ALiBi
    (its bias built in the graph from the slopes)."""
    torch.manual_seed(0)
    if case == "causal_gqa_bool":
        q, k, v = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
        mask = torch.rand(2, 1, 11, 11) > 0.2
        kw = dict(is_causal=True, enable_gqa=True)
    elif case == "window_float":
        q, k, v = (torch.randn(1, 3, 20, 32) for _ in range(3))
        mask = torch.randn(1, 3, 20, 20)
        kw = dict(window_size=[4, 2], scale=0.3)
    elif case == "alibi_causal_gqa_float":
        q, k, v = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 15, 16), torch.randn(2, 2, 15, 8)
        mask = torch.randn(11, 15)
        kw = dict(is_causal=True, enable_gqa=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    else:
        q, k, v = torch.randn(3, 7, 24), torch.randn(3, 13, 24), torch.randn(3, 13, 24)
        mask = torch.randn(7, 13)
        kw = {}
    sess, _ = _export(_Op(**kw), (q, k, v, mask))
    got, = _run(sess, q, k, v, mask)
    ref_kw, ref_mask = dict(kw), mask
    if "alibi_slopes" in kw:  # the bias -m |i + S - L - j| added to the float mask
        i, j = torch.arange(15 - 11, 15)[:, None], torch.arange(15)[None, :]
        ref_mask = mask.double() - ref_kw.pop("alibi_slopes").double()[:, None, None] * (i - j).abs()
    ref64 = reference_attention(q, k, v, ref_mask, **ref_kw).out
    eager = _Op(**kw)(q, k, v, mask)  # the fused kernel in float32 (SDPA has no window)
    assert got.shape == ref64.shape
    _close(got, ref64, eager)


def test_op_exports_with_dynamic_lengths():
    """Causal + sliding window + GQA with a dynamic batch and length: the band is built from the graph's
    own lengths, not the example's."""
    torch.manual_seed(0)
    kw = dict(is_causal=True, enable_gqa=True, window_size=[3, -1])
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=512)
    sess, _ = _export(_Op(**kw), (q, k, v, None), dynamic_shapes=({0: batch, 2: length},) * 3 + (None,))
    for n, l in ((3, 17), (1, 5), (2, 8)):
        q, k, v = torch.randn(n, 4, l, 16), torch.randn(n, 2, l, 16), torch.randn(n, 2, l, 16)
        got, = _run(sess, q, k, v)
        _close(got, reference_attention(q, k, v, **kw).out, _Op(**kw)(q, k, v, None))


def test_converted_transformer_encoder_exports_with_dynamic_shapes():
    """A converted nn.TransformerEncoder with a key padding mask, exported with a dynamic batch and length:
    one ONNX graph for other shapes than the example's."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    model = replace_multihead_attention(copy.deepcopy(ref)).eval()

    class Enc(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x, kpm):
            return self.enc(x, src_key_padding_mask=kpm)

    x = torch.randn(2, 8, 32)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=512)
    sess, _ = _export(Enc(model), (x, kpm), dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    for n, l in ((3, 17), (1, 40)):
        x = torch.randn(n, l, 32)
        kpm = torch.rand(n, l) < 0.3
        kpm[:, 0] = False
        got, = _run(sess, x, kpm)
        with torch.no_grad():
            ref64 = Enc(copy.deepcopy(ref).double())(x.double(), kpm)
            ref32 = Enc(ref)(x, kpm)
        _close(got, ref64, ref32)


def test_dropout_in_training_mode_raises_clearly():
    mine = MultiheadAttention(16, 2, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 5, 16)
    with pytest.raises(Exception, match="dropout_p=0.5"):
        _export(_SelfAttention(mine, False), (x, None, None))

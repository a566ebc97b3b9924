"""attention_ext.viz: PNG files of the expected pixel size, and collect_attention_weights."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import attention_ext
from attention_ext import viz

mpimg = pytest.importorskip("matplotlib.image")


def _read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return mpimg.imread(path)


def test_import_does_not_load_matplotlib():
    code = ("import sys, attention_ext, attention_ext.viz; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_head_heatmap_png(tmp_path):
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(5, 7), -1)
    path = viz.plot_attention_head(w, [f"q{i}" for i in range(5)], [f"k{j}" for j in range(7)],
                                   path=tmp_path / "sub" / "head.png", figsize=(4.0, 3.0), dpi=50, annotate=True)
    img = _read_png(path)
    assert img.shape[:2] == (150, 200)
    assert img.std() > 0  # not a blank image


def test_layer_grid_png(tmp_path):
    w = torch.softmax(torch.randn(1, 6, 4, 4), -1)  # leading batch dim of 1 is dropped
    path = viz.plot_attention_layer(w, list("abcd"), path=tmp_path / "layer.png", ncols=3, panel_size=2.0, dpi=40)
    img = _read_png(path)
    # 3 columns x 2 rows of 2-inch panels, plus 0.4 inch for the title row
    assert img.shape[:2] == (round((2 * 2.0 + 0.4) * 40), round(3 * 2.0 * 40))


def test_curves_png(tmp_path):
    path = viz.plot_curves({"a": [3, 2, 1], "b": [3, 2.5, 1.5]}, path=tmp_path / "c.png", figsize=(3, 2), dpi=30,
                           logy=True)
    assert _read_png(path).shape[:2] == (60, 90)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        viz.plot_attention_head(torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="token labels"):
        viz.plot_attention_head(torch.rand(3, 3), ["a", "b"])


def _model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return attention_ext.replace_multihead_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


@pytest.mark.parametrize("train", [False, True])
def test_collect_weights_match_module(train):
    model = _model().train(train)
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    n_hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    ctx = torch.enable_grad() if train else torch.no_grad()
    with ctx:
        out, weights = viz.collect_attention_weights(model, x, src_key_padding_mask=pad)
        ref_out = model(x, src_key_padding_mask=pad)
    # the model's output is what it computes without the hooks
    torch.testing.assert_close(out, ref_out)
    assert list(weights) == ["layers.0.self_attn", "layers.1.self_attn"]
    # each layer's weights equal what its module returns with need_weights=True, per head
    h = x
    for i, layer in enumerate(model.layers):
        with ctx:
            _, w_ref = layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=True,
                                       average_attn_weights=False)
            h = layer(h, src_key_padding_mask=pad)
        assert weights[f"layers.{i}.self_attn"].shape == (2, 4, 6, 6)
        torch.testing.assert_close(weights[f"layers.{i}.self_attn"], w_ref.detach())
        assert not weights[f"layers.{i}.self_attn"].requires_grad
        assert (weights[f"layers.{i}.self_attn"][1, :, :, 4:] == 0).all()  # padded keys get no weight
    # hooks removed, state unchanged
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == n_hooks
    assert model.training == train


def test_collect_keeps_callers_request_and_counts_repeats():
    torch.manual_seed(0)
    mha = attention_ext.MultiheadAttention(16, 2)
    seen = []

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            a, w_none = self.attn(x, x, x, need_weights=False)
            b, w_avg = self.attn(a, a, a)  # default: need_weights=True, averaged over heads
            seen.extend([w_none, w_avg])
            return b

    x = torch.randn(5, 3, 16)  # (L, N, E), batch_first=False
    _, weights = viz.collect_attention_weights(Twice(), x)
    assert list(weights) == ["attn", "attn#1"]
    assert seen[0] is None
    assert seen[1].shape == (3, 5, 5)
    torch.testing.assert_close(seen[1], weights["attn#1"].mean(1))
    assert weights["attn"].shape == (3, 2, 5, 5)
    assert not mha._forward_hooks and not mha._forward_pre_hooks


def test_collect_removes_hooks_on_error():
    model = _model()
    with pytest.raises(Exception):
        viz.collect_attention_weights(model, torch.randn(2, 6, 31))  # wrong embed dim
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

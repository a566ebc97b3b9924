"""replace_multihead_attention: in-place conversion, and converted models really run
attention_ext's kernels, including nn.TransformerEncoderLayer / nn.TransformerEncoder's
native eval fast paths (checked by counting op calls, not only by comparing numbers)."""
import copy

import pytest
import torch
from torch import nn

import attention_ext
from attention_ext import MultiheadAttention, replace_multihead_attention
from op_counter import OpCounter



pytestmark = pytest.mark.usefixtures("one_thread")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.blocks = nn.ModuleList([nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True),
                                     nn.Sequential(nn.MultiheadAttention(16, 4, add_bias_kv=True))])
        self.head = nn.Linear(16, 3)


def test_replace_in_place_keeps_parameters_and_optimizer_state():
    torch.manual_seed(0)
    model = Mixed()
    model.blocks[0].in_proj_bias.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 5, 16)
    model.enc(x).sum().backward()
    opt.step()
    before = {n: (p, p.requires_grad, p.dtype, p.device, p.data_ptr()) for n, p in model.named_parameters()}
    mhas_before = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    state_before = {id(p): copy.deepcopy(s) for p, s in opt.state.items()}

    out = replace_multihead_attention(model)
    assert out is model
    mhas_after = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas_after) == len(mhas_before) == 4
    assert all(type(m) is MultiheadAttention for m in mhas_after)
    assert all(a is b for a, b in zip(mhas_before, mhas_after))  # the very same module objects
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for n, (p, rg, dt, dev, ptr) in before.items():
        q = after[n]
        assert q is p and q.requires_grad == rg and q.dtype == dt and q.device == dev and q.data_ptr() == ptr, n
    for p, s in opt.state.items():
        for key, val in state_before[id(p)].items():
            assert torch.equal(s[key], val)
    # the optimizer keeps training the converted model
    model.zero_grad()
    with OpCounter() as c:
        loss = model.enc(x).sum()
    loss.backward()
    assert c.ext >= 2
    opt.step()
    # converting twice is a no-op; a bare MultiheadAttention converts itself
    assert replace_multihead_attention(model) is model
    m = nn.MultiheadAttention(16, 4)
    assert replace_multihead_attention(m) is m and type(m) is MultiheadAttention


def _encoder(num_layers=2, norm_first=False, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=True)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_fast_path_runs_attention_ext(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=norm_first).eval()
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 7, 16)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        with OpCounter() as c_ref:
            y_ref = ref(x, src_key_padding_mask=kpm)
        # the stock layer takes the native fast path: no MultiheadAttention.forward, no attention_ext
        assert c_ref.counts["aten._transformer_encoder_layer_fwd"] == 1 and c_ref.ext == 0
        replace_multihead_attention(layer)
        assert isinstance(layer, nn.TransformerEncoderLayer)
        with OpCounter() as c:
            y = layer(x, src_key_padding_mask=kpm)
        assert c.counts["aten._transformer_encoder_layer_fwd"] == 0
        assert c.counts["attention_ext._attention_forward"] == 1
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
        mask = nn.Transformer.generate_square_subsequent_mask(7)
        with OpCounter() as c:
            y = layer(x, src_mask=mask, is_causal=True)
        assert c.ext == 1
        torch.testing.assert_close(y, ref(x, src_mask=mask, is_causal=True), atol=1e-5, rtol=1e-4)


def test_encoder_nested_tensor_fast_path_runs_attention_ext():
    enc = _encoder().eval()
    ref = copy.deepcopy(enc)
    x = torch.randn(3, 8, 16)
    kpm = torch.zeros(3, 8, dtype=torch.bool)
    kpm[0, 6:] = True
    kpm[2, 3:] = True
    with torch.no_grad():
        with OpCounter() as c_ref:
            y_ref = ref(x, src_key_padding_mask=kpm)
        assert c_ref.ext == 0 and c_ref.counts["aten._nested_tensor_from_mask"] == 1
        replace_multihead_attention(enc)
        with OpCounter() as c:
            y = enc(x, src_key_padding_mask=kpm)
    assert c.counts["aten._nested_tensor_from_mask"] == 0
    assert c.counts["aten._transformer_encoder_layer_fwd"] == 0
    assert c.counts["attention_ext._attention_forward"] == 2  # one per layer
    keep = ~kpm  # the nested path zero-fills padded positions; compare the real tokens
    torch.testing.assert_close(y[keep], y_ref[keep], atol=1e-5, rtol=1e-4)


def test_user_subclass_of_encoder_layer():
    class MyLayer(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) * 2

    torch.manual_seed(0)
    layer = MyLayer(16, 4, 32, batch_first=True).eval()
    ref = copy.deepcopy(layer)
    replace_multihead_attention(layer)
    assert type(layer) is MyLayer
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), OpCounter() as c:
        y = layer(x)
    assert c.ext == 1 and c.counts["aten._transformer_encoder_layer_fwd"] == 0
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_transformer_every_attention_goes_through_attention_ext(train):
    torch.manual_seed(0)
    model = nn.Transformer(16, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                           batch_first=True)
    ref = copy.deepcopy(model)
    replace_multihead_attention(model)
    model.train(train)
    ref.train(train)
    src, tgt = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.set_grad_enabled(train), OpCounter() as c:
        y = model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, src_key_padding_mask=kpm,
                  memory_key_padding_mask=kpm)
    # 2 encoder self-attentions + 2 x (decoder self + cross) attentions
    assert c.counts["attention_ext._attention_forward"] == 6
    y_ref = ref(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, src_key_padding_mask=kpm,
                memory_key_padding_mask=kpm)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)


def test_user_subclass_of_multihead_attention_keeps_its_methods():
    class Scaled(nn.MultiheadAttention):
        def forward(self, q, k, v, **kw):
            out, w = super().forward(q, k, v, **kw)
            return out * 3, w

    torch.manual_seed(0)
    m = Scaled(16, 4)
    ref = copy.deepcopy(m)
    replace_multihead_attention(m)
    assert isinstance(m, Scaled) and isinstance(m, MultiheadAttention)
    x = torch.randn(5, 2, 16)
    with OpCounter() as c:
        out, _ = m(x, x, x, need_weights=False)
    assert c.ext == 1
    torch.testing.assert_close(out, ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-4)

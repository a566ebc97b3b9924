"""TorchScript: converted models stay scriptable and traceable, and run the fused ops there.

``torch.jit.script`` of a model (torchvision's ViT, ``nn.Transformer``, a bare
``nn.MultiheadAttention``) is how many deployments still reach LibTorch
(``torch::jit::load``). After ``replace_multihead_attention`` the scripted model
must compile, give PyTorch's results and gradients, call the fused kernels (not
PyTorch's fallback) and survive ``torch.jit.save`` / ``torch.jit.load``; the
LibTorch test (tests/cpp) loads such a file without Python.

Expected values come from PyTorch's own modules on the same weights, in float64.
"""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from attention_ext import MultiheadAttention, replace_multihead_attention
from conftest import CUDA_SKIP_REASON, HAS_CUDA
from test_mha import E, H, KDIM, MODULE_OPTIONS, VDIM, OpLog, _enumerate, make_pair


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script / trace are deprecated (FutureWarning), not removed
        return torch.jit.script(module)


def _ext_ops(log):
    return sorted(str(f.overloadpacket.__name__) for f, _ in log.ext_calls())


@pytest.mark.parametrize("batch_first,proj,bias,add_bias_kv,add_zero_attn", MODULE_OPTIONS,
                         ids=[f"bf{int(a)}-{b}-bias{int(c)}-bkv{int(d)}-zero{int(e)}" for a, b, c, d, e in MODULE_OPTIONS])
def test_scripted_module_matches_torch_float64(batch_first, proj, bias, add_bias_kv, add_zero_attn, one_thread):
    """Every option of the module and of its forward (test_mha's grid: masks, causal hint, weights,
    unbatched, self / kv / cross), scripted: outputs, weights and all gradients against PyTorch's module."""
    kw = dict(batch_first=batch_first, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    if proj == "kdim_vdim":
        kw.update(kdim=KDIM, vdim=VDIM)
    assert _enumerate(kw, torch.float64, atol=1e-10, rtol=1e-8, script=True) > 100


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_scripted_module_calls_the_fused_ops(need_weights, grad):
    """The scripted module runs the eager module's fused kernels; only the weights path under autograd takes
    the ATen composite (TorchScript has no Python autograd functions), which holds the L x S weights anyway."""
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, batch_first=True)
    s = _script(m)
    logs = []
    for mod in (m, s):
        x = torch.randn(2, 6, E, requires_grad=grad)
        with torch.set_grad_enabled(grad), OpLog() as log:
            out, w = mod(x, x, x, need_weights=need_weights)
        logs.append(log)
        assert (w is not None) == need_weights
        if grad:
            (out.sum() + (w.sum() if w is not None else 0)).backward()
            assert all(p.grad is not None for p in mod.parameters())
    eager, scripted = (_ext_ops(log) for log in logs)
    assert eager == (["_attention_forward_weights"] if need_weights else ["_attention_forward"])
    if need_weights and grad:
        assert scripted == [] and "_softmax" in logs[1].names()
    else:
        assert scripted == eager and "_softmax" not in logs[1].names()


@pytest.mark.parametrize("need_weights", [False, True])
def test_scripted_inference_in_eval_mode(need_weights):
    """eval + no_grad, the usual deployment: the scripted converted module against PyTorch's eager module.
    (PyTorch's own scripted module raises here on its native fast path in torch 2.11 and 2.14: "strides()
    called on an undefined Tensor"; the converted module has no such path.)"""
    torch.manual_seed(0)
    # the reference in train mode with dropout 0 (the same math): PyTorch's unfused float64 path
    ref = nn.MultiheadAttention(E, H, batch_first=True).double().train()
    s = _script(MultiheadAttention.convert(copy.deepcopy(ref)).eval())
    x = torch.randn(3, 8, E, dtype=torch.float64)
    kpm = torch.zeros(3, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        for mask in (None, kpm):
            with OpLog() as log:
                out, w = s(x, x, x, key_padding_mask=mask, need_weights=need_weights)
            assert _ext_ops(log) == (["_attention_forward_weights"] if need_weights else ["_attention_forward"])
            o_ref, w_ref = ref(x, x, x, key_padding_mask=mask, need_weights=need_weights)
            torch.testing.assert_close(out, o_ref, atol=1e-10, rtol=1e-8)
            assert (w is None) == (w_ref is None)
            if w is not None:
                torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-8)


def test_scripted_dropout_draws_the_eager_masks():
    """Training with dropout: the scripted module calls the same ops with the same generator, so the eager
    module's masks (need_weights=False: bitwise the same output; with weights: the same zeros)."""
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, dropout=0.4, batch_first=True).double().train()
    s = _script(m)
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    o_eager = m(x, x, x, need_weights=False)[0]
    torch.manual_seed(7)
    o_script = s(x, x, x, need_weights=False)[0]
    assert torch.equal(o_eager, o_script)
    torch.manual_seed(8)
    o1, w1 = m(x, x, x, average_attn_weights=False)
    torch.manual_seed(8)
    o2, w2 = s(x, x, x, average_attn_weights=False)
    assert (w1 == 0).any() and torch.equal(w1 == 0, w2 == 0)
    torch.testing.assert_close(w2, w1, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-10)
    g1 = torch.autograd.grad((o1 * o1).sum() + w1.pow(2).sum(), (x, m.in_proj_weight))
    g2 = torch.autograd.grad((o2 * o2).sum() + w2.pow(2).sum(), (x, s.in_proj_weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)


def test_scripted_fallback_for_large_head_dim():
    """Head dim above 256 under TorchScript: PyTorch's unfused path (super() cannot be scripted)."""
    for kw in (dict(), dict(kdim=20, vdim=30, batch_first=True)):
        torch.manual_seed(0)
        ref = nn.MultiheadAttention(600, 2, **kw).double()
        torch.manual_seed(0)
        s = _script(MultiheadAttention(600, 2, **kw).double())
        bf = kw.get("batch_first", False)
        q = torch.randn((2, 4, 600) if bf else (4, 2, 600), dtype=torch.float64)
        kv = [torch.randn((2, 5, kw.get(d, 600)) if bf else (5, 2, kw.get(d, 600)), dtype=torch.float64)
              for d in ("kdim", "vdim")]
        with OpLog() as log:
            out, w = s(q, *kv)
        assert not log.ext_calls()
        o_ref, w_ref = ref(q, *kv)
        torch.testing.assert_close(out, o_ref)
        torch.testing.assert_close(w, w_ref)


def test_save_load_roundtrip():
    torch.manual_seed(0)
    ref, mine = make_pair(dtype=torch.float64, kdim=KDIM, vdim=VDIM, add_bias_kv=True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated, not removed
        torch.jit.save(_script(mine), buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    q = torch.randn(5, 3, E, dtype=torch.float64)
    k, v = torch.randn(7, 3, KDIM, dtype=torch.float64), torch.randn(7, 3, VDIM, dtype=torch.float64)
    kpm = torch.rand(3, 7) < 0.3
    kpm[:, 0] = False
    with torch.no_grad(), OpLog() as log:
        out, w = loaded(q, k, v, key_padding_mask=kpm)
    assert _ext_ops(log) == ["_attention_forward_weights"]
    with torch.no_grad():
        o_ref, w_ref = ref(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out, o_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-8)
    # the same parameters (values) as the module that was saved
    for (n1, p1), (n2, p2) in zip(mine.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("need_weights", [False, True])
def test_traced_module_matches_torch(need_weights):
    """torch.jit.trace (its check re-runs the trace without grad), save, load, other shapes than the trace's:
    outputs, weights and gradients against PyTorch's module."""
    torch.manual_seed(0)
    ref, mine = make_pair(dtype=torch.float64, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, x, kpm):
            out, w = self.mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            return (out, w) if need_weights else out

    def kpm_for(n, l):
        kpm = torch.rand(n, l) < 0.3
        kpm[:, 0] = False
        return kpm

    x = torch.randn(2, 6, E, dtype=torch.float64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated, not removed
        torch.jit.save(torch.jit.trace(Wrap(mine), (x, kpm_for(2, 6))), buf)
        buf.seek(0)
        traced = torch.jit.load(buf)
    y = torch.randn(3, 9, E, dtype=torch.float64, requires_grad=True)
    kpm = kpm_for(3, 9)
    with OpLog() as log:
        res = traced(y, kpm)
    # need_weights: the differentiable composite (one graph for any grad mode), else the fused op
    assert _ext_ops(log) == ([] if need_weights else ["_attention_forward"])
    res_ref = ref(y, y, y, key_padding_mask=kpm, need_weights=need_weights)
    res, res_ref = (res, res_ref) if need_weights else ((res,), res_ref[:1])
    for a, b in zip(res, res_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    gs = [torch.randn_like(a) for a in res]
    g1 = torch.autograd.grad(res, [y, *traced.parameters()], gs)
    g2 = torch.autograd.grad(res_ref, [y, *ref.parameters()], gs)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def _randomize(model):
    # torchvision zero-initialises the classifier head: give every parameter a value that shows
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    return model


def test_scripted_torchvision_vit():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = _randomize(tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)).double()
    s = _script(replace_multihead_attention(copy.deepcopy(ref)))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with OpLog() as log:
        out = s(x)
    assert _ext_ops(log) == ["_attention_forward", "_attention_forward"]
    o_ref = ref(x)
    torch.testing.assert_close(out, o_ref, atol=1e-10, rtol=1e-8)
    g = torch.randn_like(out)
    g1 = torch.autograd.grad(out, list(s.parameters()), g)
    g2 = torch.autograd.grad(o_ref, list(ref.parameters()), g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    s.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(s(x), ref(x), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("batch_first", [False, True])
def test_scripted_nn_transformer_with_masks(batch_first):
    torch.manual_seed(0)
    ref = nn.Transformer(32, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                         batch_first=batch_first).double()
    s = _script(replace_multihead_attention(copy.deepcopy(ref)))
    n, src_len, tgt_len = 3, 7, 6
    src = torch.randn((n, src_len, 32) if batch_first else (src_len, n, 32), dtype=torch.float64)
    tgt = torch.randn((n, tgt_len, 32) if batch_first else (tgt_len, n, 32), dtype=torch.float64)
    kpm = torch.zeros(n, src_len, dtype=torch.bool)
    kpm[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(tgt_len, dtype=torch.float64)
    kwargs = dict(tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    with OpLog() as log:
        out = s(src, tgt, **kwargs)
    assert len(log.ext_calls()) == 6  # 2 encoder self, 2 decoder self, 2 cross
    o_ref = ref(src, tgt, **kwargs)
    torch.testing.assert_close(out, o_ref, atol=1e-10, rtol=1e-8)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, list(s.parameters()), g),
                    torch.autograd.grad(o_ref, list(ref.parameters()), g)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    # eval + no_grad: PyTorch's encoder would take its native fast path; the converted one runs the kernels
    s.eval()
    ref.eval()
    with torch.no_grad():
        with OpLog() as log:
            out = s(src, tgt, **kwargs)
        assert len(log.ext_calls()) == 6
        torch.testing.assert_close(out, ref(src, tgt, **kwargs), atol=1e-10, rtol=1e-8)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scripted_module_cuda(dtype):
    """On the GPU: the scripted module against the eager one (same kernels), and against PyTorch's module in
    float64 within the eager module's own error."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(64, 4, batch_first=True).cuda().double()
    mine = MultiheadAttention.convert(copy.deepcopy(ref)).to(dtype)
    s = _script(mine)
    x = torch.randn(2, 40, 64, device="cuda", dtype=torch.float64)
    kpm = torch.rand(2, 40, device="cuda") < 0.3
    kpm[:, 0] = False
    for need in (False, True):
        o_ref = ref(x, x, x, key_padding_mask=kpm, need_weights=need)[0]
        o_eager = mine(x.to(dtype), x.to(dtype), x.to(dtype), key_padding_mask=kpm, need_weights=need)[0]
        with OpLog() as log:
            o_script = s(x.to(dtype), x.to(dtype), x.to(dtype), key_padding_mask=kpm, need_weights=need)[0]
        assert log.ext_calls()
        err_eager = (o_eager.double() - o_ref).abs().max().item()
        err_script = (o_script.double() - o_ref).abs().max().item()
        assert err_script <= 2 * err_eager + 1e-6, (need, err_script, err_eager)

"""attention_ext.MultiheadAttention against torch.nn.MultiheadAttention.

The central test enumerates every combination of the module's options
(batch_first, packed / kdim-vdim projections, bias, add_bias_kv,
add_zero_attn) and of the forward's (batched / unbatched, self / key-is-value
/ cross attention, key_padding_mask none / bool / float, attn_mask none / 2-D /
3-D bool / float, the is_causal hint, need_weights, average_attn_weights) and
checks outputs, weights and the gradients of every input, float mask and
parameter against PyTorch on the same weights, in float64 (tight) and, for a
subset, in float32.
"""
import copy
import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attention_ext
from attention_ext import MultiheadAttention

E, H = 16, 4
KDIM, VDIM = 6, 10


class OpLog(TorchDispatchMode):
    """Records every aten / attention_ext op call (with its args) under the mode."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))

    def names(self):
        return [str(f.overloadpacket.__name__) if hasattr(f, "overloadpacket") else str(f) for f, _ in self.calls]

    def ext_calls(self):
        return [(f, a) for f, a in self.calls if f.namespace == "attention_ext"]


def make_pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, **kw)
    torch.manual_seed(seed)
    mine = MultiheadAttention(E, H, **kw)
    return ref, mine


# ---------------------------------------------------------------------------
# construction, attributes, parameters, state dicts
# ---------------------------------------------------------------------------
CONFIGS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, dropout=0.1),
    dict(kdim=KDIM, vdim=VDIM),
    dict(kdim=KDIM, vdim=VDIM, bias=False, add_bias_kv=True, batch_first=True),
    dict(batch_first=True, dtype=torch.float64),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_same_construction(kw):
    ref, mine = make_pair(**kw)
    assert isinstance(mine, torch.nn.MultiheadAttention)
    for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "head_dim", "dropout",
                 "batch_first", "add_zero_attn"):
        assert getattr(mine, attr) == getattr(ref, attr), attr
    assert isinstance(mine.dropout, float)
    names_ref = [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    names_mine = [(n, p.shape, p.dtype) for n, p in mine.named_parameters()]
    assert names_ref == names_mine
    for (n, a), (_, b) in zip(ref.named_parameters(), mine.named_parameters()):
        assert torch.equal(a, b), f"{n} differs with the same seed"
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                 "bias_v"):
        assert (getattr(ref, name) is None) == (getattr(mine, name) is None), name
    # state dicts load both ways (strict)
    sd_ref, sd_mine = ref.state_dict(), mine.state_dict()
    assert list(sd_ref) == list(sd_mine)
    other = MultiheadAttention(E, H, **kw)
    other.load_state_dict(sd_ref)
    back = torch.nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(other.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # pickling round trip
    buf = io.BytesIO()
    torch.save(mine, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is MultiheadAttention
    for a, b in zip(loaded.parameters(), mine.parameters()):
        assert torch.equal(a, b)


def test_constructor_errors():
    for args in [(0, 2), (8, 0), (-8, 2)]:
        with pytest.raises(ValueError):
            torch.nn.MultiheadAttention(*args)
        with pytest.raises(ValueError):
            MultiheadAttention(*args)
    with pytest.raises(AssertionError):
        torch.nn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError):
        MultiheadAttention(10, 3)


# ---------------------------------------------------------------------------
# the enumeration
# ---------------------------------------------------------------------------
def _masks(kind, n, l, s, batched, dtype, gen, causal):
    """attn_mask in MHA convention (bool True = ignore), never masking key 0 (no fully masked rows)."""
    if kind is None:
        return None
    dims, shape3 = kind
    if causal:
        base = torch.ones(l, s, dtype=torch.bool).triu(1)
    else:
        base = torch.rand(l, s, generator=gen) < 0.3
        base[:, 0] = False
    if dims == 3:
        lead = n * H if batched else H
        if causal:
            ignore = base.expand(lead, l, s).clone()
        else:
            ignore = torch.rand(lead, l, s, generator=gen) < 0.3
            ignore[..., 0] = False
    else:
        ignore = base
    if shape3 == "bool":
        return ignore
    if causal:  # the hint promises the causal mask itself (PyTorch may drop it): 0 / -inf, no gradient
        return torch.zeros(ignore.shape, dtype=dtype).masked_fill(ignore, float("-inf"))
    m = torch.randn(ignore.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.5
    return m.masked_fill(ignore, float("-inf")).requires_grad_()


def _kpm(kind, n, s, batched, dtype, gen):
    if kind is None:
        return None
    ignore = torch.rand((n, s) if batched else (s,), generator=gen) < 0.3
    ignore[..., 0] = False
    if kind == "bool":
        return ignore
    m = torch.randn(ignore.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.5
    return m.masked_fill(ignore, float("-inf")).requires_grad_()


def _inputs(mode, n, l, s, batch_first, batched, kdim, vdim, dtype, gen):
    def t(length, dim):
        shape = ((n, length, dim) if batch_first else (length, n, dim)) if batched else (length, dim)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    if mode == "self":
        x = t(l, E)
        return x, x, x
    if mode == "kv":
        return t(l, E), *([t(s, E)] * 2)
    return t(l, E), t(s, kdim), t(s, vdim)


def _run(mod, q, k, v, kpm, am, need, avg, causal, gen_seed, dtype):
    out, w = mod(q, k, v, key_padding_mask=kpm, need_weights=need, attn_mask=am, average_attn_weights=avg,
                 is_causal=causal)
    g = torch.Generator().manual_seed(gen_seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    leaves = []
    for x in (q, k, v, kpm, am):
        if x is not None and x.requires_grad and all(x is not y for y in leaves):
            leaves.append(x)
    params = list(mod.parameters())
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return out, w, grads


MASK_KINDS = [None, (2, "bool"), (2, "float"), (3, "bool"), (3, "float")]




def _enumerate(kw, dtype, atol, rtol, reduced=False, script=False):
    ref, mine = make_pair(**kw, dtype=dtype)
    if script:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
            mine = torch.jit.script(mine)
    bf = kw.get("batch_first", False)
    separate = "kdim" in kw
    modes = ["cross"] if separate else ["self", "kv", "cross"]
    kdim, vdim = (KDIM, VDIM) if separate else (E, E)
    gen = torch.Generator().manual_seed(1234)
    n, l = 3, 5
    checked = 0
    weight_modes = [(False, True), (True, True), (True, False)]
    for batched, mode, kpm_kind, mask_kind, causal, (need, avg) in itertools.product(
            [True, False], modes, [None, "bool", "float"], MASK_KINDS, [False, True], weight_modes):
        if causal and mask_kind is None:
            continue
        if reduced and (kpm_kind == "float" or (mask_kind is not None and mask_kind[1] == "float" and causal)):
            continue
        s = l if (mode == "self" or causal) else 7
        q, k, v = _inputs(mode, n, l, s, bf, batched, kdim, vdim, dtype, gen)
        kpm = _kpm(kpm_kind, n, s, batched, dtype, gen)
        am = _masks(mask_kind, n, l, s, batched, dtype, gen, causal)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's "mismatched mask types" deprecation warning
            o1, w1, g1 = _run(ref, q, k, v, kpm, am, need, avg, causal, checked, dtype)
            o2, w2, g2 = _run(mine, q, k, v, kpm, am, need, avg, causal, checked, dtype)
        ctx = (f"batched={batched} mode={mode} kpm={kpm_kind} mask={mask_kind} causal={causal} need={need} "
               f"avg={avg}")
        assert o1.shape == o2.shape, ctx
        torch.testing.assert_close(o2, o1, atol=atol, rtol=rtol, msg=lambda m: f"output {ctx}: {m}")
        assert (w1 is None) == (w2 is None), ctx
        if w1 is not None:
            assert w1.shape == w2.shape, ctx
            torch.testing.assert_close(w2, w1, atol=atol, rtol=rtol, msg=lambda m: f"weights {ctx}: {m}")
        assert len(g1) == len(g2)
        for i, (a, b) in enumerate(zip(g1, g2)):
            assert (a is None) == (b is None), f"grad {i} {ctx}"
            if a is not None:
                torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m: f"grad {i} {ctx}: {m}")
        checked += 1
    return checked


MODULE_OPTIONS = list(itertools.product([False, True], ["packed", "kdim_vdim"], [True, False], [False, True],
                                        [False, True]))


@pytest.mark.parametrize("batch_first,proj,bias,add_bias_kv,add_zero_attn", MODULE_OPTIONS,
                         ids=[f"bf{int(a)}-{b}-bias{int(c)}-bkv{int(d)}-zero{int(e)}" for a, b, c, d, e in MODULE_OPTIONS])
def test_matches_torch_all_options_float64(batch_first, proj, bias, add_bias_kv, add_zero_attn, one_thread):
    kw = dict(batch_first=batch_first, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    if proj == "kdim_vdim":
        kw.update(kdim=KDIM, vdim=VDIM)
    n = _enumerate(kw, torch.float64, atol=1e-10, rtol=1e-8)
    assert n > 100


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True, add_bias_kv=True),
                                dict(kdim=KDIM, vdim=VDIM, add_zero_attn=True)], ids=["default", "bf-bkv", "kv-zero"])
def test_matches_torch_float32(kw, one_thread):
    assert _enumerate(kw, torch.float32, atol=2e-5, rtol=2e-4, reduced=True) > 50


# ---------------------------------------------------------------------------
# dropout, training / eval
# ---------------------------------------------------------------------------
def test_dropout_only_in_training_and_weights_consistent():
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    ref = copy.deepcopy(m)
    ref.__class__ = torch.nn.MultiheadAttention
    x = torch.randn(2, 6, E)
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0], atol=1e-5, rtol=1e-4)
    m.train()
    torch.manual_seed(7)
    o1, _ = m(x, x, x, need_weights=False)
    torch.manual_seed(7)
    o2, w = m(x, x, x, need_weights=True, average_attn_weights=False)
    torch.manual_seed(8)
    o3, _ = m(x, x, x, need_weights=False)
    torch.testing.assert_close(o1, o2)  # same seed -> same dropout mask in both paths
    assert not torch.allclose(o1, o3)  # dropout is applied
    assert not torch.allclose(o1, m.eval()(x, x, x)[0])
    # the returned weights are the dropped-out probabilities that produced the output
    v = F.linear(x, m.in_proj_weight[2 * E:], m.in_proj_bias[2 * E:]).view(2, 6, H, E // H).transpose(1, 2)
    recon = F.linear((w @ v).transpose(1, 2).reshape(2, 6, E), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(recon, o2, atol=1e-5, rtol=1e-4)
    zero_frac = (w == 0).float().mean().item()
    assert 0.3 < zero_frac < 0.7
    assert abs(w.sum(-1).mean().item() - 1.0) < 0.25  # inverted dropout keeps the expected row sum


def test_dropout_gradients_through_weights():
    # with dropout, the gradient through both the output and the weights matches a float64
    # reference built from the kernel's own dropout mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    p = 0.3

    def f(q, k, v):
        torch.manual_seed(11)
        out, w = attention_ext.attention_with_weights(q, k, v, dropout_p=p)
        return out, w

    out, w = f(q, k, v)
    torch.manual_seed(11)
    _, _, rng = attention_ext.attention_forward(q.detach(), k.detach(), v.detach(), dropout_p=p)
    keep = torch.ops.attention_ext._dropout_mask(rng, 2, 3, 5, 5, p).view(2, 3, 5, 5)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) * keep / (1 - p)
    torch.testing.assert_close(w, probs)
    torch.testing.assert_close(out, probs @ v)
    go, gw = torch.randn_like(out), torch.randn_like(w)
    g1 = torch.autograd.grad((out * go).sum() + (w * gw).sum(), (q, k, v))
    g2 = torch.autograd.grad((probs @ v * go).sum() + (probs * gw).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# error parity
# ---------------------------------------------------------------------------
def _raises_same(ref, mine, *args, **kwargs):
    err_ref = err_mine = None
    try:
        ref(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        err_ref = e
    try:
        mine(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        err_mine = e
    assert err_ref is not None, "PyTorch accepted the input"
    assert type(err_mine) is type(err_ref), f"PyTorch raised {err_ref!r}, attention_ext raised {err_mine!r}"
    assert str(err_mine)


def test_errors_match_torch():
    ref, mine = make_pair()
    x = torch.randn(5, 2, E)
    y = torch.randn(7, 2, E)
    _raises_same(ref, mine, x, x, x, attn_mask=torch.zeros(5, 6))  # wrong 2-D mask
    _raises_same(ref, mine, x, x, x, attn_mask=torch.zeros(3, 5, 5))  # wrong 3-D mask
    _raises_same(ref, mine, x, x, x, attn_mask=torch.zeros(1, 1, 5, 5))  # 4-D mask
    _raises_same(ref, mine, x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    _raises_same(ref, mine, x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    _raises_same(ref, mine, x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int32))
    _raises_same(ref, mine, x, x, x, is_causal=True)  # hint without a mask
    _raises_same(ref, mine, torch.randn(5, 2, E + 1), torch.randn(5, 2, E + 1), torch.randn(5, 2, E + 1))
    _raises_same(ref, mine, x, y, torch.randn(6, 2, E))  # key / value lengths differ
    _raises_same(ref, mine, x, y[:, :1], y[:, :1])  # batch sizes differ
    _raises_same(ref, mine, torch.randn(2, 5, 2, E), x, x)  # 4-D query
    _raises_same(ref, mine, x, torch.randn(7, E), torch.randn(7, E))  # batched query, unbatched key
    _raises_same(ref, mine, x.double(), x.double(), x.double())  # dtype mismatch with the weights
    ref2, mine2 = make_pair(kdim=KDIM, vdim=VDIM)
    _raises_same(ref2, mine2, x, torch.randn(7, 2, KDIM), torch.randn(6, 2, VDIM))


# ---------------------------------------------------------------------------
# no hidden copies, merged masks, routing through the ops
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_self_attention_no_copies(batch_first):
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn((2, 6, E) if batch_first else (6, 2, E), requires_grad=True)
    with OpLog() as log:
        out, _ = m(x, x, x, need_weights=False)
    names = log.names()
    gemms = [n for n in names if n in ("addmm", "mm", "bmm", "matmul", "baddbmm")]
    assert gemms == ["addmm", "addmm"], names  # packed in-projection + out-projection, nothing else
    for bad in ("clone", "contiguous", "copy_", "_to_copy", "cat", "transpose_copy", "permute_copy"):
        assert bad not in names, (bad, names)
    ext = log.ext_calls()
    assert len(ext) == 1
    _, args = ext[0]
    q, k, v = args[:3]
    # heads read through strides straight from the packed projection's output
    st = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == st and v.untyped_storage().data_ptr() == st
    assert q.shape == (2, H, 6, E // H) and not q.is_contiguous()
    out.sum().backward()


def _mask_arg(m, *args, **kwargs):
    with OpLog() as log:
        m(*args, **kwargs)
    (func, a), = log.ext_calls()
    return a[3], a[5]


def test_masks_merged_without_heads_dim():
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, batch_first=True)
    n, l = 3, 6
    x = torch.randn(n, l, E)
    kpm = torch.zeros(n, l, dtype=torch.bool)
    kpm[:, -1] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(l)
    mask, is_causal = _mask_arg(m, x, x, x, key_padding_mask=kpm, need_weights=False)
    assert mask.shape == (n, 1, 1, l) and mask.dtype == torch.bool and not is_causal
    mask, is_causal = _mask_arg(m, x, x, x, key_padding_mask=kpm, attn_mask=causal.bool(), need_weights=False)
    assert mask.shape == (n, 1, l, l) and mask.dtype == torch.bool
    mask, _ = _mask_arg(m, x, x, x, key_padding_mask=kpm.float().masked_fill(kpm, -1e9), attn_mask=causal,
                        need_weights=False)
    assert mask.shape == (n, 1, l, l) and mask.is_floating_point()
    # causal hint: no L x S mask at all
    mask, is_causal = _mask_arg(m, x, x, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True,
                                need_weights=False)
    assert is_causal and mask.shape == (n, 1, 1, l)
    mask, is_causal = _mask_arg(m, x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    assert is_causal and mask is None
    # need_weights=True still goes through one fused op (forward and weights, the head mean included)
    with OpLog() as log:
        _, w = m(x, x, x, need_weights=True)
    ops = sorted(str(f.overloadpacket.__name__) for f, _ in log.ext_calls())
    assert ops == ["_attention_forward_weights"]
    names = log.names()
    assert "bmm" not in names and "_softmax" not in names and "mean" not in names
    assert w.shape == (n, l, l)


def test_fallback_for_large_head_dim():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(600, 2)
    torch.manual_seed(0)
    mine = MultiheadAttention(600, 2)
    x = torch.randn(4, 2, 600)
    with OpLog() as log:
        out = mine(x, x, x)[0]
    assert not log.ext_calls()  # head dim 300: PyTorch's implementation
    torch.testing.assert_close(out, ref(x, x, x)[0])
    # a wide embedding with ordinary heads runs the kernels (the head dim is what matters)
    wide = MultiheadAttention(768, 12)
    x = torch.randn(3, 2, 768)
    with OpLog() as log:
        wide(x, x, x, need_weights=False)
    assert len(log.ext_calls()) == 1


def test_unbatched_3d_mask_and_half_precision():
    torch.manual_seed(0)
    ref, mine = make_pair(dtype=torch.bfloat16)
    x = torch.randn(5, E, dtype=torch.bfloat16)
    am = torch.rand(H, 5, 5) < 0.3
    am[..., 0] = False
    o1, w1 = ref(x, x, x, attn_mask=am, average_attn_weights=False)
    o2, w2 = mine(x, x, x, attn_mask=am, average_attn_weights=False)
    torch.testing.assert_close(o2.float(), o1.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(w2.float(), w1.float(), atol=3e-2, rtol=3e-2)


def test_fully_masked_rows_give_zero_not_nan():
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, bias=False)
    x = torch.randn(4, 2, E, requires_grad=True)
    kpm = torch.ones(2, 4, dtype=torch.bool)
    out, w = m(x, x, x, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and (w == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradient_through_weights_only():
    ref, mine = make_pair(dtype=torch.float64, kdim=KDIM, vdim=VDIM)
    q = torch.randn(5, 2, E, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 2, KDIM, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, 2, VDIM, dtype=torch.float64, requires_grad=True)
    am = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(2, H, 5, 7, dtype=torch.float64)
    grads = []
    for m in (ref, mine):
        _, w = m(q, k, v, attn_mask=am, average_attn_weights=False)
        grads.append(torch.autograd.grad((w * gw).sum(), [q, k, am] + list(m.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        if a is None:
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(b, a)


def _cuda_ok():
    return torch.cuda.is_available() and attention_ext._loader.has_cuda_kernels()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU and the library's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_cuda(dtype):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True, device="cuda", dtype=dtype)
    mine = MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True, device="cuda", dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 33, 64, device="cuda", dtype=dtype, requires_grad=True)
    kpm = torch.zeros(3, 33, dtype=torch.bool, device="cuda")
    kpm[1, 20:] = True
    mask = torch.nn.Transformer.generate_square_subsequent_mask(33, device="cuda", dtype=dtype)
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for need in (False, True):
        outs = []
        for m in (ref, mine):
            out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need)
            grads = torch.autograd.grad(out.float().square().sum(), [x] + list(m.parameters()))
            outs.append((out, w, grads))
        (o1, w1, g1), (o2, w2, g2) = outs
        torch.testing.assert_close(o2.float(), o1.float(), **tol)
        if need:
            torch.testing.assert_close(w2.float(), w1.float(), **tol)
        for a, b in zip(g1, g2):
            scale = a.float().abs().max().clamp_min(1.0)
            torch.testing.assert_close(b.float() / scale, a.float() / scale, **tol)


@pytest.mark.parametrize("need_weights", [False, True])
def test_torch_compile_fullgraph(need_weights):
    torch._dynamo.reset()
    ref, mine = make_pair(batch_first=True)
    compiled = torch.compile(mine, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, E, requires_grad=True)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    res = []
    for m, params in ((ref, ref.parameters()), (compiled, mine.parameters())):
        o, w = m(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        loss = o.square().sum() + (w.square().sum() if w is not None else 0)
        res.append((o, w, torch.autograd.grad(loss, [x] + list(params))))
    (o1, w1, g1), (o2, w2, g2) = res
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(w2, w1, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_averaged_weights_half_precision(dtype):
    """average_attn_weights=True in bf16 / fp16 (averaged over the heads in float32 by the op, then rounded once):
    the mean of the per-head weights within one rounding, and the gradient through it is the per-head one
    averaged."""
    torch.manual_seed(3)
    m = MultiheadAttention(64, 8, batch_first=True, dtype=dtype)
    x = torch.randn(2, 40, 64, dtype=dtype)
    _, w_heads = m(x, x, x, average_attn_weights=False)
    ref = w_heads.double().mean(dim=1)
    xa = x.clone().requires_grad_()
    _, w = m(xa, xa, xa)
    assert w.dtype == dtype and w.shape == (2, 40, 40)
    step = torch.finfo(dtype).eps  # one rounding of values <= 1
    assert (w.double() - ref).abs().max().item() <= step
    g = torch.randn(w.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad((w.double() * g).sum(), xa)
    xb = x.clone().requires_grad_()
    _, wb = m(xb, xb, xb, average_attn_weights=False)
    (gx_ref,) = torch.autograd.grad((wb.double().mean(dim=1) * g).sum(), xb)
    torch.testing.assert_close(gx.double(), gx_ref.double(), atol=4 * step * gx_ref.abs().max().item(), rtol=0)

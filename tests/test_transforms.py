"""Forward-mode AD, torch.func transforms and higher-order gradients.

The fused kernels have a first-order backward only, and C++ autograd functions cannot run under torch.func.
attention therefore runs `_attention_math` (csrc/composite.cpp: the same attention in plain ATen operations, with
the forward's dropout mask) for
  - dual tensors (torch.autograd.forward_ad, torch.func.jvp / jacfwd),
  - torch.func transforms that differentiate (grad, vjp, jacrev, hessian, vmap over grad),
and its double backward recomputes the same composite (test_gradcheck.py: gradgradcheck).

Every expected value comes from tests/reference.py (float64, plain PyTorch) put through the same transform;
the low-precision tolerances are twice what PyTorch's own math backend gets in that dtype.
"""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_ext
from conftest import device_params
from reference import reference_attention

f64 = torch.float64
_ops = torch.ops.attention_ext

# (id, q shape, k shape, v shape, mask kind, options)
CASES = [
    ("plain", (2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 7, 3), None, {}),
    ("causal_gqa", (1, 4, 6, 4), (1, 2, 6, 4), (1, 2, 6, 3), None, dict(is_causal=True, enable_gqa=True)),
    ("window_empty_rows", (1, 1, 9, 3), (1, 1, 4, 3), (1, 1, 4, 2), None, dict(window_size=(1, 1))),
    ("bool_mask_row0", (1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), "bool", {}),
    ("float_mask_inf", (2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), "float", dict(scale=0.6)),
    ("rank5_causal", (2, 1, 2, 3, 4), (2, 1, 2, 5, 4), (2, 1, 2, 5, 2), None, dict(is_causal=True)),
]
IDS = [c[0] for c in CASES]


def _case(case, device="cpu", dtype=f64, seed=0):
    name, qs, ks, vs, mask, opts = case
    g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    q, k, v = (torch.randn(*s, dtype=f64, generator=g).to(device, dtype) for s in (qs, ks, vs))
    m = None
    L, S = qs[-2], ks[-2]
    if mask == "bool":
        m = torch.rand(L, S, generator=g) < 0.7
        m[:, 0] = True
        m[0] = False  # query row 0 sees nothing
        m = m.to(device)
    elif mask == "float":
        m = torch.randn(qs[0], 1, L, S, dtype=f64, generator=g)
        m[0, 0, 1] = -math.inf  # a fully masked row
        m[1, 0, :, 2] = -math.inf
        m = m.to(device, dtype)
    return q, k, v, m, opts


def _tangents(*ts, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(None if t is None else torch.randn(t.shape, dtype=f64, generator=g).to(t.device, t.dtype)
                 for t in ts)


def _ours(opts):
    def f(q, k, v, m=None):
        return attention_ext.attention(q, k, v, m, **opts)
    return f


def _ref(opts):
    def f(q, k, v, m=None):
        return reference_attention(q, k, v, m, **opts).out
    return f


def _float(m):
    return m is not None and m.is_floating_point()


# --------------------------------------------------------------------------- forward-mode AD
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_ad_dual_tensors(case):
    """Dual tensors through attention: the primal is the attention, the tangent its directional derivative
    along the tangents of q, k, v and a float mask (torch.func.jvp of the reference)."""
    q, k, v, m, opts = _case(case)
    tq, tk, tv, tm = _tangents(q, k, v, m)
    args, tans = [q, k, v], [tq, tk, tv]
    if _float(m):
        args.append(m)
        tans.append(tm)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tans)]
        if not _float(m):
            duals.append(m)
        res = fwAD.unpack_dual(_ours(opts)(*duals))
    assert res.tangent is not None
    ref_out, ref_tan = tf.jvp(lambda *a: _ref(opts)(*a, *([] if _float(m) else [m])), tuple(args), tuple(tans))
    torch.testing.assert_close(res.primal, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.tangent, ref_tan, rtol=1e-10, atol=1e-12)
    # the primal is the fused forward's value (up to rounding)
    torch.testing.assert_close(res.primal, _ours(opts)(q, k, v, m), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[IDS[1], IDS[4]])
def test_func_jvp_and_jacfwd(case):
    q, k, v, m, opts = _case(case)
    tq, tk, tv = _tangents(q, k, v)
    ours = _ours(opts)
    ref = _ref(opts)
    o1, t1 = tf.jvp(lambda a, b, c: ours(a, b, c, m), (q, k, v), (tq, tk, tv))
    o2, t2 = tf.jvp(lambda a, b, c: ref(a, b, c, m), (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t1, t2, rtol=1e-10, atol=1e-12)
    j1 = tf.jacfwd(lambda a: ours(a, k, v, m))(q)
    j2 = tf.jacfwd(lambda a: ref(a, k, v, m))(q)
    torch.testing.assert_close(j1, j2, rtol=1e-10, atol=1e-12)


def test_forward_ad_dropout_uses_one_mask():
    """With dropout the primal and the value tangent use the same mask as a plain call under the same seed:
    attention is linear in v, so the tangent along v alone is attention(q, k, t_v) with that mask."""
    q, k, v, _, _ = _case(CASES[0])
    (tv,) = _tangents(v)
    opts = dict(dropout_p=0.4, is_causal=True)
    with fwAD.dual_level():
        torch.manual_seed(7)
        res = fwAD.unpack_dual(attention_ext.attention(q, k, fwAD.make_dual(v, tv), **opts))
    torch.manual_seed(7)
    want_out = attention_ext.attention(q, k, v, **opts)
    torch.manual_seed(7)
    want_tan = attention_ext.attention(q, k, tv, **opts)
    assert (want_out != attention_ext.attention(q, k, v, is_causal=True)).any()  # dropout did drop
    torch.testing.assert_close(res.primal, want_out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(res.tangent, want_tan, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("device", device_params())
def test_forward_ad_low_precision(device, dtype):
    """The tangent's error against float64 is at most twice what PyTorch's math backend gets in that dtype."""
    q, k, v, m, opts = _case(CASES[4], device, dtype, seed=3)
    q64, k64, v64, m64 = (t.to(f64).cpu() for t in (q, k, v, m))
    tq, tk, tv = _tangents(q, k, v)
    _, want = tf.jvp(lambda a, b, c: _ref(opts)(a, b, c, m64), (q64, k64, v64),
                     tuple(t.to(f64).cpu() for t in (tq, tk, tv)))
    _, ours = tf.jvp(lambda a, b, c: _ours(opts)(a, b, c, m), (q, k, v), (tq, tk, tv))
    # PyTorch: a float mask with -inf rows gives NaN rows there, compare the rows it computes
    finite_rows = (m64 != -math.inf).any(-1, keepdim=True).expand(want.shape[:-1] + (1,)).expand(want.shape)
    with sdpa_kernel(SDPBackend.MATH):
        _, theirs = tf.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=m, **opts),
                           (q, k, v), (tq, tk, tv))
    err_ours = (ours.cpu().to(f64) - want).abs().max()
    err_torch = (theirs.cpu().to(f64) - want)[finite_rows].abs().max()
    assert torch.isfinite(ours).all()
    assert err_ours <= max(2 * err_torch, 1e-9), (err_ours, err_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("device", device_params())
def test_double_backward_low_precision(device, dtype):
    """A gradient penalty (create_graph=True, then backward) in low precision: error against float64 at most
    twice PyTorch's math backend's in that dtype."""
    q, k, v, _, opts = _case(CASES[1], device, dtype, seed=4)
    (w,) = _tangents(_ours(opts)(q, k, v))

    def penalty_grads(f, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = f(q, k, v)
        (dq,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), q, create_graph=True)
        return torch.autograd.grad(dq.square().sum(), (q, k, v))

    want = penalty_grads(_ref(opts), *(t.to(f64).cpu() for t in (q, k, v)))
    ours = penalty_grads(_ours(opts), q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = penalty_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **opts), q, k, v)
    for name, a, b, c in zip("qkv", ours, theirs, want):
        err_ours = (a.cpu().to(f64) - c).abs().max()
        err_torch = (b.cpu().to(f64) - c).abs().max()
        assert torch.isfinite(a).all()
        assert err_ours <= max(2 * err_torch, 1e-9), (name, err_ours, err_torch)


# --------------------------------------------------------------------------- torch.func, reverse mode
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_func_grad_and_vjp(case):
    q, k, v, m, opts = _case(case)
    (w,) = _tangents(_ours(opts)(q, k, v, m))
    extra = (m,) if _float(m) else ()

    def loss(f):
        def fn(a, b, c, *mm):
            return (f(a, b, c, mm[0] if mm else m) * w).sum()
        return fn

    argnums = tuple(range(3 + len(extra)))
    got = tf.grad(loss(_ours(opts)), argnums=argnums)(q, k, v, *extra)
    want = tf.grad(loss(_ref(opts)), argnums=argnums)(q, k, v, *extra)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    _, pull = tf.vjp(lambda a, b, c: _ours(opts)(a, b, c, m), q, k, v)
    for a, b in zip(pull(w), want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_func_jacrev_and_hessian():
    q, k, v, m, opts = _case(CASES[1])
    ours, ref = _ours(opts), _ref(opts)
    torch.testing.assert_close(tf.jacrev(lambda a: ours(q, k, a))(v), tf.jacrev(lambda a: ref(q, k, a))(v),
                               rtol=1e-10, atol=1e-12)
    qs, ks, vs = q[:, :2, :3], k[:, :1, :4], v[:, :1, :4]  # a small Hessian: (12 x 12) per argument
    h1 = tf.hessian(lambda a: ours(a, ks, vs).sin().sum())(qs)
    h2 = tf.hessian(lambda a: ref(a, ks, vs).sin().sum())(qs)
    torch.testing.assert_close(h1, h2, rtol=1e-9, atol=1e-11)


def _per_sample_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, L, d, heads = 4, 5, 8, 2
    x = torch.randn(n, L, d, dtype=f64, generator=g)
    params = {name: torch.randn(d, d, dtype=f64, generator=g) / math.sqrt(d) for name in ("wq", "wk", "wv")}
    return x, params, heads


def _model(attn, heads):
    def f(p, x):  # one sample x: (L, d)
        L, d = x.shape
        q, k, v = ((x @ p[n]).view(L, heads, d // heads).transpose(0, 1) for n in ("wq", "wk", "wv"))
        return attn(q, k, v).square().sum()
    return f


def test_vmap_grad_per_sample_gradients():
    """Per-sample gradients (torch.func.vmap over torch.func.grad) equal one ordinary backward per sample
    through the fused kernels, and the reference's per-sample gradients."""
    x, params, heads = _per_sample_setup()
    ours = _model(lambda q, k, v: attention_ext.attention(q, k, v, is_causal=True), heads)
    ref = _model(lambda q, k, v: reference_attention(q, k, v, is_causal=True).out, heads)
    got = tf.vmap(tf.grad(ours), in_dims=(None, 0))(params, x)
    want = tf.vmap(tf.grad(ref), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        ours(p, x[i]).backward()
        for n in params:
            torch.testing.assert_close(got[n][i], p[n].grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[n][i], want[n][i], rtol=1e-10, atol=1e-12)


def test_vmap_without_grad_runs_the_fused_forward(capfd, monkeypatch):
    """vmap alone needs no derivative: the fused forward runs (per sample), not the composite."""
    q, k, v, _, _ = _case(CASES[0])
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    out = tf.vmap(lambda a, b, c: attention_ext.attention(a, b, c, is_causal=True))(q, k, v)
    log = capfd.readouterr().err
    monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL")
    assert "attention_ext: cpu forward" in log
    torch.testing.assert_close(out, reference_attention(q, k, v, is_causal=True).out, rtol=1e-10, atol=1e-12)


def test_func_grad_runs_the_composite(capfd, monkeypatch):
    """... while torch.func.grad runs the composite: no fused forward kernel."""
    q, k, v, _, _ = _case(CASES[0])
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    tf.grad(lambda a: attention_ext.attention(a, k, v).sum())(q)
    log = capfd.readouterr().err
    monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL")
    assert "cpu forward" not in log and "cpu backward" not in log


def test_after_a_transform_autograd_runs_the_fused_kernels(capfd, monkeypatch):
    """Once a transform has run (functorch keeps its thread-local state), ordinary autograd outside any
    transform goes back to the fused forward and backward."""
    q, k, v, _, _ = _case(CASES[0])
    tf.grad(lambda a: attention_ext.attention(a, k, v).sum())(q)
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    qq = q.clone().requires_grad_()
    attention_ext.attention(qq, k, v).sum().backward()
    log = capfd.readouterr().err
    monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL")
    assert "cpu forward" in log and "cpu backward" in log


# --------------------------------------------------------------------------- the drop-in module
def _mha_pair(need_kpm, seed=0):
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=f64)
    ours = attention_ext.MultiheadAttention(8, 2, batch_first=True, dtype=f64)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 5, 8, dtype=f64, generator=g)
    kpm = None
    if need_kpm:
        kpm = torch.zeros(3, 5, dtype=torch.bool)
        kpm[1, 3:] = True
    return theirs, ours, x, kpm


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_mha_per_sample_gradients(need_weights):
    """torch.func.functional_call + vmap(grad): the converted module's per-sample gradients equal
    nn.MultiheadAttention's (key padding, and the weights in the loss when they are returned)."""
    theirs, ours, x, kpm = _mha_pair(True)

    def loss(module):
        def f(p, xi, mi):
            out, w = tf.functional_call(module, p, (xi, xi, xi), dict(key_padding_mask=mi, need_weights=need_weights))
            return out.square().sum() + (w.sin().sum() if need_weights else 0.0)
        return f

    got = tf.vmap(tf.grad(loss(ours)), in_dims=(None, 0, 0))(dict(ours.named_parameters()), x, kpm)
    want = tf.vmap(tf.grad(loss(theirs)), in_dims=(None, 0, 0))(dict(theirs.named_parameters()), x, kpm)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_mha_double_backward(need_weights):
    """A gradient penalty through the converted module (create_graph=True, then backward) gives
    nn.MultiheadAttention's gradients (with need_weights=True, which runs PyTorch's math path: its fused
    SDPA kernels have no double backward)."""
    theirs, ours, x, kpm = _mha_pair(True, seed=2)
    grads = []
    for module, nw in ((theirs, True), (ours, need_weights)):
        xi = x.clone().requires_grad_()
        out, w = module(xi, xi, xi, key_padding_mask=kpm, need_weights=nw)
        (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        module.zero_grad()
        (gx.square().sum() + out.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for n in grads[1]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12)


def test_attention_with_weights_forward_ad():
    """The weights path (need_weights=True) under forward-mode AD: out and weights tangents."""
    q, k, v, m, opts = _case(CASES[4])
    tq, tk, tv = _tangents(q, k, v)

    def ref(a, b, c):
        r = reference_attention(a, b, c, m, scale=0.6)
        return r.out, r.probs_dropped.mean(-3)

    def ours(a, b, c):
        return attention_ext.attention_with_weights(a, b, c, m, scale=0.6, average_heads=True)

    (o1, w1), (t1, u1) = tf.jvp(ours, (q, k, v), (tq, tk, tv))
    (o2, w2), (t2, u2) = tf.jvp(ref, (q, k, v), (tq, tk, tv))
    for a, b in ((o1, o2), (w1, w2), (t1, t2), (u1, u2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- clear errors
def test_varlen_refuses_forward_ad_and_func_grad():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 4, dtype=f64, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="attention_varlen has no forward-mode AD"):
            attention_ext.attention_varlen(fwAD.make_dual(q, torch.ones_like(q)), k, v, cu, cu)
    with pytest.raises(NotImplementedError, match="attention_varlen cannot be differentiated under torch.func"):
        tf.grad(lambda a: attention_ext.attention_varlen(a, k, v, cu, cu).sum())(q)
    # a call that needs no derivative is unaffected
    out = attention_ext.attention_varlen(q, k, v, cu, cu)
    assert torch.isfinite(out).all()


def test_composite_validates_like_the_kernels():
    """The composite raises the fused op's errors (its checks run first)."""
    q = torch.randn(1, 2, 3, 4, dtype=f64)
    k = torch.randn(1, 3, 3, 4, dtype=f64)
    with pytest.raises(ValueError, match="query has 2 heads but key/value have 3"):
        tf.grad(lambda a: attention_ext.attention(a, k, k).sum())(q)
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="query has 2 heads but key/value have 3"):
            attention_ext.attention(fwAD.make_dual(q, q), k, k)
    with pytest.raises(ValueError, match="needs the rng_state"):
        _ops._attention_math(q, q, q, None, 0.5, False, None, False, [-1, -1], None)

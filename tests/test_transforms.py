"""Forward-mode AD, torch.func transforms and higher-order gradients.

The fused kernels have a first-order backward only, and C++ autograd functions cannot run under torch.func.
- Under torch.func, attention_ext/_transforms.py runs the fused kernels for vmap, grad, vjp, jacrev and
  vmap(grad) (batching rules that fold the vmapped dimension into one call, and a Python autograd function);
- forward-mode AD (dual tensors, jvp, jacfwd) and nested differentiation (hessian) run `_attention_math`
  (csrc/composite.cpp: the same attention in plain ATen operations, with the forward's dropout mask), and so
  does the double backward (test_gradcheck.py: gradgradcheck).

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


def _logged(fn, capfd, monkeypatch):
    """The kernel log lines of fn() (ATTENTION_EXT_LOG_KERNEL=1)."""
    capfd.readouterr()
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    try:
        fn()
    finally:
        monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL")
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("attention_ext:")]


def test_vmap_runs_one_fused_forward(capfd, monkeypatch):
    """vmap folds the vmapped dimension into the batch: one fused call for all samples, also when an
    operand is not vmapped (expanded) or is vmapped along another dimension."""
    q, k, v, _, _ = _case(CASES[0])  # q (2, 2, 5, 4): two samples of (2, 5, 4)
    out = []
    log = _logged(lambda: out.append(tf.vmap(lambda a, b, c: attention_ext.attention(a, b, c, is_causal=True),
                                             in_dims=(0, None, 2))(q, k[0], v.movedim(0, 2))), capfd, monkeypatch)
    assert len(log) == 1 and "cpu forward" in log[0], log
    want = reference_attention(q, k[0].expand(k.shape), v, is_causal=True).out
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-12)


def test_func_grad_runs_the_fused_kernels_and_jvp_the_composite(capfd, monkeypatch):
    """torch.func.grad and vmap(grad) run the fused forward and backward (one call each for all samples);
    forward-mode AD and nested differentiation run the composite (no kernel)."""
    q, k, v, _, _ = _case(CASES[0])
    log = _logged(lambda: tf.vmap(tf.grad(lambda a, b: attention_ext.attention(a, b, v[0]).sum()))(q, k),
                  capfd, monkeypatch)
    assert [line.split(":")[1].strip() for line in log] == ["cpu forward", "cpu backward"], log
    log = _logged(lambda: tf.jvp(lambda a: attention_ext.attention(a, k, v), (q,), (q,)), capfd, monkeypatch)
    assert log == []
    log = _logged(lambda: tf.hessian(lambda a: attention_ext.attention(a, k[:1, :1], v[:1, :1]).sum())(q[:1, :1, :2]),
                  capfd, monkeypatch)
    assert log == []


def test_vmap_randomness():
    """Dropout under vmap keeps vmap's randomness: "error" raises, "same" gives every sample one mask,
    "different" gives each its own (the rows of one folded call)."""
    q, k, v, _, _ = _case(CASES[0])
    x = q[:1].expand(3, *q.shape[1:]).contiguous()  # three identical samples

    def f(a):
        return attention_ext.attention(a, a, a, dropout_p=0.5)

    with pytest.raises(RuntimeError, match="randomness error mode"):
        tf.vmap(f)(x)
    same = tf.vmap(f, randomness="same")(x)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    diff = tf.vmap(f, randomness="different")(x)
    assert not torch.equal(diff[0], diff[1]) and not torch.equal(diff[1], diff[2])


def _dropout_keep(q, k, seed, opts):
    """The keep mask a forward of (q, k) draws after torch.manual_seed(seed), (..., H, L, S)."""
    torch.manual_seed(seed)
    _, _, rng = _ops._attention_forward(q, k, k, None, opts["dropout_p"], opts.get("is_causal", False), None,
                                        False, [-1, -1])
    lead = q.shape[:-3]
    keep = _ops._dropout_mask(rng, math.prod(lead), q.shape[-3], q.shape[-2], k.shape[-2], opts["dropout_p"])
    return keep.view(*lead, q.shape[-3], q.shape[-2], k.shape[-2])


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_per_sample_gradients_with_dropout(randomness):
    """vmap(grad) with dropout: each sample's gradients are the reference's with the mask that sample drew
    ("different": its rows of the folded call; "same": the one mask of a single sample's call), for
    q, k, v and a float mask that is not vmapped (each sample still gets its own mask gradient)."""
    q, k, v, _, _ = _case(CASES[0])  # 2 samples of (2, 5, 4) / (2, 7, 4) / (2, 7, 3)
    g = torch.Generator().manual_seed(11)
    m = torch.randn(5, 7, dtype=f64, generator=g)
    (w,) = _tangents(reference_attention(q, k, v).out)
    opts = dict(dropout_p=0.3, is_causal=True)

    def f(a, b, c, mm, ww):
        return (attention_ext.attention(a, b, c, mm, **opts) * ww).sum()

    torch.manual_seed(5)
    got = tf.vmap(tf.grad(f, argnums=(0, 1, 2, 3)), in_dims=(0, 0, 0, None, 0), randomness=randomness)(q, k, v, m, w)
    keep = _dropout_keep(q, k, 5, opts) if randomness == "different" else \
        _dropout_keep(q[0], k[0], 5, opts).expand(2, *q.shape[1:3], k.shape[-2])
    assert not keep.all()
    for b in range(2):
        def ref(a, bb, c, mm):
            return (reference_attention(a, bb, c, mm, dropout_mask=keep[b], **opts).out * w[b]).sum()
        want = tf.grad(ref, argnums=(0, 1, 2, 3))(q[b], k[b], v[b], m)
        for x, y in zip(got, want):
            torch.testing.assert_close(x[b], y, rtol=1e-10, atol=1e-12)


def test_jacrev_with_dropout_replays_the_forward():
    """jacrev vmaps the backward over cotangents of one unbatched forward: with dropout every cotangent is
    pulled back through that forward's mask (the backward runs once per cotangent, not folded)."""
    q, k, v, _, _ = _case(CASES[2])
    opts = dict(dropout_p=0.4)
    torch.manual_seed(9)
    jac = tf.jacrev(lambda c: attention_ext.attention(q, k, c, **opts))(v)
    keep = _dropout_keep(q, k, 9, opts)
    want = tf.jacrev(lambda c: reference_attention(q, k, c, dropout_mask=keep, **opts).out)(v)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=[IDS[3], IDS[4]])
def test_grad_of_vmap_and_batched_masks(case):
    """grad over vmap (the per-sample losses summed) with the mask vmapped too."""
    q, k, v, m, opts = _case(case)
    extra = (m,) if _float(m) else ()

    def loss(f):
        def fn(a, b, c, mm):
            return tf.vmap(lambda a1, b1, c1, m1: f(a1, b1, c1, m1).sin().sum())(a, b, c, mm).sum()
        return fn

    m_b = m if m.dim() == q.dim() else m.expand(q.shape[0], *m.shape)  # one mask per sample
    argnums = (0, 1, 2, 3) if extra else (0, 1, 2)
    got = tf.grad(loss(_ours(opts)), argnums=argnums)(q, k, v, m_b)
    want = tf.grad(loss(_ref(opts)), argnums=argnums)(q, k, v, m_b)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_autograd_over_func_grad():
    """Ordinary autograd differentiating a torch.func.grad result (the fused function's backward,
    differentiated: the composite recomputed)."""
    q, k, v, _, opts = _case(CASES[1])
    got, want = [], []
    for f, dst in ((_ours(opts), got), (_ref(opts), want)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        gq = tf.grad(lambda a: f(a, kk, vv).sin().sum())(qq)
        dst.extend(torch.autograd.grad(gq.square().sum(), (qq, kk, vv)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


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


@pytest.mark.parametrize("device", device_params())
def test_per_sample_gradients_match_per_sample_backward(device):
    """float32 on each device: vmap(grad) through the folded fused kernels gives what one ordinary
    backward per sample gives (the same kernels, one call per sample)."""
    q, k, v, m, opts = _case(CASES[4], device, torch.float32, seed=8)
    (w,) = _tangents(q[..., :3])

    def f(a, b, c, mm, ww):
        return (attention_ext.attention(a, b, c, mm, **opts) * ww).sum()

    got = tf.vmap(tf.grad(f, argnums=(0, 1, 2)), in_dims=(0, 0, 0, 0, 0))(q, k, v, m, w)
    for b in range(q.shape[0]):
        ins = [t[b].clone().requires_grad_() for t in (q, k, v)]
        f(*ins, m[b], w[b]).backward()
        for x, t in zip(got, ins):
            torch.testing.assert_close(x[b], t.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(5, 6), (2, 1, 1, 6), (1, 2, 5, 6), (2, 2, 5, 6)],
                         ids=["LS", "keypad", "per_head", "full"])
@pytest.mark.parametrize("average_heads", [False, True], ids=["per_head_weights", "head_mean"])
def test_composite_weights_and_empty_rows(mask_shape, average_heads):
    """_attention_math's output and weights against the reference, with rows that see no key in some
    heads only (the zeroing of those rows on the output and on the head-mean weights), and gradients."""
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, 2, 5, 4, dtype=f64, generator=g).requires_grad_()
    k = torch.randn(2, 2, 6, 4, dtype=f64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 6, 3, dtype=f64, generator=g).requires_grad_()
    m = torch.randn(*mask_shape, dtype=f64, generator=g)
    hidden = {"LS": (1,), "keypad": (1,), "per_head": (0, 1, 4), "full": (1, 0, 2)}  # a hidden row (or batch)
    m[hidden[{(5, 6): "LS", (2, 1, 1, 6): "keypad", (1, 2, 5, 6): "per_head", (2, 2, 5, 6): "full"}[mask_shape]]] \
        = -math.inf
    out, w = _ops._attention_math(q, k, v, m, 0.0, True, None, False, [-1, -1], None, True, average_heads)
    r = reference_attention(q, k, v, m, is_causal=True)
    want_w = r.probs.mean(-3) if average_heads else r.probs
    torch.testing.assert_close(out, r.out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w, want_w, rtol=1e-12, atol=1e-13)
    (w2,) = _tangents(want_w)
    got = torch.autograd.grad((out.sin().sum() + (w * w2).sum()), (q, k, v))
    want = torch.autograd.grad((r.out.sin().sum() + (want_w * w2).sum()), (q, k, v))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    out2, none = _ops._attention_math(q, k, v, m, 0.0, True, None, False, [-1, -1], None)
    assert none.numel() == 0 and torch.equal(out2, out)


def test_compile_over_func_transforms():
    """torch.compile over torch.func.grad and vmap(grad) gives the eager transforms' results."""
    q, k, v, _, opts = _case(CASES[1], dtype=torch.float32)

    def f(a):
        return attention_ext.attention(a, k, v, **opts).square().sum()

    torch.testing.assert_close(torch.compile(tf.grad(f), backend="aot_eager")(q), tf.grad(f)(q),
                               rtol=1e-5, atol=1e-6)
    qs = torch.stack([q, 2 * q])
    torch.testing.assert_close(torch.compile(tf.vmap(tf.grad(f)), backend="aot_eager")(qs), tf.vmap(tf.grad(f))(qs),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["jacobian", "jacobian_vectorized", "jvp", "hvp", "hessian",
                                 "hessian_forward_over_reverse"])
def test_autograd_functional(how):
    """torch.autograd.functional (the double-backward trick, vmap over the backward, forward-over-reverse)."""
    q, k, v, m, opts = _case(CASES[3])
    AFn = torch.autograd.functional

    def run(f):
        def scalar(a):
            return f(a, k, v, m).sin().sum()
        return {
            "jacobian": lambda: AFn.jacobian(lambda a: f(a, k, v, m), q),
            "jacobian_vectorized": lambda: AFn.jacobian(lambda a: f(a, k, v, m), q, vectorize=True),
            "jvp": lambda: AFn.jvp(lambda a: f(a, k, v, m), q, torch.ones_like(q))[1],
            "hvp": lambda: AFn.hvp(scalar, q, torch.ones_like(q))[1],
            "hessian": lambda: AFn.hessian(scalar, q),
            "hessian_forward_over_reverse": lambda: AFn.hessian(scalar, q, vectorize=True,
                                                                outer_jacobian_strategy="forward-mode"),
        }[how]()

    torch.testing.assert_close(run(_ours(opts)), run(_ref(opts)), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the composite's log-sum-exp
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_math_lse_matches_the_kernels(case, dtype):
    """_attention_math_lse (the fused forwards' decomposition for exporters) against the kernel's log-sum-exp
    and the float64 reference: same shape, dtype, -inf at the same (fully masked) rows."""
    q, k, v, m, opts = _case(case, dtype=dtype)
    window = list(opts.get("window_size", (-1, -1)))
    args = (opts.get("is_causal", False), opts.get("scale"), opts.get("enable_gqa", False), window)
    lse = _ops._attention_math_lse(q, k, v, m, *args)
    _, lse_kernel, _ = _ops._attention_forward(q, k, v, m, 0.0, *args)
    lse_ref = reference_attention(q, k, v, m, **opts).lse
    assert lse.shape == lse_kernel.shape and lse.dtype == lse_kernel.dtype
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty) and torch.equal(torch.isneginf(lse_kernel), empty)
    assert torch.isfinite(lse[~empty]).all()
    err = (lse[~empty].double() - lse_ref[~empty]).abs().max().item()
    err_kernel = (lse_kernel[~empty].double() - lse_ref[~empty]).abs().max().item()
    assert err <= 2 * err_kernel + (1e-12 if dtype == f64 else 1e-6), (err, err_kernel)

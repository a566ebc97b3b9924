"""Fused dropout: seeded from torch's default generator, replayed exactly by the
backward and by attention_probs, mask available through _dropout_mask."""
import math

import pytest
import torch

import attention_ext
from conftest import cuda_marks, device_dtype_params, emu_marks
from reference import dropout_keep_mask, reference_attention, reference_grads

ops = torch.ops.attention_ext
f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
W = [-1, -1]


def _qkv(shape_q, shape_kv, Ev=None, dtype=f32, device="cpu", seed=0):
    torch.manual_seed(seed)
    q = torch.randn(*shape_q, dtype=dtype, device=device)
    k = torch.randn(*shape_kv, dtype=dtype, device=device)
    vs = (*shape_kv[:-1], Ev or shape_kv[-1])
    v = torch.randn(*vs, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("device,dtype", device_dtype_params((f32, bf16, f64)))
def test_same_seed_bitwise_identical(device, dtype):
    q, k, v = _qkv((2, 3, 33, 16), (2, 3, 41, 16), dtype=dtype, device=device)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        outs.append(attention_ext.attention(q, k, v, dropout_p=0.3))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(42)
    o, lse, rng = ops._attention_forward(q, k, v, None, 0.3, False, None, False, W)
    assert torch.equal(o, outs[0])
    torch.manual_seed(42)
    _, _, rng2 = ops._attention_forward(q, k, v, None, 0.3, False, None, False, W)
    assert torch.equal(rng, rng2) and rng.dtype == torch.int64 and rng.shape == (2,)


def test_different_seeds_and_consecutive_calls_differ(device):
    q, k, v = _qkv((2, 3, 33, 16), (2, 3, 41, 16), device=device)
    torch.manual_seed(1)
    a = attention_ext.attention(q, k, v, dropout_p=0.3)
    b = attention_ext.attention(q, k, v, dropout_p=0.3)  # generator advanced: new mask
    torch.manual_seed(2)
    c = attention_ext.attention(q, k, v, dropout_p=0.3)
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)
    # the differences are a large fraction of elements, not a rounding accident
    assert (a != c).float().mean() > 0.5


def test_generator_state_consumed_only_with_dropout(device):
    """dropout_p > 0 draws from torch's default generator (so torch.manual_seed controls it);
    dropout_p = 0 does not touch it and returns rng_state = [0, 0]."""
    q, k, v = _qkv((1, 2, 9, 8), (1, 2, 9, 8), device=device)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    out0, _, rng0 = ops._attention_forward(q, k, v, None, 0.0, False, None, False, W)
    assert torch.equal(torch.get_rng_state(), state)
    assert rng0.tolist() == [0, 0]
    ops._attention_forward(q, k, v, None, 0.5, False, None, False, W)
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(p):
    """The keep-mask keeps a fraction 1-p of the elements (6-sigma binomial bound), uniformly
    over rows, columns and heads."""
    torch.manual_seed(0)
    q, k, v = _qkv((2, 3, 64, 8), (2, 3, 300, 8))
    _, _, rng = ops._attention_forward(q, k, v, None, p, False, None, False, W)
    m = ops._dropout_mask(rng, 2, 3, 64, 300, p)
    assert m.dtype == torch.bool and m.shape == (2, 3, 64, 300)
    n = m.numel()
    frac = m.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 6 * sigma, (frac, 1 - p, sigma)
    # no structure: per (batch, head), per column-mod-4 and per row the fractions are also close
    for part, cnt in [(m.float().mean((2, 3)), 64 * 300), (m.float().reshape(2, 3, 64, 75, 4).mean((0, 1, 2, 3)),
                                                            n // 4)]:
        s = math.sqrt(p * (1 - p) / cnt)
        assert torch.all((part - (1 - p)).abs() < 6 * s), part
    # different (batch, head) slices are different masks
    flat = m.reshape(6, -1)
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(flat[i], flat[j])


def test_dropout_mask_deterministic_and_seed_dependent():
    m1 = ops._dropout_mask(torch.tensor([123, 0]), 2, 2, 9, 13, 0.4)
    m2 = ops._dropout_mask(torch.tensor([123, 0]), 2, 2, 9, 13, 0.4)
    m3 = ops._dropout_mask(torch.tensor([124, 0]), 2, 2, 9, 13, 0.4)
    m4 = ops._dropout_mask(torch.tensor([123, 1]), 2, 2, 9, 13, 0.4)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3) and not torch.equal(m1, m4)
    # the mask of a sub-problem is the corresponding slice (element (bh, i, j) depends only on its indices)
    big = ops._dropout_mask(torch.tensor([123, 0]), 2, 2, 20, 30, 0.4)
    assert torch.equal(big[:, :, :9, :13], m1)


# (id, q shape, kv shape, Ev, options)
CASES = [
    ("basic", (2, 3, 33, 16), (2, 3, 41, 16), 16, {}),
    ("rank3", (3, 17, 8), (3, 19, 8), 12, {}),
    ("batch2d_causal", (2, 2, 2, 21, 16), (2, 2, 2, 21, 16), 8, dict(is_causal=True)),
    ("gqa_window_mask", (2, 4, 70, 32), (2, 2, 300, 32), 24, dict(enable_gqa=True, window_size=(50, 10), mask=True)),
    ("big_S_chunked", (1, 1, 70, 16), (1, 1, 600, 16), 16, dict(is_causal=True)),
    ("short_rows_gqa_mask", (2, 4, 4, 40), (2, 2, 130, 40), 24, dict(enable_gqa=True, mask=True)),
]


def _run_case(case, p, dtype, device):
    name, qs, kvs, Ev, opts = case
    opts = dict(opts)
    use_mask = opts.pop("mask", False)
    q, k, v = _qkv(qs, kvs, Ev=Ev, dtype=dtype, device=device, seed=len(name))
    m = None
    if use_mask:
        m = torch.randn(qs[-2], kvs[-2], device=device)
        m[3] = -math.inf  # one dead row
    w = list(opts.get("window_size", (-1, -1)))
    causal, gqa = opts.get("is_causal", False), opts.get("enable_gqa", False)
    return q, k, v, m, w, causal, gqa, opts


@pytest.mark.parametrize("p", [0.2, 0.6])
@pytest.mark.parametrize("device,dtype", device_dtype_params((f32, bf16, f64)))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_probs_match_reference_with_mask(case, device, dtype, p):
    """Output = reference with the mask from _dropout_mask scaled by 1/(1-p); the backward
    replays that mask (gradients = float64 reference autograd with the same mask);
    attention_probs = reference probs * mask / (1 - p)."""
    q, k, v, m, w, causal, gqa, opts = _run_case(case, p, dtype, device)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ml = None if m is None else m.clone().requires_grad_()
    torch.manual_seed(99)
    out = attention_ext.attention(ql, kl, vl, ml, dropout_p=p, **opts)
    torch.manual_seed(99)
    out_f, lse, rng = ops._attention_forward(q, k, v, m, p, causal, None, gqa, w)
    assert torch.equal(out_f, out.detach())
    keep = dropout_keep_mask(rng, q, k.shape[-2], p)
    g = torch.randn(out.shape, dtype=dtype, device=device)
    out.backward(g)
    kw = dict(is_causal=causal, enable_gqa=gqa, window_size=opts.get("window_size"), dropout_p=p, dropout_mask=keep)
    rout, rlse, rdq, rdk, rdv, rdm = reference_grads(q, k, v, g, m, mask_requires_grad=m is not None, **kw)
    # float64: exact up to the kernel's float32 1/(1-p); float32 / bfloat16: accumulation / output rounding
    tol = {f64: 1e-6, f32: 2e-5, bf16: 3e-2}[dtype]
    for name, a, b in [("out", out, rout), ("dq", ql.grad, rdq), ("dk", kl.grad, rdk), ("dv", vl.grad, rdv)] + (
            [("dmask", ml.grad, rdm)] if m is not None else []):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a.detach().double(), b, rtol=tol, atol=tol, msg=lambda s: f"{name}: {s}")
    # dropout does not change the log-sum-exp
    torch.testing.assert_close(lse.double(), rlse, rtol=1e-5, atol=1e-5)
    # attention_probs with the same rng_state: probabilities after dropout
    probs = ops.attention_probs(q, k, m, lse, rng, p, causal, None, gqa, w)
    r = reference_attention(q, k, v, m, is_causal=causal, enable_gqa=gqa, window_size=opts.get("window_size"),
                            dropout_p=p, dropout_mask=keep)
    assert probs.dtype == dtype and probs.shape == r.probs_dropped.shape
    torch.testing.assert_close(probs.double(), r.probs_dropped.detach(), rtol=tol, atol=tol)
    # dropped elements are exactly 0, kept ones are probs / (1 - p)
    assert torch.all(probs[~keep] == 0)


def test_dropout_changes_output_statistically_unbiased():
    """E[dropout output] = no-dropout output: averaging many seeds converges to it."""
    q, k, v = _qkv((1, 2, 8, 8), (1, 2, 16, 8), seed=3)
    ref = attention_ext.attention(q, k, v)
    torch.manual_seed(0)
    n = 200
    acc = torch.zeros_like(ref)
    for _ in range(n):
        acc += attention_ext.attention(q, k, v, dropout_p=0.5)
    mean = acc / n
    # per element std of the average <= |v|max * sqrt(p/(1-p)) / sqrt(n) ~ 0.15; a biased mean would be off by ~|ref|
    assert (mean - ref).abs().mean() < 0.05, (mean - ref).abs().mean()


def test_dropout_zero_path_unaffected(device):
    """dropout_p = 0 is the plain path: identical to the default call, rng_state zeros,
    attention_probs with dropout_p = 0 ignores the rng_state."""
    q, k, v = _qkv((2, 2, 17, 8), (2, 2, 19, 8), device=device, seed=4)
    a = attention_ext.attention(q, k, v, is_causal=True)
    torch.manual_seed(123)
    b = attention_ext.attention(q, k, v, dropout_p=0.0, is_causal=True)
    assert torch.equal(a, b)
    _, lse, rng = ops._attention_forward(q, k, v, None, 0.0, True, None, False, W)
    p1 = ops.attention_probs(q, k, None, lse, rng, 0.0, True)
    p2 = ops.attention_probs(q, k, None, lse, torch.tensor([987654321, 5], device=device), 0.0, True)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(p1.double(), reference_attention(q, k, v, is_causal=True).probs, rtol=1e-5, atol=1e-6)


def test_backward_without_replay_would_differ():
    """Sanity of the replay test: gradients computed with a *different* mask are far off,
    so matching the reference above really means the same mask was used."""
    q, k, v = _qkv((1, 2, 17, 8), (1, 2, 19, 8), seed=5)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(1)
    out = attention_ext.attention(ql, kl, vl, dropout_p=0.5)
    g = torch.randn(out.shape)
    out.backward(g)
    wrong = ops._dropout_mask(torch.tensor([777, 0]), 1, 2, 17, 19, 0.5)
    _, _, rdq, _, _, _ = reference_grads(q, k, v, g, dropout_p=0.5, dropout_mask=wrong)
    assert (ql.grad.double() - rdq).abs().max() > 1e-2


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_float64_dropout_scale_is_float64_exact(p):
    """float64 inputs get float64 accuracy with dropout too: the output is
    (P o keep) V / (1 - p) to ~1e-15 relative, i.e. 1/(1-p) is not rounded to float32."""
    q, k, v = _qkv((1, 2, 9, 8), (1, 2, 9, 8), dtype=f64, seed=6)
    torch.manual_seed(0)
    out, _, rng = ops._attention_forward(q, k, v, None, p, False, None, False, W)
    keep = dropout_keep_mask(rng, q, 9, p)
    r = reference_attention(q, k, v, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out, r.out, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_replays_the_mask(device, need_weights, use_reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward with the generator state it stashed:
    the recomputation draws the same dropout mask, so the gradients are bitwise those of the run without
    checkpointing (converted MultiheadAttention, both need_weights paths)."""
    torch.manual_seed(0)
    mha = attention_ext.MultiheadAttention(16, 2, dropout=0.3, batch_first=True, device=device)
    x = torch.randn(2, 7, 16, device=device)
    grads = []
    for ck in (False, True):
        xi = x.clone().requires_grad_()
        mha.zero_grad()
        torch.manual_seed(5)

        def f(a):
            return mha(a, a, a, need_weights=need_weights)[0]

        out = torch.utils.checkpoint.checkpoint(f, xi, use_reentrant=use_reentrant) if ck else f(xi)
        out.square().sum().backward()
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in mha.parameters()])
    torch.manual_seed(5)
    assert not torch.equal(mha(x, x, x, need_weights=False)[0], mha.eval()(x, x, x, need_weights=False)[0])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [
    "cpu", pytest.param("emu80", marks=emu_marks()), pytest.param("emu90", marks=emu_marks()),
    pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("dtype", [f32, f16], ids=["f32", "f16"])
def test_dropout_one_drops_everything(backend, dtype, monkeypatch):
    """dropout_p = 1 (accepted by F.scaled_dot_product_attention, F.dropout and nn.MultiheadAttention) drops
    every weight: output 0, gradients of q, k, v and of a float mask 0, weights and attention_probs 0, an
    all-False _dropout_mask; never NaN (the kernels' 1 / (1 - p) is 0 there). The same as PyTorch's SDPA."""
    device = "cuda" if backend == "cuda" else "cpu"
    if backend.startswith("emu"):
        import emu
        monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", backend[3:])
        be_ops, attn = emu.ops, emu.attention
    else:
        be_ops = ops

        def attn(q, k, v, mask, p, causal, scale, gqa, window):
            return attention_ext.attention(q, k, v, mask, p, causal, scale, gqa, window)
    q, k, v = _qkv((2, 4, 37, 64), (2, 2, 70, 64), dtype=dtype, device=device, seed=9)
    mask = torch.randn(37, 70, device=device, dtype=dtype).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves, mask, 1.0, True, None, True, W)
    grads = torch.autograd.grad(out, leaves + [mask], torch.randn_like(out))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(),
                                                            dropout_p=1.0, enable_gqa=True)
    assert torch.equal(out.float().cpu(), torch.zeros_like(sdpa)) and torch.equal(sdpa, torch.zeros_like(sdpa))
    for g, t in zip(grads, leaves + [mask]):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))
    # without a mask (on an sm_90 device, 16-bit: the Hopper kernels, whose output and dV epilogues scale by
    # 1 / (1 - p))
    out = attn(*leaves, None, 1.0, True, None, True, W)
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out, leaves, torch.randn_like(out)):
        assert torch.equal(g, torch.zeros_like(g))
    _, lse, rng, w = be_ops._attention_forward_weights(q, k, v, None, 1.0, False, None, True, W, backend != "cpu")
    assert torch.isfinite(lse).all() and torch.equal(w, torch.zeros_like(w))
    assert not be_ops._dropout_mask(rng, 2, 4, 37, 70, 1.0).any()
    if backend == "cpu":
        assert torch.equal(ops.attention_probs(q, k, None, lse, rng, 1.0, False, None, True, W),
                           torch.zeros(2, 4, 37, 70, dtype=dtype))
        cu = torch.tensor([0, 5, 40], dtype=torch.int32)
        x = torch.randn(40, 2, 16, dtype=dtype, requires_grad=True)
        o = attention_ext.attention_varlen(x, x, x, cu, cu, dropout_p=1.0)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(torch.autograd.grad(o.sum(), x)[0], torch.zeros_like(x))
        # the ATen composite (forward-mode AD) too
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(q, torch.ones_like(q))
            o = attention_ext.attention(dual, k, v, dropout_p=1.0, enable_gqa=True)
            p, t = torch.autograd.forward_ad.unpack_dual(o)
        assert torch.equal(p, torch.zeros_like(p)) and torch.equal(t, torch.zeros_like(t))


def test_multihead_attention_dropout_one_matches_torch():
    """nn.MultiheadAttention(dropout=1.0) in training: the converted module gives PyTorch's output (the
    out-projection's bias), weights (zeros) and gradients."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, dropout=1.0, batch_first=True)
    with torch.no_grad():
        ref.out_proj.bias.normal_()
    mine = attention_ext.MultiheadAttention(16, 4, dropout=1.0, batch_first=True)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 16)
    for need in (False, True):
        results = []
        for mod in (ref, mine):
            xi = x.clone().requires_grad_()
            out, w = mod(xi, xi, xi, need_weights=need)
            grads = torch.autograd.grad(out.sum() + (w.sum() if w is not None else 0), [xi, *mod.parameters()],
                                        allow_unused=True)
            results.append((out, w, grads))
        (o1, w1, g1), (o2, w2, g2) = results
        torch.testing.assert_close(o2, o1)
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            torch.testing.assert_close(w2, w1)
        for a, b in zip(g1, g2):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a)

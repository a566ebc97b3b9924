"""torch.library.opcheck of every operator (schema, autograd registration, fake /
meta kernels, AOT dispatch), torch.compile(fullgraph=True) training steps
matching eager (static and dynamic shapes), and autocast."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck

import attention_ext
from reference import reference_grads

ops = torch.ops.attention_ext
f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def _t(*shape, dtype=f32, device="cpu", grad=False, layout=None):
    if layout == "blhe":  # (..., L, H, E) storage seen as (..., H, L, E)
        s = (*shape[:-3], shape[-2], shape[-3], shape[-1])
        return torch.randn(*s, dtype=dtype, device=device).transpose(-3, -2).requires_grad_(grad)
    return torch.randn(*shape, dtype=dtype, device=device, requires_grad=grad)


def _samples(device, grad):
    """(id, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap) samples."""
    torch.manual_seed(0)
    t = lambda *s, **kw: _t(*s, device=device, grad=grad, **kw)  # noqa: E731
    bool_mask = torch.rand(7, 9, device=device) < 0.7
    return [
        ("f32_float_mask", t(2, 3, 7, 16), t(2, 3, 9, 16), t(2, 3, 9, 8),
         torch.randn(7, 9, device=device, requires_grad=grad), 0.0, False, None, False, [-1, -1], 3.0),
        ("bf16_blhe_gqa_bool_causal", t(2, 4, 7, 32, dtype=bf16, layout="blhe"), t(2, 2, 9, 32, dtype=bf16, layout="blhe"),
         t(2, 2, 9, 32, dtype=bf16, layout="blhe"), bool_mask, 0.0, True, None, True, [-1, -1], 0.0),
        ("f16_rank3_window_scale", t(3, 5, 8, dtype=f16), t(3, 6, 8, dtype=f16), t(3, 6, 4, dtype=f16), None, 0.0,
         False, 0.5, False, [1, 2], 0.0),
        ("f32_rank5_keypad", t(2, 2, 2, 5, 8), t(2, 2, 2, 6, 8), t(2, 2, 2, 6, 8),
         torch.randn(2, 2, 1, 1, 6, device=device, requires_grad=grad), 0.0, False, None, False, [-1, -1], 0.0),
    ] + ([("f64_causal_window", t(1, 2, 6, 4, dtype=f64), t(1, 2, 6, 4, dtype=f64), t(1, 2, 6, 4, dtype=f64),
           None, 0.0, True, None, False, [2, -1], 2.0)] if device == "cpu" else [])


SAMPLE_IDS = ["f32_float_mask", "bf16_blhe_gqa_bool_causal", "f16_rank3_window_scale", "f32_rank5_keypad",
              "f64_causal_window"]


def _sample(device, grad, sid):
    for s in _samples(device, grad):
        if s[0] == sid:
            return s[1:]
    pytest.skip(f"sample {sid} not on {device}")


@pytest.mark.parametrize("sid", SAMPLE_IDS)
def test_opcheck_attention(device, sid):
    q, k, v, m, p, causal, scale, gqa, w, cap = _sample(device, True, sid)
    opcheck(ops.attention.default, (q, k, v), dict(attn_mask=m, dropout_p=p, is_causal=causal, scale=scale,
                                                  enable_gqa=gqa, window_size=w, softcap=cap), test_utils=ALL_TESTS)


@pytest.mark.parametrize("sid", SAMPLE_IDS)
def test_opcheck_forward_backward_probs(device, sid):
    q, k, v, m, p, causal, scale, gqa, w, cap = _sample(device, False, sid)
    opcheck(ops._attention_forward.default, (q, k, v, m, p, causal, scale, gqa, w, cap), test_utils=ALL_TESTS)
    out, lse, rng = ops._attention_forward(q, k, v, m, p, causal, scale, gqa, w, cap)
    grad = torch.randn_like(out)
    mask_grad = m is not None and m.is_floating_point()
    opcheck(ops._attention_backward.default,  # with the log-sum-exp's cotangent too
            (grad, q, k, v, m, out, lse, rng, p, causal, scale, gqa, w, mask_grad, torch.randn_like(lse), cap),
            test_utils=ALL_TESTS)
    opcheck(ops.attention_probs.default, (q, k, m, lse, rng, p, causal, scale, gqa, w, cap), test_utils=ALL_TESTS)
    for avg in (False, True):
        opcheck(ops._attention_forward_weights.default, (q, k, v, m, p, causal, scale, gqa, w, avg, cap),
                test_utils=ALL_TESTS)


def test_opcheck_dropout(device):
    q, k, v, m, _, causal, scale, gqa, w, _ = _sample(device, False, "f32_float_mask")
    opcheck(ops._attention_forward.default, (q, k, v, m, 0.25, causal, scale, gqa, w), test_utils=NO_AOT)
    out, lse, rng = ops._attention_forward(q, k, v, m, 0.25, causal, scale, gqa, w)
    opcheck(ops._attention_backward.default,
            (torch.randn_like(out), q, k, v, m, out, lse, rng, 0.25, causal, scale, gqa, w, True), test_utils=ALL_TESTS)
    opcheck(ops.attention_probs.default, (q, k, m, lse, rng, 0.25, causal, scale, gqa, w), test_utils=ALL_TESTS)
    opcheck(ops._dropout_mask.default, (rng, 2, 3, 7, 9, 0.25), test_utils=ALL_TESTS)
    opcheck(ops._attention_forward_weights.default, (q, k, v, m, 0.25, causal, scale, gqa, w, True), test_utils=NO_AOT)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    opcheck(ops.attention.default, (qg, kg, vg), dict(attn_mask=m, dropout_p=0.25), test_utils=NO_AOT)


def test_fake_tensor_shapes_strides_dtypes():
    """The Meta kernels give exactly the real outputs' shapes, dtypes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for sid in SAMPLE_IDS:
        q, k, v, m, p, causal, scale, gqa, w, _ = _sample("cpu", False, sid)
        real = ops._attention_forward(q, k, v, m, p, causal, scale, gqa, w)
        grad = torch.randn_like(real[0])
        real_b = ops._attention_backward(grad, q, k, v, m, *real, p, causal, scale, gqa, w, True)
        real_p = ops.attention_probs(q, k, m, real[1], real[2], p, causal, scale, gqa, w)
        real_w = [ops._attention_forward_weights(q, k, v, m, p, causal, scale, gqa, w, a) for a in (False, True)]
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fq, fk, fv, fg = (mode.from_tensor(t) for t in (q, k, v, grad))
            fm = None if m is None else mode.from_tensor(m)
            fake = ops._attention_forward(fq, fk, fv, fm, p, causal, scale, gqa, w)
            fo, fl, fr = fake
            fake_b = ops._attention_backward(fg, fq, fk, fv, fm, fo, fl, fr, p, causal, scale, gqa, w, True)
            fake_p = ops.attention_probs(fq, fk, fm, fl, fr, p, causal, scale, gqa, w)
            fake_w = [ops._attention_forward_weights(fq, fk, fv, fm, p, causal, scale, gqa, w, a) for a in (False, True)]
        names = ("out", "lse", "rng", "dq", "dk", "dv", "dmask", "probs") + tuple(
            f"{a}_{n}" for a in ("weights_op", "weights_op_avg") for n in ("out", "lse", "rng", "weights"))
        for name, r, f in zip(names, (*real, *real_b, real_p, *real_w[0], *real_w[1]),
                              (*fake, *fake_b, fake_p, *fake_w[0], *fake_w[1])):
            assert r.shape == f.shape, (sid, name, r.shape, f.shape)
            assert r.dtype == f.dtype, (sid, name, r.dtype, f.dtype)
            if r.numel() > 1:
                assert r.stride() == f.stride(), (sid, name, r.stride(), f.stride())


# --------------------------------------------------------------------------------------------
# torch.compile

def _train_step(q, k, v, m, gqa):
    out = attention_ext.attention(q, k, v, m, is_causal=True, enable_gqa=gqa, window_size=(5, -1))
    return (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).square().sum()


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _run(fn, q, k, v, m, gqa):
    lq, lk, lv, lm = _leaves(q, k, v, m)
    loss = fn(lq, lk, lv, lm, gqa)
    loss.backward()
    return loss.detach(), lq.grad, lk.grad, lv.grad, lm.grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_training_step_matches_eager(device, backend):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 33, 16, device=device)
    k, v = torch.randn(2, 2, 40, 16, device=device), torch.randn(2, 2, 40, 8, device=device)
    m = torch.randn(33, 40, device=device)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend(backend)
    compiled = torch.compile(_train_step, backend=cnt, fullgraph=True)
    eager = _run(_train_step, q, k, v, m, True)
    got = _run(compiled, q, k, v, m, True)
    assert cnt.frame_count >= 1
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dmask"), got, eager):
        assert b is not None and a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name}: {s}")
    # and the eager gradients are the right ones
    lq, lk, lv, lm = _leaves(q, k, v, m)
    out = attention_ext.attention(lq, lk, lv, lm, is_causal=True, enable_gqa=True, window_size=(5, -1))
    w = torch.linspace(-1, 1, 8, device=device)
    go = 2 * out.detach() * w * w
    _, _, rdq, rdk, rdv, rdm = reference_grads(q, k, v, go, m, mask_requires_grad=True, is_causal=True,
                                               enable_gqa=True, window_size=(5, -1))
    for a, b in zip(eager[1:], (rdq, rdk, rdv, rdm)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_dynamic_shapes(device, backend):
    """dynamic=True: one compiled graph serves several lengths / batch sizes (no recompile),
    and matches eager for each."""
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend(backend)
    compiled = torch.compile(_train_step, backend=cnt, fullgraph=True, dynamic=True)
    torch.manual_seed(1)
    frames = []
    # sizes avoid 0/1 (always specialized) and coincidences with other sizes (duck sizing)
    for B, L, S in [(3, 47, 53), (5, 37, 61), (7, 40, 72)]:
        q = torch.randn(B, 4, L, 16, device=device)
        k, v = torch.randn(B, 2, S, 16, device=device), torch.randn(B, 2, S, 8, device=device)
        m = torch.randn(L, S, device=device)
        got = _run(compiled, q, k, v, m, True)
        eager = _run(_train_step, q, k, v, m, True)
        for name, a, b in zip(("loss", "dq", "dk", "dv", "dmask"), got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name} at {(B, L, S)}: {s}")
        frames.append(cnt.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], f"recompiled for new shapes: frame counts {frames}"


def test_compile_dropout_same_seed_matches_eager(device):
    def f(q, k, v):
        return attention_ext.attention(q, k, v, dropout_p=0.4)

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 8, device=device) for _ in range(3))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(7)
    a = compiled(q, k, v)
    torch.manual_seed(7)
    b = f(q, k, v)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_errors_are_the_same():
    """Invalid inputs raise the same error type and message under torch.compile (Meta kernels)."""
    def f(q, k, v):
        return attention_ext.attention(q, k, v)

    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match=r"query has 4 heads but key/value have 3; pass enable_gqa=True"):
        f(q, k, k)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"query has 4 heads but key/value have 3; pass enable_gqa=True"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, k)


# --------------------------------------------------------------------------------------------
# autocast

def test_autocast_cpu_bf16():
    torch.manual_seed(3)
    q = torch.randn(2, 4, 17, 32, requires_grad=True)
    k = torch.randn(2, 2, 19, 32, requires_grad=True)
    v = torch.randn(2, 2, 19, 16, requires_grad=True)
    m = torch.randn(17, 19, requires_grad=True)  # float32 mask stays float32
    with torch.autocast("cpu", dtype=bf16):
        out = attention_ext.attention(q, k, v, m, is_causal=True, enable_gqa=True)
        assert out.dtype == bf16
        out_t = torch.ops.attention_ext.attention(q, k, v, m, 0.0, True, None, True, [-1, -1])
        assert out_t.dtype == bf16
    g = torch.randn(out.shape)
    out.backward(g.to(bf16))
    for t in (q, k, v, m):
        assert t.grad is not None and t.grad.dtype == f32, t.grad
    # matches the op on explicitly cast inputs and the float64 reference (bf16 accuracy)
    qb, kb, vb = (t.detach().to(bf16) for t in (q, k, v))
    torch.testing.assert_close(out.detach(), attention_ext.attention(qb, kb, vb, m.detach(), is_causal=True,
                                                                     enable_gqa=True), rtol=0, atol=0)
    rout, _, rdq, rdk, rdv, rdm = reference_grads(qb, kb, vb, g.to(bf16), m, mask_requires_grad=True,
                                                  is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.detach().double(), rout, rtol=2e-2, atol=2e-2)
    for a, b in zip((q.grad, k.grad, v.grad, m.grad), (rdq, rdk, rdv, rdm)):
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2)


def test_autocast_leaves_half_and_f64_alone():
    q = torch.randn(1, 2, 5, 8, dtype=f64)
    with torch.autocast("cpu", dtype=bf16):
        assert attention_ext.attention(q, q, q).dtype == f64
        qh = q.to(f16)
        assert attention_ext.attention(qh, qh, qh).dtype == f16
    assert attention_ext.attention(q.float(), q.float(), q.float()).dtype == f32  # no autocast outside

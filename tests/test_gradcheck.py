"""torch.autograd.gradcheck (float64, CPU) of attention_ext.attention wrt query,
key, value and a float mask, and gradgradcheck of its double backward."""
import math

import pytest
import torch

import attention_ext
from reference import reference_grads

f64 = torch.float64


def _inputs(qs, ks, vs, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*qs, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(*ks, dtype=f64, generator=g, requires_grad=True)
    v = torch.randn(*vs, dtype=f64, generator=g, requires_grad=True)
    return q, k, v, g


# (id, q shape, k shape, v shape, mask kind/shape, options)
CASES = [
    ("plain", (1, 2, 5, 4), (1, 2, 7, 4), (1, 2, 7, 3), None, {}),
    ("rank3", (2, 4, 3), (2, 6, 3), (2, 6, 5), None, {}),
    ("batch2d", (2, 1, 1, 3, 2), (2, 1, 1, 4, 2), (2, 1, 1, 4, 2), None, {}),
    ("causal", (1, 2, 6, 4), (1, 2, 6, 4), (1, 2, 6, 3), None, dict(is_causal=True)),
    ("causal_L_gt_S", (1, 1, 7, 3), (1, 1, 4, 3), (1, 1, 4, 2), None, dict(is_causal=True)),
    ("window", (1, 2, 7, 4), (1, 2, 8, 4), (1, 2, 8, 3), None, dict(window_size=(2, 1))),
    ("window_empty_rows", (1, 1, 9, 3), (1, 1, 4, 3), (1, 1, 4, 2), None, dict(window_size=(1, 1))),
    ("gqa", (1, 4, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), None, dict(enable_gqa=True)),
    ("mqa_causal_window", (2, 3, 6, 2), (2, 1, 6, 2), (2, 1, 6, 3), None,
     dict(enable_gqa=True, is_causal=True, window_size=(3, -1))),
    ("scale", (1, 2, 4, 4), (1, 2, 5, 4), (1, 2, 5, 4), None, dict(scale=0.7)),
    ("keypad_bool", (2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), ("bool", "keypad"), {}),
    ("bool_fully_masked_row", (1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), ("bool", "row0"), {}),
    ("float_mask_LS", (1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), ("float", (5, 6)), {}),
    ("float_mask_keypad_causal", (2, 2, 5, 4), (2, 2, 5, 4), (2, 2, 5, 3), ("float", (2, 1, 1, 5)),
     dict(is_causal=True)),
    ("float_mask_full_gqa_window", (1, 4, 5, 3), (1, 2, 6, 3), (1, 2, 6, 2), ("float", (1, 4, 5, 6)),
     dict(enable_gqa=True, window_size=(2, 2))),
    ("float_mask_L1", (1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), ("float", (5, 1)), {}),
    ("float_mask_H11", (1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), ("float", (2, 1, 1)), {}),
]


def _poisoned(t):
    """t seen through a view into a larger buffer whose extra rows and columns are
    NaN (differentiably): a kernel reading outside t turns the result into NaN."""
    rows = torch.full((*t.shape[:-2], 3, t.shape[-1]), math.nan, dtype=t.dtype)
    t2 = torch.cat([t, rows], -2)
    cols = torch.full((*t2.shape[:-1], 2), math.nan, dtype=t.dtype)
    return torch.cat([t2, cols], -1)[..., : t.shape[-2], : t.shape[-1]]


def _mask(kind, shape, qs, ks, g):
    if kind is None:
        return None
    L, S = qs[-2], ks[-2]
    if kind == "bool":
        if shape == "keypad":
            m = torch.ones(qs[0], 1, 1, S, dtype=torch.bool)
            m[0, ..., -2:] = False
            m[1, ..., :1] = False
        else:  # "row0": query row 0 sees nothing, the others a random subset
            m = torch.rand(L, S, generator=g) < 0.7
            m[:, 0] = True
            m[0] = False
        return m
    return torch.randn(*shape, dtype=f64, generator=g).requires_grad_()


def _case_fn(name, qs, ks, vs, mask, opts, seed):
    """(fn, inputs): the attention of a case on NaN-padded views, and the inputs to differentiate."""
    q, k, v, g = _inputs(qs, ks, vs, seed=seed + sum(map(ord, name)))
    m = _mask(*(mask or (None, None)), qs, ks, g)
    inputs = (q, k, v) + ((m,) if m is not None and m.requires_grad else ())

    def fn(q, k, v, *rest):
        mm = rest[0] if rest else m
        return attention_ext.attention(_poisoned(q), _poisoned(k), _poisoned(v), mm, **opts)

    return fn, inputs


@pytest.mark.parametrize("name,qs,ks,vs,mask,opts", CASES, ids=[c[0] for c in CASES])
def test_gradcheck(name, qs, ks, vs, mask, opts):
    fn, inputs = _case_fn(name, qs, ks, vs, mask, opts, seed=len(name) * 7919)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["gradcheck", "gradgradcheck"])
def test_gradcheck_dropout_fixed_seed(check):
    """With the generator reseeded inside the function every evaluation uses the same
    dropout mask, so gradcheck checks that the backward (and gradgradcheck that the
    double backward) replays that very mask."""
    q, k, v, _ = _inputs((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), seed=5)

    def fn(q, k, v):
        torch.manual_seed(1234)
        return attention_ext.attention(q, k, v, dropout_p=0.3, is_causal=True)

    assert check(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_fully_masked_rows_have_zero_grad():
    """A row that sees no key contributes 0 and gets exactly 0 gradient (never NaN)."""
    q, k, v, g = _inputs((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), seed=3)
    m = torch.zeros(5, 6, dtype=f64)
    m[1] = -math.inf
    m[3, 2:] = -math.inf
    m.requires_grad_()
    out = attention_ext.attention(q, k, v, m)
    out.backward(torch.randn(out.shape, dtype=f64, generator=g))
    assert torch.all(out[:, :, 1] == 0)
    assert torch.all(q.grad[:, :, 1] == 0)
    assert torch.all(m.grad[1] == 0) and torch.all(m.grad[3, 2:] == 0)
    for t in (q, k, v, m):
        assert not torch.isnan(t.grad).any()


def test_create_graph_first_order_unchanged():
    """create_graph=True gives the fused backward's first-order gradients, which then carry a graph."""
    q, k, v, g = _inputs((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), seed=4)
    out = attention_ext.attention(q, k, v, is_causal=True)
    go = torch.randn(out.shape, dtype=f64, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go, create_graph=True)
    _, _, rdq, rdk, rdv, _ = reference_grads(q, k, v, go, is_causal=True)
    for a, b in [(dq, rdq), (dk, rdk), (dv, rdv)]:
        assert a.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,qs,ks,vs,mask,opts", CASES, ids=[c[0] for c in CASES])
def test_gradgradcheck(name, qs, ks, vs, mask, opts):
    """The double backward (attention_math recomputed, csrc/ops.cpp) against finite differences of the
    fused first-order gradients, for every gradcheck case, the float mask's gradient included."""
    fn, inputs = _case_fn(name, qs, ks, vs, mask, opts, seed=len(name) * 104729)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_third_order():
    """Gradients of the double backward's gradients: the recomputation keeps its graph (create_graph)."""
    q, k, v, g = _inputs((1, 1, 3, 2), (1, 1, 4, 2), (1, 1, 4, 2), seed=6)

    def fn(q, k, v):
        return attention_ext.attention(q, k, v, is_causal=True)

    def ref(q, k, v):
        from reference import reference_attention
        return reference_attention(q, k, v, is_causal=True).out

    got, want = [], []
    for f, dst in ((fn, got), (ref, want)):
        out = f(q, k, v)
        (dq,) = torch.autograd.grad(out.sin().sum(), (q,), create_graph=True)
        (dk,) = torch.autograd.grad(dq.square().sum(), (k,), create_graph=True)
        dst.extend(torch.autograd.grad(dk.cos().sum(), (q, k, v)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_internal_ops_not_differentiable():
    """Only `attention` is differentiable: the outputs of the internal ops never require grad."""
    q, k, v, _ = _inputs((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), seed=7)
    out, lse, rng = torch.ops.attention_ext._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    assert not out.requires_grad and not lse.requires_grad
    probs = torch.ops.attention_ext.attention_probs(q, k, None, lse, rng)
    assert not probs.requires_grad

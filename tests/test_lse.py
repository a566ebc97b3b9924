"""attention_ext.attention(..., return_lse=True): the output and the log-sum-exp, both differentiable on the fused
kernels (attention_ext/_lse.py).

The reference is float64 and written here: lse = log sum_j exp(s_ij) over the keys a row sees (before dropout),
the loss sum(g * out) + sum(c * lse) over the rows that see a key. The yardstick is the same formula in the
test's dtype: errors within twice its error plus the dtype's floor. The merge test is what split-key, ring and
cascade attention do with it: attention over two halves of the keys, merged with their lse, must be attention
over all of them, gradients included.
"""
import math

import pytest
import torch

import attention_ext
from reference import assert_close_vs_baseline, window_visibility

f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
ops = torch.ops.attention_ext

pytestmark = pytest.mark.usefixtures("one_thread")


def scores(q, k, v, visible=None, bias=None, scale=None):
    """(scores, value) in q's dtype, key / value heads repeated for GQA: visible (bool, broadcast to the scores)
    and bias (added) as given."""
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * sc
    if bias is not None:
        s = s + bias.to(s.dtype)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    return s, v


def formula(q, k, v, visible=None, bias=None, scale=None, keep=None, dropout_p=0.0):
    """(out, lse) in q's dtype; lse -inf for a row that sees no key, whose output is 0. lse = m + log sum exp(s - m)
    with the row max m held constant, so that its gradient is the softmax itself: torch.logsumexp's,
    exp(s - lse), is off by the number of keys on a row masked with finfo.min, where lse rounds to m."""
    s, v = scores(q, k, v, visible, bias, scale)
    live = (s != -math.inf).any(-1, keepdim=True)
    safe = torch.where(live, s, torch.zeros((), dtype=s.dtype))
    p = torch.softmax(safe, -1) * live
    m = safe.amax(-1, keepdim=True).detach() if s.shape[-1] else safe.sum(-1, keepdim=True).detach()
    lse = (m + torch.log(torch.exp(safe - m).sum(-1, keepdim=True))).squeeze(-1)
    lse = torch.where(live.squeeze(-1), lse, torch.full((), -math.inf, dtype=s.dtype))
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v, lse


CASES = {
    "plain": ((2, 4, 7, 16), (2, 4, 9, 16), (2, 4, 9, 8), {}),
    "gqa_causal": ((2, 4, 9, 32), (2, 2, 9, 32), (2, 2, 9, 32), dict(enable_gqa=True, is_causal=True)),
    "window_scale": ((1, 3, 12, 16), (1, 3, 12, 16), (1, 3, 12, 16), dict(window_size=[3, 1], scale=0.4)),
    "bool_mask_dead_rows": ((2, 2, 6, 16), (2, 2, 8, 16), (2, 2, 8, 16), dict(mask="bool")),
    "float_mask_grad_dead_row": ((2, 2, 6, 16), (2, 2, 8, 16), (2, 2, 8, 16), dict(mask="float")),
}


def _inputs(name, dtype):
    qs, ks, vs, opts = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name) + 50)
    q, k, v = (torch.randn(s, generator=g, dtype=f64) for s in (qs, ks, vs))
    mask = None
    if opts.get("mask") == "bool":
        mask = torch.rand(qs[0], 1, qs[-2], ks[-2], generator=g) > 0.4
        mask[0, 0, 2] = False
    elif opts.get("mask") == "float":
        mask = torch.randn(qs[-2], ks[-2], generator=g, dtype=f64)
        mask[3] = -math.inf  # a row that sees no key
        mask = mask.to(dtype)
    opts = {k_: v_ for k_, v_ in opts.items() if k_ != "mask"}
    return [t.to(dtype) for t in (q, k, v)], mask, opts


@pytest.mark.parametrize("dtype", [f64, f32, bf16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_lse_and_its_gradients_match_reference(name, dtype):
    (q, k, v), mask, opts = _inputs(name, dtype)
    mask_grad = mask is not None and mask.is_floating_point()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([mask.clone().requires_grad_()] if mask_grad else [])
    out, lse = attention_ext.attention(*leaves[:3], attn_mask=leaves[3] if mask_grad else mask, return_lse=True,
                                       **opts)
    assert lse.dtype == (f64 if dtype == f64 else f32) and lse.shape == q.shape[:-1]
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(out.shape, generator=gen, dtype=f64)
    c = torch.randn(lse.shape, generator=gen, dtype=f64)
    live = lse != -math.inf
    grads = torch.autograd.grad([out, torch.where(live, lse, 0)], leaves, [g.to(dtype), c.to(lse.dtype)])
    vis = None
    if opts.get("is_causal") or opts.get("window_size"):
        vis = window_visibility(q.shape[-2], k.shape[-2], opts.get("is_causal", False), opts.get("window_size"))
    if mask is not None and mask.dtype == torch.bool:
        vis = mask if vis is None else vis & mask
    res = []
    for dt in (f64, dtype):
        rl = [t.detach().to(dt).requires_grad_() for t in leaves]
        ro, rlse = formula(*rl[:3], visible=vis, bias=rl[3] if mask_grad else None, scale=opts.get("scale"))
        rlive = rlse != -math.inf
        assert torch.equal(rlive, live)
        rg = torch.autograd.grad([ro, torch.where(rlive, rlse, 0)], rl, [g.to(dt), c.to(rlse.dtype)])
        res.append([ro, rlse] + list(rg))
    for what, ours, r, b in zip(("output", "lse", "dq", "dk", "dv", "dmask"), [out, lse, *grads], *res):
        assert_close_vs_baseline(f"{name} {what}", ours, r, b, dtype)


def test_merging_two_halves_of_the_keys_is_attention_over_all():
    """Split-key (ring, cascade) attention from two calls and their lse: the output and its gradients equal
    attention over every key, in float64."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g, dtype=f64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    o1, l1 = attention_ext.attention(qq, kk[..., :6, :], vv[..., :6, :], return_lse=True)
    o2, l2 = attention_ext.attention(qq, kk[..., 6:, :], vv[..., 6:, :], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - lse).unsqueeze(-1) * o1 + torch.exp(l2 - lse).unsqueeze(-1) * o2
    do = torch.randn(merged.shape, generator=g, dtype=f64)
    grads = torch.autograd.grad(merged, leaves, do)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_ext.attention(*whole)
    rgrads = torch.autograd.grad(ref, whole, do)
    for what, a, b in zip(("output", "dq", "dk", "dv"), [merged, *grads], [ref, *rgrads]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")
    _, full_lse = attention_ext.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)


def test_lse_with_dropout():
    """lse is of the scores before dropout; the output's dropout is the kernel's keep mask (replayed)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 7, 16, generator=g, dtype=f64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    out, lse = attention_ext.attention(*leaves, dropout_p=0.25, is_causal=True, return_lse=True)
    torch.manual_seed(3)
    rng = ops._attention_forward(q, k, v, None, 0.25, True, None, False, [-1, -1])[2]
    keep = ops._dropout_mask(rng, 2, 2, 7, 7, 0.25)
    assert 0.5 < keep.float().mean() < 0.95
    do, c = torch.randn(out.shape, generator=g, dtype=f64), torch.randn(lse.shape, generator=g, dtype=f64)
    grads = torch.autograd.grad([out, lse], leaves, [do, c])
    rl = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, rlse = formula(*rl, visible=window_visibility(7, 7, True), keep=keep, dropout_p=0.25)
    rgrads = torch.autograd.grad([ro, rlse], rl, [do, c])
    for what, a, b in zip(("output", "lse", "dq", "dk", "dv"), [out, lse, *grads], [ro, rlse, *rgrads]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")


def test_lse_gradcheck_gradgradcheck_compile_vmap():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g, dtype=f64, requires_grad=True) for _ in range(3))
    mask = torch.randn(4, 4, generator=g, dtype=f64)
    mask[2] = -math.inf
    mask.requires_grad_()

    def fn(q, k, v, m):
        out, lse = attention_ext.attention(q, k, v, m, return_lse=True)
        return out, torch.where(lse == -math.inf, 0, lse)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))
    assert torch.autograd.gradgradcheck(fn, (q, k, v, mask))
    # torch.compile (AOTAutograd) and per-sample gradients
    x = [torch.randn(3, 2, 6, 8, generator=g) for _ in range(3)]

    def loss(q, k, v):
        out, lse = attention_ext.attention(q, k, v, is_causal=True, return_lse=True)
        return out.square().sum() + lse.sum()
    cl = torch.compile(loss, backend="aot_eager", fullgraph=True)
    a = [t.clone().requires_grad_() for t in x]
    b = [t.clone().requires_grad_() for t in x]
    cl(*a).backward()
    loss(*b).backward()
    for s, t in zip(a, b):
        torch.testing.assert_close(s.grad, t.grad, rtol=1e-5, atol=1e-6)
    per = torch.func.vmap(torch.func.grad(loss))(*x)
    for i in range(3):
        qi = x[0][i].clone().requires_grad_()
        loss(qi, x[1][i], x[2][i]).backward()
        torch.testing.assert_close(per[i], qi.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- packed sequences
LENS_Q, LENS_K = [6, 0, 11, 4], [8, 5, 11, 0]  # an empty query sequence, and one that sees no key


def _packed(dtype, seed=21, E=16):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = torch.randn(tq, 4, E, generator=g, dtype=f64).to(dtype)
    k = torch.randn(tk, 2, E, generator=g, dtype=f64).to(dtype)
    v = torch.randn(tk, 2, E, generator=g, dtype=f64).to(dtype)
    cu_q = torch.tensor([0] + torch.tensor(LENS_Q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(LENS_K).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def sequence_reference(q, k, v, g, c, rows, keys, causal, dtype):
    """One sequence of packed (total, heads, E) inputs (its query rows and its keys) on its own, by the formula:
    [out, lse, dq, dk, dv], heads first, in float64 and in dtype (the yardstick), for cotangents g (packed like
    the output) and c (heads, L) of the output and the lse (rows that see no key: no lse term)."""
    vis = window_visibility(rows.stop - rows.start, keys.stop - keys.start, causal, None)
    res = []
    for dt in (f64, dtype):
        rl = [t[sl].transpose(0, 1).detach().to(dt).requires_grad_() for t, sl in ((q, rows), (k, keys), (v, keys))]
        ro, rlse = formula(*rl, visible=vis)
        rg = torch.autograd.grad([ro, torch.where(rlse != -math.inf, rlse, 0)], rl,
                                 [g[rows].transpose(0, 1).to(dt), c.to(rlse.dtype)], allow_unused=True)
        res.append([ro, rlse] + [torch.zeros_like(t) if x is None else x for x, t in zip(rg, rl)])
    return res


@pytest.mark.parametrize("dtype", [f64, f32, bf16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_lse_and_its_gradients_match_reference(dtype, causal):
    """attention_varlen(..., return_lse=True): lse (total_q, Hq), and the gradients through output and lse, of
    each sequence against the formula on that sequence alone (float64, and the yardstick in the dtype)."""
    q, k, v, cu_q, cu_k = _packed(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ext.attention_varlen(*leaves, cu_q, cu_k, is_causal=causal, enable_gqa=True,
                                              return_lse=True)
    assert lse.shape == q.shape[:2] and lse.dtype == (f64 if dtype == f64 else f32)
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(out.shape, generator=gen, dtype=f64)
    c = torch.randn(lse.shape, generator=gen, dtype=f64)
    live = lse != -math.inf
    grads = torch.autograd.grad([out, torch.where(live, lse, 0)], leaves, [g.to(dtype), c.to(lse.dtype)])
    for b in range(len(LENS_Q)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = slice(int(cu_k[b]), int(cu_k[b + 1]))
        res = sequence_reference(q, k, v, g, c[rows].transpose(0, 1), rows, keys, causal, dtype)
        ours = [out[rows], lse[rows], grads[0][rows], grads[1][keys], grads[2][keys]]
        for what, o, r, base in zip(("output", "lse", "dq", "dk", "dv"), ours, *res):
            o = o.transpose(0, 1)
            if what == "lse":
                fin = r != -math.inf
                assert torch.equal(o != -math.inf, fin), f"sequence {b}: rows that see no key must be -inf"
                o, r, base = (t.masked_fill(~fin, 0) for t in (o, r, base))
            assert_close_vs_baseline(f"sequence {b} {what}", o, r, base, dtype)


def test_varlen_merging_two_halves_of_the_keys_is_attention_over_all():
    """Ring attention on packed sequences: each sequence's keys split in two calls, merged with their lse, equal
    one call over all of them, output and gradients (float64)."""
    q, k, v, cu_q, _ = _packed(f64, seed=4)
    cu_k = cu_q.clone()  # self-attention lengths; the halves: the first half of each sequence's keys, the rest
    k, v = k[:q.shape[0]], v[:q.shape[0]]
    lens = torch.tensor(LENS_Q)
    first = lens // 2
    idx1 = torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in zip(cu_k[:-1], first)])
    idx2 = torch.cat([torch.arange(int(s) + int(n), int(e)) for s, n, e in zip(cu_k[:-1], first, cu_k[1:])])
    cu1 = torch.tensor([0] + first.cumsum(0).tolist(), dtype=torch.int32)
    cu2 = torch.tensor([0] + (lens - first).cumsum(0).tolist(), dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    o1, l1 = attention_ext.attention_varlen(qq, kk[idx1], vv[idx1], cu_q, cu1, enable_gqa=True, return_lse=True)
    o2, l2 = attention_ext.attention_varlen(qq, kk[idx2], vv[idx2], cu_q, cu2, enable_gqa=True, return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - lse).unsqueeze(-1) * o1 + torch.exp(l2 - lse).unsqueeze(-1) * o2
    do = torch.randn(merged.shape, generator=torch.Generator().manual_seed(2), dtype=f64)
    grads = torch.autograd.grad(merged, leaves, do)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_ext.attention_varlen(*whole, cu_q, cu_k, enable_gqa=True, return_lse=True)
    rgrads = torch.autograd.grad(ref, whole, do)
    assert (first > 0).sum() >= 2 and ((lens - first) > 0).sum() >= 2
    for what, a, b in zip(("output", "lse", "dq", "dk", "dv"), [merged, lse, *grads], [ref, ref_lse, *rgrads]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")


def test_varlen_lse_double_backward_raises_and_compiles():
    q, k, v, cu_q, cu_k = _packed(f32, seed=8)
    with pytest.raises(ValueError, match=r"query must be packed as \(total_q, heads, E\)"):  # the op's own check
        attention_ext.attention_varlen(q[:, 0], k, v, cu_q, cu_k, return_lse=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ext.attention_varlen(*leaves, cu_q, cu_k, enable_gqa=True, return_lse=True)
    live = lse != -math.inf
    dq = torch.autograd.grad(out.square().sum() + torch.where(live, lse, 0).sum(), leaves[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="attention_varlen does not support double backward"):
        dq.sum().backward()

    def loss(q, k, v):
        o, l_ = attention_ext.attention_varlen(q, k, v, cu_q, cu_k, enable_gqa=True, return_lse=True)
        return o.square().sum() + torch.where(l_ == -math.inf, 0, l_).sum()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(loss, backend="aot_eager")(*a).backward()
    loss(*b).backward()
    for s, t in zip(a, b):
        torch.testing.assert_close(s.grad, t.grad, rtol=1e-5, atol=1e-6)


def test_nested_tensors_return_lse():
    """Jagged nested tensors (batch, heads, ragged, E): (out, lse) nested, each sequence's equal to the dense call
    on it alone, gradients through both included (float64)."""
    g = torch.Generator().manual_seed(12)
    lens = [5, 9, 2]
    qs = [torch.randn(4, n, 8, generator=g, dtype=f64) for n in lens]
    ks = [torch.randn(2, n, 8, generator=g, dtype=f64) for n in lens]
    vs = [torch.randn(2, n, 8, generator=g, dtype=f64) for n in lens]
    nt = [torch.nested.nested_tensor(ts, layout=torch.jagged).requires_grad_() for ts in (qs, ks, vs)]
    out, lse = attention_ext.attention(*nt, is_causal=True, enable_gqa=True, return_lse=True)
    assert out.is_nested and lse.is_nested and lse.shape[:2] == (3, 4)
    (out.values().square().sum() + lse.values().sin().sum()).backward()
    for b, n in enumerate(lens):
        leaves = [t[b].clone().requires_grad_() for t in (qs, ks, vs)]
        ro, rl = attention_ext.attention(*leaves, is_causal=True, enable_gqa=True, return_lse=True)
        (ro.square().sum() + rl.sin().sum()).backward()
        torch.testing.assert_close(out[b], ro, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b], rl, rtol=1e-12, atol=1e-12)
        for t, leaf in zip(nt, leaves):
            torch.testing.assert_close(t.grad[b], leaf.grad, rtol=1e-10, atol=1e-12)


def test_merge_attention_equals_one_call():
    """attention_ext.merge_attention over three key chunks (a row that sees no key in one chunk, and one that sees
    none anywhere) equals one call over all keys: output, lse and gradients through both (float64)."""
    g = torch.Generator().manual_seed(15)
    q = torch.randn(2, 3, 7, 16, generator=g, dtype=f64)
    k, v = (torch.randn(2, 3, 12, 16, generator=g, dtype=f64) for _ in range(2))
    mask = torch.rand(2, 1, 7, 12, generator=g) > 0.3
    mask[:, :, 1, :5] = False  # row 1 sees nothing in the first chunk
    mask[:, :, 4] = False      # row 4 sees no key at all
    chunks = [slice(0, 5), slice(5, 9), slice(9, 12)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    parts = [attention_ext.attention(leaves[0], leaves[1][..., c, :], leaves[2][..., c, :], mask[..., c],
                                     return_lse=True) for c in chunks]
    assert bool((parts[0][1][:, :, 1] == -math.inf).all())
    out, lse = attention_ext.merge_attention([o for o, _ in parts], [l_ for _, l_ in parts])
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_ext.attention(*whole, mask, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert bool((out[:, :, 4] == 0).all()) and bool((lse[:, :, 4] == -math.inf).all())
    do, c = torch.randn(out.shape, generator=g, dtype=f64), torch.randn(lse.shape, generator=g, dtype=f64)
    live = ref_lse != -math.inf
    grads = torch.autograd.grad([out, torch.where(live, lse, 0)], leaves, [do, c])
    rgrads = torch.autograd.grad([ref, torch.where(live, ref_lse, 0)], whole, [do, c])
    for what, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")


def test_merge_attention_dtypes_gradgradcheck_and_errors():
    g = torch.Generator().manual_seed(16)
    o = [torch.randn(2, 5, 4, generator=g, dtype=f64, requires_grad=True) for _ in range(2)]
    l_ = [torch.randn(2, 5, generator=g, dtype=f64, requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        l_[1][0, 2] = -math.inf  # one part saw no key on that row
    assert torch.autograd.gradcheck(lambda *x: attention_ext.merge_attention(x[:2], x[2:]), (*o, *l_))
    assert torch.autograd.gradgradcheck(lambda *x: attention_ext.merge_attention(x[:2], x[2:]), (*o, *l_))
    ob, lb = [t.detach().to(bf16) for t in o], [t.detach().float() for t in l_]
    out, lse = attention_ext.merge_attention(ob, lb)
    assert out.dtype == bf16 and lse.dtype == f32
    ref, _ = attention_ext.merge_attention([t.double() for t in ob], [t.double() for t in lb])
    assert (out.double() - ref).abs().max() < 2e-2
    with pytest.raises(ValueError, match="as many outputs as lses"):
        attention_ext.merge_attention(o, l_[:1])
    with pytest.raises(ValueError, match="every output must have"):
        attention_ext.merge_attention(o, [l_[0], l_[1][:, :4]])

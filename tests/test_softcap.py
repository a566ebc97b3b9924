"""Logit soft-capping (``softcap``: Gemma 2's attn_logit_softcapping, FlashAttention's softcap): each scaled
score x becomes softcap * tanh(x / softcap) before the mask is added; 0 turns it off.

Fused in every CPU kernel (forward, backward, the weights), the sm80 CUDA kernels and the Hopper kernels (but
their packed variants, which decline soft-capped calls), with float masks, their gradient, ALiBi and dropout
alike (the kernel log says which kernels ran). Checked on the CPU, the emulated sm_80 and sm_90 devices and a GPU against a float64 reference written here, with Gemma 2's
eager formula in the same dtype (PyTorch's way) as the yardstick of the error; gradcheck and gradgradcheck in
float64; packed sequences, return_lse, sinks, torch.compile and the errors; and a small Gemma 2 model from
transformers against its eager attention."""
import math

import pytest
import torch

import attention_ext
from conftest import cuda_marks, dtype_id, emu_marks
from emu import backend_ops
from hf_compare import assert_matches_eager
from reference import ABS_FLOOR, assert_close_vs_baselines, dropout_keep_mask

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# (batch dims, Hq, Hkv, L, S, E, Ev, options): the cap bites (scores of standard deviation ~2 against caps of
# 2 and 3, ~18 against 50), with every other feature of the ops once
CASES = {
    "causal-gqa-float-mask": ((2,), 4, 2, 37, 37, 64, 64, dict(cap=2.0, is_causal=True, mask="float")),
    "window-keypad-dropout": ((1,), 2, 2, 20, 45, 32, 48, dict(cap=3.0, window=(5, 7), mask="bool", dropout_p=0.3,
                                                               scale=0.3)),
    # Gemma 2's cap with scores up to ~+-70 (scale 1): tanh's small-argument range and its saturation
    "long-causal-cap50": ((), 2, 1, 160, 160, 64, 64, dict(cap=50.0, is_causal=True, scale=1.0)),
    # a float mask that needs no gradient (Hugging Face's padding masks): the CUDA backward kernels cap before it
    "causal-float-mask-const": ((2,), 4, 2, 37, 37, 64, 64, dict(cap=2.0, is_causal=True, mask="float-const")),
    # a float key-padding mask (the Hopper kernels take it), GQA; and the same with dropout
    "keypad-float-gqa": ((2,), 4, 2, 50, 70, 64, 64, dict(cap=3.0, mask="keypad-float")),
    "keypad-float-dropout": ((2,), 2, 2, 20, 45, 32, 32, dict(cap=3.0, mask="keypad-float", dropout_p=0.3)),
    # a float mask's gradient with dropout and a window (more keys than one CUDA key block: 70)
    "float-mask-grad-dropout": ((2,), 2, 2, 40, 70, 32, 48, dict(cap=2.0, mask="float", dropout_p=0.3,
                                                                 window=(20, 9))),
}
BACKEND_DTYPES = (
    [pytest.param("cpu", dt, id=f"cpu-{dtype_id(dt)}") for dt in (f32, bf16, f16, f64)]
    + [pytest.param("emu80", dt, id=f"emu80-{dtype_id(dt)}", marks=emu_marks()) for dt in (f32, f16, bf16)]
    + [pytest.param("emu90", dt, id=f"emu90-{dtype_id(dt)}", marks=emu_marks()) for dt in (f16, bf16)]
    + [pytest.param("cuda", dt, id=f"cuda-{dtype_id(dt)}", marks=cuda_marks()) for dt in (f32, f16, bf16)]
)


def _visible(L, S, is_causal, window, device):
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    vis = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        vis &= j <= i
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    return vis


def _scores(q, k, cap, scale):
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * sc
    return torch.tanh(s / cap) * cap


def _masked_scores(q, k, mask, cap, is_causal, scale, window):
    """The soft-capped scores, then the mask added (a float one) and -inf where a key is hidden, in q's dtype."""
    s = _scores(q, k, cap, scale)
    vis = _visible(s.shape[-2], s.shape[-1], is_causal, window, s.device)
    if mask is not None and mask.dtype == torch.bool:
        vis = vis & mask
    elif mask is not None:
        s = s + mask.to(s.dtype)
    return s.masked_fill(~vis, -math.inf)


def reference(q, k, v, mask, cap, is_causal=False, scale=None, window=(-1, -1), keep=None, p=0.0, sink=None):
    """float64 (out, lse, weights), differentiable: the scores soft-capped, then masked; a row that sees no key
    gives 0 and lse -inf; with sink (one logit per head) its term joins each row's denominator."""
    q, k, v = q.to(f64), k.to(f64), v.to(f64)
    if k.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = _masked_scores(q, k, mask, cap, is_causal, scale, window)
    seen = (s != -math.inf).any(-1, keepdim=True)
    s = torch.where(seen, s, torch.zeros((), dtype=f64))
    if sink is not None:
        s = torch.cat([s, sink.to(f64).view(-1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    lse = torch.where(seen.squeeze(-1), torch.logsumexp(s, -1), torch.full((), -math.inf, dtype=f64))
    w = torch.softmax(s, -1) * seen
    if sink is not None:
        w = w[..., :-1]
    wd = w if keep is None else w * keep / (1 - p)
    return wd @ v, lse, wd


def gemma_eager(q, k, v, mask, cap, is_causal=False, scale=None, window=(-1, -1), keep=None, p=0.0):
    """PyTorch's way, as Gemma 2's eager attention computes it: scores and tanh in the inputs' dtype, softmax
    in float32 (rows that see no key 0 here), on the CPU; differentiable."""
    if k.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = _masked_scores(q, k, mask, cap, is_causal, scale, window)
    w = torch.softmax(s, dim=-1, dtype=f32).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        w = w * keep / (1 - p)
    return w @ v


def _inputs(case, dtype, device, seed):
    batch, hq, hkv, L, S, E, Ev, o = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    q, k, v = rn(*batch, hq, L, E) * 1.5, rn(*batch, hkv, S, E) * 1.5, rn(*batch, hkv, S, Ev)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    mask = None
    if o.get("mask") == "float":
        m = 2 * rn(L, S)
        m[3, :] = -math.inf  # a row that sees no key
        m[5, 2] = -math.inf
        mask = m.to(device=device, dtype=dtype).requires_grad_()
    elif o.get("mask") == "float-const":
        m = 2 * rn(L, S)
        m[3, :] = -math.inf
        m[6, 4] = -math.inf
        mask = m.to(device=device, dtype=dtype)
    elif o.get("mask") == "keypad-float":  # (batch, 1, 1, S): 0 or -inf, and small offsets
        m = 0.5 * rn(*batch, 1, 1, S)
        m[..., -7:] = -math.inf
        mask = m.to(device=device, dtype=dtype)
    elif o.get("mask") == "bool":
        m = torch.rand(hq, 1, S, generator=g) < 0.7
        m[1, 0, :] = False
        mask = m.to(device)
    return q, k, v, mask, o


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_softcap_ops_vs_reference(backend, dtype, case, monkeypatch):
    """Output, log-sum-exp, gradients (a float mask's too) and the attention weights of the forward and backward
    ops against the float64 reference, within 2x the error of Gemma 2's eager formula in the same dtype."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    q, k, v, mask, o = _inputs(case, dtype, device, seed=len(case) + len(backend))
    cap, p, causal, scale = o["cap"], o.get("dropout_p", 0.0), o.get("is_causal", False), o.get("scale")
    window, gqa = list(o.get("window", (-1, -1))), q.shape[-3] != k.shape[-3]
    mask_grad = mask is not None and mask.requires_grad
    args = (p, causal, scale, gqa, window)
    with attention_ext.debug.kernel_log() as lines:
        torch.manual_seed(3)
        out, lse, rng = ops._attention_forward(q, k, v, mask, *args, cap)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=f64).to(device, dtype)
        dq, dk, dv, dm = ops._attention_backward(do, q, k, v, mask, out, lse, rng, *args, mask_grad, None, cap)
    with attention_ext.debug.kernel_log() as plain_lines:  # the same calls without the cap
        o0, lse0, rng0 = ops._attention_forward(q, k, v, mask, *args, 0.0)
        ops._attention_backward(do, q, k, v, mask, o0, lse0, rng0, *args, mask_grad, None, 0.0)
    # the kernels fuse the cap: a capped call runs the kernels the plain one does (the Hopper ones included)
    assert len(lines) == 2 and lines == plain_lines, (lines, plain_lines)
    assert not any("ATen operations" in line for line in lines), lines

    keep = dropout_keep_mask(rng.cpu(), q, k.shape[-2], p).to(device) if p > 0 else None
    kw = dict(is_causal=causal, scale=scale, window=window, keep=keep, p=p)
    leaves = [t.detach().to(f64).requires_grad_() for t in (q, k, v)]
    m64 = None if mask is None else (mask.detach().to(f64).requires_grad_(mask_grad) if mask_grad else mask)
    r_out, r_lse, r_w = reference(*leaves, m64, cap, **kw)
    r_grads = torch.autograd.grad(r_out, leaves + ([m64] if mask_grad else []), do.to(f64))
    bl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    bm = None if mask is None else (mask.detach().cpu().requires_grad_() if mask_grad else mask.cpu())
    b_out = gemma_eager(*bl, bm, cap, **{**kw, "keep": None if keep is None else keep.cpu()})
    b_grads = torch.autograd.grad(b_out, bl + ([bm] if mask_grad else []), do.cpu())
    names = ("out", "dq", "dk", "dv", "dmask")
    for name, ours, ref, base in zip(names, (out, dq, dk, dv) + ((dm,) if mask_grad else ()), (r_out, *r_grads),
                                     (b_out, *b_grads)):
        assert_close_vs_baselines(f"{name} ({backend}, {case})", ours, ref, [base], dtype)
    assert_close_vs_baselines("logsumexp", lse, r_lse, [], dtype, floor=4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64)))

    torch.manual_seed(3)  # the same dropout draw as above
    _, _, _, w = ops._attention_forward_weights(q, k, v, mask, *args, False, cap)
    bmd = None if bm is None else bm.detach()
    base_w = torch.softmax(_masked_scores(q.cpu(), k.cpu(), bmd, cap, causal, scale, window), -1, dtype=f32)
    base_w = base_w.nan_to_num(0.0)
    if keep is not None:
        base_w = base_w * keep.cpu() / (1 - p)
    assert_close_vs_baselines("weights", w, r_w, [base_w.to(dtype)], dtype)
    probs = ops.attention_probs(q, k, mask, lse, rng, *args, cap)
    assert_close_vs_baselines("attention_probs", probs, r_w, [base_w.to(dtype)], dtype)


@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks()),
                                     pytest.param("cuda", marks=cuda_marks())])
def test_softcap_deterministic_backward(backend, monkeypatch):
    """torch.use_deterministic_algorithms with a soft cap: the sm80 backward's fixed-order dQ gives the same bits
    twice (on the emulator, the second time with its warps scheduled in another order) and agrees with the
    atomic dQ and with the float64 reference."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    g = torch.Generator().manual_seed(31)
    q = (torch.randn(1, 4, 150, 64, generator=g, dtype=f64) * 1.5).to(device, bf16)
    k = (torch.randn(1, 2, 300, 64, generator=g, dtype=f64) * 1.5).to(device, bf16)
    v = torch.randn(1, 2, 300, 64, generator=g, dtype=f64).to(device, bf16)
    do = torch.randn(1, 4, 150, 64, generator=g, dtype=f64).to(device, bf16)
    mask = (torch.arange(300) < 260).view(1, 1, 1, 300).to(device)
    args = (0.0, True, None, True, [-1, -1])
    out, lse, rng = ops._attention_forward(q, k, v, mask, *args, 3.0)
    bwd = lambda: ops._attention_backward(do, q, k, v, mask, out, lse, rng, *args, False, None, 3.0)  # noqa: E731
    atomic = bwd()
    torch.use_deterministic_algorithms(True)
    try:
        det = bwd()
        if backend == "emu80":
            import emu

            with emu.schedule("shuffle", "early"):
                det2 = bwd()
        else:
            det2 = bwd()
    finally:
        torch.use_deterministic_algorithms(False)
    leaves = [t.detach().to(f64).cpu().requires_grad_() for t in (q, k, v)]
    r_out, _, _ = reference(*leaves, mask.cpu(), 3.0, is_causal=True)
    refs = torch.autograd.grad(r_out, leaves, do.to(f64).cpu())
    for a, b, c, r in zip(atomic[:3], det[:3], det2[:3], refs):
        assert torch.equal(b, c)
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
        assert (b.cpu().double() - r).abs().max() < 2e-2 * max(1.0, r.abs().max().item())


def test_softcap_off_is_plain_attention():
    """softcap=0 is no cap (bit for bit the call without it), and a huge cap tends to plain attention."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 17, 32, generator=g) for _ in range(3))
    plain = attention_ext.attention(q, k, v, is_causal=True)
    assert torch.equal(attention_ext.attention(q, k, v, is_causal=True, softcap=0.0), plain)
    torch.testing.assert_close(attention_ext.attention(q, k, v, is_causal=True, softcap=1e4), plain,
                               rtol=1e-4, atol=1e-5)
    capped = attention_ext.attention(q, k, v, is_causal=True, softcap=0.5)
    assert (capped - plain).abs().max() > 1e-2  # the cap changes the result


def test_softcap_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck of attention with a soft cap (GQA, a float mask with its gradient,
    causal with a window), through the fused backward and the composite's double backward; and with dropout
    (one seed, one mask)."""
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 2, 5, 4, dtype=f64, generator=g) * 2).requires_grad_()
    k = (torch.randn(1, 1, 6, 4, dtype=f64, generator=g) * 2).requires_grad_()
    v = torch.randn(1, 1, 6, 3, dtype=f64, generator=g, requires_grad=True)
    m = torch.randn(5, 6, dtype=f64, generator=g, requires_grad=True)

    def fn(q, k, v, m):
        return attention_ext.attention(q, k, v, m, is_causal=True, enable_gqa=True, window_size=(3, -1), softcap=1.5)

    assert torch.autograd.gradcheck(fn, (q, k, v, m))
    assert torch.autograd.gradgradcheck(fn, (q, k, v, m))

    def dropped(q, k, v):
        torch.manual_seed(7)
        return attention_ext.attention(q, k, v, dropout_p=0.3, enable_gqa=True, softcap=2.0)

    assert torch.autograd.gradcheck(dropped, (q, k, v))


def test_softcap_return_lse_and_sinks():
    """return_lse and sinks with a soft cap: the log-sum-exp and its gradient, and the sinks' output and
    gradients, against the float64 reference."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g, dtype=f64) * 1.5 for _ in range(3))
    sinks = torch.randn(3, generator=g, dtype=f64)
    cap = 2.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ext.attention(*leaves, is_causal=True, softcap=cap, return_lse=True)
    r_out, r_lse, _ = reference(q, k, v, None, cap, is_causal=True)
    torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, r_lse, rtol=1e-10, atol=1e-10)
    w = torch.randn(lse.shape, generator=g, dtype=f64)
    grads = torch.autograd.grad((lse * w).sum() + out.sum(), leaves)
    r_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    r_out, r_lse, _ = reference(*r_leaves, None, cap, is_causal=True)
    r_grads = torch.autograd.grad((r_lse * w).sum() + r_out.sum(), r_leaves)
    for a, b in zip(grads, r_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = attention_ext.attention(*leaves[:3], is_causal=True, softcap=cap, sinks=leaves[3])
    r_leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    r_out, _, _ = reference(*r_leaves[:3], None, cap, is_causal=True, sink=r_leaves[3])
    torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(r_out.sum(), r_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


LENS_Q, LENS_K = [5, 0, 17, 9], [7, 3, 17, 0]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks()),
                                     pytest.param("emu90", marks=emu_marks()),
                                     pytest.param("cuda", marks=cuda_marks())])
def test_softcap_varlen(backend, monkeypatch):
    """Packed sequences with a soft cap (causal, GQA; sequences of no query or no key): output, log-sum-exp and
    gradients of each sequence against the reference of that sequence alone. emu90: bf16, which the Hopper
    kernels take, but whose packed forward has no cap: the sm80 kernel runs the sequences in one launch."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    dtype, cap = {"cpu": f64, "emu90": bf16}.get(backend, f32), 2.5
    g = torch.Generator().manual_seed(12)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = (torch.randn(tq, 4, 16, generator=g, dtype=f64) * 1.5).to(device, dtype)
    k = (torch.randn(tk, 2, 16, generator=g, dtype=f64) * 1.5).to(device, dtype)
    v = torch.randn(tk, 2, 16, generator=g, dtype=f64).to(device, dtype)
    do = torch.randn(tq, 4, 16, generator=g, dtype=f64).to(device, dtype)
    cu = lambda lens: torch.tensor([0] + lens).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(LENS_Q), cu(LENS_K)
    args = (0.0, True, None, True, [-1, -1])
    with attention_ext.debug.kernel_log() as lines:
        out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, *args, cap)
        dq, dk, dv = ops._attention_varlen_backward(do, q, k, v, cu_q, cu_k, out, lse, rng, *args, None, cap)
    if backend == "emu90":
        assert "sm80" in lines[0] and "packed sequences in one launch" in lines[0], lines
    tol = {f64: dict(rtol=1e-9, atol=1e-10), f32: dict(rtol=2e-4, atol=2e-5), bf16: dict(rtol=3e-2, atol=3e-2)}[dtype]
    for b, (L, S) in enumerate(zip(LENS_Q, LENS_K)):
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        sl = lambda t, s0, n: t[s0:s0 + n].transpose(0, 1).detach().to(f64).cpu().requires_grad_()  # noqa: E731
        qs, ks, vs = sl(q, q0, L), sl(k, k0, S), sl(v, k0, S)
        if L == 0:
            continue
        r_out, r_lse, _ = reference(qs, ks, vs, None, cap, is_causal=True)
        ours = out[q0:q0 + L].transpose(0, 1).cpu()
        torch.testing.assert_close(ours.to(f64), r_out.detach(), **tol)
        torch.testing.assert_close(lse[4 * q0:4 * (q0 + L)].view(4, L).cpu().to(f64), r_lse.detach(), **tol)
        if S == 0:
            assert torch.equal(dq[q0:q0 + L].cpu(), torch.zeros_like(dq[q0:q0 + L].cpu()))
            continue
        r = torch.autograd.grad(r_out, (qs, ks, vs), do[q0:q0 + L].transpose(0, 1).to(f64).cpu())
        for name, x, rr in zip(("dq", "dk", "dv"), (dq[q0:q0 + L], dk[k0:k0 + S], dv[k0:k0 + S]), r):
            torch.testing.assert_close(x.transpose(0, 1).cpu().to(f64), rr, **tol, msg=lambda m, n=name: f"{n}: {m}")
    if backend == "cpu":  # the differentiable op and the nested tensors' path take it too
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o2 = attention_ext.attention_varlen(*leaves, cu_q, cu_k, is_causal=True, enable_gqa=True, softcap=cap)
        torch.testing.assert_close(o2, out, rtol=0, atol=0)
        grads = torch.autograd.grad(o2, leaves, do)
        for a, b in zip(grads, (dq, dk, dv)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_softcap_under_compile_and_errors():
    """torch.compile (the Meta kernels and the autograd function take softcap) matches eager, gradients too;
    a negative or non-finite softcap raises a ValueError naming it, eagerly, under compile and for packed
    sequences."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return attention_ext.attention(q, k, v, is_causal=True, softcap=3.0)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c, out_e = compiled(q, k, v), fn(q, k, v)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(out_c.sum(), (q, k, v)), torch.autograd.grad(out_e.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"softcap must be a finite number >= 0 \(0: no soft-capping\), got"):
            attention_ext.attention(q, k, v, softcap=bad)
        with pytest.raises(ValueError, match=r"softcap must be a finite number >= 0"):
            torch.ops.attention_ext._attention_forward(q.to("meta"), k.to("meta"), v.to("meta"), None, 0.0, False,
                                                       None, False, [-1, -1], bad)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"softcap must be a finite number >= 0"):
            attention_ext.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                           softcap=bad)


def _tiny_gemma2():
    """(transformers, a 2-layer random Gemma 2 in float32: sliding and full layers, GQA, a logit cap of 2)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 2")
    cfg = transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=None, query_pre_attn_scalar=16, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers, transformers.Gemma2ForCausalLM(cfg).float()


def test_hf_gemma2_matches_eager():
    """A small random Gemma 2 (attention soft-capped at 2, sliding and full layers, GQA, left padding) with
    attn_implementation="attention_ext" against "eager": logits and the gradients of every attention parameter;
    the fused forward ran in every layer."""
    transformers, model = _tiny_gemma2()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    # padded query rows see no key: 0 here, eager's uniform weights there. The loss leaves out the tokens predicted
    # from a padded position (labels are shifted by one inside the model)
    labels = ids.clone()
    labels[1, :4] = -100
    assert_matches_eager(model, ids, am, labels)


def test_hf_softcap_head_dim_above_256_falls_back():
    """Hugging Face's softcap where the kernels take no such head dim: the eager formula, soft-capped, against the
    float64 reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 5, 320, generator=g) * 3 for _ in range(3))

    class M(torch.nn.Module):
        is_causal = True

    out, _ = attention_ext.hf.attention_forward(M(), q, k, v, None, scaling=0.05, is_causal=True, softcap=2.0)
    ref, _, _ = reference(q, k, v, None, 2.0, is_causal=True, scale=0.05)
    # (float32 scores summed over 320 products of values ~3: ~1e-6 of rounding in the scores themselves)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=1e-5, atol=1e-5)

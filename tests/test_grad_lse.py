"""grad_logsumexp of the fused backwards: the cotangent c of the forward's log-sum-exp, taken by
_attention_backward and _attention_varlen_backward in one pass.

As d lse_i / d s_ij = p_ij, c only changes the softmax-backward row term: dS = P o (dP - D + c). Each kernel
subtracts c from its D: the CPU kernel (csrc/cpu/flash_cpu.h), and the CUDA row statistics that the sm80 and
the Hopper backwards both read (csrc/cuda/aux_kernels.cu, flash_fwd.cuh), here on the SIMT emulator as an A100
("emu80") and as an H100 ("emu90", whose Hopper backward must be the kernel that ran), and on a GPU when there
is one. A head dim of 0 takes the ATen composite (csrc/composite.cpp).

The reference is float64 autograd of the formula of test_lse.py (loss sum(g * out) + sum(c * lse) over the
rows that see a key); the yardstick is the same formula in the test's dtype, errors within twice its error
plus the dtype's floor. Rows that see no key, rows masked with finfo.min (the backward's recomputed
statistics), dropout (lse is of the scores before it), GQA, E != Ev and a float mask's gradient (dS itself)
are all in the grid.
"""
import math

import pytest
import torch

import emu
from conftest import cuda_marks
from reference import assert_close_vs_baseline, window_visibility
from test_lse import formula, sequence_reference

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ops = torch.ops.attention_ext

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (B, Hq, Hkv, L, S, E, Ev, options)
CASES = {
    "gqa": (2, 4, 2, 37, 45, 64, 64, {}),
    "causal_ev": (1, 2, 2, 70, 70, 64, 32, dict(is_causal=True)),
    "window_dead_rows": (1, 2, 1, 40, 30, 64, 64, dict(window=[3, 0])),
    "key_padding": (2, 2, 2, 33, 50, 64, 64, dict(mask="padding")),
    "float_mask_grad": (2, 2, 2, 21, 26, 32, 32, dict(mask="float")),
    "finfo_min_rows": (1, 2, 2, 17, 24, 32, 32, dict(mask="finfo_min")),
    "dropout": (1, 2, 2, 19, 27, 32, 32, dict(dropout_p=0.3)),
}
# Inputs the Hopper kernels cover (fp16 / bf16, head dims 64 / 128 / 256, no float mask, no dropout).
HOPPER = {"gqa", "causal_ev", "window_dead_rows", "key_padding"}


def _inputs(name, dtype):
    B, Hq, Hkv, L, S, E, Ev, opts = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name) + 300)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=f64)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=f64)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=f64)
    go = torch.randn(B, Hq, L, Ev, generator=g, dtype=f64)
    c = torch.randn(B, Hq, L, generator=g, dtype=f64)
    mask, kind = None, opts.get("mask")
    if kind == "padding":  # batch 1 sees no key at all
        mask = torch.arange(S).view(1, 1, 1, S) < torch.tensor([37, 0]).view(2, 1, 1, 1)
    elif kind == "float":
        mask = torch.randn(L, S, generator=g, dtype=f64)
        mask[4] = -math.inf
        mask = mask.to(dtype)
    elif kind == "finfo_min":  # Hugging Face's padding: whole rows at finfo.min, |lse| beyond kExtremeLse
        mask = torch.randn(B, 1, L, S, generator=g, dtype=f64)
        mask[..., 3:6, :] = torch.finfo(dtype).min
        mask = mask.to(dtype)
    return [t.to(dtype) for t in (q, k, v, go)], c, mask, opts


def _run(backend, dtype, name, capfd=None):
    """(out, lse, dq, dk, dv, dmask or None) of the backend's forward and of its backward with grad_output g and
    grad_logsumexp c, and the inputs."""
    (q, k, v, go), c, mask, opts = _inputs(name, dtype)
    device = "cuda" if backend == "cuda" else "cpu"
    the_ops = emu.ops if backend.startswith("emu") else ops
    q, k, v, go = (t.to(device) for t in (q, k, v, go))
    m = mask.to(device) if mask is not None else None
    args = (opts.get("dropout_p", 0.0), opts.get("is_causal", False), None, q.shape[1] != k.shape[1],
            opts.get("window", [-1, -1]))
    out, lse, rng = the_ops._attention_forward(q, k, v, m, *args)
    mask_grad = m is not None and m.is_floating_point()
    dq, dk, dv, dm = the_ops._attention_backward(go, q, k, v, m, out, lse, rng, *args, mask_grad,
                                                 c.to(device=device, dtype=lse.dtype))
    return [t.cpu() for t in (out, lse, dq, dk, dv)] + [dm.cpu() if mask_grad else None], rng.cpu()


def _references(name, dtype, rng):
    """[out, lse, dq, dk, dv, dmask] in float64 and in dtype (the yardstick), from the formula."""
    (q, k, v, go), c, mask, opts = _inputs(name, dtype)
    B, Hq, Hkv, L, S, E, Ev, _ = CASES[name]
    vis = window_visibility(L, S, opts.get("is_causal", False), opts.get("window"))
    bias = None
    if mask is not None and mask.dtype == torch.bool:
        vis = vis & mask if vis is not None else mask
    elif mask is not None:
        bias = mask
    keep, p = None, opts.get("dropout_p", 0.0)
    if p > 0:
        keep = ops._dropout_mask(rng, B, Hq, L, S, p).view(B, Hq, L, S)
    res = []
    for dt in (f64, dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        b = bias.detach().to(dt).requires_grad_() if bias is not None else None
        out, lse = formula(*leaves, visible=vis, bias=b, keep=keep, dropout_p=p)
        live = lse != -math.inf
        wrt = leaves + ([b] if b is not None else [])
        grads = torch.autograd.grad([out, torch.where(live, lse, 0)], wrt, [go.to(dt), c.to(dt)])
        res.append([out, lse, *grads[:3], grads[3] if b is not None else None])
    return res


def _check(backend, dtype, name):
    ours, rng = _run(backend, dtype, name)
    ref, base = _references(name, dtype, rng)
    live = ref[1] != -math.inf
    assert torch.equal(ours[1] != -math.inf, live), "rows that see no key must have lse -inf"
    ours[1], ref[1], base[1] = (t.masked_fill(~live, 0) for t in (ours[1], ref[1], base[1]))
    for what, o, r, b in zip(("output", "lse", "dq", "dk", "dv", "dmask"), ours, ref, base):
        if r is not None:
            assert_close_vs_baseline(f"{backend} {name} {what}", o, r, b, dtype)


# float16's finfo.min (-65504) has an ulp of 32: the yardstick formula in float16 loses every score of those
# rows, and its error would allow anything there. That case runs in the other dtypes only.
CPU_GRID = [(n, d) for n in sorted(CASES) for d in (f64, f32, bf16, f16) if (n, d) != ("finfo_min_rows", f16)]


@pytest.mark.parametrize("name,dtype", CPU_GRID, ids=[f"{n}-{str(d)[6:]}" for n, d in CPU_GRID])
def test_cpu(name, dtype):
    _check("cpu", dtype, name)


@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_cuda(name, dtype, device):
    _check(device, dtype, name)


@pytest.mark.emu
@pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or "")
@pytest.mark.parametrize("dtype", [f32, bf16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_sm80(name, dtype, monkeypatch):
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "80")
    _check("emu80", dtype, name)


@pytest.mark.emu
@pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or "")
@pytest.mark.parametrize("dtype", [bf16, f16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(HOPPER))
def test_emulated_sm90(name, dtype, monkeypatch, capfd):
    """The Hopper backward reads the same D as the sm80 one: it must be the kernel that ran."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    capfd.readouterr()
    _check("emu90", dtype, name)
    log = [line for line in capfd.readouterr().err.splitlines() if "backward" in line]
    assert log and all("sm90a" in line for line in log), log


# ---------------------------------------------------------------------------------------------- packed
LENS_Q, LENS_K = [5, 0, 17, 9], [9, 4, 20, 0]


def _packed(dtype, Hq=4, Hkv=2, E=32, Ev=32, seed=11):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = torch.randn(tq, Hq, E, generator=g, dtype=f64).to(dtype)
    k = torch.randn(tk, Hkv, E, generator=g, dtype=f64).to(dtype)
    v = torch.randn(tk, Hkv, Ev, generator=g, dtype=f64).to(dtype)
    go = torch.randn(tq, Hq, Ev, generator=g, dtype=f64).to(dtype)
    c = torch.randn(Hq * tq, generator=g, dtype=f64)
    cu_q = torch.tensor([0] + list(torch.tensor(LENS_Q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(LENS_K).cumsum(0)), dtype=torch.int32)
    return q, k, v, go, c, cu_q, cu_k


@pytest.mark.parametrize("backend,dtype", [("cpu", f64), ("cpu", bf16), ("emu80", f32), ("emu80", bf16),
                                           ("emu90", bf16), pytest.param("cuda", bf16, marks=cuda_marks())])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(backend, dtype, causal, monkeypatch, capfd):
    """Packed sequences (empty ones included): each sequence's gradients are its own attention's, c read from
    the flat (Hq, L_b) blocks of the log-sum-exp; on the emulated H100, by the packed Hopper backward."""
    if backend.startswith("emu"):
        if not emu.LOADED:
            pytest.skip(emu.SKIP_REASON)
        monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", backend[3:])
        monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    the_ops = emu.ops if backend.startswith("emu") else ops
    q, k, v, go, c, cu_q, cu_k = _packed(dtype, E=64, Ev=64)
    Hq = q.shape[1]
    args = (0.0, causal, None, True, [-1, -1])
    dev = "cuda" if backend == "cuda" else "cpu"
    on = [t.to(dev) for t in (q, k, v, go)]
    out, lse, rng = the_ops._attention_varlen_forward(*on[:3], cu_q, cu_k, None, None, *args)
    dq, dk, dv = (t.cpu() for t in the_ops._attention_varlen_backward(on[3], *on[:3], cu_q, cu_k, out, lse, rng,
                                                                      *args, c.to(lse.device, lse.dtype)))
    for b in range(len(LENS_Q)):
        L, S = LENS_Q[b], LENS_K[b]
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        rows, keys = slice(q0, q0 + L), slice(k0, k0 + S)
        res = [r[2:] for r in sequence_reference(q, k, v, go, c[Hq * q0:Hq * (q0 + L)].view(Hq, L), rows, keys,
                                                 causal, dtype)]
        for what, ours, r, base in zip(("dq", "dk", "dv"), (dq[rows], dk[keys], dv[keys]), *res):
            assert_close_vs_baseline(f"{backend} sequence {b} {what}", ours.transpose(0, 1), r, base, dtype)
    if backend == "emu90":
        log = [line for line in capfd.readouterr().err.splitlines() if "varlen backward" in line]
        assert log and all("sm90a" in line and "packed sequences in one launch" in line for line in log), log


# ---------------------------------------------------------------------------------------------- head dim 0
@pytest.mark.parametrize("E,Ev", [(0, 16), (16, 0)])
def test_zero_head_dims(E, Ev):
    """E = 0 (every score 0: dq and dk empty, the lse gradient reaches only a float mask) and Ev = 0 (no
    output, so dq and dk come from c alone) take the ATen composite."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 6, E, generator=g, dtype=f64)
    k = torch.randn(2, 3, 7, E, generator=g, dtype=f64)
    v = torch.randn(2, 3, 7, Ev, generator=g, dtype=f64)
    mask = torch.randn(6, 7, generator=g, dtype=f64)
    go = torch.randn(2, 3, 6, Ev, generator=g, dtype=f64)
    c = torch.randn(2, 3, 6, generator=g, dtype=f64)
    out, lse, rng = ops._attention_forward(q, k, v, mask, 0.0, False, 0.5, False, [-1, -1])
    dq, dk, dv, dm = ops._attention_backward(go, q, k, v, mask, out, lse, rng, 0.0, False, 0.5, False, [-1, -1],
                                             True, c)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    o, l_ = formula(*leaves[:3], bias=leaves[3], scale=0.5)
    ref = torch.autograd.grad([o, l_], leaves, [go, c], allow_unused=True)
    for what, ours, r, t in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dm), ref, leaves):
        r = torch.zeros_like(t) if r is None else r
        assert ours.shape == r.shape and torch.allclose(ours, r, atol=1e-12, rtol=0), what
    assert c.abs().sum() > 0 and dm.abs().sum() > 0


@pytest.mark.parametrize("E,Ev", [(0, 16), (16, 0)])
def test_zero_head_dims_packed(E, Ev):
    """Packed sequences of head dim 0 run sequence by sequence through the dense backward: each sequence gets
    its own block of c."""
    g = torch.Generator().manual_seed(6)
    lens = [3, 0, 5]
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    q = torch.randn(8, 2, E, generator=g, dtype=f64)
    k = torch.randn(8, 2, E, generator=g, dtype=f64)
    v = torch.randn(8, 2, Ev, generator=g, dtype=f64)
    go = torch.randn(8, 2, Ev, generator=g, dtype=f64)
    c = torch.randn(16, generator=g, dtype=f64)
    out, lse, rng = ops._attention_varlen_forward(q, k, v, cu, cu, None, None, 0.0, True, 0.5, False, [-1, -1])
    dq, dk, dv = ops._attention_varlen_backward(go, q, k, v, cu, cu, out, lse, rng, 0.0, True, 0.5, False,
                                                [-1, -1], c)
    for b, L in enumerate(lens):
        r = slice(int(cu[b]), int(cu[b + 1]))
        leaves = [t[r].transpose(0, 1).clone().requires_grad_() for t in (q, k, v)]
        o, l_ = formula(*leaves, visible=window_visibility(L, L, True), scale=0.5)
        cb = c[2 * int(cu[b]):2 * int(cu[b + 1])].view(2, L)
        ref = torch.autograd.grad([o, l_], leaves, [go[r].transpose(0, 1), cb], allow_unused=True)
        for what, ours, rr, t in zip(("dq", "dk", "dv"), (dq[r], dk[r], dv[r]), ref, leaves):
            rr = torch.zeros_like(t) if rr is None else rr
            assert torch.allclose(ours.transpose(0, 1), rr, atol=1e-12, rtol=0), (b, what)
    assert (dq.abs().sum() > 0) == (E > 0 and Ev == 0)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_grad_logsumexp_raises_naming_it():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, lse, rng = ops._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    args = (q, k, v, None, out, lse, rng, 0.0, False, None, False, [-1, -1], False)
    with pytest.raises(ValueError, match=r"grad_logsumexp must have shape \[1, 2, 5\]"):
        ops._attention_backward(out, *args, torch.zeros(1, 2, 6))
    with pytest.raises(TypeError, match="grad_logsumexp must be Float .*got Double"):
        ops._attention_backward(out, *args, torch.zeros(1, 2, 5, dtype=f64))
    with torch.device("meta"):  # torch.compile's fake tensors raise the same
        mq, mk, mv, mo, ml = (t.to("meta") for t in (q, k, v, out, lse))
        with pytest.raises(ValueError, match="grad_logsumexp must have shape"):
            ops._attention_backward(mo, mq, mk, mv, None, mo, ml, rng.to("meta"), *args[7:], torch.zeros(2, 5))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    o, l_, r = ops._attention_varlen_forward(qp, kp, vp, cu, cu, None, None, 0.0, False, None, False, [-1, -1])
    with pytest.raises(ValueError, match=r"grad_logsumexp must have shape \[10\]"):
        ops._attention_varlen_backward(o, qp, kp, vp, cu, cu, o, l_, r, 0.0, False, None, False, [-1, -1],
                                       torch.zeros(2, 5))

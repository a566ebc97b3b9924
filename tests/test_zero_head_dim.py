"""The calls every backend takes in ATen operations (csrc/composite.h) rather than in its kernels.

A head dim of 0, which F.scaled_dot_product_attention accepts. E = 0 (query and key): every score is an empty
sum, 0, so the weights are the softmax of the mask and the band alone and the output is their average of V; its
gradients reach V and a float mask. Ev = 0: an empty output, while the log-sum-exp and the weights still come
from Q Kᵀ. No kernel has an instantiation for either.

float64 on CUDA, which PyTorch's SDPA takes on the GPU (its math backend; gradcheck there): the CUDA kernels have
no float64 instantiation, so the CUDA ops take it here, head dims above 0 included. The emulator's ops share the
CUDA ops' glue (csrc/cuda/ops_glue.h), so the emulated sm_80 and sm_90 devices run that very path on the CPU.

Every backend's ops take these calls after validating them and drawing the dropout state as for any other.
Checked on each backend (the CPU, the emulated sm_80 and sm_90 devices, a GPU) against the float64 reference,
with PyTorch's own SDPA in the same dtype as the yardstick of the error."""
import math

import pytest
import torch
import torch.nn.functional as F

import attention_ext
from conftest import cuda_marks, dtype_id, emu_marks
from reference import (ABS_FLOOR, assert_close_vs_baselines, dropout_keep_mask, reference_attention, reference_grads,
                       window_visibility)

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("emu80", id="emu80", marks=emu_marks()),
            pytest.param("emu90", id="emu90", marks=emu_marks()), pytest.param("cuda", id="cuda", marks=cuda_marks())]

# (name, batch dims, Hq, Hkv, L, S, options): every feature of the ops at once, a few ways
CASES = {
    "plain": ((2,), 3, 3, 7, 9, {}),
    "unbatched-causal-float-mask": ((), 2, 2, 9, 6, dict(is_causal=True, mask="float")),
    "gqa-bool-mask-window": ((2, 1), 4, 2, 8, 11, dict(enable_gqa=True, mask="bool", window=(2, 3))),
    "dropout-float-mask-scale": ((2,), 2, 1, 6, 10, dict(enable_gqa=True, mask="float", dropout_p=0.4, scale=-0.7)),
}


def _ops(backend, monkeypatch):
    import emu

    ops = emu.backend_ops(backend, monkeypatch)
    return ops, (emu.attention if backend.startswith("emu") else lambda *a: attention_ext.attention(*a))


def _inputs(case, E, Ev, dtype, device, seed):
    batch, hq, hkv, L, S, o = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = rn(*batch, hq, L, E), rn(*batch, hkv, S, E), rn(*batch, hkv, S, Ev)
    mask = None
    if o.get("mask") == "float":
        mask = (2 * rn(L, S)).requires_grad_()
        with torch.no_grad():
            mask[1, :] = -math.inf  # a row that sees no key: 0 and zero gradient
            mask[2, 3] = -math.inf
    elif o.get("mask") == "bool":
        mask = torch.rand(hq, 1, S, generator=g) < 0.6
        mask[0, 0, :] = False
        mask = mask.to(device)
    return q, k, v, mask, o


ZERO_DIMS = [(0, 24), (16, 0), (0, 0)]


def _grid(zero_dims):
    """(backend, dtype, (E, Ev)): head dims of 0 on every backend and dtype, and float64 with head dims above 0
    on the CUDA ops (emulated or not), which the CPU runs in its float64 kernels instead."""
    params = []
    for b in BACKENDS:
        for dt in (f32, f16, bf16, f64):
            dims = zero_dims + ([(24, 16)] if dt == f64 and b.values[0] != "cpu" else [])
            params += [pytest.param(b.values[0], dt, d, id=f"{b.id}-{dtype_id(dt)}-E{d[0]}-Ev{d[1]}", marks=b.marks)
                       for d in dims]
    return params


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype,dims", _grid(ZERO_DIMS))
def test_zero_head_dim(backend, dtype, case, dims, monkeypatch):
    device = "cuda" if backend == "cuda" else "cpu"
    ops, attn = _ops(backend, monkeypatch)
    E, Ev = dims
    with attention_ext.debug.kernel_log() as lines:
        _check_dense(backend, dtype, case, E, Ev, device, ops, attn)
    _check_log(backend, E, Ev, lines)


def _check_log(backend, E, Ev, lines):
    """The CUDA ops' forward and backward (emulated or not) took the call in ATen operations, saying why."""
    if backend != "cpu":
        why = "head dim 0" if E * Ev == 0 else "float64"
        assert any(ln.endswith(f"forward: {why}, in ATen operations") for ln in lines), lines
        assert any(ln.endswith(f"backward: {why}, in ATen operations") for ln in lines), lines


def _check_dense(backend, dtype, case, E, Ev, device, ops, attn):
    q, k, v, mask, o = _inputs(case, E, Ev, dtype, device, seed=len(case) + 7 * E + Ev)
    p, causal, scale = o.get("dropout_p", 0.0), o.get("is_causal", False), o.get("scale")
    gqa = o.get("enable_gqa", False)
    window = list(o.get("window", (-1, -1)))
    mask_grad = mask is not None and mask.requires_grad

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = attn(*leaves, mask, p, causal, scale, gqa, window)
    do = torch.randn(out.shape, dtype=f64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves + ([mask] if mask_grad else []), do)
    assert out.shape == (*q.shape[:-1], Ev) and out.dtype == dtype

    keep = None
    if p > 0:  # the forward's dropout mask, replayed
        torch.manual_seed(11)
        _, _, rng = ops._attention_forward(q, k, v, mask, p, causal, scale, gqa, window)
        keep = dropout_keep_mask(rng.cpu(), q, k.shape[-2], p).to(device)
    kw = dict(is_causal=causal, scale=scale, enable_gqa=gqa, window_size=window, dropout_p=p, dropout_mask=keep)
    ref_out, ref_lse, *ref_grads = reference_grads(q, k, v, do, mask, mask_requires_grad=mask_grad, **kw)

    # PyTorch's SDPA in the same dtype (its math path, on the CPU; rows that see no key give NaN there and set
    # no tolerance), with the same dropout mask and the band as a boolean mask
    bl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    band = window_visibility(q.shape[-2], k.shape[-2], causal, window)
    bmask = None if mask is None else mask.detach().cpu().requires_grad_(mask_grad)
    smask = band.cpu() if mask is None else (
        (band.cpu() & bmask) if bmask.dtype == torch.bool else bmask.to(dtype).masked_fill(~band.cpu(), -math.inf))
    b_out = torch.ops.aten._scaled_dot_product_attention_math(
        *bl, attn_mask=smask, dropout_p=p, dropout_mask=None if keep is None else keep.cpu(), scale=scale,
        enable_gqa=gqa)[0]
    b_grads = torch.autograd.grad(b_out, bl + ([bmask] if mask_grad else []), do.cpu(), allow_unused=True)

    names = ("out", "dq", "dk", "dv", "dmask")
    for name, ours, ref, base in zip(names, (out, *grads), (ref_out, *ref_grads), (b_out, *b_grads)):
        if base is None:  # PyTorch's graph has no path to it (an empty output): the gradient is 0
            base = torch.zeros_like(ref)
        assert ours.shape == ref.shape and ours.dtype == (mask.dtype if name == "dmask" else dtype), name
        assert_close_vs_baselines(f"{name} ({backend}, {case}, E={E}, Ev={Ev})", ours, ref, [base], dtype)
    if Ev == 0:  # nothing flows back through an empty output
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))

    # the log-sum-exp and the weights (per head, and their mean over the heads), with the same dropout draw
    torch.manual_seed(11)
    _, lse, rng, w = ops._attention_forward_weights(q, k, v, mask, p, causal, scale, gqa, window, False)
    assert lse.dtype == (f64 if dtype == f64 else f32)
    assert_close_vs_baselines("logsumexp", lse, ref_lse, [], dtype, floor=4 * ABS_FLOOR[f32])
    r = reference_attention(q, k, v, mask, **kw)
    base = _torch_weights(q, k, smask, keep, p, scale, gqa)  # as nn.MultiheadAttention computes its weights
    assert_close_vs_baselines("weights", w, r.probs_dropped, [base], dtype)
    torch.manual_seed(11)
    *_, w_mean = ops._attention_forward_weights(q, k, v, mask, p, causal, scale, gqa, window, True)
    assert_close_vs_baselines("head-mean weights", w_mean, r.probs_dropped.mean(-3), [base.float().mean(-3).to(dtype)],
                              dtype)
    probs = ops.attention_probs(q, k, mask, lse, rng, p, causal, scale, gqa, window)
    assert_close_vs_baselines("attention_probs", probs, r.probs_dropped, [base], dtype)


def _torch_weights(q, k, smask, keep, p, scale, gqa):
    """PyTorch's way to the weights: the softmax of float32 scores (rows that see no key 0), dropped and scaled
    like the output, rounded to the dtype."""
    kk = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) if gqa else k
    sc = scale if scale is not None else (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0)
    s = (q.float() @ kk.float().transpose(-1, -2)).cpu() * sc
    s = s.masked_fill(~smask, -math.inf) if smask.dtype == torch.bool else s + smask.detach().float()
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if keep is not None:
        w = w * keep.cpu() / (1.0 - p)
    return w.to(q.dtype)

def test_zero_head_dim_gradcheck():
    """float64 gradcheck and gradgradcheck of the op with E = 0 (gradients reach V and the float mask) and with
    Ev = 0, through the fused ops' path and the ATen composite of the double backward."""
    g = torch.Generator().manual_seed(3)
    for E, Ev in ((0, 5), (4, 0)):
        q = torch.randn(2, 4, 6, E, dtype=f64, generator=g, requires_grad=True)
        k = torch.randn(2, 2, 7, E, dtype=f64, generator=g, requires_grad=True)
        v = torch.randn(2, 2, 7, Ev, dtype=f64, generator=g, requires_grad=True)
        m = torch.randn(6, 7, dtype=f64, generator=g, requires_grad=True)

        def fn(q, k, v, m):
            return attention_ext.attention(q, k, v, m, is_causal=True, enable_gqa=True, window_size=(3, -1))

        assert torch.autograd.gradcheck(fn, (q, k, v, m))
        assert torch.autograd.gradgradcheck(fn, (q, k, v, m))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_float64_on_cuda_autograd(device):
    """float64 on the GPU as PyTorch's SDPA takes it there: gradcheck and gradgradcheck of attention_ext.attention
    (GQA, a float mask with its gradient, causal with a window, dropout replayed), the same values as the CPU's
    float64 kernels, and the drop-in module against torch.nn.MultiheadAttention."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 6, 8, dtype=f64, generator=g).to(device).requires_grad_()
    k = torch.randn(2, 2, 7, 8, dtype=f64, generator=g).to(device).requires_grad_()
    v = torch.randn(2, 2, 7, 5, dtype=f64, generator=g).to(device).requires_grad_()
    m = torch.randn(6, 7, dtype=f64, generator=g).to(device).requires_grad_()

    def fn(q, k, v, m):
        return attention_ext.attention(q, k, v, m, is_causal=True, enable_gqa=True, window_size=(3, -1))

    assert torch.autograd.gradcheck(fn, (q, k, v, m))
    assert torch.autograd.gradgradcheck(fn, (q, k, v, m))
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v, m)]
    out, out_cpu = fn(q, k, v, m), fn(*cpu)
    torch.testing.assert_close(out.cpu(), out_cpu, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (q, k, v, m), torch.ones_like(out))
    grads_cpu = torch.autograd.grad(out_cpu, cpu, torch.ones_like(out_cpu))
    for a, b in zip(grads, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-11)

    def dropped(q, k, v):  # the same seed, the same mask: gradcheck sees one function
        torch.manual_seed(7)
        return attention_ext.attention(q, k, v, dropout_p=0.3, enable_gqa=True)

    assert torch.autograd.gradcheck(dropped, (q, k, v))

    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=f64, device=device)
    ours = attention_ext.MultiheadAttention(16, 4, batch_first=True, dtype=f64, device=device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, 16, dtype=f64, device=device)
    o_ref, w_ref = ref(x, x, x, need_weights=True)
    o, w = ours(x, x, x, need_weights=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)


def test_zero_head_dim_dropin_and_module_paths():
    """The SDPA drop-in runs E = 0 on the op (no longer handed to PyTorch) and matches SDPA; torch.compile traces
    it (the Meta kernels take E = 0)."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(3, 5, 0, generator=g), torch.randn(3, 8, 0, generator=g)
    v = torch.randn(3, 8, 6, generator=g)
    mask = torch.randn(5, 8, generator=g)
    ours = attention_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours, torch.softmax(mask, -1) @ v, rtol=2e-6, atol=2e-6)
    compiled = torch.compile(lambda q, k, v, m: attention_ext.attention(q, k, v, m), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), ours, rtol=0, atol=0)


# packed sequences (lengths from 0; keys per sequence differ) for attention_varlen
VARLEN_Q, VARLEN_K = [3, 0, 7, 5], [4, 6, 0, 9]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("backend,dtype,dims", _grid(ZERO_DIMS))
def test_zero_head_dim_varlen(backend, dtype, dims, dropout_p, monkeypatch):
    """attention_varlen takes a head dim of 0 too (and the CUDA ops float64), sequence by sequence through the
    dense op (each sequence's
    dropout draw its own row of the rng_state): output, log-sum-exp and gradients of every sequence against the
    float64 reference of that sequence alone (GQA, causal with a window; sequences of no query or no key), with
    PyTorch's SDPA per sequence in the same dtype as the yardstick."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops, _ = _ops(backend, monkeypatch)
    E, Ev = dims
    hq, hkv, causal, window, scale = 4, 2, True, [3, -1], 0.6
    g = torch.Generator().manual_seed(13 + E + Ev)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64).to(device=device, dtype=dtype)  # noqa: E731
    tq, tk = sum(VARLEN_Q), sum(VARLEN_K)
    q, k, v, do = rn(tq, hq, E), rn(tk, hkv, E), rn(tk, hkv, Ev), rn(tq, hq, Ev)
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(VARLEN_Q), cu(VARLEN_K)
    args = (dropout_p, causal, scale, True, window)
    with attention_ext.debug.kernel_log() as lines:
        out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, *args)
        dq, dk, dv = ops._attention_varlen_backward(do, q, k, v, cu_q, cu_k, out, lse, rng, *args)
    _check_log(backend, E, Ev, lines)  # sequence by sequence through the dense ops
    assert out.shape == (tq, hq, Ev) and lse.shape == (hq * tq,) and rng.shape == (len(VARLEN_Q), 2)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)

    heads = lambda t, start, n: t[start:start + n].transpose(0, 1)  # noqa: E731  (heads, rows, dim)
    for b, (L, S) in enumerate(zip(VARLEN_Q, VARLEN_K)):
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        qb, kb, vb, dob = heads(q, q0, L), heads(k, k0, S), heads(v, k0, S), heads(do, q0, L)
        p_b = dropout_p if L * S else 0.0  # (a sequence without queries or keys draws nothing)
        keep = dropout_keep_mask(rng[b].cpu(), qb, S, p_b).to(device) if p_b > 0 else None
        kw = dict(is_causal=causal, scale=scale, enable_gqa=True, window_size=window, dropout_p=p_b, dropout_mask=keep)
        ref_out, ref_lse, ref_dq, ref_dk, ref_dv, _ = reference_grads(qb, kb, vb, dob, None, **kw)
        bl = [t.detach().cpu().requires_grad_() for t in (qb, kb, vb)]
        band = window_visibility(L, S, causal, window)
        b_out = torch.ops.aten._scaled_dot_product_attention_math(
            *bl, attn_mask=band, dropout_p=p_b, dropout_mask=None if keep is None else keep.cpu(), scale=scale,
            enable_gqa=True)[0]
        b_grads = torch.autograd.grad(b_out, bl, dob.cpu(), allow_unused=True) if b_out.numel() else (None,) * 3
        ours = (heads(out, q0, L), heads(dq, q0, L), heads(dk, k0, S), heads(dv, k0, S))
        for name, o, r, base in zip(("out", "dq", "dk", "dv"), ours, (ref_out, ref_dq, ref_dk, ref_dv),
                                    (b_out, *b_grads)):
            base = torch.zeros_like(r) if base is None else base
            assert_close_vs_baselines(f"varlen {name} ({backend}, sequence {b}, E={E}, Ev={Ev})", o, r, [base], dtype)
        ours_lse = lse[hq * q0:hq * (q0 + L)].view(hq, L)
        assert_close_vs_baselines(f"varlen logsumexp (sequence {b})", ours_lse, ref_lse, [], dtype,
                                  floor=4 * ABS_FLOOR[f32])


def test_zero_head_dim_varlen_autograd_and_compile():
    """attention_varlen with E = 0 through autograd (float64 gradcheck: the gradients reach V) and torch.compile
    (the Meta kernels take it)."""
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    q = torch.randn(7, 2, 0, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(7, 1, 0, dtype=f64, generator=g, requires_grad=True)
    v = torch.randn(7, 1, 3, dtype=f64, generator=g, requires_grad=True)

    def fn(q, k, v):
        return attention_ext.attention_varlen(q, k, v, cu, cu, is_causal=True, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    # E = 0, causal: query i of a sequence averages the values of its keys 0..i
    for s0, s1 in ((0, 2), (2, 7)):
        vv = v[s0:s1, 0].detach()
        want = vv.cumsum(0) / torch.arange(1, s1 - s0 + 1, dtype=f64)[:, None]
        torch.testing.assert_close(out[s0:s1].detach(), want[:, None].expand(-1, 2, -1), rtol=1e-12, atol=1e-12)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), out, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("dims", [(0, 5), (3, 0)], ids=lambda d: f"E{d[0]}-Ev{d[1]}")
def test_zero_head_dim_nested_tensors(dims):
    """The SDPA drop-in takes jagged nested tensors of head dim 0 on attention_varlen, where PyTorch's own SDPA
    raises ("to_padded_tensor: at least one constituent tensor should have non-zero numel"): every sequence's
    output and its gradients against SDPA on that sequence alone (dense tensors, which SDPA takes)."""
    E, Ev = dims
    g = torch.Generator().manual_seed(9)
    lens = (3, 6, 1)
    qs = [torch.randn(n, 4, E, dtype=f64, generator=g) for n in lens]
    ks = [torch.randn(n + 2, 2, E, dtype=f64, generator=g) for n in lens]
    vs = [torch.randn(n + 2, 2, Ev, dtype=f64, generator=g) for n in lens]
    nest = lambda ts: torch.nested.nested_tensor(ts, layout=torch.jagged, requires_grad=True)  # noqa: E731
    q, k, v = nest(qs), nest(ks), nest(vs)
    out = attention_ext.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True).transpose(1, 2)
    assert out.is_nested and out.values().shape == (sum(lens), 4, Ev)
    go = torch.randn(out.values().shape, dtype=f64, generator=g)
    if Ev:
        grads = torch.autograd.grad(out.values(), [q, k, v], go)
        grads = [t.unbind() for t in grads]
    row = 0
    for b, n in enumerate(lens):
        qb, kb, vb = (t[b].transpose(0, 1).clone().requires_grad_() for t in (qs, ks, vs))
        ref = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out.unbind()[b].transpose(0, 1), ref, rtol=1e-12, atol=1e-12)
        if Ev:
            ref_grads = torch.autograd.grad(ref, [qb, kb, vb], go[row:row + n].transpose(0, 1))
            for ours, want in zip((gr[b] for gr in grads), ref_grads):
                torch.testing.assert_close(ours.transpose(0, 1), want, rtol=1e-12, atol=1e-12)
        row += n

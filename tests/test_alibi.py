"""ALiBi (attention with linear biases; FlashAttention's ``alibi_slopes``): float32 slopes m of shape (heads,) or
(..., heads) add -m_h * |i + S - L - j| to the score of query i and key j, after the soft cap and before the mask
(the queries are the last L of the S key positions); packed sequences take (heads,) or (batch, heads), each
sequence with its own distances.

Fused in the CPU kernels (forward, backward, the weights), the sm80 CUDA kernels (forward, backward, the weights
kernel) and the Hopper kernels (not their packed variants: on CUDA, packed sequences with ALiBi run sequence by
sequence), with a soft cap, float masks and their gradient, and dropout alike (the kernel log says which kernels
ran). Checked against a float64 reference written here, with PyTorch's way -- SDPA in the same dtype with the bias
as a float mask, as Hugging Face's ALiBi models call it, and the eager formula -- as the yardstick of the error;
gradcheck and gradgradcheck in float64; packed and nested sequences, return_lse and sinks, vmap, torch.compile,
opcheck, autocast and the errors."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import attention_ext
from conftest import cuda_marks, dtype_id, emu_marks
from emu import backend_ops
from reference import ABS_FLOOR, assert_close_vs_baselines, dropout_keep_mask, window_visibility

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# (batch dims, Hq, Hkv, L, S, E, Ev, options)
CASES = {
    # BLOOM-like: causal self-attention, one slope per head, GQA, a float mask with its gradient
    "causal-gqa-float-mask": ((2,), 4, 2, 37, 37, 64, 64, dict(is_causal=True, mask="float")),
    # a decoding-like block: 5 queries at the end of 70 keys, slopes per (batch, head), key padding, a window,
    # dropout
    "tail-queries-keypad-dropout": ((2,), 2, 2, 5, 70, 32, 48, dict(mask="bool", window=(30, -1), dropout_p=0.3,
                                                                    per_batch=True)),
    # more queries than keys (negative offset), soft cap, no batch dims
    "L-gt-S-softcap": ((), 3, 3, 40, 25, 16, 16, dict(cap=3.0, scale=0.5)),
    # a soft cap with dropout; and with a float mask's gradient too (the CUDA backward caps before both)
    "softcap-dropout": ((2,), 2, 2, 20, 30, 32, 32, dict(cap=3.0, dropout_p=0.3)),
    "softcap-float-mask-dropout": ((2,), 4, 2, 37, 37, 32, 32, dict(cap=3.0, mask="float", dropout_p=0.3,
                                                                    is_causal=True)),
    # MQA with key padding, head dim 128: what the Hopper kernels take without ALiBi
    "keypad-mqa-d128": ((2,), 4, 1, 50, 64, 128, 128, dict(mask="bool")),
    # one decoding step of a GQA model, slopes per (batch, head): on CUDA the query heads are not packed into the
    # rows of their key / value head as without ALiBi (each row's slope and distance are its own)
    "decode-gqa": ((2,), 8, 2, 1, 90, 64, 64, dict(per_batch=True)),
}
BACKEND_DTYPES = (
    [pytest.param("cpu", dt, id=f"cpu-{dtype_id(dt)}") for dt in (f32, bf16, f16, f64)]
    + [pytest.param("emu80", dt, id=f"emu80-{dtype_id(dt)}", marks=emu_marks()) for dt in (f32, f16, bf16)]
    + [pytest.param("emu90", dt, id=f"emu90-{dtype_id(dt)}", marks=emu_marks()) for dt in (bf16,)]
    + [pytest.param("cuda", dt, id=f"cuda-{dtype_id(dt)}", marks=cuda_marks()) for dt in (f32, f16, bf16)]
)


def slopes(heads):
    """The ALiBi paper's slopes as BLOOM builds them: 2^(-8 h / n) for h = 1..n, n the largest power of two up to
    heads, then 2^(-4 h / n) for odd h for the heads beyond."""
    n = 2 ** int(math.log2(heads))
    base = [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    base += [2.0 ** (-4.0 * h / n) for h in range(1, 2 * (heads - n), 2)]
    return torch.tensor(base, dtype=f32)


def alibi_bias(m, L, S, dtype=f64, device="cpu"):
    """-m |i + S - L - j| as (..., heads, L, S) from slopes (..., heads)."""
    i = torch.arange(S - L, S, device=device, dtype=f64)[:, None]
    j = torch.arange(S, device=device, dtype=f64)[None, :]
    return (-(m.to(device=device, dtype=f64)[..., None, None]) * (i - j).abs()).to(dtype)


def masked_scores(q, k, mask, m, cap=0.0, is_causal=False, scale=None, window=(-1, -1)):
    """In q's dtype: the scaled scores, soft-capped, the ALiBi bias and a float mask added, -inf where the band or
    a boolean mask hides the key (k's heads repeated for GQA)."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * sc
    if cap > 0:
        s = torch.tanh(s / cap) * cap
    L, S = s.shape[-2:]
    s = s + alibi_bias(m, L, S, q.dtype, s.device)
    vis = window_visibility(L, S, is_causal, window, s.device)
    if mask is not None and mask.dtype == torch.bool:
        vis = vis & mask
    elif mask is not None:
        s = s + mask.to(q.dtype)
    return s.masked_fill(~vis, -math.inf)


def _values(v, heads):
    return v.repeat_interleave(heads // v.shape[-3], dim=-3) if v.shape[-3] != heads else v


def reference(q, k, v, mask, m, cap=0.0, is_causal=False, scale=None, window=(-1, -1), keep=None, p=0.0):
    """float64 (out, lse, weights), differentiable; a row that sees no key gives 0 and lse -inf."""
    q, k, v = q.to(f64), k.to(f64), v.to(f64)
    s = masked_scores(q, k, mask, m, cap, is_causal, scale, window)
    seen = (s != -math.inf).any(-1, keepdim=True)
    s = torch.where(seen, s, torch.zeros((), dtype=f64))
    lse = torch.where(seen.squeeze(-1), torch.logsumexp(s, -1), torch.full((), -math.inf, dtype=f64))
    w = torch.softmax(s, -1) * seen
    wd = w if keep is None else w * keep / (1 - p)
    return wd @ _values(v, q.shape[-3]), lse, wd


def sdpa_baseline(q, k, v, mask, m, is_causal=False, scale=None, window=(-1, -1)):
    """PyTorch's way in q's dtype on the CPU: SDPA with the ALiBi bias (in q's dtype) as its float mask, the band
    and a boolean mask folded in as -inf; rows that see no key 0. None with a soft cap (SDPA has none)."""
    L, S = q.shape[-2], k.shape[-2]
    bias = alibi_bias(m, L, S, q.dtype)
    vis = window_visibility(L, S, is_causal, window, "cpu")
    if mask is not None and mask.dtype == torch.bool:
        vis = vis & mask
    elif mask is not None:
        bias = bias + mask
    bias = bias.masked_fill(~vis, -math.inf)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=k.shape[-3] != q.shape[-3])
    return out.nan_to_num(0.0)


def eager_baseline(q, k, v, mask, m, cap=0.0, is_causal=False, scale=None, window=(-1, -1), keep=None, p=0.0):
    """PyTorch's eager way in q's dtype on the CPU, as BLOOM's eager attention computes it: scores, cap and bias
    in q's dtype, softmax in float32 (rows that see no key 0); (out, weights), differentiable."""
    s = masked_scores(q, k, mask, m, cap, is_causal, scale, window)
    w = torch.softmax(s, -1, dtype=f32).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        w = w * keep / (1 - p)
    return w @ _values(v, q.shape[-3]), w


def _inputs(case, dtype, device, seed):
    batch, hq, hkv, L, S, E, Ev, o = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    q, k, v = rn(*batch, hq, L, E), rn(*batch, hkv, S, E), rn(*batch, hkv, S, Ev)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    m = slopes(hq) * 4  # steep: the bias spans tens of units over the keys
    if o.get("per_batch"):
        m = m * (1 + torch.rand(*batch, hq, generator=g))
    mask = None
    if o.get("mask") == "float":
        mm = 2 * rn(L, S)
        mm[3, :] = -math.inf  # a row that sees no key
        mm[5, 2] = -math.inf
        mask = mm.to(device=device, dtype=dtype).requires_grad_()
    elif o.get("mask") == "bool":
        mm = torch.rand(*batch, 1, 1, S, generator=g) < 0.8
        mm[0, ..., 40:] = False
        mask = mm.to(device)
    return q, k, v, mask, m.to(device), o


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_alibi_ops_vs_reference(backend, dtype, case, monkeypatch):
    """Output, log-sum-exp, gradients (a float mask's too) and the attention weights of the forward and backward
    ops against the float64 reference, within 2x the error of SDPA with the bias as a float mask in the same
    dtype. Every call runs the kernels the same call without ALiBi runs (kernel log; on sm_90 the Hopper ones where
    they apply)."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    q, k, v, mask, m, o = _inputs(case, dtype, device, seed=len(case) + len(backend))
    cap, p, causal, scale = o.get("cap", 0.0), o.get("dropout_p", 0.0), o.get("is_causal", False), o.get("scale")
    window, gqa = list(o.get("window", (-1, -1))), q.shape[-3] != k.shape[-3]
    mask_grad = mask is not None and mask.is_floating_point()
    args = (p, causal, scale, gqa, window)
    with attention_ext.debug.kernel_log() as lines:
        torch.manual_seed(3)
        out, lse, rng = ops._attention_forward(q, k, v, mask, *args, cap, m)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=f64).to(device, dtype)
        dq, dk, dv, dm = ops._attention_backward(do, q, k, v, mask, out, lse, rng, *args, mask_grad, None, cap, m)
    with attention_ext.debug.kernel_log() as plain_lines:  # the same calls without ALiBi
        o0, lse0, rng0 = ops._attention_forward(q, k, v, mask, *args, cap)
        ops._attention_backward(do, q, k, v, mask, o0, lse0, rng0, *args, mask_grad, None, cap)
    assert len(lines) == 2 and not any("ATen operations" in line for line in lines), lines
    # (decoding with GQA: the same kernel, its query heads not packed)
    assert lines[0] == re.sub(r", GQA heads packed \d+ per CTA", "", plain_lines[0]), (lines, plain_lines)
    if backend.startswith("emu") and case == "decode-gqa":
        assert "GQA heads packed 4 per CTA" in plain_lines[0], plain_lines
    assert lines[1] == plain_lines[1], (lines, plain_lines)
    if backend == "emu90" and case == "keypad-mqa-d128":  # the Hopper kernels take ALiBi
        assert all("sm90a wgmma" in line for line in lines), lines

    keep = dropout_keep_mask(rng.cpu(), q, k.shape[-2], p).to(device) if p > 0 else None
    kw = dict(cap=cap, is_causal=causal, scale=scale, window=window, keep=keep, p=p)
    leaves = [t.detach().to(f64).requires_grad_() for t in (q, k, v)]
    m64 = None if mask is None else (mask.detach().to(f64).requires_grad_(mask_grad) if mask_grad else mask)
    r_out, r_lse, r_w = reference(*leaves, m64, m, **kw)
    r_grads = torch.autograd.grad(r_out, leaves + ([m64] if mask_grad else []), do.to(f64))
    bl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    bm = None if mask is None else (mask.detach().cpu().requires_grad_() if mask_grad else mask.cpu())
    b_out, b_w = eager_baseline(*bl, bm, m.cpu(), **{**kw, "keep": None if keep is None else keep.cpu()})
    bases = [(b_out, *torch.autograd.grad(b_out, bl + ([bm] if mask_grad else []), do.cpu()))]
    if cap == 0 and p == 0:  # SDPA takes the bias as a float mask
        s_out = sdpa_baseline(*bl, bm, m.cpu(), is_causal=causal, scale=scale, window=window)
        bases.append((s_out, *torch.autograd.grad(s_out, bl + ([bm] if mask_grad else []), do.cpu())))
    names = ("out", "dq", "dk", "dv", "dmask")
    for t, (name, ours, ref) in enumerate(zip(names, (out, dq, dk, dv) + ((dm,) if mask_grad else ()),
                                              (r_out, *r_grads))):
        assert_close_vs_baselines(f"{name} ({backend}, {case})", ours, ref, [b[t] for b in bases], dtype)
    assert_close_vs_baselines("logsumexp", lse, r_lse, [], dtype, floor=4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64)))

    torch.manual_seed(3)  # the same dropout draw as above
    _, _, _, w = ops._attention_forward_weights(q, k, v, mask, *args, False, cap, m)
    assert_close_vs_baselines("weights", w, r_w, [b_w.detach()], dtype)
    probs = ops.attention_probs(q, k, mask, lse, rng, *args, cap, m)
    assert_close_vs_baselines("attention_probs", probs, r_w, [b_w.detach()], dtype)


VARLEN_BACKENDS = [pytest.param("cpu", f32, id="cpu-f32"), pytest.param("cpu", bf16, id="cpu-bf16"),
                   pytest.param("emu80", f16, id="emu80-f16", marks=emu_marks()),
                   pytest.param("emu90", bf16, id="emu90-bf16", marks=emu_marks()),
                   pytest.param("cuda", bf16, id="cuda-bf16", marks=cuda_marks())]


@pytest.mark.parametrize("per_seq", [False, True], ids=["slopes-heads", "slopes-batch-heads"])
@pytest.mark.parametrize("backend,dtype", VARLEN_BACKENDS)
def test_alibi_varlen(backend, dtype, per_seq, monkeypatch):
    """Packed sequences with ALiBi (slopes (heads,) or one row per sequence; GQA, causal, an empty sequence and
    one without keys): each sequence's output, log-sum-exp and gradients against the float64 reference of that
    sequence alone (its own distances: i + S_b - L_b - j), within 2x PyTorch's eager error."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    g = torch.Generator().manual_seed(41)
    lq, lk = [9, 0, 30, 5, 17], [9, 4, 41, 0, 17]
    Hq, Hkv, E = 4, 2, 32
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lq), Hq, E, generator=g, dtype=f64).to(device, dtype)
    k = torch.randn(sum(lk), Hkv, E, generator=g, dtype=f64).to(device, dtype)
    v = torch.randn(sum(lk), Hkv, E, generator=g, dtype=f64).to(device, dtype)
    do = torch.randn(sum(lq), Hq, E, generator=g, dtype=f64).to(device, dtype)
    m = (slopes(Hq) * 3 * (1 + torch.rand(len(lq), Hq, generator=g)) if per_seq else slopes(Hq) * 3).to(device)
    args = (None, None, 0.0, True, None, True, [-1, -1], 0.0, m)
    with attention_ext.debug.kernel_log() as lines:
        out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, *args)
        dq, dk, dv = ops._attention_varlen_backward(do, q, k, v, cu_q, cu_k, out, lse, rng, *args[2:7], None,
                                                    0.0, m)
    assert not any("ATen operations" in line for line in lines), lines
    for b in range(len(lq)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lq[b] == 0:
            continue
        mb = m[b] if per_seq else m
        leaves = [t[r].transpose(0, 1).detach().to(f64).requires_grad_() for t, r in ((q, rows), (k, keys), (v, keys))]
        r_out, r_lse, _ = reference(*leaves, None, mb.cpu(), is_causal=True)
        gout = do[rows].transpose(0, 1).to(f64)
        if lk[b] == 0:  # no key: output 0, lse -inf, no gradient
            assert torch.equal(out[rows].cpu(), torch.zeros_like(out[rows].cpu()))
            assert torch.equal(dq[rows].cpu(), torch.zeros_like(dq[rows].cpu()))
            continue
        r_grads = torch.autograd.grad(r_out, leaves, gout.cpu())
        bl = [t.detach().cpu().to(dtype).requires_grad_() for t in leaves]
        b_out, _ = eager_baseline(*bl, None, mb.cpu(), is_causal=True)
        b_grads = torch.autograd.grad(b_out, bl, gout.cpu().to(dtype))
        ours = [out[rows], dq[rows], dk[keys], dv[keys]]
        for name, o, r, base in zip(("out", "dq", "dk", "dv"), ours, (r_out, *r_grads), (b_out, *b_grads)):
            assert_close_vs_baselines(f"{name} of sequence {b}", o.transpose(0, 1), r, [base], dtype)
        lse_b = lse[Hq * cu_q[b]: Hq * cu_q[b + 1]].view(Hq, lq[b])
        assert_close_vs_baselines(f"lse of sequence {b}", lse_b, r_lse, [], dtype, floor=16 * ABS_FLOOR[f32])


def test_alibi_nested_and_packed_lse():
    """Nested (jagged) tensors with per-sequence slopes equal the dense op on each sequence; attention_varlen's
    return_lse with ALiBi equals the dense log-sum-exp."""
    g = torch.Generator().manual_seed(43)
    lens = [6, 11, 3]
    seqs = [[torch.randn(4, n, 16, generator=g, dtype=f64) for n in lens] for _ in range(3)]
    m = torch.rand(3, 4, generator=g)
    nested = [torch.nested.nested_tensor([s.transpose(0, 1) for s in t], layout=torch.jagged).transpose(1, 2)
              for t in seqs]
    out = attention_ext.attention(*nested, is_causal=True, alibi_slopes=m)
    for b, o in enumerate(out.unbind()):
        want = attention_ext.attention(seqs[0][b], seqs[1][b], seqs[2][b], is_causal=True, alibi_slopes=m[b])
        torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    packed = [torch.cat([s.transpose(0, 1) for s in t]) for t in seqs]
    cu = torch.tensor([0, 6, 17, 20], dtype=torch.int32)
    o, lse = attention_ext.attention_varlen(*packed, cu, cu, is_causal=True, alibi_slopes=m, return_lse=True)
    for b in range(3):
        _, want = attention_ext.attention(seqs[0][b], seqs[1][b], seqs[2][b], is_causal=True, alibi_slopes=m[b],
                                          return_lse=True)
        torch.testing.assert_close(lse[cu[b]:cu[b + 1]].transpose(0, 1), want, rtol=1e-12, atol=1e-12)


def test_alibi_matches_sdpa_with_the_bias():
    """In float64 the op equals SDPA given the bias as a float mask, forward and backward (slopes (heads,) and
    (batch, heads), causal, GQA, L < S); zero slopes are plain attention bit for bit."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 9, 16, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 13, 16, dtype=f64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 13, 8, dtype=f64, generator=g, requires_grad=True)
    for m in (slopes(4), slopes(4) * torch.tensor([[1.0], [3.0]])):
        ours = attention_ext.attention(q, k, v, enable_gqa=True, alibi_slopes=m)
        bias = alibi_bias(m, 9, 13)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        go = torch.randn_like(ours)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), go), torch.autograd.grad(theirs, (q, k, v), go)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    plain = attention_ext.attention(q, k, v, enable_gqa=True, is_causal=True)
    assert torch.equal(attention_ext.attention(q, k, v, enable_gqa=True, is_causal=True, alibi_slopes=torch.zeros(4)),
                       plain)


def test_alibi_decoding_continues_the_prompt():
    """The last query row of a causal prompt and the same query decoded alone against the whole cache (L = 1) see
    the same distances: the same output."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 4, 33, 32, generator=g) for _ in range(3))
    m = slopes(4)
    full = attention_ext.attention(q, k, v, is_causal=True, alibi_slopes=m)
    step = attention_ext.attention(q[..., -1:, :], k, v, alibi_slopes=m)
    torch.testing.assert_close(step, full[..., -1:, :], rtol=1e-5, atol=1e-6)


def test_alibi_return_lse_and_sinks():
    """return_lse and attention sinks with ALiBi: the output and the log-sum-exp (sinks: the row's whole
    denominator) and their gradients, the lse's included, against the float64 reference; and the lse merges two
    halves of the keys into the whole (the bias counts each key's own distance)."""
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, 4, 7, 8, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, dtype=f64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 12, 8, dtype=f64, generator=g, requires_grad=True)
    m, sinks = slopes(4), torch.randn(4, dtype=f64, generator=g)
    go, gl = torch.randn(2, 4, 7, 8, dtype=f64, generator=g), torch.randn(2, 4, 7, dtype=f64, generator=g)
    for sk in (None, sinks):
        out, lse = attention_ext.attention(q, k, v, is_causal=True, enable_gqa=True, alibi_slopes=m, sinks=sk,
                                           return_lse=True)
        r_out, r_lse, _ = reference(q, k, v, None, m, is_causal=True)
        if sk is not None:
            r_tot = torch.logaddexp(r_lse, sk[:, None])
            r_out, r_lse = r_out * torch.exp(r_lse - r_tot)[..., None], r_tot
        torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, r_lse, rtol=1e-10, atol=1e-10)
        ours = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
        ref = torch.autograd.grad((r_out * go).sum() + (r_lse * gl).sum(), (q, k, v))
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # keys split in two (each half's queries are its last L positions: shift the slopes' view by giving each
    # half all keys but a -inf float mask over the other half)
    with torch.no_grad():
        whole = attention_ext.attention(q, k, v, enable_gqa=True, alibi_slopes=m, return_lse=True)
        hide = torch.zeros(7, 12, dtype=f64)
        parts = [attention_ext.attention(q, k, v, hide.index_fill(1, torch.arange(a, b), -math.inf),
                                         enable_gqa=True, alibi_slopes=m, return_lse=True)
                 for a, b in ((0, 5), (5, 12))]
        merged = attention_ext.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(merged[0], whole[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged[1], whole[1], rtol=1e-10, atol=1e-10)


def test_alibi_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck with ALiBi (GQA, a float mask with its gradient, causal with a window,
    a soft cap), through the fused backward and the composite's double backward."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 5, 4, dtype=f64, generator=g).requires_grad_()
    k = torch.randn(1, 1, 6, 4, dtype=f64, generator=g).requires_grad_()
    v = torch.randn(1, 1, 6, 3, dtype=f64, generator=g, requires_grad=True)
    mm = torch.randn(5, 6, dtype=f64, generator=g, requires_grad=True)
    m = torch.tensor([0.5, 0.25])

    def fn(q, k, v, mm):
        return attention_ext.attention(q, k, v, mm, is_causal=True, enable_gqa=True, window_size=(3, -1),
                                       softcap=2.0, alibi_slopes=m)
    assert torch.autograd.gradcheck(fn, (q, k, v, mm))
    assert torch.autograd.gradgradcheck(fn, (q, k, v, mm))


def test_alibi_vmap_compile_autocast():
    """vmap over per-sample slopes, torch.compile (fullgraph) and autocast give what the plain calls give."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(3, 2, 11, 16, generator=g) for _ in range(3))
    ms = torch.rand(3, 2, generator=g)
    fn = lambda q, k, v, m: attention_ext.attention(q, k, v, is_causal=True, alibi_slopes=m)  # noqa: E731
    loop = torch.stack([fn(q[b], k[b], v[b], ms[b]) for b in range(3)])
    torch.testing.assert_close(torch.func.vmap(fn)(q, k, v, ms), loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=(0, 0, 0, None))(q, k, v, ms[0]),
                               torch.stack([fn(q[b], k[b], v[b], ms[0]) for b in range(3)]), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, ms), fn(q, k, v, ms), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=bf16):
        out = fn(q, k, v, ms)
    assert out.dtype == bf16
    torch.testing.assert_close(out.float(), fn(q.to(bf16), k.to(bf16), v.to(bf16), ms).float(), rtol=0, atol=0)


def test_alibi_opcheck():
    """torch.library.opcheck of the forward, backward and weights ops and the packed forward and backward with ALiBi
    slopes (schema, fake kernels, autograd registration)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    m = torch.rand(2, 2, generator=g)
    ops = torch.ops.attention_ext
    args = (None, 0.0, True, None, False, [-1, -1])
    torch.library.opcheck(ops._attention_forward.default, (q, k, v, *args, 0.0, m))
    out, lse, rng = ops._attention_forward(q, k, v, *args, 0.0, m)
    torch.library.opcheck(ops._attention_backward.default,
                          (torch.randn_like(out), q, k, v, None, out, lse, rng, *args[1:], False, None, 0.0, m))
    torch.library.opcheck(ops._attention_forward_weights.default, (q, k, v, *args, True, 0.0, m))
    # packed sequences, one slope row each
    pq, pk, pv = (t.transpose(1, 2).reshape(14, 2, 8) for t in (q, k, v))
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    vargs = (None, None, 0.0, True, None, False, [-1, -1], 0.0, m)
    torch.library.opcheck(ops._attention_varlen_forward.default, (pq, pk, pv, cu, cu, *vargs))
    out, lse, rng = ops._attention_varlen_forward(pq, pk, pv, cu, cu, *vargs)
    torch.library.opcheck(ops._attention_varlen_backward.default,
                          (torch.randn_like(out), pq, pk, pv, cu, cu, out, lse, rng, *vargs[2:7], None, 0.0, m))


def test_alibi_errors():
    """Slopes of the wrong dtype, shape, device or layout, and slopes that require grad, raise errors naming
    alibi_slopes: through the Python functions and the ops themselves, dense and packed."""
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    pq, pk, pv = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # 5 packed rows, 4 heads
    ops = torch.ops.attention_ext
    calls = {"dense": lambda m: attention_ext.attention(q, k, v, alibi_slopes=m),
             "packed": lambda m: attention_ext.attention_varlen(pq, pk, pv, cu, cu, alibi_slopes=m)}
    for name, call in calls.items():
        with pytest.raises(TypeError, match="alibi_slopes must be float32, got Double"):
            call(torch.ones(4, dtype=f64))
        with pytest.raises(RuntimeError, match="alibi_slopes is on meta but query is on cpu"):
            call(torch.ones(4, device="meta"))
        with pytest.raises(ValueError, match="alibi_slopes must be a dense \\(strided\\) tensor"):
            call(torch.ones(4).to_sparse())
    for bad in (torch.ones(3), torch.ones(3, 4), torch.ones(1, 2, 4), torch.ones(())):
        with pytest.raises(ValueError, match="alibi_slopes must have shape \\(heads,\\) or \\(..., heads\\)"):
            calls["dense"](bad)
    calls["dense"](torch.ones(1, 4))  # broadcasts over the batch
    for bad in (torch.ones(3), torch.ones(3, 4), torch.ones(2, 1)):
        with pytest.raises(ValueError, match="alibi_slopes of packed sequences must have shape"):
            calls["packed"](bad)
    slopes = torch.ones(4, requires_grad=True)
    qg = q.clone().requires_grad_()
    for call, op in ((lambda: attention_ext.attention(qg, k, v, alibi_slopes=slopes), "attention"),
                     (lambda: ops.attention(qg, k, v, alibi_slopes=slopes), "attention"),
                     (lambda: attention_ext.attention_varlen(pq, pk, pv, cu, cu, alibi_slopes=slopes),
                      "attention_varlen"),
                     (lambda: ops.attention_varlen(pq, pk, pv, cu, cu, alibi_slopes=slopes), "attention_varlen")):
        with pytest.raises(ValueError, match=f"alibi_slopes: {op} has no gradient with respect to the ALiBi slopes"):
            call()

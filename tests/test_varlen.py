"""Variable-length (packed) sequences: torch.ops.attention_ext.attention_varlen (FlashAttention's varlen
layout, cu_seqlens offsets) and jagged nested tensors through attention_ext.attention /
scaled_dot_product_attention.

Every sequence is checked against the float64 reference computed on that sequence alone (tests/reference.py),
with the tolerance set by PyTorch's own SDPA on the same sequence in the same dtype; gradients likewise. The
CPU kernels run here; the CUDA backend's (one launch over the packed sequences forward, sequence by sequence
backward) runs on the emulated kernels.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import attention_ext
import emu
from conftest import cuda_marks
from reference import (assert_close_vs_baseline, assert_close_vs_baselines, flash2_rounding, max_abs_error,
                       reference_attention, reference_grads, window_visibility)

ops = torch.ops.attention_ext
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}

# name: (query lengths, key lengths, heads_q, heads_kv, E, Ev, options)
CASES = {
    "self": ([37, 5, 130, 1], None, 4, 4, 32, 32, {}),
    "self_causal": ([37, 5, 130, 1], None, 4, 4, 64, 64, dict(is_causal=True)),
    "cross": ([7, 50, 3], [20, 9, 140], 2, 2, 16, 24, {}),
    "cross_causal": ([7, 50, 3], [20, 9, 140], 2, 2, 16, 16, dict(is_causal=True)),
    "window_gqa": ([64, 17, 90], None, 6, 2, 48, 48, dict(window_size=(5, 3), enable_gqa=True)),
    "mqa_scale": ([33, 8], [12, 70], 4, 1, 8, 40, dict(enable_gqa=True, scale=0.37)),
    "empty_sequences": ([0, 9, 4, 0, 6], [3, 0, 5, 0, 6], 3, 3, 16, 16, {}),
    "head_dim_1": ([9, 4], None, 2, 2, 1, 3, {}),
    "head_dim_256": ([20, 3], None, 2, 2, 256, 256, dict(is_causal=True)),
    "one_sequence": ([300], None, 2, 2, 32, 32, {}),
    "many_short": ([3, 11, 1, 7, 2, 9, 16, 5, 4, 13, 1, 8], None, 2, 2, 16, 16, dict(is_causal=True)),
}


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=dtype)


def make_case(name, dtype, seed=0, requires_grad=True):
    lq, lk, hq, hkv, e, ev, kw = CASES[name]
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, hq, e, generator=g).to(dtype)
    k = torch.randn(tk, hkv, e, generator=g).to(dtype)
    v = torch.randn(tk, hkv, ev, generator=g).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, offsets(lq), offsets(lk, torch.int64), kw


def per_sequence(cu_q, cu_k):
    for b in range(len(cu_q) - 1):
        yield b, int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])


def heads_first(t):
    return t.transpose(0, 1)


def torch_sdpa(q, k, v, kw):
    """PyTorch's SDPA on one sequence (heads, L, E) in the inputs' dtype: the yardstick of the tolerance."""
    kw = dict(kw)
    window = kw.pop("window_size", None)
    causal = kw.pop("is_causal", False)
    mask = None
    if window is not None or (causal and q.shape[-2] != k.shape[-2]):
        mask = window_visibility(q.shape[-2], k.shape[-2], causal, window)
        causal = False
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **kw)


def reference(q, k, v, cu_q, cu_k, kw, grad=None, dropout_p=0.0, rng=None, mask_fn=None):
    """Float64 reference, PyTorch baseline and (with grad) gradients, each concatenated over the sequences.
    With dropout, sequence b's keep mask is mask_fn(rng[b], 1, Hq, L_b, S_b, p) (default: the CPU kernels')."""
    mask_fn = mask_fn or ops._dropout_mask
    Hq, Ev = q.shape[1], v.shape[2]
    out64, base, lse64 = torch.empty(q.shape[0], Hq, Ev, dtype=torch.float64), [], []
    dq64, dk64, dv64 = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    bq, bk, bv = (torch.zeros(t.shape, dtype=t.dtype) for t in (q, k, v))
    rkw = {n: kw[n] for n in ("is_causal", "scale", "enable_gqa", "window_size") if n in kw}
    for b, q0, q1, k0, k1 in per_sequence(cu_q, cu_k):
        qs, ks, vs = heads_first(q[q0:q1]), heads_first(k[k0:k1]), heads_first(v[k0:k1])
        keep = None
        if dropout_p > 0:
            keep = mask_fn(rng[b], 1, Hq, q1 - q0, k1 - k0, dropout_p)[0]
        if grad is None:
            r = reference_attention(qs, ks, vs, dropout_p=dropout_p, dropout_mask=keep, **rkw)
            o, l = r.out, r.lse
        else:
            o, l, gq, gk, gv, _ = reference_grads(qs, ks, vs, heads_first(grad[q0:q1]), dropout_p=dropout_p,
                                                  dropout_mask=keep, **rkw)
            dq64[q0:q1], dk64[k0:k1], dv64[k0:k1] = heads_first(gq), heads_first(gk), heads_first(gv)
        out64[q0:q1] = heads_first(o.detach())
        lse64.append(l.reshape(-1))
        if dropout_p == 0:
            with torch.enable_grad():
                ql, kl, vl = (t.detach().requires_grad_() for t in (qs, ks, vs))
                o_b = torch_sdpa(ql, kl, vl, rkw)
                if o_b is not None:
                    base.append((q0, q1, k0, k1, o_b))
                    if grad is not None:
                        g = torch.autograd.grad(o_b, (ql, kl, vl), heads_first(grad[q0:q1]))
                        bq[q0:q1], bk[k0:k1], bv[k0:k1] = (heads_first(x) for x in g)
    bo = torch.zeros(q.shape[0], Hq, Ev, dtype=q.dtype)
    for q0, q1, _, _, o_b in base:
        bo[q0:q1] = heads_first(o_b.detach())
    have_base = dropout_p == 0
    res = dict(out=out64, lse=torch.cat(lse64) if lse64 else torch.empty(0, dtype=torch.float64),
               dq=dq64, dk=dk64, dv=dv64, base_out=bo if have_base else None, base_dq=bq if have_base else None,
               base_dk=bk if have_base else None, base_dv=bv if have_base else None)
    if have_base and grad is not None and q.dtype != torch.float64:
        res.update(flash_model(q, k, v, cu_q, cu_k, rkw, grad))
    return res


def flash_model(q, k, v, cu_q, cu_k, kw, grad):
    """model_out, model_dq, ...: reference.flash2_rounding on each sequence (the roundings of PyTorch's CUDA
    FLASH backend), rows of sequences without keys 0."""
    res = {f"model_{n}": torch.zeros(t.shape, dtype=t.dtype) for n, t in
           (("out", grad), ("dq", q), ("dk", k), ("dv", v))}
    causal, window = kw.get("is_causal", False), kw.get("window_size")
    for b, q0, q1, k0, k1 in per_sequence(cu_q, cu_k):
        if q1 == q0 or k1 == k0:
            continue
        qs, ks, vs = heads_first(q[q0:q1]), heads_first(k[k0:k1]), heads_first(v[k0:k1])
        m = window_visibility(q1 - q0, k1 - k0, causal, window) if (causal or window is not None) else None
        o, dq, dk, dv, _ = flash2_rounding(qs, ks, vs, heads_first(grad[q0:q1]), m, kw.get("scale"))
        res["model_out"][q0:q1], res["model_dq"][q0:q1] = heads_first(o), heads_first(dq)
        res["model_dk"][k0:k1], res["model_dv"][k0:k1] = heads_first(dk), heads_first(dv)
    return res


def assert_vs_pytorch(name, x, ref, key, dtype):
    """x against the float64 reference ref[key]: at most 2x the larger error of PyTorch's CPU SDPA and of the
    model of its CUDA FLASH backend's roundings (the tensor-core kernels round P and dS to the input dtype, as
    FlashAttention-2 does; PyTorch's CPU backward keeps them in float32)."""
    assert_close_vs_baselines(name, x, ref[key], (ref.get("base_" + key), ref.get("model_" + key)), dtype)


def check(ours, ref, dtype, names=("out", "dq", "dk", "dv")):
    for name in names:
        assert_close_vs_baseline(name, ours[name], ref[name], ref.get("base_" + name), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=[_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_cpu(case, dtype, one_thread):
    q, k, v, cu_q, cu_k, kw = make_case(case, dtype)
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, **{n: (list(x) if n == "window_size" else x)
                                                       for n, x in kw.items()})
    grad = torch.randn(out.shape).to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad)
    check(dict(out=out, dq=dq, dk=dk, dv=dv), ref, dtype)
    # the internal forward's log-sum-exp: sequence b's (Hq, L_b) block at Hq * cu_seqlens_q[b]
    _, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, kw.get("is_causal", False),
                                                kw.get("scale"), kw.get("enable_gqa", False),
                                                list(kw.get("window_size", (-1, -1))))
    assert lse.shape == (q.shape[0] * q.shape[1],) and rng.shape == (len(cu_q) - 1, 2)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert max_abs_error(lse, ref["lse"]) <= tol


@pytest.mark.parametrize("threads", [2, 3])
def test_varlen_threads_share_sequences(threads):
    """Many short sequences and a long one: the short ones share one parallel region (one thread each), the
    long one runs on every thread; the results match the reference either way."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lens = [5, 17, 3, 400, 9, 2, 33, 64, 1, 8, 21]
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(sum(lens), 2, 32, generator=g).requires_grad_() for _ in range(3))
        cu = offsets(lens)
        for causal in (False, True):
            out = ops.attention_varlen(q, k, v, cu, cu, is_causal=causal)
            grad = torch.randn(out.shape, generator=g)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
            ref = reference(q, k, v, cu, cu, dict(is_causal=causal), grad=grad)
            check(dict(out=out, dq=dq, dk=dk, dv=dv), ref, torch.float32)
    finally:
        torch.set_num_threads(n)


def test_varlen_matches_padded_batch(one_thread):
    """Equal lengths: the same numbers as the dense op on the (batch, heads, L, E) view."""
    B, L, H, E = 3, 40, 2, 16
    q, k, v = (torch.randn(B * L, H, E, dtype=torch.float64) for _ in range(3))
    cu = torch.arange(B + 1, dtype=torch.int32) * L
    out = ops.attention_varlen(q, k, v, cu, cu, is_causal=True)
    dense = ops.attention(*(t.view(B, L, H, E).transpose(1, 2) for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(B * L, H, E), rtol=0, atol=1e-12)


def test_varlen_strided_views(one_thread):
    """q, k, v as slices of one packed (total, 3, heads, E) projection, int64 offsets, max_seqlen given."""
    lens = [12, 30, 7]
    qkv = torch.randn(sum(lens), 3, 4, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = offsets(lens, torch.int64)
    out = ops.attention_varlen(q, k, v, cu, cu, max_seqlen_q=30, max_seqlen_k=30, is_causal=True)
    grad = torch.randn(out.shape, dtype=torch.float64)
    dqkv, = torch.autograd.grad(out, qkv, grad)
    ref = reference(q, k, v, cu, cu, dict(is_causal=True), grad=grad)
    check(dict(out=out, dq=dqkv[:, 0], dk=dqkv[:, 1], dv=dqkv[:, 2]), ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_varlen_dropout(dtype, one_thread):
    """Each sequence draws its own dropout mask (offset + b in rng_state's row b) and the backward replays it."""
    p = 0.3
    q, k, v, cu_q, cu_k, kw = make_case("cross", dtype, seed=3)
    torch.manual_seed(7)
    out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, p, False, None, False, [-1, -1])
    assert rng.shape == (3, 2) and len(set(rng[:, 1].tolist())) == 3
    grad = torch.randn(out.shape).to(dtype)
    dq, dk, dv = ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, p, False, None, False,
                                                [-1, -1])
    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad, dropout_p=p, rng=rng)
    floor = {torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]
    for name, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
        err = max_abs_error(x, ref[name])
        assert err <= floor, f"{name}: {err:.3g}"
    # two sequences with identical data get different masks
    x = torch.randn(16, 2, 8)
    qq = torch.cat([x, x])
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    o = ops.attention_varlen(qq, qq, qq, cu, cu, dropout_p=0.5)
    assert not torch.equal(o[:16], o[16:])


@pytest.mark.emu
def test_varlen_emulated_cuda():
    """The CUDA backend's varlen on the emulated kernels: the forward and the backward (row statistics, the
    backward kernel, the dQ conversion) each in one launch over the packed sequences (FwdParams::cu_seqlens_q;
    a lone sequence runs as an ordinary call). Output, log-sum-exp and gradients against the reference; the
    kernel log names the path."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    for case, dtype in (("empty_sequences", torch.float16), ("window_gqa", torch.bfloat16),
                        ("cross_causal", torch.float32), ("mqa_scale", torch.float16),
                        ("many_short", torch.bfloat16), ("one_sequence", torch.float16),
                        ("head_dim_256", torch.bfloat16), ("self", torch.float32)):
        q, k, v, cu_q, cu_k, kw = make_case(case, dtype, requires_grad=False)
        args = (kw.get("is_causal", False), kw.get("scale"), kw.get("enable_gqa", False),
                list(kw.get("window_size", (-1, -1))))
        with attention_ext.debug.kernel_log() as lines:
            out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, *args)
        packed = len(cu_q) > 2
        assert len(lines) == 1 and ("packed sequences in one launch" in lines[0]) == packed, (case, lines)
        grad = torch.randn(out.shape).to(dtype)
        with attention_ext.debug.kernel_log() as lines:
            dq, dk, dv = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, 0.0, *args)
        if packed:
            assert len(lines) == 1 and lines[0].startswith("emu varlen backward: sm80") and \
                "packed sequences in one launch" in lines[0], (case, lines)
        else:
            assert len(lines) == 1 and lines[0].startswith("emu backward:"), (case, lines)
        ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad)
        # the tensor-core kernels round P and dS to the input dtype, as FlashAttention-2 does (assert_vs_pytorch)
        for name, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
            assert_vs_pytorch(f"{case} {name}", x, ref, name, dtype)
        assert max_abs_error(lse, ref["lse"]) <= 1e-3, case


@pytest.mark.emu
def test_varlen_emulated_hopper(monkeypatch):
    """On an sm_90 device (the emulator with ATTENTION_EXT_EMU_ARCH=90) the varlen ops keep the Hopper kernels:
    a lone sequence is an ordinary call; the forward and the backward of several are one packed Hopper launch
    each wherever those kernels cover the call (fp32 is not covered: the packed sm80 launches). Output, lse and
    gradients against the reference."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    g = torch.Generator().manual_seed(21)
    # (lengths, emulated SMs, dtype, forward, backward): "hopper" = one Hopper launch per sequence, "packed" =
    # one sm80 launch for all, "hopper packed" = one Hopper launch for all
    for lengths, sms, dtype, fwd_kind, bwd_kind in (([300], "132", torch.bfloat16, "hopper", "hopper"),
                                                    ([1100, 1000], "16", torch.bfloat16, "hopper packed",
                                                     "hopper packed"),
                                                    ([200, 90, 31], "132", torch.bfloat16, "hopper packed",
                                                     "hopper packed"),
                                                    ([200, 90, 31], "132", torch.float32, "packed", "packed")):
        monkeypatch.setenv("ATTENTION_EXT_EMU_SMS", sms)
        total = sum(lengths)
        q, k, v = (torch.randn(total, 2, 64, generator=g).to(dtype) for _ in range(3))
        cu = offsets(lengths)
        with attention_ext.debug.kernel_log() as lines:
            out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu, cu, None, None, 0.0, True, None, False,
                                                              [-1, -1])
            grad = torch.randn(out.shape, generator=g).to(q.dtype)
            dq, dk, dv = emu.ops._attention_varlen_backward(grad, q, k, v, cu, cu, out, lse, rng, 0.0, True, None,
                                                            False, [-1, -1])
        for kind, direction in ((fwd_kind, "forward"), (bwd_kind, "backward")):
            got = [ln for ln in lines if direction in ln]
            if kind == "hopper":
                assert len(got) == len(lengths) and all("sm90a" in ln for ln in got), (lengths, sms, lines)
            elif kind == "hopper packed":
                assert len(got) == 1 and "sm90a" in got[0] and "packed sequences" in got[0], (lengths, sms, lines)
            else:
                assert len(got) == 1 and "sm80" in got[0] and "packed sequences" in got[0], (lengths, sms, lines)
        ref = reference(q, k, v, cu, cu, dict(is_causal=True), grad=grad)
        for name, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
            assert_vs_pytorch(f"{lengths} {name}", x, ref, name, q.dtype)
        assert max_abs_error(lse, ref["lse"]) <= 1e-3, lengths


# name: (query lengths, key lengths, heads_q, heads_kv, E, Ev, options): packed Hopper forwards, with sequences
# without queries or without keys, and tiles overhanging a sequence's end
HOPPER_PACKED = {
    "cross_causal_gqa": ([130, 257, 3, 0, 260], [300, 7, 129, 50, 0], 4, 2, 64, 64,
                         dict(is_causal=True, enable_gqa=True)),
    "window_ev": ([140, 129, 200], None, 2, 2, 128, 96, dict(window_size=(70, 20))),
    "mqa_scale_256": ([150, 131], [129, 260], 2, 1, 200, 256, dict(enable_gqa=True, scale=0.2)),
}


def _hopper_packed_case(name, dtype=torch.bfloat16, seed=0):
    lq, lk, hq, hkv, e, ev, kw = HOPPER_PACKED[name]
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, e, generator=g).to(dtype)
    k = torch.randn(sum(lk), hkv, e, generator=g).to(dtype)
    v = torch.randn(sum(lk), hkv, ev, generator=g).to(dtype)
    args = (kw.get("is_causal", False), kw.get("scale"), kw.get("enable_gqa", False),
            list(kw.get("window_size", (-1, -1))))
    return q, k, v, offsets(lq), offsets(lk), kw, args


@pytest.mark.emu
@pytest.mark.parametrize("case", list(HOPPER_PACKED))
def test_varlen_emulated_hopper_packed(case, monkeypatch):
    """The Hopper forward and backward over packed sequences in one launch each (their kPacked variants): 5
    emulated multiprocessors, so that each persistent forward CTA walks tiles of several sequences through one
    pipeline; cross lengths, causal, windows, GQA / MQA, E != Ev, head dims below the bucket, sequences without
    queries or keys (rows of 0, lse -inf, zero gradients). Output, lse, dQ, dK and dV against the float64
    reference; every row written (outputs start as NaN)."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    monkeypatch.setenv("ATTENTION_EXT_EMU_SMS", "5")
    q, k, v, cu_q, cu_k, kw, args = _hopper_packed_case(case)
    with attention_ext.debug.kernel_log() as lines:
        out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, *args)
    n = len(cu_q) - 1
    assert len(lines) == 1 and "sm90a" in lines[0] and f"{n} packed sequences in one launch" in lines[0], lines
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    with attention_ext.debug.kernel_log() as lines:
        dq, dk, dv = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, 0.0, *args)
    assert len(lines) == 1 and "sm90a" in lines[0] and f"{n} packed sequences in one launch" in lines[0], lines
    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad)
    assert_close_vs_baseline(f"{case} out", out, ref["out"], ref["base_out"], q.dtype)
    assert max_abs_error(lse, ref["lse"]) <= 1e-3, case
    # the tensor-core backward rounds P and dS to the input dtype, as FlashAttention-2 does (assert_vs_pytorch)
    for name, x in dict(dq=dq, dk=dk, dv=dv).items():
        assert_vs_pytorch(f"{case} {name}", x, ref, name, q.dtype)


@pytest.mark.emu
def test_varlen_emulated_hopper_packed_sequences_isolated(monkeypatch):
    """A tile that overhangs its sequence's end reads zeros, not the next sequence's rows, and the backward's dQ
    reduce-adds of rows past a sequence's end are dropped: with the middle sequence's queries, keys, values and
    output gradient all NaN / inf, the other sequences' outputs, lse and gradients keep every bit (0 x inf in
    P V, or in dS = P (dP - D) with dP = dO V^T, would reach them otherwise). One emulator thread, so that the
    dQ reduce-adds come in the same order."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", "1")
    lengths = [130, 120, 150]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(sum(lengths), 2, 64, generator=g).to(torch.float16) for _ in range(3))
    cu = offsets(lengths)
    args = (None, None, 0.0, False, None, False, [-1, -1])
    grad = torch.randn(q.shape, generator=g).to(q.dtype)

    def run():
        o, l_, r = emu.ops._attention_varlen_forward(q, k, v, cu, cu, *args)
        return (o, l_) + tuple(emu.ops._attention_varlen_backward(grad, q, k, v, cu, cu, o, l_, r, *args[2:]))

    with attention_ext.debug.kernel_log() as lines:
        clean = run()
    assert len(lines) == 2 and all("sm90a" in ln and "3 packed sequences" in ln for ln in lines), lines
    mid = slice(130, 250)
    q[mid], k[mid], v[mid], grad[mid] = float("nan"), float("nan"), float("inf"), float("nan")
    dirty = run()
    for rows in (slice(0, 130), slice(250, 400)):
        for i in (0, 2, 3, 4):  # out, dq, dk, dv
            assert torch.equal(clean[i][rows], dirty[i][rows]), i
    for b, (q0, q1) in enumerate(((0, 130), (250, 400))):  # lse: (heads, L_b) blocks one after another
        assert torch.equal(clean[1][2 * q0:2 * q1], dirty[1][2 * q0:2 * q1]), b
    assert torch.isnan(dirty[0][mid]).all()


@pytest.mark.emu
def test_varlen_emulated_hopper_packed_dropout(monkeypatch):
    """Dropout in the packed Hopper forward and backward: sequence b draws (seed, offset + b), the stream of a
    batch-1 call (output and gradients against the reference under _dropout_mask's masks, as the sm80 packed
    launches are), at head dims 64 and 200 (the 256 bucket, whose consumers have no register to spare: the
    generator's key words are rebuilt per key tile)."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    p = 0.25
    for case, kernel in (("cross_causal_gqa", "sm90a"), ("mqa_scale_256", "sm90a")):
        q, k, v, cu_q, cu_k, kw, args = _hopper_packed_case(case, torch.float16, seed=3)
        torch.manual_seed(11)
        with attention_ext.debug.kernel_log() as lines:
            out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, p, *args)
            grad = torch.randn(out.shape).to(q.dtype)
            dq, dk, dv = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, p, *args)
        assert len(lines) == 2 and kernel in lines[0] and "sm90a" in lines[1], lines
        assert all("packed sequences in one launch" in ln for ln in lines), lines
        n = len(cu_q) - 1
        assert rng[:, 1].tolist() == [int(rng[0, 1]) + b for b in range(n)]
        ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad, dropout_p=p, rng=rng, mask_fn=emu.ops._dropout_mask)
        for name, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
            assert max_abs_error(x, ref[name]) <= 2e-2, (case, name)
        assert max_abs_error(lse, ref["lse"]) <= 1e-3, case


@pytest.mark.emu
def test_varlen_emulated_hopper_packed_switch(monkeypatch):
    """ATTENTION_EXT_PACKED_SM90=0 runs the packed sm80 kernels on an sm_90 device instead (same results up to
    rounding); a value other than 0 or 1 is an error naming the variable."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    q, k, v, cu_q, cu_k, kw, args = _hopper_packed_case("window_ev", seed=4)
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[2]).to(q.dtype)

    def run():
        with attention_ext.debug.kernel_log() as lines:
            o, l_, r = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, *args)
            grads = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, o, l_, r, 0.0, *args)
        return (o,) + tuple(grads), lines

    hopper, lines = run()
    assert len(lines) == 2 and all("sm90a" in ln for ln in lines), lines
    monkeypatch.setenv("ATTENTION_EXT_PACKED_SM90", "0")
    sm80, lines = run()
    assert len(lines) == 2 and all("sm80" in ln and "packed sequences" in ln for ln in lines), lines
    for name, a, b in zip(("out", "dq", "dk", "dv"), hopper, sm80):
        assert max_abs_error(a, b) <= 3e-2, name
    monkeypatch.setenv("ATTENTION_EXT_PACKED_SM90", "on")
    with pytest.raises(ValueError, match="ATTENTION_EXT_PACKED_SM90 must be 0 or 1, got 'on'"):
        emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, *args)


@pytest.mark.emu
def test_varlen_emulated_hopper_packed_schedule_independent(monkeypatch):
    """The packed Hopper forward and backward give the same bits in every fiber order and whether TMA data and
    wgmma results land at issue or at the wait, dropout included (dQ, summed by TMA reduce-adds in whichever
    order the CTAs reach them, up to rounding)."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    monkeypatch.setenv("ATTENTION_EXT_EMU_SMS", "3")
    q, k, v, cu_q, cu_k, kw, args = _hopper_packed_case("cross_causal_gqa", seed=9)
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[2]).to(q.dtype)

    def run():
        torch.manual_seed(5)
        o, l_, r = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.2, *args)
        return (o, l_, r) + tuple(emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, o, l_, r, 0.2, *args))

    with emu.schedule("forward", "late"):
        base = run()
    with emu.schedule("shuffle", "early"):
        other = run()
    for i, (a, b) in enumerate(zip(base, other)):
        if i == 3:  # dq
            assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(a, b), i


@pytest.mark.emu
def test_varlen_emulated_cuda_backward_modes():
    """The one-launch backward in deterministic mode (a private dQ split per chunk of key blocks, summed in a
    fixed order: bitwise the same twice, and as close to the reference), and with scores so large that the
    log-sum-exp exceeds 1e4 (the row statistics are recomputed by the packed forward kernel in stats mode: the
    same gradients as the ordinary backward of each sequence)."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    q, k, v, cu_q, cu_k, kw = make_case("self_causal", torch.bfloat16, seed=7, requires_grad=False)
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, True, None, False,
                                                      [-1, -1])
    grad = torch.randn(out.shape).to(q.dtype)
    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            with attention_ext.debug.kernel_log() as lines:
                runs.append(emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, 0.0, True,
                                                               None, False, [-1, -1]))
            assert len(lines) == 1 and "deterministic (" in lines[0] and "packed sequences" in lines[0], lines
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for name, x in zip(("dq", "dk", "dv"), runs[0]):
        assert_vs_pytorch(f"deterministic {name}", x, ref, name, q.dtype)

    # Every score of a row near 1e6 (a shared first feature) but spread by O(1): the softmax is not one-hot, and
    # P = exp(x - lse) is off by up to ~6% (fp32's spacing at 1e6) without the recomputed statistics. Against
    # the ordinary (batch-1) emulated backward of each sequence, which tests/test_cuda.py holds to the reference
    q, k, v, cu_q, cu_k, kw = make_case("cross", torch.float32, seed=8, requires_grad=False)
    q[..., 0] = 4.0e6
    k[..., 0] = 1.0
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, False, None, False,
                                                      [-1, -1])
    assert lse.abs().max() > 1e6
    grad = torch.randn(out.shape)
    packed = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, 0.0, False, None, False,
                                                [-1, -1])
    for b, q0, q1, k0, k1 in per_sequence(cu_q, cu_k):
        rows = lambda t, a, z: heads_first(t[a:z])  # noqa: E731
        hq = q.shape[1]
        ordinary = emu.ops._attention_backward(rows(grad, q0, q1), rows(q, q0, q1), rows(k, k0, k1), rows(v, k0, k1),
                                               None, rows(out, q0, q1), lse[hq * q0:hq * q1].view(hq, -1),
                                               rng[b], 0.0, False, None, False, [-1, -1], False)
        for name, x, y, a, z in (("dq", packed[0], ordinary[0], q0, q1), ("dk", packed[1], ordinary[1], k0, k1),
                                 ("dv", packed[2], ordinary[2], k0, k1)):
            assert max_abs_error(x[a:z], heads_first(y)) <= 1e-5 * (1 + y.abs().max()), (b, name)


@pytest.mark.emu
@pytest.mark.parametrize("order,cp_async", [("reverse", "late"), ("shuffle", "early")])
def test_varlen_emulated_cuda_schedule_independent(order, cp_async, monkeypatch):
    """The packed forward and backward give the same bits in every fiber order and with cp.async data landing
    at issue or at the wait (a read that no barrier or wait orders would change them); dropout included. One OS
    thread, so that dQ's atomic adds come in the same order."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", "1")
    q, k, v, cu_q, cu_k, kw = make_case("window_gqa", torch.float16, seed=5, requires_grad=False)
    args = (0.2, False, None, True, [5, 3])
    torch.manual_seed(2)
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, *args)
    grad = torch.randn(out.shape).to(q.dtype)

    def run():
        torch.manual_seed(2)
        o, l_, r = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, *args)
        return (o, l_, r) + tuple(emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, o, l_, r, *args))

    base = run()
    with emu.schedule(order, cp_async):
        other = run()
    for a, b in zip(base, other):
        assert torch.equal(a, b)


@pytest.mark.emu
def test_varlen_emulated_cuda_dropout():
    """Dropout in the one-launch forward: sequence b draws (seed, offset + b), row b of rng_state, the stream
    of a batch-1 call; the mask _dropout_mask gives for that row is the one applied (output against the
    reference under it), and the one-launch backward replays it (gradients)."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    p = 0.3
    q, k, v, cu_q, cu_k, kw = make_case("cross", torch.float16, seed=4, requires_grad=False)
    torch.manual_seed(11)
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, p, False, None, False,
                                                      [-1, -1])
    assert rng.shape == (3, 2) and len(set(rng[:, 0].tolist())) == 1
    assert rng[:, 1].tolist() == [int(rng[0, 1]) + b for b in range(3)]
    grad = torch.randn(out.shape).to(q.dtype)
    dq, dk, dv = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, p, False, None,
                                                    False, [-1, -1])
    masks = {}

    def dropout_mask(r, *shape):
        masks[len(masks)] = emu.ops._dropout_mask(r, *shape)
        return masks[len(masks) - 1]

    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad, dropout_p=p, rng=rng, mask_fn=dropout_mask)
    assert len(masks) == 3 and all(0.5 < m.float().mean() < 0.9 for m in masks.values())
    for name, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
        assert max_abs_error(x, ref[name]) <= 2e-2, name


@pytest.mark.emu
def test_varlen_emulated_cuda_row_limit():
    """The one-launch forward reads int32 offsets: more than 2^31 - 1 packed rows is refused by name (expanded
    views, nothing allocated)."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    n = 2**31
    q = torch.zeros(1, 2, 8, dtype=torch.float16).expand(n, 2, 8)
    cu = torch.tensor([0, n - 5, n], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"at most 2\^31 - 1 packed rows, got 2147483648 queries"):
        emu.ops._attention_varlen_forward(q, q, q, cu, cu, None, None, 0.0, False, None, False, [-1, -1])


def _jagged(lengths, heads, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.nested.nested_tensor([torch.randn(n, heads, dim, generator=g, dtype=dtype) for n in lengths],
                                   layout=torch.jagged, requires_grad=True)
    return t, t.transpose(1, 2)  # the leaf, and the (batch, heads, ragged, E) view SDPA takes


@pytest.mark.parametrize("cross", [False, True])
def test_nested_tensors_match_pytorch(cross, one_thread):
    """Jagged nested tensors through attention_ext.scaled_dot_product_attention and attention_ext.attention:
    the same output and gradients (into the nested leaves) as PyTorch's SDPA on them."""
    lq, lk = [5, 19, 3], ([8, 2, 30] if cross else [5, 19, 3])
    q, qt = _jagged(lq, 4, 16, seed=1)
    k, kt = _jagged(lk, 4, 16, seed=2)
    v, vt = _jagged(lk, 4, 16, seed=3)
    ref = F.scaled_dot_product_attention(qt, kt, vt)
    for fn in (attention_ext.scaled_dot_product_attention, attention_ext.attention):
        out = fn(qt, kt, vt)
        assert out.is_nested and out.shape[:2] == ref.shape[:2] and out.shape[-1] == ref.shape[-1]
        torch.testing.assert_close(out.values(), ref.values(), rtol=0, atol=1e-12)
        g = torch.autograd.grad(out.values().sum(), (q, k, v), retain_graph=True)
        gr = torch.autograd.grad(ref.values().sum(), (q, k, v), retain_graph=True)
        for a, b in zip(g, gr):
            torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=1e-12)


def test_nested_causal_gqa_against_reference(one_thread):
    """is_causal (top-left per sequence) and GQA with nested tensors, against the per-sequence reference."""
    lens = [6, 25, 1]
    q, qt = _jagged(lens, 6, 8, seed=4)
    k, kt = _jagged(lens, 2, 8, seed=5)
    v, vt = _jagged(lens, 2, 8, seed=6)
    out = attention_ext.attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    for b, (qs, ks, vs, os_) in enumerate(zip(qt.unbind(), kt.unbind(), vt.unbind(), out.unbind())):
        r = reference_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        assert max_abs_error(os_, r.out) <= 1e-12, b


def test_varlen_errors():
    q, k, v = torch.randn(10, 2, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4, 10]), torch.tensor([0, 5, 12])
    bad = [
        (dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), TypeError, "cu_seqlens_q must be int32 or int64"),
        (dict(cu_seqlens_q=torch.tensor([[0, 4, 10]])), ValueError, "cu_seqlens_q must be 1-D"),
        (dict(cu_seqlens_k=torch.tensor([0, 12])), ValueError, "cu_seqlens_k has 2 offsets but cu_seqlens_q has 3"),
        (dict(cu_seqlens_q=torch.tensor([1, 4, 10])), ValueError, r"cu_seqlens_q\[0\] must be 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4])), ValueError, "cu_seqlens_q must not decrease"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 11])), ValueError, r"cu_seqlens_k\[-1\] must be the number of rows "
                                                                  r"of key \(12\), got 11"),
        (dict(max_seqlen_q=5), ValueError, "max_seqlen_q is 5 but cu_seqlens_q holds a sequence of length 6"),
        (dict(query=torch.randn(2, 5, 2, 8)), ValueError, r"query must be packed as \(total_q, heads, E\)"),
        (dict(value=torch.randn(11, 2, 8)), ValueError, "value length"),
        (dict(key=torch.randn(12, 3, 8), value=torch.randn(12, 3, 8)), ValueError, "enable_gqa"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
    ]
    base = dict(query=q, key=k, value=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for change, exc, msg in bad:
        kw = dict(base, **change)
        with pytest.raises(exc, match=msg):
            ops.attention_varlen(**kw)
    # nested tensors: a clear error from the dense op, and for a mask
    _, qt = _jagged([3, 4], 2, 8)
    with pytest.raises(ValueError, match="takes dense tensors; for nested"):
        ops.attention(qt, qt, qt)
    with pytest.raises(ValueError, match="attn_mask is not supported with nested"):
        attention_ext.attention(qt, qt, qt, attn_mask=torch.ones(4, 4, dtype=torch.bool))


def test_varlen_opcheck_and_compile(one_thread):
    q, k, v, cu_q, cu_k, kw = make_case("cross_causal", torch.float32, seed=2)
    opcheck(ops.attention_varlen.default, (q, k, v, cu_q, cu_k), dict(is_causal=True))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, lse, rng = ops._attention_varlen_forward(qd, kd, vd, cu_q, cu_k, None, None, 0.0, True, None, False, [-1, -1])
    opcheck(ops._attention_varlen_forward.default, (qd, kd, vd, cu_q, cu_k, None, None, 0.0, True, None, False,
                                                    [-1, -1]))
    for glse in (None, torch.randn_like(lse)):  # with and without the log-sum-exp's cotangent
        opcheck(ops._attention_varlen_backward.default, (torch.randn_like(out), qd, kd, vd, cu_q, cu_k, out, lse,
                                                         rng, 0.0, True, None, False, [-1, -1], glse))

    def f(q, k, v, cu_q, cu_k):
        return ops.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True).square().sum()

    eager = torch.autograd.grad(f(q, k, v, cu_q, cu_k), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k),
                                   (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_varlen_autocast(one_thread):
    q, k, v, cu_q, cu_k, _ = make_case("self", torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention_varlen(q, k, v, cu_q, cu_k)
    assert out.dtype == torch.bfloat16
    ref = ops.attention_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert math.isfinite(float(out.float().abs().max()))


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=cuda_marks()) for d in (torch.float16, torch.bfloat16,
                                                                                   torch.float32)],
                         ids=["f16", "bf16", "f32"])
def test_varlen_cuda(dtype):
    """On a GPU: forward and backward against the reference, offsets on the GPU and on the CPU alike."""
    q, k, v, cu_q, cu_k, kw = make_case("window_gqa", dtype, requires_grad=False)
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[2]).to(dtype)
    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad)
    for where in ("cuda", "cpu"):
        qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
        out = ops.attention_varlen(qc, kc, vc, cu_q.to(where), cu_k.to(where), window_size=list(kw["window_size"]),
                                   enable_gqa=True)
        dq, dk, dv = torch.autograd.grad(out, (qc, kc, vc), grad.cuda())
        for name, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
            assert_vs_pytorch(f"{where} {name}", x.cpu(), ref, name, dtype)


@pytest.mark.parametrize("case", [pytest.param(c, marks=cuda_marks()) for c in HOPPER_PACKED])
def test_varlen_cuda_hopper_packed(case):
    """On a GPU: the packed Hopper kernels' cases, forward and backward, against the reference. On an H100 / H200
    the kernel log must name the Hopper kernels (the driver accepted their tensor maps, whose base lies before
    the tensor's); other GPUs run the packed sm80 kernels."""
    q, k, v, cu_q, cu_k, kw, args = _hopper_packed_case(case)
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[2]).to(q.dtype)
    qc, kc, vc, cq, ck = (t.cuda() for t in (q, k, v, cu_q, cu_k))
    with attention_ext.debug.kernel_log() as lines:
        out, lse, rng = ops._attention_varlen_forward(qc, kc, vc, cq, ck, None, None, 0.0, *args)
        dq, dk, dv = ops._attention_varlen_backward(grad.cuda(), qc, kc, vc, cq, ck, out, lse, rng, 0.0, *args)
    assert len(lines) == 2 and all("packed sequences in one launch" in ln for ln in lines), lines
    if torch.cuda.get_device_capability() == (9, 0):
        assert all("sm90a" in ln for ln in lines), lines
    ref = reference(q, k, v, cu_q, cu_k, kw, grad=grad)
    assert_close_vs_baseline(f"{case} out", out.cpu(), ref["out"], ref["base_out"], q.dtype)
    assert max_abs_error(lse.cpu(), ref["lse"]) <= 1e-3, case
    for name, x in dict(dq=dq, dk=dk, dv=dv).items():
        assert_vs_pytorch(f"{case} {name}", x.cpu(), ref, name, q.dtype)


def test_nested_tensors_under_compile_and_mismatched_lengths(one_thread):
    """torch.compile(fullgraph=True) through the nested path gives eager's output and gradients; key and value
    nested tensors of different lengths are refused by name."""
    q, _ = _jagged([5, 9, 3], 4, 16, seed=7)
    k, _ = _jagged([5, 9, 3], 4, 16, seed=8)
    v, _ = _jagged([5, 9, 3], 4, 16, seed=9)

    def f(q, k, v):
        return attention_ext.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True).transpose(1, 2)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled.values(), eager.values(), rtol=0, atol=0)
    ge = torch.autograd.grad(eager.values().sum(), (q, k, v))
    gc = torch.autograd.grad(compiled.values().sum(), (q, k, v))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)
    _, vt = _jagged([9, 5, 3], 4, 16, seed=9)
    with pytest.raises(ValueError, match="key and value must have the same sequence lengths"):
        attention_ext.attention(q.transpose(1, 2), k.transpose(1, 2), vt)


def test_varlen_more_bad_inputs():
    """The offsets' device, the backward's saved tensors, and nested inputs that are not (batch, heads,
    ragged, E) jagged tensors: each refused with a message naming the argument."""
    q, k, v = torch.randn(10, 2, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4, 10]), torch.tensor([0, 5, 12])
    with pytest.raises(RuntimeError, match="cu_seqlens_q is on meta but query is on cpu"):
        ops.attention_varlen(q, k, v, cu_q.to("meta"), cu_k)
    out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.5, False, None, False, [-1, -1])
    args = (q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"rng_state must be the int64 \(batch, 2\) tensor"):
        ops._attention_varlen_backward(out, *args, out, lse, rng[0], 0.5, False, None, False, [-1, -1])
    with pytest.raises(ValueError, match="logsumexp must have shape"):
        ops._attention_varlen_backward(out, *args, out, lse[:-1], rng, 0.5, False, None, False, [-1, -1])
    with pytest.raises(ValueError, match="grad_output must have shape"):
        ops._attention_varlen_backward(out[:-1], *args, out, lse, rng, 0.5, False, None, False, [-1, -1])
    _, qt = _jagged([3, 4], 2, 8)
    dense = torch.randn(2, 2, 4, 8)
    with pytest.raises(ValueError, match="key must be a nested tensor with layout=torch.jagged"):
        attention_ext.attention(qt, dense, qt)
    with pytest.raises(ValueError, match=r"query must be a jagged nested tensor of shape \(batch, heads, ragged"):
        attention_ext.attention(qt.transpose(1, 2), qt, qt)


# attention_varlen's forward under CUDA-graph capture: the offsets stay on the device (not read back), so the
# packed kernels run over offsets checked there (launch_packed_rows). ATTENTION_EXT_EMU_CAPTURE=1 runs the emulated
# glue that way; the emulator faults on any access outside the launch's tensors. Each case: how it corrupts the
# offsets (or max_seqlen_q), and the first sequence that must come out refused (it and every later one: NaN rows).
def _capture_case(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(41)
    lq, lk = [5, 9, 13, 4], [7, 3, 20, 6]
    q = torch.randn(sum(lq), 4, 64, generator=g).to(dtype)
    k = torch.randn(sum(lk), 2, 64, generator=g).to(dtype)
    v = torch.randn(sum(lk), 2, 64, generator=g).to(dtype)
    return q, k, v, offsets(lq), offsets(lk), max(lq), max(lk)


VARLEN_CAPTURE_BAD = {
    "q-step-down": (lambda cq, ck, mq: (cq.index_fill(0, torch.tensor([2]), 4), ck, mq), 1),
    "q-past-total": (lambda cq, ck, mq: (cq.index_fill(0, torch.tensor([4]), 40), ck, mq), 3),
    "k-step-down": (lambda cq, ck, mq: (cq, ck.index_fill(0, torch.tensor([3]), 8), mq), 2),
    "k-first-not-zero": (lambda cq, ck, mq: (cq, ck.index_fill(0, torch.tensor([0]), 1), mq), 0),
    "q-longer-than-max": (lambda cq, ck, mq: (cq, ck, 10), 2),
    # an int64 offset 2**32 past its value (cut to int32 it would look right)
    "k-int64-wraps": (lambda cq, ck, mq: (cq, ck.long().index_add(0, torch.tensor([3]), torch.tensor([2**32])), mq), 2),
}


@pytest.mark.emu
@pytest.mark.parametrize("name", list(VARLEN_CAPTURE_BAD))
@pytest.mark.parametrize("arch", ["80", "90"])
def test_varlen_capture_offsets_out_of_range(arch, name, monkeypatch):
    """Under (emulated) graph capture, with max_seqlen_q / max_seqlen_k given: good offsets give the eager result bit
    for bit (one launch of the sm80 or, as sm_90, the Hopper packed kernel); offsets out of range (a step down, an
    end past the total, a first offset not 0, a sequence longer than max_seqlen_q, an int64 offset that int32 would
    wrap) give NaN output and log-sum-exp rows from the first bad sequence on, the rows before it the eager result
    bit for bit, and no access outside the tensors."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", arch)
    q, k, v, cu_q, cu_k, mq, mk = _capture_case()
    args = (0.0, True, None, True, [-1, -1])
    want_out, want_lse, _ = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, *args)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    with attention_ext.debug.kernel_log() as lines:
        out, lse, _ = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, *args)
    assert len(lines) == 1 and ("sm90" in lines[0]) == (arch == "90"), lines
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse), "good offsets under capture"
    corrupt, first = VARLEN_CAPTURE_BAD[name]
    bad_q, bad_k, bad_mq = corrupt(cu_q.clone(), cu_k.clone(), mq)
    out, lse, _ = emu.ops._attention_varlen_forward(q, k, v, bad_q, bad_k, bad_mq, mk, *args)
    row = int(cu_q[first])  # rows before the first refused sequence keep their offsets
    assert out[row:].isnan().all() and lse[4 * row:].isnan().all(), "refused rows"
    assert torch.equal(out[:row], want_out[:row]) and torch.equal(lse[:4 * row], want_lse[:4 * row]), "rows before"


@pytest.mark.emu
def test_varlen_capture_refusals(monkeypatch):
    """Under (emulated) graph capture: no max_seqlen_q / max_seqlen_k, ALiBi, float64 and head dim 0 (sequence by
    sequence) each raise an error that says why."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    q, k, v, cu_q, cu_k, mq, mk = _capture_case()
    args = (0.0, True, None, True, [-1, -1])
    with pytest.raises(ValueError, match="needs max_seqlen_q and max_seqlen_k"):
        emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, mk, *args)
    with pytest.raises(RuntimeError, match="with ALiBi cannot be captured in a CUDA graph"):
        emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, *args, 0.0, torch.full((4,), 0.5))
    with pytest.raises(RuntimeError, match="in float64 cannot be captured in a CUDA graph"):
        emu.ops._attention_varlen_forward(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk, *args)
    with pytest.raises(RuntimeError, match="of head dim 0 cannot be captured in a CUDA graph"):
        emu.ops._attention_varlen_forward(q[..., :0], k[..., :0], v[..., :0], cu_q, cu_k, mq, mk, *args)


@pytest.mark.emu
def test_varlen_capture_backward_refusals(monkeypatch):
    """Under (emulated) graph capture the backward without max_seqlen_q / max_seqlen_k, and with ALiBi, a soft cap,
    float64 or head dim 0 (which run sequence by sequence), raises an error that says why."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    q, k, v, cu_q, cu_k, mq, mk = _capture_case()
    args = (0.0, True, None, True, [-1, -1])
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, *args)
    g = torch.randn_like(out)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    bwd = emu.ops._attention_varlen_backward
    with pytest.raises(ValueError, match="backward under CUDA-graph capture needs max_seqlen_q and max_seqlen_k"):
        bwd(g, q, k, v, cu_q, cu_k, out, lse, rng, *args)
    with pytest.raises(ValueError, match="max_seqlen_q and max_seqlen_k must be >= 0"):
        bwd(g, q, k, v, cu_q, cu_k, out, lse, rng, *args, None, 0.0, None, mq, -1)
    for extra, what in (((0.0, torch.full((4,), 0.5)), "with ALiBi"), ((5.0, None), "with a soft cap")):
        with pytest.raises(RuntimeError, match=f"backward {what} cannot be captured in a CUDA graph"):
            bwd(g, q, k, v, cu_q, cu_k, out, lse, rng, *args, None, *extra, mq, mk)
    d = [t.double() for t in (g, q, k, v)]
    with pytest.raises(RuntimeError, match="backward in float64 cannot be captured in a CUDA graph"):
        bwd(d[0], *d[1:], cu_q, cu_k, out.double(), lse.double(), rng, *args, None, 0.0, None, mq, mk)
    z = [t[..., :0] for t in (g, q, k, v, out)]
    with pytest.raises(RuntimeError, match="backward of head dim 0 cannot be captured in a CUDA graph"):
        bwd(z[0], *z[1:4], cu_q, cu_k, z[4], lse, rng, *args, None, 0.0, None, mq, mk)


@pytest.mark.emu
@pytest.mark.parametrize("name", list(VARLEN_CAPTURE_BAD))
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_capture_backward_offsets_out_of_range(arch, name, dropout_p, monkeypatch):
    """The backward under (emulated) graph capture, with max_seqlen_q / max_seqlen_k given: good offsets give the
    eager gradients bit for bit (one launch of each kernel, the Hopper backward as sm_90); offsets out of range give
    NaN gradient rows (query, key and value) from the first refused sequence on, the rows before it the eager ones
    bit for bit, and no access outside the tensors."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", arch)
    q, k, v, cu_q, cu_k, mq, mk = _capture_case()
    args = (dropout_p, True, None, True, [-1, -1])
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, *args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    want = emu.ops._attention_varlen_backward(g, q, k, v, cu_q, cu_k, out, lse, rng, *args)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    tail = (None, 0.0, None)
    with attention_ext.debug.kernel_log() as lines:
        got = emu.ops._attention_varlen_backward(g, q, k, v, cu_q, cu_k, out, lse, rng, *args, *tail, mq, mk)
    assert len(lines) == 1 and ("sm90" in lines[0]) == (arch == "90"), lines
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "good offsets under capture"
    corrupt, first = VARLEN_CAPTURE_BAD[name]
    bad_q, bad_k, bad_mq = corrupt(cu_q.clone(), cu_k.clone(), mq)
    got = emu.ops._attention_varlen_backward(g, q, k, v, bad_q, bad_k, out, lse, rng, *args, *tail, bad_mq, mk)
    rows = (int(cu_q[first]), int(cu_k[first]), int(cu_k[first]))  # rows before the first refused sequence
    for what, a, b, row in zip(("dq", "dk", "dv"), got, want, rows):
        assert a[row:].isnan().all(), f"{what}: refused rows"
        assert torch.equal(a[:row], b[:row]), f"{what}: rows before"


@pytest.mark.emu
def test_varlen_capture_backward_no_rows(monkeypatch):
    """A captured backward whose longest query (or key) sequence has no rows runs no kernel: the gradient rows of
    the sequences are 0 (as eager), rows past the offsets NaN."""
    if emu.ops is None:
        pytest.skip(emu.SKIP_REASON)
    q, k, v, _, _, _, _ = _capture_case()
    cu_q = torch.tensor([0, 0, 0], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    q0, k0, v0 = q[:0], k[:7], v[:7]
    args = (0.0, False, None, True, [-1, -1])
    out, lse, rng = emu.ops._attention_varlen_forward(q0, k0, v0, cu_q, cu_k, 0, 4, *args)
    want = emu.ops._attention_varlen_backward(out, q0, k0, v0, cu_q, cu_k, out, lse, rng, *args)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    got = emu.ops._attention_varlen_backward(out, q0, k0, v0, cu_q, cu_k, out, lse, rng, *args, None, 0.0, None, 0, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and not got[1].any()
    # the keys' offsets end before the last 3 keys: their gradient rows are no sequence's (NaN)
    got = emu.ops._attention_varlen_backward(out, q0, k[:10], v[:10], cu_q, cu_k, out, lse, rng, *args, None, 0.0,
                                             None, 0, 4)
    for t in got[1:]:
        assert not t[:7].any() and t[7:].isnan().all()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_varlen_cuda_graph(device):
    """attention_varlen captured in a CUDA graph with its offsets on the GPU and max_seqlen_q / _k given (no sync):
    the replay gives the eager result bit for bit; replayed after cu_seqlens_k stepped down at sequence 2 (in the
    captured tensor), rows from sequence 2 on are NaN and the others unchanged, without a fault."""
    q, k, v, cu_q, cu_k, mq, mk = (t.to(device) if isinstance(t, torch.Tensor) else t for t in _capture_case())
    kw = dict(max_seqlen_q=mq, max_seqlen_k=mk, is_causal=True, enable_gqa=True)
    want = attention_ext.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention_ext.attention_varlen(q, k, v, cu_q, cu_k, **kw)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_ext.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    cu_k[3] = 8
    graph.replay()
    torch.cuda.synchronize()
    row = int(cu_q[2])
    assert out[row:].isnan().all() and torch.equal(out[:row], want[:row])


@pytest.mark.parametrize("return_lse", [False, True])
def test_varlen_backward_gets_the_forwards_maxima(return_lse):
    """attention_varlen's autograd (the C++ one, and with return_lse=True the Python one of _lse.py) passes the
    forward's max_seqlen_q / max_seqlen_k on to the backward op (which needs them to be captured in a CUDA graph),
    and the backward checks them against the offsets as the forward does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.attention_ext._attention_varlen_backward.default:
                calls.append((args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    q, k, v, cu_q, cu_k, mq, mk = _capture_case(torch.float32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention_ext.attention_varlen(*leaves, cu_q, cu_k, mq, mk, is_causal=True, enable_gqa=True,
                                         return_lse=return_lse)
    with Record():
        if return_lse:
            torch.autograd.backward(out, [torch.randn_like(out[0]), torch.randn_like(out[1])])
        else:
            out.backward(torch.randn_like(out))
    assert len(calls) == 1
    schema = torch.ops.attention_ext._attention_varlen_backward.default._schema
    names = [a.name for a in schema.arguments]
    args, kwargs = calls[0]
    bound = dict(zip(names, args)) | kwargs
    assert (bound["max_seqlen_q"], bound["max_seqlen_k"]) == (mq, mk)
    assert return_lse == (bound.get("grad_logsumexp") is not None)
    o, lse, rng = torch.ops.attention_ext._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, 0.0, True, None,
                                                                     True, [-1, -1])
    with pytest.raises(ValueError, match="max_seqlen_q is 12 but cu_seqlens_q holds a sequence of length 13"):
        torch.ops.attention_ext._attention_varlen_backward(o, q, k, v, cu_q, cu_k, o, lse, rng, 0.0, True, None, True,
                                                           [-1, -1], max_seqlen_q=12, max_seqlen_k=mk)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_varlen_cuda_graph_backward(device, dropout_p):
    """attention_varlen's forward and backward captured in one CUDA graph with the offsets on the GPU and
    max_seqlen_q / _k given (through autograd without dropout; through the ops with it, so that the replay's
    rng_state is at hand): the replay gives the eager gradients bit for bit (deterministic algorithms on: dQ's
    reduction in a fixed order); replayed after cu_seqlens_k stepped down at sequence 2, the gradient rows from
    sequence 2 on are NaN and the others unchanged, without a fault."""
    torch.use_deterministic_algorithms(True)
    try:
        _varlen_cuda_graph_backward(device, dropout_p)
    finally:
        torch.use_deterministic_algorithms(False)


def _varlen_cuda_graph_backward(device, dropout_p):
    q, k, v, cu_q, cu_k, mq, mk = (t.to(device) if isinstance(t, torch.Tensor) else t for t in _capture_case())
    g = torch.randn(q.shape[0], 4, 64, device=device, dtype=q.dtype)
    args = (dropout_p, True, None, True, [-1, -1])
    ops = torch.ops.attention_ext
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        if dropout_p == 0.0:
            out = attention_ext.attention_varlen(*leaves, cu_q, cu_k, mq, mk, *args)
            return torch.autograd.grad(out, leaves, g), None
        out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, *args)
        return ops._attention_varlen_backward(g, q, k, v, cu_q, cu_k, out, lse, rng, *args, None, 0.0, None, mq,
                                              mk), (out, lse, rng)

    def eager(saved, offsets_k):  # (offsets on the host: read without a sync)
        if saved is None:
            out = attention_ext.attention_varlen(*leaves, cu_q.cpu(), offsets_k.cpu(), mq, mk, *args)
            return torch.autograd.grad(out, leaves, g)
        return ops._attention_varlen_backward(g, q, k, v, cu_q.cpu(), offsets_k.cpu(), *saved, *args)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads, saved = step()
    graph.replay()
    torch.cuda.synchronize()
    good_k = cu_k.clone()
    assert all(torch.equal(a, b) for a, b in zip(grads, eager(saved, good_k)))
    cu_k[3] = 8
    graph.replay()
    torch.cuda.synchronize()
    want = eager(saved, good_k)  # (the rows before sequence 2 do not depend on the NaN rows of out)
    for a, b, row in zip(grads, want, (int(cu_q[2]), int(good_k[2]), int(good_k[2]))):
        assert a[row:].isnan().all() and torch.equal(a[:row], b[:row])

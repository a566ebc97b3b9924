"""The Hopper (sm_90a) forward and backward kernels (csrc/cuda/hopper/), run on the CPU
SIMT emulator with ATTENTION_EXT_EMU_ARCH=90: TMA copies, mbarriers, wgmma
and the warp-specialised pipeline emulated as the PTX ISA defines them.

What these tests pin down: the kernel log says which kernel ran (and the
sm80 fallback takes every call the Hopper kernel does not cover); the output
and log-sum-exp match the float64 reference with the same <= 2x PyTorch
error tolerance as every other backend, over both head-dim buckets, fp16 and
bf16, causal / sliding windows, GQA / MQA, ragged lengths, head dims below
the bucket, E != Ev, non-contiguous views, key-padding masks and dropout
(forward); the Hopper backward's dQ, dK, dV over the same grid, within the
yardstick of test_cuda_emu.py; and no result changes by a single bit with the
fiber order or the moment TMA data and wgmma results land (a missing wait or
barrier would; dQ, summed with atomics, only up to rounding).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import emu
from test_cuda_emu import _check_fwd_bwd, _inputs
from test_ops import check_hidden_key_tiles
from reference import (assert_close_vs_baseline, assert_close_vs_baselines, expand_kv, flash2_rounding,
                       reference_attention, reference_grads, window_visibility)

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or "")]

f16, bf16 = torch.float16, torch.bfloat16
W = [-1, -1]


@pytest.fixture
def sm90(monkeypatch):
    """The emulated device is an H100: the Hopper kernels run where they cover the call
    (outputs start as NaN: conftest sets ATTENTION_EXT_POISON=1)."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")


def _forward(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, window=W):
    gqa = k.shape[-3] != q.shape[-3]
    return emu.ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, gqa, list(window))


def _baseline(q, k, v, is_causal=False, window=None, scale=None):
    """PyTorch's CPU SDPA in the input dtype, with the same visibility as one mask."""
    L, S = q.shape[-2], k.shape[-2]
    vis = window_visibility(L, S, is_causal, window)
    gqa = k.shape[-3] != q.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=gqa, scale=scale)


def _check(q, k, v, is_causal=False, window=None, scale=None):
    out, lse, _ = _forward(q, k, v, is_causal=is_causal, scale=scale, window=window or W)
    ref = reference_attention(q, k, v, is_causal=is_causal, scale=scale, window_size=window,
                              enable_gqa=k.shape[-3] != q.shape[-3])
    assert_close_vs_baseline("output", out, ref.out, _baseline(q, k, v, is_causal, window, scale), q.dtype)
    # log-sum-exp in fp32 from fp32 accumulators: rows with no visible key are -inf
    finite = torch.isfinite(ref.lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref.lse[finite]).abs().max() < 2e-3
    return out, lse


def _kernel_log(fn):
    """Runs fn in a fresh interpreter with ATTENTION_EXT_LOG_KERNEL=1 and returns its stderr."""
    env = dict(os.environ, ATTENTION_EXT_LOG_KERNEL="1", ATTENTION_EXT_EMU_ARCH="90")
    code = ("import sys; sys.path.insert(0, %r); import torch, emu\n" % os.path.dirname(__file__)) + fn
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.parametrize("dtype", [f16, bf16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("E", [64, 128, 256, 200])
def test_buckets(sm90, dtype, E):
    """Every head-dim bucket (200 runs on 256), several key tiles (S = 300: 3 tiles of 128
    or 5 of 64, the last ragged), two query blocks, causal and not."""
    q, k, v, _ = _inputs(1, 2, 2, 160, 300, E, E, dtype, seed=E)
    _check(q, k, v)
    _check(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [f16, bf16], ids=["fp16", "bf16"])
def test_causal_and_windows(sm90, dtype):
    """Causal (fully masked key tiles skipped, diagonal tiles masked element-wise) and
    sliding windows, including one whose rows near the start see no key at all."""
    q, k, v, _ = _inputs(1, 2, 2, 300, 300, 64, 64, dtype, seed=3)
    _check(q, k, v, is_causal=True)
    _check(q, k, v, window=(100, 0))
    _check(q, k, v, window=(40, 70))
    q2, k2, v2, _ = _inputs(1, 1, 1, 200, 90, 64, 64, dtype, seed=4)
    out, lse = _check(q2, k2, v2, window=(5, 0))  # rows i >= 95 see no key: keys [i - 5, i] are past S = 90
    assert torch.equal(out[..., 95:, :], torch.zeros_like(out[..., 95:, :]))
    assert torch.isinf(lse[..., 95:]).all() and torch.isfinite(lse[..., :95]).all()


@pytest.mark.parametrize("hkv", [1, 2], ids=["mqa", "gqa"])
def test_gqa(sm90, hkv):
    """Grouped-query attention: the kv head of a CTA through the TMA coordinate."""
    q, k, v, _ = _inputs(2, 4, hkv, 130, 200, 128, 128, bf16, seed=5)
    _check(q, k, v, is_causal=True)


def test_small_dims_and_ev(sm90):
    """Head dims below the bucket (TMA zero-fills past E) and Ev != E, L != S."""
    q, k, v, _ = _inputs(1, 2, 2, 70, 129, 40, 40, f16, seed=6)
    _check(q, k, v)
    q, k, v, _ = _inputs(1, 2, 2, 33, 257, 96, 72, bf16, seed=7)
    _check(q, k, v, scale=0.3)


def test_non_contiguous_views(sm90):
    """(B, L, H, E) storage seen as (B, H, L, E): TMA takes the strides as they are."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 150, 3, 64, generator=g).to(bf16).transpose(1, 2)
    k = torch.randn(2, 190, 3, 64, generator=g).to(bf16).transpose(1, 2)
    v = torch.randn(2, 190, 3, 64, generator=g).to(bf16).transpose(1, 2)
    assert not q.is_contiguous()
    _check(q, k, v, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "float", "bf16"])
def test_key_padding_mask(sm90, kind):
    """A key-padding mask (B, 1, 1, S), bool or additive, read per key column by the
    Hopper kernel; one batch row masks every key (output 0 / NaN-free)."""
    B, H, L, S = 3, 2, 70, 200
    q, k, v, _ = _inputs(B, H, H, L, S, 64, 64, bf16, seed=13)
    lengths = torch.tensor([200, 77, 0])
    keep = torch.arange(S)[None, :] < lengths[:, None]
    if kind == "bool":
        mask = keep[:, None, None, :]
    else:
        g = torch.Generator().manual_seed(2)
        mask = (torch.randn(B, 1, 1, S, generator=g) * 2).masked_fill(~keep[:, None, None, :], -math.inf)
        mask = mask.to(torch.float32 if kind == "float" else bf16)
    out, lse, _ = _forward(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    bmask = mask[:2] if kind == "bool" else mask[:2].to(bf16)
    base = F.scaled_dot_product_attention(q[:2], k[:2], v[:2], attn_mask=bmask)
    assert_close_vs_baseline("output", out[:2], ref.out[:2], base, bf16)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # the fully padded sequence: 0, as every backend here
    assert torch.isinf(lse[2]).all()
    err = _kernel_log(
        "m = torch.ones(2, 1, 1, 30, dtype=torch.bool)\n"
        "q = torch.randn(2, 1, 16, 64, dtype=torch.bfloat16); k = torch.randn(2, 1, 30, 64, dtype=torch.bfloat16)\n"
        "emu.ops._attention_forward(q, k, k, m, 0.0, False, None, False, [-1, -1])\n")
    assert "sm90a" in err


def test_dropout_same_mask_as_sm80(sm90):
    """Dropout: the keep-mask is the shared Philox stream, so the output equals the
    reference computed with _dropout_mask's mask."""
    p = 0.25
    q, k, v, _ = _inputs(2, 2, 2, 140, 150, 64, 64, f16, seed=10)
    torch.manual_seed(1)
    out, lse, rng = _forward(q, k, v, dropout_p=p)
    keep = emu.ops._dropout_mask(rng, 2, 2, 140, 150, p)
    r = reference_attention(q, k, v, dropout_p=p, dropout_mask=keep)
    assert (out.double() - r.out).abs().max() < 2e-2


def test_backward_after_hopper_forward(sm90):
    """The sm80 backward runs from the Hopper forward's output and log-sum-exp."""
    q, k, v, do = _inputs(1, 2, 1, 150, 170, 64, 64, bf16, seed=11)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = emu.attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    out.backward(do)
    _, _, rdq, rdk, rdv, _ = reference_grads(q, k, v, do, None, is_causal=True, enable_gqa=True)
    bq, bk, bv = (t.clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(bq, bk, bv, is_causal=True, enable_gqa=True).backward(do)
    for name, ours, ref, base in zip(("dq", "dk", "dv"), (qs, ks, vs), (rdq, rdk, rdv), (bq, bk, bv)):
        # 16-bit gradients: the FLASH-style roundings may exceed the math backend's error by a little
        err = (ours.grad.double() - ref).abs().max()
        assert err <= 2 * max((base.grad.double() - ref).abs().max(), 4e-3 * ref.abs().max()), name


@pytest.mark.parametrize("order,landing", [("reverse", "late"), ("shuffle", "late"), ("forward", "early")])
def test_schedules_bit_identical(sm90, order, landing):
    """Fiber order and TMA / wgmma landing time change no bit of the output or lse."""
    q, k, v, _ = _inputs(1, 2, 1, 140, 270, 128, 128, f16, seed=12)
    with emu.schedule("forward", "late"):
        base = _forward(q, k, v, is_causal=True, window=(200, 0))
    with emu.schedule(order, landing):
        again = _forward(q, k, v, is_causal=True, window=(200, 0))
    assert torch.equal(base[0], again[0])
    assert torch.equal(base[1], again[1])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_persistent_grid(sm90, monkeypatch, dropout):
    """The persistent forward: with 3 emulated multiprocessors each CTA walks 8 tiles of
    different lengths (causal, longest first) through one continuing TMA / mbarrier
    pipeline, and gives the same bits as one CTA per tile (132 multiprocessors)."""
    q, k, v, _ = _inputs(2, 3, 1, 300, 300, 128, 128, bf16, seed=14)

    def run():
        torch.manual_seed(3)  # the emulator's glue draws the dropout seed from the CPU generator
        return _forward(q, k, v, dropout_p=dropout, is_causal=True)

    one = run()
    monkeypatch.setenv("ATTENTION_EXT_EMU_SMS", "3")
    many = run()
    assert torch.equal(one[2], many[2])  # same rng_state
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    if not dropout:
        _check(q, k, v, is_causal=True)


def test_kernel_log_and_fallbacks():
    """The log names the Hopper kernel for covered calls and the sm80 kernel for
    the rest: an explicit (non key-padding) mask, fp32, rows not 16-byte aligned."""
    err = _kernel_log(
        "q = torch.randn(1, 2, 20, 64, dtype=torch.bfloat16)\n"
        "o = lambda *a: emu.ops._attention_forward(*a)\n"
        "o(q, q, q, None, 0.0, False, None, False, [-1, -1])\n"
        "o(q, q, q, torch.ones(20, 20, dtype=torch.bool), 0.0, False, None, False, [-1, -1])\n"
        "o(q.float(), q.float(), q.float(), None, 0.0, False, None, False, [-1, -1])\n"
        "r = torch.randn(1, 2, 20, 192, dtype=torch.bfloat16)\n"
        "o(r, r, r, None, 0.0, False, None, False, [-1, -1])\n"
        "u = torch.randn(1, 2, 20, 36, dtype=torch.float16)\n"
        "o(u, u, u, None, 0.0, False, None, False, [-1, -1])\n")
    lines = [ln for ln in err.splitlines() if "emu forward" in ln]
    assert len(lines) == 5, err
    assert "sm90a wgmma + TMA" in lines[0] and "bucket 64" in lines[0] and "bf16" in lines[0]
    assert "sm90a wgmma + TMA" in lines[3] and "bucket 256" in lines[3]  # E = 192 runs on the 256 bucket
    for ln in (lines[1], lines[2], lines[4]):
        assert "sm80 mma.sync" in ln, ln


def test_disable_switch(monkeypatch):
    """ATTENTION_EXT_DISABLE_SM90=1 runs the sm80 kernel even on an sm_90 device."""
    monkeypatch.setenv("ATTENTION_EXT_DISABLE_SM90", "1")
    err = _kernel_log("q = torch.randn(1, 1, 8, 64, dtype=torch.float16)\n"
                      "emu.ops._attention_forward(q, q, q, None, 0.0, False, None, False, [-1, -1])\n")
    assert "sm80 mma.sync" in err and "sm90a" not in err


# ---------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("dtype", [f16, bf16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("E", [64, 128, 256])
def test_backward_buckets(sm90, dtype, E):
    """dQ, dK, dV of every bucket: two key blocks of 128 (64 and 128) or four of 64 (256,
    the head-dim split), the last ragged; three query blocks."""
    q, k, v, do = _inputs(1, 2, 2, 150, 200, E, E, dtype, seed=20 + E)
    _check_fwd_bwd(q, k, v, do)


@pytest.mark.parametrize("case", ["causal", "window", "gqa", "mqa-causal", "small-dims", "scale",
                                  "d256-gqa-causal", "d256-window", "d256-small-dims"])
def test_backward_features(sm90, case):
    """Causal / window bounds per (key row, query column), GQA (dK / dV summed over the
    group in registers), head dims below the bucket and E != Ev, a custom scale; the same
    for the head-dim split of bucket 256 (its two consumers own different query columns of
    S^T and different head dims of dK, dV, dQ)."""
    if case == "causal":
        q, k, v, do = _inputs(1, 2, 2, 200, 200, 64, 64, bf16, seed=30)
        _check_fwd_bwd(q, k, v, do, is_causal=True)
    elif case == "window":
        q, k, v, do = _inputs(1, 2, 2, 260, 230, 64, 64, f16, seed=31)
        _check_fwd_bwd(q, k, v, do, window_size=(70, 20))
    elif case == "gqa":
        q, k, v, do = _inputs(2, 4, 2, 70, 140, 128, 128, bf16, seed=32)
        _check_fwd_bwd(q, k, v, do)
    elif case == "mqa-causal":
        q, k, v, do = _inputs(1, 3, 1, 130, 130, 64, 64, f16, seed=33)
        _check_fwd_bwd(q, k, v, do, is_causal=True)
    elif case == "small-dims":
        q, k, v, do = _inputs(1, 2, 2, 90, 150, 40, 56, bf16, seed=34)
        _check_fwd_bwd(q, k, v, do)
    elif case == "scale":
        q, k, v, do = _inputs(1, 1, 1, 64, 128, 128, 96, f16, seed=35)
        _check_fwd_bwd(q, k, v, do, scale=0.05)
    elif case == "d256-gqa-causal":
        q, k, v, do = _inputs(1, 4, 2, 140, 140, 256, 256, bf16, seed=38)
        _check_fwd_bwd(q, k, v, do, is_causal=True)
    elif case == "d256-window":
        q, k, v, do = _inputs(1, 2, 2, 150, 170, 256, 256, f16, seed=39)
        _check_fwd_bwd(q, k, v, do, window_size=(50, 30))
    else:
        q, k, v, do = _inputs(1, 2, 1, 90, 110, 200, 136, bf16, seed=40)
        _check_fwd_bwd(q, k, v, do)


@pytest.mark.parametrize("E", [64, 256])
def test_backward_key_padding(sm90, E):
    """A bool key-padding mask, one sequence fully padded (zero gradients, no NaN)."""
    B, H, L, S = 3, 2, 40, 150
    q, k, v, do = _inputs(B, H, H, L, S, E, E, bf16, seed=36)
    lengths = torch.tensor([150, 61, 0])
    mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    emu.attention(qs, ks, vs, mask).backward(do)
    _, _, rdq, rdk, rdv, _ = reference_grads(q, k, v, do, mask)
    bq, bk, bv = (t[:2].clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(bq, bk, bv, attn_mask=mask[:2]).backward(do[:2])
    # and the roundings of PyTorch's CUDA FLASH backend, which the tensor-core kernels share (P, dS in bf16)
    model = flash2_rounding(q[:2], k[:2], v[:2], do[:2], mask[:2])[1:4]
    for name, ours, ref, base, m in zip(("dq", "dk", "dv"), (qs, ks, vs), (rdq, rdk, rdv), (bq, bk, bv), model):
        assert_close_vs_baselines(name, ours.grad[:2], ref[:2], (base.grad, m), bf16)
        assert torch.equal(ours.grad[2], torch.zeros_like(ours.grad[2])), name


@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("layout", ["keypad", "decode_per_head"])
def test_key_padding_tiles_skipped(sm90, layout, E):
    """The Hopper forward and backward skip the key tiles outside a boolean key-padding mask's span of
    true keys (FwdParams::key_bounds, launch_key_bounds): NaN keys and values there change nothing
    (test_ops.check_hidden_key_tiles); the kernel log says the Hopper kernels ran."""
    check_hidden_key_tiles(emu.attention, "cpu", bf16, layout, E=E)
    log = _kernel_log(f"q = torch.randn(1, 2, 8, {E}, dtype=torch.bfloat16, requires_grad=True)\n"
                      f"k, v = (torch.randn(1, 2, 300, {E}, dtype=torch.bfloat16) for _ in range(2))\n"
                      "m = (torch.arange(300) < 200).view(1, 1, 1, 300)\n"
                      "emu.attention(q, k, v, m).sum().backward()\n")
    assert "emu forward: sm90a" in log and "emu backward: sm90a" in log, log


def test_backward_kernel_log():
    """Covered backward calls name the Hopper kernel (head dims 64 and 256: the key split
    and the head-dim split; dropout); a mask gradient, the deterministic mode and rows TMA
    cannot read (72-byte rows) fall back to the sm80 kernel, decided before any row
    statistics or workspace are made."""
    err = _kernel_log(
        "q = torch.randn(1, 2, 20, 64, dtype=torch.float16, requires_grad=True)\n"
        "emu.attention(q, q, q).sum().backward()\n"
        "r = torch.randn(1, 2, 20, 256, dtype=torch.float16, requires_grad=True)\n"
        "emu.attention(r, r, r).sum().backward()\n"
        "emu.attention(q, q, q, dropout_p=0.2).sum().backward()\n"
        "m = torch.zeros(20, 20, dtype=torch.float16, requires_grad=True)\n"
        "emu.attention(q, q, q, m).sum().backward()\n"
        "torch.use_deterministic_algorithms(True)\n"
        "emu.attention(q, q, q).sum().backward()\n"
        "torch.use_deterministic_algorithms(False)\n"
        "u = torch.randn(1, 2, 20, 36, dtype=torch.float16, requires_grad=True)\n"
        "emu.attention(u, u, u).sum().backward()\n")
    lines = [ln for ln in err.splitlines() if "emu backward" in ln]
    assert len(lines) == 6, err
    fwd = [ln for ln in err.splitlines() if "emu forward" in ln]
    assert "sm80 mma.sync" in fwd[-1]  # 72-byte rows: neither direction
    assert "sm90a" in lines[0] and "bucket 64" in lines[0]
    assert "sm90a" in lines[1] and "bucket 256" in lines[1]
    assert "sm90a" in lines[2] and "bucket 64" in lines[2]  # dropout
    for ln in lines[3:]:
        assert "sm80 mma.sync" in ln, ln


@pytest.mark.parametrize("E,dtype,Hkv,causal", [(64, f16, 2, False), (128, bf16, 1, True), (256, f16, 2, True)],
                         ids=["64", "128-mqa-causal", "256-gqa-causal"])
def test_backward_dropout(sm90, E, dtype, Hkv, causal):
    """The Hopper backward with dropout applies the forward's keep-mask (the shared Philox
    stream, drawn in the transposed key-major fragments): dQ, dK, dV against the float64
    reference built with _dropout_mask's mask, within 2x the error of the same
    computation in the input dtype by PyTorch (softmax, then P o Z / (1 - p); or with
    the roundings of its CUDA FLASH backend, whichever is further). Ragged
    lengths, so that draws past L and S are made and discarded."""
    p = 0.3
    B, Hq, L, S = 1, 4, 90, 150
    q, k, v, do = _inputs(B, Hq, Hkv, L, S, E, E, dtype, seed=41 + E)
    torch.manual_seed(5)
    out, lse, rng = _forward(q, k, v, dropout_p=p, is_causal=causal)
    keep = emu.ops._dropout_mask(rng, B, Hq, L, S, p)
    dq, dk, dv, _ = emu.ops._attention_backward(do, q, k, v, None, out, lse, rng, p, causal, None, Hkv != Hq, W, False)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = reference_attention(rq, rk, rv, dropout_p=p, dropout_mask=keep, is_causal=causal, enable_gqa=Hkv != Hq)
    g = torch.autograd.grad(r.out, (rq, rk, rv), do.double())
    # the same computation in the input dtype by PyTorch's CPU SDPA, with the mask as
    # an explicit dropout (P o Z / (1 - p)): its error is the yardstick
    bq, bk, bv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    scores = (bq @ expand_kv(bk, Hq).transpose(-1, -2)) * E ** -0.5
    scores = scores.masked_fill(~window_visibility(L, S, causal), float("-inf"))
    probs = torch.softmax(scores.float(), -1).to(dtype) * keep / (1 - p)
    (probs @ expand_kv(bv, Hq)).backward(do)
    # and the roundings of PyTorch's CUDA FLASH backend with that mask (reference.flash2_rounding)
    model = flash2_rounding(q, k, v, do, window_visibility(L, S, causal), None, p, keep)[1:4]
    for name, ours, ref, base, m in zip(("dq", "dk", "dv"), (dq, dk, dv), g, (bq.grad, bk.grad, bv.grad), model):
        assert torch.isfinite(ours).all(), name
        # the yardsticks themselves are close computations (a wrong one would widen the tolerance)
        for b in (base, m):
            assert (b.double() - ref).abs().max() < 0.05 * ref.abs().max(), name
        assert_close_vs_baselines(name, ours, ref, (base, m), dtype)


@pytest.mark.parametrize("order,landing", [("reverse", "late"), ("shuffle", "early")])
@pytest.mark.parametrize("E,dropout", [(64, 0.0), (256, 0.0), (128, 0.2)])
def test_backward_schedules(sm90, order, landing, E, dropout):
    """dK and dV (register accumulators) are bit-identical across schedules; dQ (atomics
    from two warpgroups) equal up to the order of its fp32 additions. At 256 this also
    covers the head-dim split's shared P^T / dS^T buffers and its dQ staging in the stage
    the producer refills; with dropout, the generator words in shared memory and the
    keep-bit shuffles."""
    q, k, v, do = _inputs(1, 2, 1, 100, 190, E, E, bf16, seed=37)

    def grads():
        torch.manual_seed(3)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        emu.attention(qs, ks, vs, is_causal=True, enable_gqa=True, dropout_p=dropout).backward(do)
        return qs.grad, ks.grad, vs.grad

    with emu.schedule("forward", "late"):
        base = grads()
    with emu.schedule(order, landing):
        again = grads()
    assert torch.equal(base[1], again[1]) and torch.equal(base[2], again[2])
    assert (base[0].float() - again[0].float()).abs().max() <= 2 ** -7 * base[0].float().abs().max()

"""The CUDA kernels, run on the CPU SIMT emulator (tests/emu.py, csrc/cuda/emu/).

The float64-reference grid of test_ops.py runs on the emulator too (its
'emu-*' cases). This file adds what that grid does not reach: every compiled
head-dim bucket and dtype (TF32 included), the deterministic backward, dropout
(the CUDA Philox stream must equal the CPU one), attention_probs, and the
schedule checks: the fiber order and the cp.async landing time must not
change a single bit of any result (a missing barrier or wait would).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import emu
from conftest import dtype_id
from reference import (assert_close_vs_baseline, flash2_rounding_grads, reference_attention, reference_grads,
                       window_visibility)

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or "")]

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
W = [-1, -1]


@pytest.fixture
def tf32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(old)


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(dtype)
    do = torch.randn(B, Hq, L, Ev, generator=g).to(dtype)
    return q, k, v, do


def _check_fwd_bwd(q, k, v, do, mask=None, baseline_dtype=None, **kw):
    """Emulated forward + backward against the float64 reference. Yardstick:
    PyTorch's CPU SDPA in baseline_dtype (default: the input dtype); for 16-bit
    gradients, the larger of its error and that of the FLASH backend's
    roundings (reference.flash2_rounding_grads)."""
    dt = q.dtype
    gqa = k.shape[-3] != q.shape[-3]
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = emu.attention(qs, ks, vs, mask, enable_gqa=gqa, **kw)
    out.backward(do)
    rout, rlse, rdq, rdk, rdv, _ = reference_grads(q, k, v, do, mask, enable_gqa=gqa, **kw)
    bd = baseline_dtype or dt
    bq, bk, bv = (t.detach().to(bd).requires_grad_() for t in (q, k, v))
    # the same visibility as one SDPA mask (SDPA has no windows)
    L, S = q.shape[-2], k.shape[-2]
    vis = window_visibility(L, S, kw.get("is_causal", False), kw.get("window_size"))
    if mask is None:
        bmask = vis
    elif mask.dtype == torch.bool:
        bmask = mask & vis
    else:
        bmask = mask.detach().to(bd).masked_fill(~vis, -math.inf)
    bout = F.scaled_dot_product_attention(bq, bk, bv, attn_mask=bmask, enable_gqa=gqa, scale=kw.get("scale"))
    bout.backward(do.to(bd))
    assert_close_vs_baseline("output", out, rout, bout, dt)
    base_grads = [bq.grad, bk.grad, bv.grad]
    if dt in (f16, bf16):
        model = flash2_rounding_grads(q, k, v, do, bmask, kw.get("scale"))
        for i, (g, ref) in enumerate(zip(model, (rdq, rdk, rdv))):
            if (g.double() - ref).abs().max() > (base_grads[i].double() - ref).abs().nan_to_num(0.0).max():
                base_grads[i] = g
    for name, ours, ref, base in zip(("dq", "dk", "dv"), (qs, ks, vs), (rdq, rdk, rdv), base_grads):
        assert ours.grad.dtype == dt
        assert_close_vs_baseline(name, ours.grad, ref, base, dt)
    return out, qs.grad, ks.grad, vs.grad


# Every head-dim bucket of generate.py, with query and value head dims that are
# not the bucket itself (padding inside the kernel), ragged L and S, causal or not.
BUCKETS = [(32, 24), (64, 64), (72, 96), (128, 120), (160, 192), (256, 200)]


@pytest.mark.parametrize("dtype", [f16, bf16], ids=dtype_id)
@pytest.mark.parametrize("E,Ev", BUCKETS, ids=[f"E{e}_Ev{v}" for e, v in BUCKETS])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dim_buckets_half(dtype, E, Ev, causal):
    q, k, v, do = _inputs(1, 2, 2, 70, 101, E, Ev, dtype, seed=E + Ev + causal)
    _check_fwd_bwd(q, k, v, do, is_causal=causal)


@pytest.mark.parametrize("E,Ev", [(40, 64), (128, 96), (256, 256)], ids=["E40_Ev64", "E128_Ev96", "E256"])
def test_head_dim_buckets_fp32(E, Ev):
    """float32 without TF32: the 3-pass split keeps float32 accuracy."""
    q, k, v, do = _inputs(1, 2, 1, 45, 77, E, Ev, f32, seed=E)
    _check_fwd_bwd(q, k, v, do, is_causal=True)


@pytest.mark.parametrize("E", [64, 128])
def test_fp32_tf32_when_allowed(tf32, E):
    """float32 with TF32 allowed (torch.set_float32_matmul_precision('high')): one
    TF32 pass. TF32 keeps 10 mantissa bits, like float16, so PyTorch's float16
    SDPA is the yardstick; and the result must differ from the exact 3-pass one."""
    q, k, v, do = _inputs(2, 2, 2, 64, 64, E, E, f32, seed=E)
    out, *_ = _check_fwd_bwd(q, k, v, do, baseline_dtype=f16)
    torch.set_float32_matmul_precision("highest")
    exact, _, _ = emu.ops._attention_forward(q, k, v, None, 0.0, False, None, False, W)
    assert not torch.equal(out.detach(), exact)
    rout = reference_attention(q, k, v).out
    assert (exact.double() - rout).abs().max() < 1e-5 < (out.detach().double() - rout).abs().max()


def test_gqa_window_mask_many_tiles():
    """Several key blocks per CTA loop, GQA groups, a window and a float mask
    broadcast over batch: the backward's (head, query block) walk."""
    q, k, v, do = _inputs(2, 4, 1, 300, 280, 64, 64, bf16, seed=3)
    mask = torch.randn(1, 4, 300, 280).to(bf16)
    _check_fwd_bwd(q, k, v, do, mask, window_size=(90, 20))


@pytest.mark.parametrize("dtype", [f16, bf16], ids=dtype_id)
def test_deterministic_backward(dtype):
    """torch.use_deterministic_algorithms: the backward splits the key blocks in
    chunks with private dQ accumulators summed in a fixed order; it must agree
    with the atomic path and give the same bits in every fiber order."""
    q, k, v, do = _inputs(1, 2, 2, 150, 700, 64, 64, dtype, seed=5)
    out, lse, rng = emu.ops._attention_forward(q, k, v, None, 0.0, True, None, False, W)
    args = (do, q, k, v, None, out, lse, rng, 0.0, True, None, False, W, False)
    atomic = emu.ops._attention_backward(*args)
    torch.use_deterministic_algorithms(True)
    try:
        det = emu.ops._attention_backward(*args)
        with emu.schedule("shuffle", "early"):
            det2 = emu.ops._attention_backward(*args)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(atomic[:3], det[:3], det2[:3]):
        assert torch.equal(b, c)
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    _, _, rdq, rdk, rdv, _ = reference_grads(q, k, v, do, is_causal=True)
    for ours, ref in zip(det[:3], (rdq, rdk, rdv)):
        assert (ours.double() - ref).abs().max() < (2e-2 if dtype == bf16 else 3e-3)


def _schedule_case():
    torch.manual_seed(7)
    q, k, v, do = _inputs(2, 4, 2, 77, 90, 64, 48, f16, seed=7)
    mask = torch.randn(2, 1, 77, 90).to(f16)
    mask[0, 0, 5] = -math.inf
    return q, k, v, do, mask.requires_grad_()


@pytest.mark.parametrize("order,cp_async", [("reverse", "late"), ("shuffle", "late"), ("forward", "early"),
                                            ("reverse", "early")])
def test_schedule_independent(order, cp_async, monkeypatch):
    """Same bits in every fiber order and with cp.async data landing at issue or
    at the wait: a read not ordered by a barrier / wait would change the result.
    One OS thread: dQ's atomic adds then come in block order every time."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", "1")
    q, k, v, do, mask = _schedule_case()
    common = dict(dropout_p=0.2, is_causal=True, enable_gqa=True)

    def run():
        torch.manual_seed(11)
        qs, ks, vs, ms = (t.detach().clone().requires_grad_() for t in (q, k, v, mask))
        out = emu.attention(qs, ks, vs, ms, **common)
        out.backward(do)
        return out.detach(), qs.grad, ks.grad, vs.grad, ms.grad

    base = run()
    with emu.schedule(order, cp_async):
        other = run()
    for a, b in zip(base, other):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=dtype_id)
def test_dropout_stream_matches_cpu(dtype):
    """The CUDA kernels' dropout mask (Philox, counters {j/4, i, b*H+h, offset})
    equals the CPU backend's bit for bit for the same rng_state, and the forward,
    backward and attention_probs all apply exactly that mask."""
    p = 0.3
    q, k, v, do = _inputs(2, 3, 3, 37, 45, 32, 32, dtype, seed=9)
    torch.manual_seed(123)
    out, lse, rng = emu.ops._attention_forward(q, k, v, None, p, False, None, False, W)
    assert rng[1] != 0  # the emulator's glue draws a nonzero offset: the layout is exercised
    keep = emu.ops._dropout_mask(rng, 2, 3, 37, 45, p)
    assert torch.equal(keep, torch.ops.attention_ext._dropout_mask(rng, 2, 3, 37, 45, p))
    assert 0.6 < keep.float().mean() < 0.8
    r = reference_attention(q, k, v, dropout_p=p, dropout_mask=keep)
    tol = 1e-5 if dtype == f32 else 2e-2
    assert (out.double() - r.out).abs().max() < tol
    probs = emu.ops.attention_probs(q, k, None, lse, rng, p)
    assert (probs.double() - r.probs_dropped).abs().max() < tol * 10
    dq, dk, dv, _ = emu.ops._attention_backward(do, q, k, v, None, out, lse, rng, p, False, None, False, W, False)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    rr = reference_attention(rq, rk, rv, dropout_p=p, dropout_mask=keep)
    g = torch.autograd.grad(rr.out, (rq, rk, rv), do.double())
    for ours, ref in zip((dq, dk, dv), g):
        assert (ours.double() - ref).abs().max() < tol * 3


def test_attention_probs_extreme_rows():
    """attention_probs: finfo.min rows are uniform over their keys (the row
    statistics recomputed on the device), -inf rows are 0, others match."""
    torch.manual_seed(9)
    q = torch.randn(2, 4, 21, 16)
    k = torch.randn(2, 2, 150, 16)
    m = torch.randn(2, 1, 21, 150)
    m[0, 0, 3] = -math.inf
    m[1, 0, 4] = torch.finfo(f32).min
    m[1, 0, 6, ::2] = torch.finfo(f32).min  # partly: the other keys carry the row
    _, lse, rng = emu.ops._attention_forward(q, k, k[..., :8], m, 0.0, True, None, True, [40, -1])
    probs = emu.ops.attention_probs(q, k, m, lse, rng, 0.0, True, None, True, [40, -1])
    r = reference_attention(q, k, k[..., :8], m, is_causal=True, enable_gqa=True, window_size=(40, -1))
    torch.testing.assert_close(probs.double(), r.probs, rtol=1e-5, atol=1e-6)
    assert torch.all(probs[0, :, 3] == 0)
    assert torch.allclose(probs[1, :, 4, :5].double(), torch.full((4, 5), 0.2, dtype=f64))


def test_attention_probs_large_scores_fp32():
    """fp32 scores in the hundreds (scale 10): attention_probs normalises with row sums of its own scores,
    so its weights are as accurate as PyTorch's fp32 softmax of the same scores (with the forward's lse,
    computed from the tensor-core scores, they were ~10x off), per head and in the averaged weights of
    _attention_forward_weights."""
    torch.manual_seed(11)
    q, k, v = torch.randn(2, 2, 65, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 32)
    r = reference_attention(q, k, v, is_causal=True, scale=10.0)
    s = (q @ k.transpose(-1, -2) * 10.0).masked_fill(~r.visible, -math.inf)
    base = torch.softmax(s, dim=-1)
    _, lse, rng = emu.ops._attention_forward(q, k, v, None, 0.0, True, 10.0, False, [-1, -1])
    probs = emu.ops.attention_probs(q, k, None, lse, rng, 0.0, True, 10.0, False, [-1, -1])
    assert_close_vs_baseline("probs", probs, r.probs, base, f32)
    out, _, _, w = emu.ops._attention_forward_weights(q, k, v, None, 0.0, True, 10.0, False, [-1, -1], True)
    assert_close_vs_baseline("averaged weights", w, r.probs.mean(-3), base.mean(-3), f32)
    assert_close_vs_baseline("output", out, r.out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=10.0),
                             f32)


@pytest.mark.parametrize("dtype", [f32, f16], ids=dtype_id)
def test_averaged_weights_with_dropout_and_gqa(dtype):
    """The head mean of _attention_forward_weights (nn.MultiheadAttention's default weights) comes from the
    probabilities kernel itself, which walks every head of a tile and sums in fp32 (the per-head weights are
    never written): it equals the fp32 mean of attention_probs' per-head weights under the same dropout mask,
    with GQA, a causal bound and a key-padding mask, and has the shape (B, L, S)."""
    q, k, v, _ = _inputs(2, 6, 2, 45, 70, 32, 32, dtype, seed=17)
    keep = torch.rand(2, 1, 1, 70, generator=torch.Generator().manual_seed(3)) > 0.2
    torch.manual_seed(5)
    out, lse, rng, w = emu.ops._attention_forward_weights(q, k, v, keep, 0.3, True, None, True, [-1, -1], True)
    assert w.shape == (2, 45, 70) and w.dtype == dtype
    per_head = emu.ops.attention_probs(q, k, keep, lse, rng, 0.3, True, None, True, [-1, -1])
    want = per_head.float().mean(dim=-3)
    # the same fp32 terms in the same order, divided once; rounded to the dtype once (per_head was rounded
    # per head before its mean: up to one rounding step of the dtype apart)
    tol = 2e-6 if dtype == f32 else 2.0 ** -10
    assert (w.float() - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    assert torch.isfinite(w).all() and (w >= 0).all()


def test_averaged_weights_allocate_no_per_head_weights():
    """The head mean never materialises the per-head weights: no allocation inside the op (torch's profiler,
    CPU memory of every aten::empty) is as large as (B, H, L, S) of the dtype, which the former weights-then-sum
    path allocated."""
    from torch.profiler import ProfilerActivity, profile
    q, k, _, _ = _inputs(1, 8, 8, 64, 96, 32, 32, f16, seed=19)
    per_head_bytes = 8 * 64 * 96 * 2
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        w = emu.ops._attention_forward_weights(q, k, k, None, 0.0, False, None, False, [-1, -1], True)[3]
    assert w.shape == (1, 64, 96)
    allocs = [e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage > 0]
    assert allocs and max(allocs) < per_head_bytes, allocs


@pytest.mark.parametrize("dtype", [f32, bf16], ids=dtype_id)
def test_extreme_rows_backward(dtype):
    """Whole rows at finfo.min (Hugging Face pads so) are uniform over their
    keys: the backward must use their exact row statistics, not exp(x - lse),
    whose fp32 lse has lost log(l). (A row shifted by a large finite offset
    such as -1e6 cannot be tested this way: fp32 scores near -1e6 keep only
    1/16 of resolution, in PyTorch as here.)"""
    q, k, v, do = _inputs(1, 2, 2, 40, 50, 32, 32, dtype, seed=13)
    m = torch.randn(1, 1, 40, 50)
    m[..., 2, :] = torch.finfo(f32).min
    m[..., 7, 1::3] = torch.finfo(f32).min
    m.requires_grad_()
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = emu.attention(qs, ks, vs, m)
    out.backward(do)
    rout, _, rdq, rdk, rdv, rdm = reference_grads(q, k, v, do, m, mask_requires_grad=True)
    tol = 1e-4 if dtype == f32 else 3e-2
    for name, ours, ref in (("out", out, rout), ("dq", qs.grad, rdq), ("dk", ks.grad, rdk), ("dv", vs.grad, rdv),
                            ("dmask", m.grad, rdm)):
        err = (ours.detach().double() - ref).abs().max().item()
        assert err < tol, f"{name}: {err}"


def test_fully_masked_rows_and_empty_windows():
    """Rows that see no key: output 0, lse -inf, zero gradients, no NaN."""
    q, k, v, do = _inputs(1, 2, 2, 60, 20, 64, 64, f16, seed=17)
    mask = torch.ones(1, 1, 60, 20, dtype=torch.bool)
    mask[..., 10:20, :] = False
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = emu.attention(qs, ks, vs, mask, window_size=(3, 3))  # rows >= 23 see no key either
    out.backward(do)
    _, lse, _ = emu.ops._attention_forward(q, k, v, mask, 0.0, False, None, False, [3, 3])
    dead = torch.zeros(60, dtype=torch.bool)
    dead[10:20] = True
    dead[23:] = True
    assert torch.all(out.detach()[..., dead, :] == 0) and torch.all(torch.isneginf(lse[..., dead]))
    assert torch.all(qs.grad[..., dead, :] == 0)
    for t in (out, qs.grad, ks.grad, vs.grad):
        assert not torch.isnan(t).any()
    _check_fwd_bwd(q, k, v, do, mask, window_size=(3, 3))


def _huge_batch_view(shape, dtype, gen):
    """A (2, H, L, E) view whose batch stride is 2^31 + 64 elements: offsets past
    2^31 elements, with only the used rows ever touched (the 4+ GB buffer is
    reserved, not committed)."""
    B, H, L, E = shape
    sb = 2**31 + 64
    base = torch.empty(sb + H * L * E, dtype=dtype)
    view = base.as_strided(shape, (sb, L * E, E, 1))
    for b in range(B):
        view[b].copy_(torch.randn(H, L, E, generator=gen).to(dtype))
    return view


@pytest.mark.parametrize("impl", ["emu", "cpu"])
def test_int64_offsets(impl):
    """Offsets beyond 2^31 elements (issue: B*H*L*E > 2^31 must work): q, k, v
    and dO are views with a batch stride of 2^31 + 64 elements."""
    import attention_ext

    g = torch.Generator().manual_seed(21)
    q, k, v, do = (_huge_batch_view((2, 2, 40, 64), bf16, g) for _ in range(4))
    attn = emu.attention if impl == "emu" else attention_ext.attention
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = attn(qs, ks, vs, is_causal=True)
    dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), do)
    small = [t.contiguous() for t in (q, k, v, do)]
    rout, _, rdq, rdk, rdv, _ = reference_grads(*small, is_causal=True)
    for name, ours, ref in (("out", out, rout), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        err = (ours.detach().double() - ref).abs().max().item()
        assert err < 2e-2, f"{name}: {err}"


def test_kernel_log(capfd, monkeypatch):
    """ATTENTION_EXT_LOG_KERNEL=1 names the instantiation each call runs: the
    smallest compiled head-dim bucket >= max(E, Ev), the fp32 path, the dQ mode."""
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    q, k, v, do = _inputs(1, 2, 2, 20, 30, 100, 72, bf16, seed=1)
    out, lse, rng = emu.ops._attention_forward(q, k, v, None, 0.0, False, None, False, W)
    emu.ops._attention_backward(do, q, k, v, None, out, lse, rng, 0.0, False, None, False, W, False)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    emu.ops._attention_forward(q32, k32, v32, None, 0.0, False, None, False, W)
    err = capfd.readouterr().err
    assert "emu forward: sm80 mma.sync kernel, head-dim bucket 128, bf16" in err, err
    assert "emu backward: sm80 mma.sync kernel, head-dim bucket 128, bf16, dQ atomics" in err, err
    assert "emu forward: sm80 mma.sync kernel, head-dim bucket 128, fp32 (3xTF32)" in err, err
    monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL")
    emu.ops._attention_forward(q, k, v, None, 0.0, False, None, False, W)
    assert "attention_ext:" not in capfd.readouterr().err


@pytest.mark.parametrize("fault,message", [
    ("divergent_barrier", "thread exited while 16 threads wait at __syncthreads"),
    ("divergent_shuffle", "deadlock; thread 0 waits at __shfl_xor_sync"),
    ("ldmatrix_outside", "ldmatrix: lane 0 gives row address 64, which is not a 16-byte aligned row inside the 64"),
    ("shared_outside", "shared-memory address outside the launch's dynamic shared memory"),
    ("cp_async_misaligned", "the destination must be aligned to the copy size"),
    ("cp_async_outside", "cp.async reads global memory outside every tensor of the launch"),
])
def test_emulator_catches_faults(fault, message):
    """Each check of the emulator fires on a kernel that has the fault (and a
    well-formed kernel using the same instructions passes)."""
    emu.ops._selftest("clean")
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        emu.ops._selftest(fault)


@pytest.mark.parametrize("threads", ["1", "2", "5"])
def test_emulator_threads(monkeypatch, threads):
    """The CTAs of a grid run on ATTENTION_EXT_EMU_THREADS OS threads: atomic adds
    from every CTA all land (a plain add loses some of 409600 at once), and a fault
    is reported from the lowest faulting block, as the serial order would meet it."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", threads)
    emu.ops._selftest("grid_atomics")
    with pytest.raises(RuntimeError, match=r"grid_selftest_kernel, block \(5,0,0\), thread \d+: thread exited while"):
        emu.ops._selftest("grid_fault")


@pytest.mark.parametrize("value", ["0", "two", "300"])
def test_emulator_threads_setting_checked(monkeypatch, value):
    monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", value)
    with pytest.raises(RuntimeError, match="ATTENTION_EXT_EMU_THREADS must be a whole number from 1 to 256, got '%s'"
                       % value):
        emu.ops._selftest("clean")


def test_emulator_threads_same_results(monkeypatch):
    """One OS thread or four: the forward and the deterministic backward are bitwise
    the same (each CTA's arithmetic does not depend on which thread runs it)."""
    q, k, v = (torch.randn(2, 3, 150, 64, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn(2, 3, 150, 64, dtype=torch.bfloat16)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for threads in ("1", "4"):
            monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", threads)
            out, lse, rng = emu.ops._attention_forward(q, k, v, None, 0.0, True, None, False, [-1, -1])
            grads = emu.ops._attention_backward(do, q, k, v, None, out, lse, rng, 0.0, True, None, False, [-1, -1],
                                                False)
            runs.append((out, lse) + tuple(grads[:3]))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_emulator_selftest_unknown_fault():
    with pytest.raises(ValueError, match="_selftest: unknown fault 'nope'"):
        emu.ops._selftest("nope")


def test_emulator_schedule_variables_checked(monkeypatch):
    """A bad ATTENTION_EXT_EMU_ORDER / _CPASYNC value is an error naming the variable."""
    q, k, v, _ = _inputs(1, 1, 1, 8, 8, 32, 32, f16, seed=0)
    for var, allowed in (("ATTENTION_EXT_EMU_ORDER", "forward, reverse or shuffle"),
                         ("ATTENTION_EXT_EMU_CPASYNC", "early or late")):
        monkeypatch.setenv(var, "sideways")
        with pytest.raises(RuntimeError, match=f"{var} must be {allowed}, got 'sideways'"):
            emu.ops._attention_forward(q, k, v, None, 0.0, False, None, False, W)
        monkeypatch.delenv(var)


@pytest.mark.parametrize("var,value,allowed", [
    ("ATTENTION_EXT_EMU_ARCH", "hopper", "a compute capability such as 80 or 90"),
    ("ATTENTION_EXT_EMU_ARCH", "70", "a compute capability such as 80 or 90"),
    ("ATTENTION_EXT_EMU_SMS", "0", "a multiprocessor count"),
    ("ATTENTION_EXT_EMU_SMS", "12x", "a multiprocessor count"),
])
def test_emulator_device_variables_checked(monkeypatch, var, value, allowed):
    """A bad emulated compute capability or multiprocessor count is an error naming the
    variable (it used to fall back silently to an sm_80 device or one SM)."""
    q, k, v, _ = _inputs(1, 1, 1, 8, 8, 32, 32, f16, seed=0)
    monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError, match=f"{var} must be {allowed}.*got '{value}'"):
        emu.ops._attention_forward(q, k, v, None, 0.0, False, None, False, W)

"""CUDA-specific checks of the fused kernels (csrc/cuda/), against the float64
reference (tests/reference.py). The general CPU/GPU grid lives in test_ops.py;
this file covers what only the CUDA backend has: every head-dim bucket and the
tile boundaries of each kernel, mask dtypes/strides staged through shared
memory, dropout masks equal to the CPU's, deterministic (bitwise) backward,
CUDA-graph capture and replay, the TF32 switch, non-default devices, and a
tensor beyond 2^31 elements.

Tolerance (as test_ops.py): error(ours vs float64) <= 2 x error(PyTorch's
F.scaled_dot_product_attention math backend in the same dtype) + a floor.
The kernel-correctness tests take the `be` fixture and run three times: on the
GPU (marked `cuda`, skipped where there is no GPU or no CUDA kernels), on the
CPU SIMT emulator of the same kernels (marked `emu`, tests/emu.py), which
runs everywhere, and on the emulator as an sm_90 device (`emu90`: the fp16 /
bf16 cases that the Hopper kernels cover run through them). The rest (graphs, streams, devices, TF32 switch, memory
sizes) is GPU-only.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import attention_ext  # noqa: F401
import emu
from conftest import HAS_CUDA, CUDA_SKIP_REASON, cuda_marks, emu_marks
from reference import (assert_close_vs_baseline, flash2_rounding, flash2_rounding_grads, max_abs_error,
                       reference_attention, reference_grads, window_visibility)



def gpu(fn):
    """Marks a test `cuda` and skips it where there is no GPU / no CUDA kernels."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")(fn))


ops = torch.ops.attention_ext
f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DT_ID = {f32: "f32", f16: "f16", bf16: "bf16"}


class Backend:
    """Where the CUDA kernels run: on the GPU ('cuda'), or on the CPU SIMT
    emulator ('emu', CPU tensors, tests/emu.py). The kernel-correctness tests
    below run on both, so their own logic is exercised before any GPU runs them."""

    def __init__(self, name):
        self.name = name
        self.device = "cuda" if name == "cuda" else "cpu"
        self.ops = ops if name == "cuda" else emu.ops

    def attention(self, *args):
        return ops.attention(*args) if self.name == "cuda" else emu.attention(*args)


@pytest.fixture(params=[pytest.param("cuda", marks=cuda_marks()), pytest.param("emu", marks=emu_marks()),
                        pytest.param("emu90", marks=emu_marks())])
def be(request, monkeypatch):
    """'emu90': the emulator as an sm_90 device (ATTENTION_EXT_EMU_ARCH=90), so that the
    fp16 / bf16 cases the Hopper kernels cover run through them (the rest through the sm80
    kernels, as on an H100); float32 never reaches them and is left to the 'emu' case."""
    if request.param == "emu90":
        params = getattr(request.node, "callspec", None)
        if params is not None and params.params.get("dtype") == f32:
            pytest.skip("float32 never runs on the Hopper kernels: the 'emu' case covers it")
        monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    return Backend("emu" if request.param == "emu90" else request.param)


@pytest.fixture(autouse=True)
def _exact_fp32_and_nondeterministic():
    """Every test starts with TF32 off and non-deterministic algorithms (the defaults)."""
    if not torch.cuda.is_available():
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32
    prec = torch.get_float32_matmul_precision()
    det = torch.are_deterministic_algorithms_enabled()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.use_deterministic_algorithms(False)
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision(prec)
    torch.use_deterministic_algorithms(det)


def _sdpa_mask(L, S, mask, causal, window, dtype, device):
    """Bool/float mask for F.scaled_dot_product_attention folding causal/window in."""
    vis = window_visibility(L, S, causal, window, device=device)
    if mask is None:
        return vis
    if mask.dtype == torch.bool:
        return mask & vis
    bias = torch.zeros(L, S, dtype=dtype, device=device).masked_fill(~vis, -math.inf)
    return mask.to(dtype) + bias


def _baseline(q, k, v, mask, causal, window, scale, gqa, grad_out, ref_grads, mask_grad=False):
    """PyTorch's own result in the input dtype (math backend): output and q/k/v
    grads. For 16-bit gradients, each is replaced by the float32 model of the
    FLASH backend's roundings (reference.flash2_rounding_grads) where that has
    the larger error against the float64 ref_grads: the math backend computes
    in the input dtype but rounds P and dS differently from every tensor-core
    flash kernel, and happens to be closer on some elements."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mb = mask.detach().clone().requires_grad_() if mask_grad else mask
    m = _sdpa_mask(q.shape[-2], k.shape[-2], mb, causal, window, q.dtype, q.device)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, scale=scale, enable_gqa=gqa)
    out.backward(grad_out)
    grads = [qb.grad, kb.grad, vb.grad]
    dmask = mb.grad if mask_grad else None
    if q.dtype in (f16, bf16):
        model = flash2_rounding_grads(q, k, v, grad_out, m, scale)
        for i, (g, r) in enumerate(zip(model, ref_grads)):
            if max_abs_error(g, r) > max_abs_error(grads[i], r, ignore_nan=True):
                grads[i] = g
    return out.detach(), *grads, dmask


def _run(be, q, k, v, mask=None, causal=False, window=(-1, -1), scale=None, gqa=False, mask_grad=False, seed=0):
    """Our forward + backward through the public op; returns (out, lse, dq, dk, dv, dmask, grad_out)."""
    gen = torch.Generator(device=q.device).manual_seed(seed)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mm = None
    if mask is not None:
        mm = mask.detach().clone()
        if mask_grad:
            mm.requires_grad_()
    out, lse, _ = be.ops._attention_forward(qq.detach(), kk.detach(), vv.detach(),
                                            mm.detach() if mm is not None else None, 0.0, causal, scale, gqa,
                                            list(window))
    out2 = be.attention(qq, kk, vv, mm, 0.0, causal, scale, gqa, list(window))
    grad_out = torch.randn(out2.shape, generator=gen, device=q.device, dtype=q.dtype)
    out2.backward(grad_out)
    dmask = mm.grad if (mm is not None and mask_grad) else None
    return out2.detach(), lse, qq.grad, kk.grad, vv.grad, dmask, grad_out


def _check(be, name, q, k, v, mask=None, causal=False, window=(-1, -1), scale=None, gqa=False, mask_grad=False):
    dtype = q.dtype
    out, lse, dq, dk, dv, dmask, g = _run(be, q, k, v, mask, causal, window, scale, gqa, mask_grad)
    r_out, r_lse, r_dq, r_dk, r_dv, r_dmask = reference_grads(
        q, k, v, g, attn_mask=mask, mask_requires_grad=mask_grad, is_causal=causal, scale=scale, enable_gqa=gqa,
        window_size=window)
    b_out, b_dq, b_dk, b_dv, b_dmask = _baseline(q, k, v, mask, causal, window, scale, gqa, g, (r_dq, r_dk, r_dv),
                                                 mask_grad)
    assert_close_vs_baseline(f"{name}: out", out, r_out, b_out, dtype)
    assert_close_vs_baseline(f"{name}: lse", lse, r_lse, None, dtype, floor=1e-4 if dtype == f32 else 2e-2)
    assert_close_vs_baseline(f"{name}: dq", dq, r_dq, b_dq, dtype)
    assert_close_vs_baseline(f"{name}: dk", dk, r_dk, b_dk, dtype)
    assert_close_vs_baseline(f"{name}: dv", dv, r_dv, b_dv, dtype)
    if mask_grad:
        assert dmask is not None and r_dmask is not None
        # the gradient comes back in the mask's dtype: PyTorch's error (math
        # backend, same dtypes) includes that rounding
        assert_close_vs_baseline(f"{name}: dmask", dmask, r_dmask, b_dmask, dtype,
                                 floor=1e-4 if dtype == f32 else 2e-2)


def _qkv(B, Hq, Hkv, L, S, E, Ev, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, device=device, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------------------
# every head-dim bucket (and the dims padded into them), both kernels

HEAD_DIMS = [(8, 8), (32, 32), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128), (160, 160), (192, 192),
             (256, 256), (64, 128), (128, 64), (256, 32), (7, 24)]


@pytest.mark.parametrize("dtype", [f16, bf16, f32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("E,Ev", HEAD_DIMS, ids=[f"E{e}_Ev{ev}" for e, ev in HEAD_DIMS])
def test_head_dims(be, dtype, E, Ev):
    q, k, v = _qkv(2, 3, 3, 77, 131, E, Ev, dtype, device=be.device)
    _check(be, f"E{E}/Ev{Ev}", q, k, v)


# ---------------------------------------------------------------------------
# tile boundaries: lengths around every block size, causal with L != S (whole
# key tiles skipped), windows, GQA/MQA

GEOMETRY = [
    # B, Hq, Hkv, L, S, E, causal, window
    (1, 2, 2, 1, 1, 64, False, (-1, -1)),
    (1, 2, 2, 16, 16, 64, True, (-1, -1)),
    (2, 2, 2, 63, 65, 64, True, (-1, -1)),
    (1, 2, 2, 128, 128, 128, True, (-1, -1)),
    (1, 2, 2, 129, 257, 128, False, (-1, -1)),
    (1, 4, 1, 300, 40, 64, True, (-1, -1)),        # MQA, L > S: rows past S see every key
    (1, 4, 2, 40, 300, 64, True, (-1, -1)),        # GQA, L < S: most key tiles skipped
    (1, 2, 2, 500, 500, 64, False, (31, 17)),      # sliding window: tiles skipped on both sides
    (1, 2, 2, 257, 260, 96, True, (64, -1)),
    (2, 8, 2, 200, 200, 32, False, (0, 0)),        # diagonal only
    (1, 2, 2, 70, 6, 16, False, (1, 1)),           # rows that see no key (out 0, lse -inf)
    (1, 2, 2, 1000, 1000, 64, True, (-1, -1)),
]


@pytest.mark.parametrize("dtype", [f16, bf16, f32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("geo", GEOMETRY, ids=lambda g: "B{}_H{}-{}_L{}_S{}_E{}_c{}_w{}-{}".format(*g[:7], *g[7]))
def test_geometry(be, dtype, geo):
    B, Hq, Hkv, L, S, E, causal, window = geo
    q, k, v = _qkv(B, Hq, Hkv, L, S, E, E, dtype, seed=L + S, device=be.device)
    _check(be, "geometry", q, k, v, causal=causal, window=window, gqa=Hq != Hkv)


# ---------------------------------------------------------------------------
# explicit masks: dtypes, broadcast shapes (zero strides), strided columns,
# odd row lengths (element-wise staging), gradient of float masks, -inf rows

MASKS = [
    # kind, shape of the stored mask (None: (L, S)), transpose-last-two, mask grad
    ("bool", (1, 1, 1, "S"), False, False),        # key padding, stride 0 over rows
    ("bool", ("B", 1, "L", "S"), False, False),
    ("bool", (1, "H", "L", "S"), True, False),     # column stride != 1: element-wise staging
    ("f32", ("L", "S"), False, True),
    ("f32", ("B", "H", "L", "S"), False, True),
    ("f32", ("L", 1), False, True),                # broadcast over keys: column stride 0
    ("q", (1, "H", 1, "S"), False, True),          # mask in the query dtype
    ("q", ("L", "S"), True, True),
]


@pytest.mark.parametrize("dtype", [f16, bf16, f32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("S", [96, 131])          # 131: rows of odd length (not 16-byte aligned)
@pytest.mark.parametrize("spec", MASKS, ids=lambda m: f"{m[0]}_{'x'.join(map(str, m[1]))}{'_T' if m[2] else ''}")
def test_masks(be, dtype, S, spec):
    kind, shape, transpose, mask_grad = spec
    B, H, L, E = 2, 4, 70, 64
    q, k, v = _qkv(B, H, H, L, S, E, E, dtype, seed=S, device=be.device)
    sizes = {"B": B, "H": H, "L": L, "S": S}
    store = [sizes.get(d, d) if isinstance(d, str) else d for d in shape]
    if transpose:
        store[-1], store[-2] = store[-2], store[-1]
    g = torch.Generator(device=be.device).manual_seed(1)
    if kind == "bool":
        m = torch.rand(*store, generator=g, device=be.device) < 0.7
    else:
        mdt = f32 if kind == "f32" else dtype
        m = torch.randn(*store, generator=g, device=be.device).to(mdt)
        m = m.masked_fill(torch.rand(*store, generator=g, device=be.device) < 0.1, -math.inf)
    if transpose:
        m = m.transpose(-1, -2)
    _check(be, f"mask {spec}", q, k, v, mask=m, causal=(S == 131), mask_grad=mask_grad)


@pytest.mark.parametrize("dtype", [f16, bf16, f32], ids=lambda d: DT_ID[d])
def test_fully_masked_rows_zero_and_finite(be, dtype):
    B, H, L, S, E = 2, 2, 40, 50, 64
    q, k, v = _qkv(B, H, H, L, S, E, E, dtype, device=be.device)
    m = torch.rand(B, H, L, S, device=be.device) < 0.5
    m[:, :, ::3] = False                            # every third row sees nothing
    fm = torch.zeros(B, H, L, S, device=be.device).masked_fill(~m, -math.inf).requires_grad_()
    out, lse, dq, dk, dv, dmask, _ = _run(be, q, k, v, fm, mask_grad=True)
    assert torch.all(out[:, :, ::3] == 0)
    assert torch.all(lse[:, :, ::3] == -math.inf)
    assert torch.all(dq[:, :, ::3] == 0)
    assert torch.all(dmask[:, :, ::3] == 0)
    for t in (out, dq, dk, dv, dmask):
        assert torch.isfinite(t).all()
    _check(be, "fully masked", q, k, v, mask=m)


@pytest.mark.parametrize("dtype", [f16, bf16], ids=lambda d: DT_ID[d])
def test_strided_views(be, dtype):
    """(B, L, H, E) storage seen through transpose(1, 2), and a misaligned slice
    (element-wise loads): no copies, same results."""
    B, L, S, H, E = 2, 100, 120, 4, 64
    q = torch.randn(B, L, H, E, device=be.device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, H, E, device=be.device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, H, E, device=be.device, dtype=dtype).transpose(1, 2)
    _check(be, "blhe", q, k, v, causal=True)
    base = torch.randn(B, H, S, E + 3, device=be.device, dtype=dtype)
    k2 = base[..., 1:E + 1]                          # rows start 2 bytes past a 16-byte boundary
    v2 = base[..., 2:E + 2]
    _check(be, "misaligned", q, k2, v2)


# ---------------------------------------------------------------------------
# dropout: the CUDA keep-mask is the CPU's for the same rng_state, and the
# forward / backward / attention_probs replay it

@pytest.mark.parametrize("dtype", [f16, f32], ids=lambda d: DT_ID[d])
def test_dropout_mask_matches_cpu_and_reference(be, dtype):
    p = 0.3
    B, H, L, S, E = 2, 3, 67, 93, 64
    q, k, v = _qkv(B, H, H, L, S, E, E, dtype, device=be.device)
    torch.manual_seed(123)
    out, lse, rng = be.ops._attention_forward(q, k, v, None, p, True, None, False, [-1, -1])
    assert rng.device == q.device and rng.dtype == torch.int64 and rng.numel() == 2
    m_cuda = be.ops._dropout_mask(rng, B, H, L, S, p)
    m_cpu = ops._dropout_mask(rng.cpu(), B, H, L, S, p)
    assert torch.equal(m_cuda.cpu(), m_cpu)
    kept = m_cpu.float().mean().item()
    assert abs(kept - (1 - p)) < 0.02
    ref = reference_attention(q, k, v, is_causal=True, dropout_p=p, dropout_mask=m_cuda)
    # yardstick: the roundings of PyTorch's CUDA FLASH backend with this keep-mask (reference.flash2_rounding)
    g = torch.randn_like(out)
    model = flash2_rounding(q, k, v, g, window_visibility(L, S, True, device=q.device), None, p, m_cuda)
    assert_close_vs_baseline("dropout out", out, ref.out, model[0], dtype)
    probs = be.ops.attention_probs(q, k, None, lse, rng, p, True, None, False, [-1, -1])
    assert_close_vs_baseline("dropout probs", probs, ref.probs_dropped, None, dtype,
                             floor=2e-2 if dtype != f32 else 1e-5)
    # backward replays the same mask
    dq, dk, dv, _ = be.ops._attention_backward(g, q, k, v, None, out, lse, rng, p, True, None, False, [-1, -1], False)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = reference_attention(q64, k64, v64, is_causal=True, dropout_p=p, dropout_mask=m_cuda)
    rq, rk, rv = torch.autograd.grad(r.out, (q64, k64, v64), g.double())
    for name, ours, ref_, base in zip(("dq", "dk", "dv"), (dq, dk, dv), (rq, rk, rv), model[1:4]):
        assert_close_vs_baseline(f"dropout {name}", ours, ref_, base, dtype)


@gpu
def test_dropout_graph_safe_rng_state():
    """Under CUDA-graph capture the forward's rng_state is written on the device
    at each replay: two replays draw different masks, and each replay's output
    is the reference with the mask of its own rng_state."""
    p = 0.25
    q, k, v = _qkv(1, 2, 2, 64, 80, 64, 64, f16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (allocator, lazy module loading)
            ops._attention_forward(q, k, v, None, p, False, None, False, [-1, -1])
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse, rng = ops._attention_forward(q, k, v, None, p, False, None, False, [-1, -1])
    states, outs = [], []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        states.append(rng.clone())
        outs.append(out.clone())
    assert not torch.equal(states[0], states[1]), "replays must advance the Philox offset"
    for st, o in zip(states, outs):
        m = ops._dropout_mask(st, 1, 2, 64, 80, p)
        ref = reference_attention(q, k, v, dropout_p=p, dropout_mask=m)
        assert max_abs_error(o, ref.out) < 2e-2


@gpu
def test_averaged_weights_never_hold_per_head_weights():
    """need_weights=True's default, the head mean: the probabilities kernel sums the heads of each tile itself,
    so the call's peak memory stays far below the per-head weights it would otherwise write (16 heads x
    1024 x 1024 bf16 = 32 MiB), and the mean equals attention_probs' per-head weights averaged in fp32."""
    q, k, v = _qkv(1, 16, 16, 1024, 1024, 64, 64, bf16)
    ops._attention_forward_weights(q, k, v, None, 0.0, False, None, False, [-1, -1], True)  # warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, lse, rng, w = ops._attention_forward_weights(q, k, v, None, 0.0, False, None, False, [-1, -1], True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    per_head_bytes = 16 * 1024 * 1024 * 2
    assert w.shape == (1, 1024, 1024)
    assert peak < per_head_bytes / 4, f"peak {peak / 2**20:.1f} MiB"
    per_head = ops.attention_probs(q, k, None, lse, rng, 0.0, False, None, False, [-1, -1])
    assert (w.float() - per_head.float().mean(dim=-3)).abs().max().item() <= 2.0 ** -9


# ---------------------------------------------------------------------------
# deterministic backward

@pytest.mark.parametrize("dtype", [f16, bf16, f32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("gqa", [False, True])
@gpu
def test_deterministic_backward_bitwise(dtype, gqa):
    # S = 1500: 12 key blocks, so the deterministic chunks hold several blocks each
    B, Hq, Hkv, L, S, E = 2, 4, (2 if gqa else 4), 300, 1500, 64
    q, k, v = _qkv(B, Hq, Hkv, L, S, E, E, dtype)
    m = torch.randn(B, 1, L, S, device="cuda", dtype=f32).requires_grad_()
    torch.use_deterministic_algorithms(True)
    runs = [_run(Backend("cuda"), q, k, v, m, causal=True, gqa=gqa, mask_grad=True, seed=5) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0][2:6], r[2:6]):
            assert torch.equal(a, b), "deterministic backward must be bitwise reproducible"
    _check(Backend("cuda"), "deterministic", q, k, v, mask=m.detach(), causal=True, gqa=gqa, mask_grad=True)
    torch.use_deterministic_algorithms(False)
    nd = _run(Backend("cuda"), q, k, v, m, causal=True, gqa=gqa, mask_grad=True, seed=5)
    for a, b in zip(runs[0][2:6], nd[2:6]):  # the atomic path computes the same thing
        assert max_abs_error(a, b.to(a.dtype)) <= (1e-4 if dtype == f32 else 3e-2) * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------
# CUDA graphs

@pytest.mark.parametrize("deterministic", [False, True])
@gpu
def test_cuda_graph_forward_backward_matches_eager(deterministic):
    torch.use_deterministic_algorithms(deterministic)
    q, k, v = _qkv(2, 4, 2, 150, 170, 64, 64, bf16)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 4, 150, 64, device="cuda", dtype=bf16)

    def step():
        out = ops.attention(qs, ks, vs, None, 0.0, True, None, True, [-1, -1])
        out.backward(g)
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
            for t in (qs, ks, vs):
                t.grad = None
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = step()
    graph.replay()
    torch.cuda.synchronize()
    grads_g = [t.grad.clone() for t in (qs, ks, vs)]
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_e = ops.attention(qe, ke, ve, None, 0.0, True, None, True, [-1, -1])
    out_e.backward(g)
    assert torch.equal(out_g, out_e.detach())
    for a, b in zip(grads_g, (qe.grad, ke.grad, ve.grad)):
        if deterministic:
            assert torch.equal(a, b)
        else:
            assert max_abs_error(a, b) < 3e-2 * max(1.0, b.abs().max().item())
    torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------
# float32: exact by default, TF32 only when allowed

@gpu
def test_tf32_switch():
    q, k, v = _qkv(1, 2, 2, 256, 256, 128, 128, f32, seed=3)
    ref = reference_attention(q, k, v).out
    exact, _, _ = ops._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    err_exact = max_abs_error(exact, ref)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    tf32, _, _ = ops._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    err_tf32 = max_abs_error(tf32, ref)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    again, _, _ = ops._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    assert torch.equal(again, exact), "the default precision must come back when TF32 is switched off"
    assert err_exact < 2e-5, f"fp32 default must be fp32-accurate, error {err_exact}"
    assert err_tf32 > 4 * err_exact, f"TF32 was allowed but the result is as exact ({err_tf32} vs {err_exact})"
    assert err_tf32 < 2e-2


# ---------------------------------------------------------------------------
# devices and sizes

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@gpu
def test_non_default_device():
    dev = torch.device("cuda", 1)
    q, k, v = _qkv(2, 2, 2, 65, 70, 64, 64, f16, device=dev)
    with torch.cuda.device(0):
        _check(Backend("cuda"), "cuda:1", q, k, v, causal=True)
        torch.manual_seed(0)
        out, lse, rng = ops._attention_forward(q, k, v, None, 0.2, False, None, False, [-1, -1])
        assert out.device == dev and lse.device == dev and rng.device == dev
        m = ops._dropout_mask(rng, 2, 2, 65, 70, 0.2)
        assert m.device == dev


@gpu
def test_more_than_2_31_elements():
    """B*H*L*E > 2^31 (int64 offsets): q/k/v/out and their gradients of
    2^31 + 2^18 bf16 elements each, short rows and many heads so the
    attention itself stays cheap; heads past element 2^31 are checked."""
    B, L, E = 1, 64, 64
    H = 2**31 // (L * E) + 64
    n = B * H * L * E
    # 8 bf16 tensors of n elements, the fp32 dQ workspace (n * 4 bytes), slack
    need = 8 * n * 2 + n * 4 + (2 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
    q = torch.randn(B, H, L, E, device="cuda", dtype=bf16)
    k = torch.randn(B, H, L, E, device="cuda", dtype=bf16)
    v = torch.randn(B, H, L, E, device="cuda", dtype=bf16)
    assert q.numel() > 2**31
    out, lse, rng = ops._attention_forward(q, k, v, None, 0.0, True, None, False, [-1, -1])
    g = torch.randn_like(out)
    dq, dk, dv, _ = ops._attention_backward(g, q, k, v, None, out, lse, rng, 0.0, True, None, False, [-1, -1], False)
    for h in (0, H // 2, H - 1):
        sl = slice(h, h + 1)
        r_out, _, r_dq, r_dk, r_dv, _ = reference_grads(q[:, sl], k[:, sl], v[:, sl], g[:, sl], is_causal=True)
        assert max_abs_error(out[:, sl], r_out) < 2e-2
        for name, ours, ref_ in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
            assert max_abs_error(ours[:, sl], ref_) < 5e-2 * max(1.0, ref_.abs().max().item()), (name, h)


@gpu
@pytest.mark.parametrize("dtype", [f16, bf16], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("E", [64, 128, 256])
def test_hopper_kernels_run_on_sm90(dtype, E, capfd, monkeypatch):
    """On an sm_90 GPU the covered calls run the Hopper kernels (the kernel log says
    so), and their results agree with the float64 reference as closely as the sm80
    kernels' (ATTENTION_EXT_DISABLE_SM90=1) do, up to the same <= 2x PyTorch yardstick."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100 / H200)")
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 333, E, device="cuda", dtype=dtype) for _ in range(4))
    k, v = k[:, :2], v[:, :2]
    results = {}
    for name, off in (("sm90", "0"), ("sm80", "1")):
        monkeypatch.setenv("ATTENTION_EXT_DISABLE_SM90", off)
        monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = ops.attention(qs, ks, vs, None, 0.0, True, None, True)
        out.backward(do)
        torch.cuda.synchronize()
        log = capfd.readouterr().err
        assert ("sm90a" in log) == (name == "sm90"), log
        results[name] = (out, qs.grad, ks.grad, vs.grad)
    rout, _, rdq, rdk, rdv, _ = reference_grads(q.cpu(), k.cpu(), v.cpu(), do.cpu(), None, is_causal=True,
                                                enable_gqa=True)
    for i, (name, ref) in enumerate(zip(("out", "dq", "dk", "dv"), (rout, rdq, rdk, rdv))):
        err90 = max_abs_error(results["sm90"][i].cpu(), ref)
        err80 = max_abs_error(results["sm80"][i].cpu(), ref)
        assert err90 <= 2 * err80 + 1e-3, (name, err90, err80)


@gpu
@pytest.mark.parametrize("E", [64, 128, 256])
def test_hopper_backward_dropout_on_sm90(E, capfd, monkeypatch):
    """On an sm_90 GPU the Hopper backward with dropout (keep-bits drawn in its key-major
    fragments) applies the forward's mask: from one forward, the Hopper and the sm80
    backward both match the float64 reference built with _dropout_mask's mask, the
    Hopper one at most 2x as far off (+ 1e-3)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100 / H200)")
    torch.manual_seed(0)
    p, B, Hq, Hkv, L, S = 0.25, 2, 4, 2, 200, 333
    q = torch.randn(B, Hq, L, E, device="cuda", dtype=bf16)
    k, v = (torch.randn(B, Hkv, S, E, device="cuda", dtype=bf16) for _ in range(2))
    do = torch.randn(B, Hq, L, E, device="cuda", dtype=bf16)
    out, lse, rng = ops._attention_forward(q, k, v, None, p, True, None, True, [-1, -1])
    keep = ops._dropout_mask(rng, B, Hq, L, S, p)
    grads = {}
    for name, off in (("sm90", "0"), ("sm80", "1")):
        monkeypatch.setenv("ATTENTION_EXT_DISABLE_SM90", off)
        monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
        grads[name] = ops._attention_backward(do, q, k, v, None, out, lse, rng, p, True, None, True, [-1, -1],
                                              False)[:3]
        torch.cuda.synchronize()
        log = capfd.readouterr().err
        assert ("sm90a" in log) == (name == "sm90"), log
    rq, rk, rv = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    r = reference_attention(rq, rk, rv, dropout_p=p, dropout_mask=keep.cpu(), is_causal=True, enable_gqa=True)
    ref = torch.autograd.grad(r.out, (rq, rk, rv), do.cpu().double())
    for i, name in enumerate(("dq", "dk", "dv")):
        err90 = max_abs_error(grads["sm90"][i].cpu(), ref[i])
        err80 = max_abs_error(grads["sm80"][i].cpu(), ref[i])
        assert err90 <= 2 * err80 + 1e-3, (name, err90, err80)


@gpu
@pytest.mark.parametrize("dtype", [f16, bf16], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("swizzle", [0, 32, 64, 128])
@pytest.mark.parametrize("layout", ["A-K_B-K", "A-K_B-N", "A-M_B-K", "A-M_B-N", "A-reg_B-K", "A-reg_B-N"])
@pytest.mark.parametrize("n", [64, 128, 256])
def test_sm90_layout_selftest(dtype, swizzle, layout, n):
    """The Hopper layout self-test on the GPU: one TMA + wgmma GEMM per shared-memory
    layout (K- or MN-major A and B, A from registers, every swizzle). The emulator
    passes all of them (test_cuda_emu_sm90.py) with its own reading of the PTX ISA's
    layouts; here the hardware says which readings hold, layout by layout, before the
    attention kernels that rely on K-major SW128 (Q, K) and N-major SW128 (V, dO, Q, K)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100 / H200)")
    a_part, b_part = layout.split("_")
    torch.manual_seed(n + swizzle)
    K = 128
    a = torch.randn(64, K, device="cuda").to(dtype)
    b = torch.randn(K, n, device="cuda").to(dtype)
    d = ops._sm90_gemm_selftest(a, b, swizzle, a_part == "A-M", b_part == "B-N", a_part == "A-reg")
    ref = a.double() @ b.double()
    # fp32 accumulation over K = 128 in k16 steps: a few fp32 roundings of sums of ~|a||b|
    tol = 1e-5 * (a.double().abs() @ b.double().abs()).max().item()
    assert (d.double() - ref).abs().max().item() <= tol


@gpu
def test_compiled_out_error_names_the_switch():
    """Every head dim <= 256 must have a kernel in the default build; the error
    text (for builds with ATTENTION_EXT_HEAD_DIMS) is checked when it occurs."""
    q, k, v = _qkv(1, 1, 1, 8, 8, 256, 256, f16)
    try:
        ops._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    except RuntimeError as e:
        assert "ATTENTION_EXT_HEAD_DIMS" in str(e) or "ATTENTION_EXT_DTYPES" in str(e)


# ---------------------------------------------------------------------------
# checks that need no GPU (they run in CI)

def test_generated_instantiations_up_to_date():
    """csrc/cuda/{fwd,bwd}_hdim<D>_<dtype>.cu are exactly what generate.py writes."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "csrc", "cuda", "generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fragment_model():
    """The fragment index algebra of flash_common.cuh against the PTX semantics
    of ldmatrix / mma (a numpy model, csrc/cuda/fragment_model.py)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("fragment_model", os.path.join(root, "csrc", "cuda",
                                                                                "fragment_model.py"))
    fm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fm)
    for esz in (2, 4):
        for ak in (True, False):
            for bk in (True, False):
                fm.test_ss(esz, ak, bk)
        fm.test_rs(esz)

"""Randomised cases: attention_ext.attention against the float64 reference, forward and gradients.

The curated grids (test_ops.py, test_cuda_emu.py, ...) pick one feature at a time; here every case draws
all of them at once from its seed: batch rank and sizes, heads and GQA groups, lengths (1 included),
head dims 1..256 with a different value head dim, dtype, causal, sliding windows, boolean or additive
masks of a random broadcast shape (with -inf entries, gradient, fully masked rows), scale, dropout, ALiBi
slopes per head or per (batch, head), logit soft-capping and the memory layout of every operand
(transposed, sliced, expanded, last dim not contiguous). Each case
runs on the CPU kernels, on the CUDA kernels' emulator as an sm_80 and as an sm_90 device, and on a GPU
where there is one.

Tolerance as everywhere in the suite: error <= 2 x the error of PyTorch's own implementation in the
same dtype on the same inputs (F.scaled_dot_product_attention; with dropout, aten's math attention
given the kernels' keep-mask) + reference.ABS_FLOOR. A failure prints the case, which its id (the seed)
reproduces: `pytest tests/test_fuzz.py -k "cpu-17"`. By default 48 cases on the CPU, 12 on each emulated
device and 300 on a GPU (scripts/gpu_session.sh runs them with the other cuda tests);
ATTENTION_EXT_FUZZ_CASES=n draws n per backend instead.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import attention_ext
import emu
import test_alibi
from conftest import HAS_CUDA, cuda_marks, emu_marks
from reference import ABS_FLOOR, assert_close_vs_baselines, flash2_rounding, reference_attention, reference_grads
from test_ops import sdpa_mask  # causal and windows folded into one mask for SDPA

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# cases per backend: (default, the largest L * S * heads * batch a case may have)
_BACKENDS = {
    "cpu": (48, 400_000),
    "emu80": (12, 60_000),
    "emu90": (12, 60_000),
    "cuda": (300, 4_000_000),
}
_FUZZ_CASES = os.environ.get("ATTENTION_EXT_FUZZ_CASES")
_LENGTHS = (1, 2, 3, 5, 8, 16, 17, 31, 64, 65, 100, 128, 129, 200, 300)
_HEAD_DIMS = (8, 16, 32, 40, 64, 80, 96, 128, 160, 192, 256)


@dataclass
class Draw:
    seed: int
    backend: str
    dtype: torch.dtype = f32
    batch: Tuple[int, ...] = ()
    hkv: int = 1
    group: int = 1
    enable_gqa: bool = False
    L: int = 1
    S: int = 1
    E: int = 8
    Ev: int = 8
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    mask: Optional[str] = None            # None | "bool" | "float"
    mask_dims: Tuple[bool, ...] = ()      # per dim of (*batch, H, L, S) from the right: full size or 1
    mask_dtype: Optional[torch.dtype] = None
    mask_grad: bool = False
    mask_ninf: bool = False
    keep_frac: float = 1.0
    scale: Optional[float] = None
    dropout_p: float = 0.0
    layouts: Tuple[str, ...] = ("contig", "contig", "contig")
    alibi: Optional[str] = None           # None | "heads" (slopes (Hq,)) | "batch" (slopes (*batch, Hq))
    softcap: float = 0.0
    deterministic: bool = False           # torch.use_deterministic_algorithms around our calls
    env: Tuple[Tuple[str, str], ...] = ()  # the emulated device's knobs (environment variables)
    captured: bool = False                # (varlen, emulator) forward and backward as under CUDA-graph capture

    @property
    def hq(self):
        return self.hkv * self.group

    def __str__(self):
        skip = {"seed", "backend"}
        kv = ", ".join(f"{k}={getattr(self, k)}" for k in self.__dataclass_fields__ if k not in skip)
        return f"{self.backend}-{self.seed}: {kv}"


def draw(seed: int, backend: str, tag: str = "") -> Draw:
    """One case from its seed (the same case on every machine: Python's own generator)."""
    r = random.Random(f"{tag}{backend}-{seed}")
    d = Draw(seed, backend)
    d.dtype = r.choice((f32, f16, bf16, f64) if backend == "cpu" else (f32, f16, bf16))
    d.batch = tuple(r.randint(1, 3) for _ in range(r.choice((0, 1, 1, 1, 2))))
    d.hkv = r.choice((1, 1, 2, 3))
    d.group = r.choice((1, 1, 2, 3, 4))
    d.enable_gqa = d.group > 1 or r.random() < 0.2
    limit = _BACKENDS[backend][1]
    while True:
        d.L, d.S = r.choice(_LENGTHS), r.choice(_LENGTHS)
        if r.random() < 0.15:
            d.L = r.choice((1, 2, 4))          # decoding
        if d.L * d.S * d.hq * math.prod(d.batch) <= limit:
            break
    d.E = r.choice(_HEAD_DIMS) if r.random() < 0.6 else r.randint(1, 256)
    d.Ev = d.E if r.random() < 0.6 else (r.choice(_HEAD_DIMS) if r.random() < 0.5 else r.randint(1, 256))
    d.causal = r.random() < 0.3
    if r.random() < 0.25:
        d.window = (r.choice((-1, 0, 1, r.randint(0, max(d.S, 1)))), r.choice((-1, 0, 2, r.randint(0, max(d.S, 1)))))
    u = r.random()
    d.mask = None if u < 0.4 else ("bool" if u < 0.7 else "float")
    if d.mask:
        rank = len(d.batch) + 3
        n = r.randint(1, rank)                  # the mask's own rank (leading dims broadcast)
        dims = [r.random() < 0.5 for _ in range(n)]
        if n >= 1:
            dims[-1] = r.random() < 0.9         # S: usually full
        if n >= 2:
            dims[-2] = r.random() < 0.6         # L
        d.mask_dims = tuple(dims)
        d.keep_frac = r.choice((1.0, 0.9, 0.6, 0.3, 0.05))
        if d.mask == "float":
            d.mask_dtype = r.choice((f32, d.dtype))
            d.mask_grad = r.random() < 0.6
            d.mask_ninf = r.random() < 0.4
    if r.random() < 0.3:  # scores of standard deviation c for unit inputs: flat, peaked (4), negative
        d.scale = r.choice((0.1, 0.5, 2.0, 4.0, -1.0)) / math.sqrt(d.E)
    if r.random() < 0.2:
        d.dropout_p = r.choice((0.1, 0.3, 0.6))
    d.layouts = tuple(r.choice(("contig", "contig", "blhe", "sliced", "lastdim_t", "expand")) for _ in range(3))
    # ALiBi and the soft cap from a generator of their own (the draws above stay those of earlier versions)
    rb = random.Random(f"{tag}bias-{backend}-{seed}")
    if rb.random() < 0.3:
        d.alibi = rb.choice(("heads", "batch")) if d.batch else "heads"
    if rb.random() < 0.25:
        d.softcap = rb.choice((1.0, 5.0, 30.0))
    _draw_device(d, random.Random(f"{tag}device-{backend}-{seed}"))
    return d


def _draw_device(d: Draw, r: random.Random):
    """Deterministic mode, and on the emulator the device and schedule: multiprocessor count (which decides
    key splits and GQA row packing), forced key splits, fiber order, cp.async landing, GQA packing and the
    packed Hopper kernels off."""
    d.deterministic = r.random() < 0.2
    if not d.backend.startswith("emu"):
        return
    env = {"ATTENTION_EXT_EMU_ARCH": d.backend[3:], "ATTENTION_EXT_EMU_SMS": str(r.choice((132, 132, 1, 3, 16, 108))),
           "ATTENTION_EXT_EMU_ORDER": r.choice(("forward", "reverse", "shuffle")),
           "ATTENTION_EXT_EMU_CPASYNC": r.choice(("late", "early"))}
    if r.random() < 0.3:
        env["ATTENTION_EXT_FWD_SPLITS"] = str(r.choice((2, 3, 7)))
    if r.random() < 0.2:
        env["ATTENTION_EXT_PACK_GQA"] = "0"
    if d.backend == "emu90" and r.random() < 0.3:
        env["ATTENTION_EXT_PACKED_SM90"] = "0"
    d.env = tuple(sorted(env.items()))


class _deterministic:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.on)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old)


# --------------------------------------------------------------------------------------------- inputs
def _view(t_shape, layout, dtype, device, g):
    """A random tensor of shape t_shape = (*batch, H, N, D) seen through `layout` (values never 0)."""
    def rn(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return torch.where(x.abs() < 0.02, torch.full_like(x, 0.5), x).to(dtype).to(device)

    *b, H, N, D = t_shape
    if layout == "blhe":
        return rn(*b, N, H, D).transpose(-3, -2)
    if layout == "sliced":
        return rn(*b, H, 2 * N + 1, D + 3)[..., 1::2, 2:2 + D]
    if layout == "lastdim_t":
        return rn(*b, H, D, N).transpose(-1, -2)
    if layout == "expand":  # one head / batch element seen many times (stride 0)
        return rn(*([1] * len(b)), 1, N, D).expand(*b, H, N, D)
    return rn(*b, H, N, D)


def make_inputs(d: Draw, device):
    g = torch.Generator().manual_seed(d.seed * 7919 + len(d.backend))
    q = _view((*d.batch, d.hq, d.L, d.E), d.layouts[0], d.dtype, device, g)
    k = _view((*d.batch, d.hkv, d.S, d.E), d.layouts[1], d.dtype, device, g)
    v = _view((*d.batch, d.hkv, d.S, d.Ev), d.layouts[2], d.dtype, device, g)
    do = _view((*d.batch, d.hq, d.L, d.Ev), "contig", d.dtype, device, g)
    mask = None
    if d.mask:
        full = (*d.batch, d.hq, d.L, d.S)
        shape = tuple(full[len(full) - len(d.mask_dims) + i] if f else 1 for i, f in enumerate(d.mask_dims))
        keep = torch.rand(*shape, generator=g) < d.keep_frac
        if d.mask == "bool":
            mask = keep
        else:
            vals = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
            if d.mask_ninf:
                vals = vals.masked_fill(~keep, -math.inf)
            mask = vals.to(d.mask_dtype)
        mask = mask.to(device)
        if d.mask_grad:
            mask.requires_grad_()
    return q, k, v, do, mask


def make_slopes(d: Draw, device):
    """ALiBi slopes of the case (float32, (Hq,) or (*batch, Hq), in [0.02, 0.5)), or None."""
    if d.alibi is None:
        return None
    g = torch.Generator().manual_seed(d.seed * 31 + 5)
    shape = (*d.batch, d.hq) if d.alibi == "batch" else (d.hq,)
    return (torch.rand(*shape, generator=g) * 0.48 + 0.02).to(device)


def alibi_bias(d: Draw, slopes):
    """ALiBi's float64 bias -m |i + S - L - j| of the case, (..., Hq, L, S) (test_alibi's), or None."""
    return None if slopes is None else test_alibi.alibi_bias(slopes, d.L, d.S, device=slopes.device)


def with_bias(m, bias, dtype):
    """A mask for PyTorch's kernels that also adds the bias (in dtype): m bool, float or None."""
    if bias is None:
        return m
    b = bias.to(dtype)
    if m is None:
        return b
    if m.dtype == torch.bool:
        return b.masked_fill(~m, -math.inf)
    return m.to(dtype) + b


# --------------------------------------------------------------------------------------------- the check
def _run_ours(d: Draw, q, k, v, mask, window, slopes):
    if d.backend.startswith("emu"):
        return emu.attention(q, k, v, mask, d.dropout_p, d.causal, d.scale, d.enable_gqa, window, d.softcap, slopes)
    return attention_ext.attention(q, k, v, attn_mask=mask, dropout_p=d.dropout_p, is_causal=d.causal,
                                   scale=d.scale, enable_gqa=d.enable_gqa, window_size=window, softcap=d.softcap,
                                   alibi_slopes=slopes)


def _keep_mask(d: Draw, q, k, v, mask, window, slopes):
    """The keep-mask of the dropout draw the forward made (same generator state, same call)."""
    ops = emu.ops if d.backend.startswith("emu") else torch.ops.attention_ext
    _, _, rng = ops._attention_forward(q.detach(), k.detach(), v.detach(),
                                       None if mask is None else mask.detach(), d.dropout_p, d.causal, d.scale,
                                       d.enable_gqa, list(window), d.softcap, slopes)
    keep = ops._dropout_mask(rng, math.prod(d.batch), d.hq, d.L, d.S, d.dropout_p)
    return keep.reshape(*d.batch, d.hq, d.L, d.S)


def check(d: Draw, device):
    q, k, v, do, mask = make_inputs(d, device)
    slopes = make_slopes(d, device)
    bias = alibi_bias(d, slopes)
    window = list(d.window) if d.window else [-1, -1]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    seed = 1000 + d.seed
    with _deterministic(d.deterministic):
        torch.manual_seed(seed)
        out = _run_ours(d, *leaves, mask, window, slopes)
        grads = torch.autograd.grad(out, leaves + ([mask] if d.mask_grad else []), do, retain_graph=d.deterministic)
        if d.deterministic:  # the same bits again
            again = torch.autograd.grad(out, leaves + ([mask] if d.mask_grad else []), do)
            for a, b in zip(grads, again):
                assert torch.equal(a, b), f"deterministic backward differs between two runs\ncase {d}"
    keep = None
    if d.dropout_p > 0:
        torch.manual_seed(seed)
        keep = _keep_mask(d, q, k, v, mask, window, slopes)

    kw = dict(is_causal=d.causal, scale=d.scale, enable_gqa=d.enable_gqa, window_size=d.window,
              dropout_p=d.dropout_p, dropout_mask=keep, softcap=d.softcap, bias=bias)
    ref_out, _, *ref_grads = reference_grads(q, k, v, do, mask, mask_requires_grad=d.mask_grad, **kw)

    # PyTorch's own attention in the same dtype on the same inputs (on the CPU for the emulator); ALiBi as its
    # bias in a float mask (as Hugging Face's ALiBi models give it), a soft cap through the eager formula
    bdev = "cpu" if d.backend.startswith("emu") else device
    bl = [t.detach().to(bdev).requires_grad_() for t in (q, k, v)]
    bmask = None if mask is None else mask.detach().to(bdev).requires_grad_(d.mask_grad)
    bbias = None if bias is None else bias.to(bdev)
    smask = fmask = sdpa_mask(d, bmask, bdev)
    if smask is not None and smask.dtype != torch.bool and smask.dtype != d.dtype:
        smask = smask.to(d.dtype)  # SDPA wants a float mask of the query's dtype
    smask = with_bias(smask, bbias, d.dtype)
    fmask = with_bias(fmask, bbias, torch.float32 if d.dtype != f64 else f64)
    try:
        if d.softcap > 0:
            b_out = _eager_softcap(d, *bl, fmask, keep)
        elif keep is None:
            b_out = F.scaled_dot_product_attention(*bl, attn_mask=smask, scale=d.scale, enable_gqa=d.enable_gqa)
        else:
            b_out = torch.ops.aten._scaled_dot_product_attention_math(
                *bl, attn_mask=smask, dropout_p=d.dropout_p, dropout_mask=keep.to(bdev), scale=d.scale,
                enable_gqa=d.enable_gqa)[0]
        b_grads = torch.autograd.grad(b_out, bl + ([bmask] if d.mask_grad else []), do.to(bdev))
    except RuntimeError:  # an input PyTorch's kernels refuse: the floor alone is the tolerance
        b_out, b_grads = None, [None] * len(grads)

    # PyTorch's implementations of the same computation in the same dtype: the yardsticks of the error
    # (and the gradients of that model's backward given our forward's output, as PyTorch's flash backward would be:
    # not its output, which is ours)
    given = _flash_rounding_model(d, q, k, v, fmask, do, keep, mask, out=out)
    others = [_flash_baseline(d, q, k, v, smask, do) if bdev == "cpu" and keep is None and d.softcap == 0 else None,
              _flash_rounding_model(d, q, k, v, fmask, do, keep, mask),
              None if given is None else (None, *given[1:])]
    where = f"\ncase {d}"
    out_w = _check_weights(d, q, k, v, mask, window, seed, fmask, keep, where, slopes, bias)
    names = ("out", "dq", "dk", "dv", "dmask")
    for i, (name, ours, ref, base) in enumerate(zip(names, (out, *grads), (ref_out, *ref_grads), (b_out, *b_grads))):
        bases = [base] + [o[i] for o in others if o is not None and i < len(o)]
        _assert_close(name + where, ours, ref, bases, d.dtype)
        if i == 0:
            _assert_close("output (with weights)" + where, out_w, ref, bases, d.dtype)


def _eager_softcap(d: Draw, q, k, v, fmask, keep):
    """The soft-capped attention as Hugging Face's Gemma 2 computes it, in the inputs' dtype: the scaled scores,
    softcap * tanh(x / softcap), the mask (and ALiBi's bias) added, the softmax in float32 rounded to the dtype
    (0 for rows that see no key), dropout's keep-mask, times V."""
    kk, vv = k.repeat_interleave(d.group, dim=-3), v.repeat_interleave(d.group, dim=-3)
    sc = d.scale if d.scale is not None else 1.0 / math.sqrt(d.E)
    s = (q @ kk.transpose(-1, -2)) * sc
    s = d.softcap * torch.tanh(s / d.softcap)
    if fmask is not None:
        fm = fmask.to(s.device)
        s = s.masked_fill(~fm, -math.inf) if fm.dtype == torch.bool else s + fm.to(s.dtype)
    # rows that see no key: 0 (their softmax taken over zeros, so that no NaN reaches the gradients)
    seen = (s != -math.inf).any(dim=-1, keepdim=True)
    s = torch.where(seen, s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = (torch.softmax(s, dim=-1, dtype=torch.float32) * seen).to(q.dtype)
    if keep is not None:
        p = p * keep.to(p.device) / (1.0 - d.dropout_p)
    return p @ vv


def _check_weights(d: Draw, q, k, v, mask, window, seed, fmask, keep, where, slopes, bias):
    """_attention_forward_weights (what MultiheadAttention's need_weights=True runs), per head or averaged over
    the heads (the emulated kernels: averaged only), with the same dropout draw: weights against the
    reference's probabilities (times keep / (1 - p)), with PyTorch's softmax of the same float32 scores,
    rounded to the dtype, as the yardstick. Returns its output (checked as the forward's)."""
    emulated = d.backend.startswith("emu")
    ops = emu.ops if emulated else torch.ops.attention_ext
    average = emulated or d.seed % 2 == 1
    m = None if mask is None else mask.detach()
    torch.manual_seed(seed)
    out, _, _, w = ops._attention_forward_weights(q, k, v, m, d.dropout_p, d.causal, d.scale, d.enable_gqa, window,
                                                  average, d.softcap, slopes)
    r = reference_attention(q, k, v, m, is_causal=d.causal, scale=d.scale, enable_gqa=d.enable_gqa,
                            window_size=d.window, dropout_p=d.dropout_p, dropout_mask=keep, softcap=d.softcap,
                            bias=bias)
    with torch.no_grad():  # PyTorch's way, as nn.MultiheadAttention computes its weights
        kk = k.repeat_interleave(d.group, dim=-3)
        sc = d.scale if d.scale is not None else 1.0 / math.sqrt(d.E)
        s = (q @ kk.transpose(-1, -2)).float() * sc
        if d.softcap > 0:
            s = d.softcap * torch.tanh(s / d.softcap)
        if fmask is not None:
            fm = fmask.to(s.device)
            s = s.masked_fill(~fm, -math.inf) if fm.dtype == torch.bool else s + fm.detach().float()
        base = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see no key: 0, as the reference
        if keep is not None:
            base = base * keep.to(s.device) / (1.0 - d.dropout_p)
        base = base.to(d.dtype)
    ref = r.probs_dropped
    if average:  # the baseline averages its rounded per-head weights in float32 and rounds once
        ref, base = ref.mean(dim=-3), base.float().mean(dim=-3).to(d.dtype)
    assert w.dtype == d.dtype and w.shape == ref.shape, (w.dtype, tuple(w.shape), tuple(ref.shape))
    _assert_close("weights" + where, w, ref, [base], d.dtype)
    return out


def _assert_close(name, ours, ref, baselines, dtype):
    """assert_close_vs_baseline against the larger error of PyTorch's implementations given, with the floor
    (reference.ABS_FLOOR) scaled by the largest magnitude when that exceeds 1: a random case's sums reach
    tens, where the float32 floor of 1e-5 is a couple of ulps, and PyTorch's error sometimes a few fewer."""
    finite = ref.detach()[torch.isfinite(ref.detach())]
    floor = ABS_FLOOR[dtype] * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    assert_close_vs_baselines(name, ours, ref, baselines, dtype, floor=floor)


def _flash_baseline(d: Draw, q, k, v, smask, do):
    """(out, dq, dk, dv) from PyTorch's CPU flash kernel in the inputs' dtype, K / V repeated for GQA,
    or None where it refuses the input. F.scaled_dot_product_attention runs its math path in float32
    for 16-bit inputs it does not send to that kernel (GQA, some head dims); the flash kernel computes
    the softmax-backward correction D = rowsum(dO o O) from the output rounded to the dtype, as every
    flash-style backward does (ours, FlashAttention-2, cuDNN), which costs accuracy in rows whose
    weights are nearly one-hot (README, Testing)."""
    if d.dtype not in (f16, bf16):
        return None
    def flat(t):
        return t.detach().reshape(-1, *t.shape[-3:]).contiguous()
    kk, vv = k, v
    if d.group > 1:
        kk, vv = k.repeat_interleave(d.group, dim=-3), v.repeat_interleave(d.group, dim=-3)
    m = None
    if smask is not None:
        m = smask.detach().expand(*d.batch, d.hq, d.L, d.S).reshape(-1, d.hq, d.L, d.S)
        m = torch.zeros(m.shape, dtype=d.dtype).masked_fill(~m, -math.inf) if m.dtype == torch.bool else m.to(d.dtype)
    try:
        qf, kf, vf = (flat(t).requires_grad_() for t in (q, kk, vv))
        o, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, kf, vf, attn_mask=m, scale=d.scale)
        gq, gk, gv = torch.autograd.grad(o, (qf, kf, vf), flat(do))
    except RuntimeError:
        return None
    if d.group > 1:  # the repeated heads' gradients summed back onto their K / V head
        gk = gk.reshape(gk.shape[0], d.hkv, d.group, *gk.shape[-2:]).sum(2)
        gv = gv.reshape(gv.shape[0], d.hkv, d.group, *gv.shape[-2:]).sum(2)
    shape = lambda t, h: t.reshape(*d.batch, h, *t.shape[-2:])  # noqa: E731
    return shape(o, d.hq), shape(gq, d.hq), shape(gk, d.hkv), shape(gv, d.hkv)


def _flash_rounding_model(d: Draw, q, k, v, smask, do, keep, mask, out=None):
    """reference.flash2_rounding for the case (None for float64); out: the forward output its backward is given."""
    if d.dtype == f64:
        return None
    return flash2_rounding(q, k, v, do, smask, d.scale, d.dropout_p, keep, mask.shape if d.mask_grad else None,
                           d.softcap, None if out is None else out.to(q.device))


def _params(counts, prefix=""):
    params = []
    for backend, n in counts.items():
        count = int(_FUZZ_CASES) if _FUZZ_CASES else n
        marks = cuda_marks() if backend == "cuda" else (emu_marks() if backend.startswith("emu") else ())
        if (backend == "cuda" and not HAS_CUDA) or (backend.startswith("emu") and not emu.LOADED):
            count = 1  # one skipped case says why, not hundreds
        params += [pytest.param(backend, s, id=f"{prefix}{backend}-{s}", marks=marks) for s in range(count)]
    return params


@pytest.mark.parametrize("backend,seed", _params({b: n for b, (n, _) in _BACKENDS.items()}))
def test_fuzz(backend, seed, monkeypatch):
    d = draw(seed, backend)
    for k, v in d.env:
        monkeypatch.setenv(k, v)
    check(d, "cuda" if backend == "cuda" else "cpu")


def test_draws_cover_the_features():
    """The default draws reach every feature the docstring names (a generator that stopped drawing one
    would make the test above pass without testing it)."""
    ds = [draw(s, b) for b, (n, _) in _BACKENDS.items() if b != "cuda" for s in range(n)]
    seen = {
        "fp16": any(d.dtype == f16 for d in ds), "bf16": any(d.dtype == bf16 for d in ds),
        "fp64": any(d.dtype == f64 for d in ds), "gqa": any(d.group > 1 for d in ds),
        "decode": any(d.L == 1 for d in ds), "E>128": any(d.E > 128 for d in ds),
        "E!=Ev": any(d.E != d.Ev for d in ds), "odd E": any(d.E not in _HEAD_DIMS for d in ds),
        "causal": any(d.causal for d in ds), "window": any(d.window for d in ds),
        "bool mask": any(d.mask == "bool" for d in ds), "float mask grad": any(d.mask_grad for d in ds),
        "-inf": any(d.mask_ninf for d in ds), "dropout": any(d.dropout_p for d in ds),
        "scale": any(d.scale is not None for d in ds), "unbatched": any(not d.batch for d in ds),
        "batch rank 2": any(len(d.batch) == 2 for d in ds),
        "layouts": {l for d in ds for l in d.layouts} == {"contig", "blhe", "sliced", "lastdim_t", "expand"},
        "deterministic": any(d.deterministic for d in ds),
        "forced key splits": any(k == "ATTENTION_EXT_FWD_SPLITS" for d in ds for k, _ in d.env),
        "one SM": any(("ATTENTION_EXT_EMU_SMS", "1") in d.env for d in ds),
        "GQA packing off": any(k == "ATTENTION_EXT_PACK_GQA" for d in ds for k, _ in d.env),
        "ALiBi per head": any(d.alibi == "heads" for d in ds), "ALiBi per batch": any(d.alibi == "batch" for d in ds),
        "soft cap": any(d.softcap for d in ds), "ALiBi and soft cap": any(d.alibi and d.softcap for d in ds),
        "ALiBi decoding with GQA": any(d.alibi and d.L == 1 and d.group > 1 for d in ds),
        "soft cap with a float mask's gradient": any(d.softcap and d.mask_grad for d in ds),
        "soft cap, dropout and ALiBi or a float mask": any(d.softcap and d.dropout_p and (d.alibi or d.mask == "float")
                                                          for d in ds),
    }
    assert all(seen.values()), [k for k, v in seen.items() if not v]


def test_varlen_draws_cover_capture():
    """The default varlen draws run the emulated forward, and (without a soft cap) the backward, as under CUDA-graph
    capture on both emulated devices."""
    ds = [draw_varlen(s, b)[0] for b in ("emu80", "emu90") for s in range(_VARLEN_BACKENDS[b])]
    assert {d.backend for d in ds if d.captured} == {"emu80", "emu90"}
    assert {d.backend for d in ds if d.captured and d.softcap == 0} == {"emu80", "emu90"}


# --------------------------------------------------------------------------------------------- packed sequences
# attention_varlen: several sequences of random lengths (0 included) packed without padding, each against
# the reference on that sequence alone; on the emulated sm_90 device the packed Hopper launches; on the emulator
# some forwards and backwards as under CUDA-graph capture (Draw.captured)
_VARLEN_BACKENDS = {"cpu": 24, "emu80": 8, "emu90": 8, "cuda": 100}
_VARLEN_LENGTHS = (0, 1, 2, 5, 17, 64, 65, 100, 130)


def draw_varlen(seed: int, backend: str):
    """(the case's options as a Draw, query lengths, key lengths): no mask (the op takes none), no batch."""
    d = draw(seed, backend, tag="varlen-")
    r = random.Random(f"varlen-lengths-{backend}-{seed}")
    n = r.randint(1, 5)
    lq = [r.choice(_VARLEN_LENGTHS) for _ in range(n)]
    lk = lq if r.random() < 0.5 else [r.choice(_VARLEN_LENGTHS) for _ in range(n)]
    d.batch, d.mask, d.mask_dims, d.mask_grad, d.mask_ninf = (), None, (), False, False
    if d.alibi and r.random() < 0.5:
        d.alibi = "batch"  # slopes (sequences, Hq)
    d.layouts = tuple(r.choice(("contig", "sliced")) for _ in range(3))
    # (drawn last) the emulated forward as under CUDA-graph capture: offsets not read back, max_seqlen_* given, one
    # launch planned without the lengths (not for ALiBi, float64 or head dim 0, which run sequence by sequence)
    d.captured = (backend.startswith("emu") and not d.alibi and d.E > 0 and d.dtype != torch.float64
                  and r.random() < 0.3)
    return d, lq, lk


def _packed(total, heads, dim, layout, dtype, device, g):
    x = torch.randn(2 * total + 1 if layout == "sliced" else total, heads, dim + 3, generator=g, dtype=torch.float64)
    x = torch.where(x.abs() < 0.02, torch.full_like(x, 0.5), x).to(dtype).to(device)
    return x[1::2, :, 2:2 + dim] if layout == "sliced" else x[..., :dim]


@contextlib.contextmanager
def _captured(on: bool):
    """ATTENTION_EXT_EMU_CAPTURE=1 inside (the emulated glue as under CUDA-graph capture), when on."""
    old = os.environ.get("ATTENTION_EXT_EMU_CAPTURE")
    if on:
        os.environ["ATTENTION_EXT_EMU_CAPTURE"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                del os.environ["ATTENTION_EXT_EMU_CAPTURE"]
            else:
                os.environ["ATTENTION_EXT_EMU_CAPTURE"] = old


def check_varlen(d: Draw, lq, lk, device):
    g = torch.Generator().manual_seed(d.seed * 7919 + 17)
    q = _packed(sum(lq), d.hq, d.E, d.layouts[0], d.dtype, device, g)
    k = _packed(sum(lk), d.hkv, d.E, d.layouts[1], d.dtype, device, g)
    v = _packed(sum(lk), d.hkv, d.Ev, d.layouts[2], d.dtype, device, g)
    do = _packed(sum(lq), d.hq, d.Ev, "contig", d.dtype, device, g)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int64)
    window = list(d.window) if d.window else [-1, -1]
    opts = (d.dropout_p, d.causal, d.scale, d.enable_gqa, window)
    # ALiBi slopes (Hq,) or (sequences, Hq), each sequence with its own distances
    slopes = make_slopes(Draw(**{**d.__dict__, "batch": (len(lq),)}), device)
    seed = 2000 + d.seed
    with _deterministic(d.deterministic):
        if d.backend.startswith("emu"):
            torch.manual_seed(seed)
            with _captured(d.captured):
                most = (max(lq), max(lk)) if d.captured else (None, None)
                out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, *most, *opts, d.softcap,
                                                                  slopes)

            def bwd():  # (captured too, but for a soft cap: its backward runs sequence by sequence)
                with _captured(d.captured and d.softcap == 0):
                    return emu.ops._attention_varlen_backward(do, q, k, v, cu_q, cu_k, out, lse, rng, *opts, None,
                                                              d.softcap, slopes, *most)

            grads = bwd()
            mask_fn = emu.ops._dropout_mask
            if d.deterministic:  # the same bits again
                again = bwd()
                assert all(torch.equal(a, b) for a, b in zip(grads, again)), f"deterministic backward differs\n{d}"
        else:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            torch.manual_seed(seed)
            out = attention_ext.attention_varlen(*leaves, cu_q, cu_k, None, None, *opts, softcap=d.softcap,
                                                 alibi_slopes=slopes)
            grads = torch.autograd.grad(out, leaves, do)
            torch.manual_seed(seed)  # the same draw again, for its rng_state (one row per sequence)
            rng = torch.ops.attention_ext._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, *opts,
                                                                    d.softcap, slopes)[2]
            mask_fn = torch.ops.attention_ext._dropout_mask

    f64_ = torch.float64
    ref = [torch.zeros(t.shape, dtype=f64_, device=device) for t in (out, q, k, v)]
    # the baselines start equal to the reference, so sequences they do not cover add no error
    # (as check's: "given" is the model's backward given our forward's output, as PyTorch's flash backward would be)
    bases = {key: [torch.zeros(t.shape, dtype=f64_, device=device) for t in (out, q, k, v)]
             for key in ("sdpa", "model", "given")}
    hf = lambda t: t.transpose(0, 1)  # noqa: E731  (tokens, heads, dim) <-> (heads, tokens, dim)
    for b in range(len(lq)):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0 or k1 == k0:  # no rows, or rows that see no key: output and gradients 0 (reference zeros)
            continue
        db = Draw(**{**d.__dict__, "L": q1 - q0, "S": k1 - k0})
        qs, ks, vs, dos = hf(q[q0:q1]), hf(k[k0:k1]), hf(v[k0:k1]), hf(do[q0:q1])
        keep = mask_fn(rng[b], 1, d.hq, db.L, db.S, d.dropout_p)[0] if d.dropout_p > 0 else None
        sb = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        bias = alibi_bias(db, sb)
        r = reference_grads(qs, ks, vs, dos, None, is_causal=d.causal, scale=d.scale, enable_gqa=d.enable_gqa,
                            window_size=d.window, dropout_p=d.dropout_p, dropout_mask=keep, softcap=d.softcap,
                            bias=bias)
        rows = (slice(q0, q1), slice(q0, q1), slice(k0, k1), slice(k0, k1))
        for dst, x, sl in zip(ref, (r[0], *r[2:5]), rows):
            dst[sl] = hf(x)
        vis = sdpa_mask(db, None, qs.device)
        sm = with_bias(vis, bias, d.dtype)
        fm = with_bias(vis, bias, torch.float32 if d.dtype != f64 else f64)
        bl = [t.detach().requires_grad_() for t in (qs, ks, vs)]
        if d.softcap > 0:
            bo = _eager_softcap(db, *bl, fm, keep)
        elif keep is None:
            bo = F.scaled_dot_product_attention(*bl, attn_mask=sm, scale=d.scale, enable_gqa=d.enable_gqa)
        else:
            bo = torch.ops.aten._scaled_dot_product_attention_math(*bl, attn_mask=sm, dropout_p=d.dropout_p,
                                                                   dropout_mask=keep, scale=d.scale,
                                                                   enable_gqa=d.enable_gqa)[0]
        sdpa = (bo, *torch.autograd.grad(bo, bl, dos))
        model = _flash_rounding_model(db, qs, ks, vs, fm, dos, keep, None)
        given = _flash_rounding_model(db, qs, ks, vs, fm, dos, keep, None, out=hf(out[q0:q1].detach()))
        given = None if given is None else (None, *given[1:4])  # (its output is ours: no yardstick for it)
        for key, vals in (("sdpa", sdpa), ("model", model), ("given", given)):
            if vals is None:
                for dst, x, sl in zip(bases[key], ref, rows):
                    dst[sl] = x[sl]
                continue
            for dst, x, sl, exact in zip(bases[key], vals, rows, ref):
                dst[sl] = exact[sl] if x is None else hf(x.detach()).to(f64_).nan_to_num(0.0)

    where = f"\ncase {d} lengths q {lq} k {lk}"
    for i, (name, ours) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *grads))):
        _assert_close(name + where, ours, ref[i], [bases[key][i] for key in ("sdpa", "model", "given")], d.dtype)


@pytest.mark.parametrize("backend,seed", _params(_VARLEN_BACKENDS, "varlen-"))
def test_fuzz_varlen(backend, seed, monkeypatch):
    d, lq, lk = draw_varlen(seed, backend)
    for k, v in d.env:
        monkeypatch.setenv(k, v)
    check_varlen(d, lq, lk, "cuda" if backend == "cuda" else "cpu")

"""Infinities, NaN, huge and subnormal inputs: never a NaN where PyTorch gives a number.

A randomised differential test: random shapes, dtypes and masks, with a special value
(+-inf, NaN, +-1e30, a subnormal, 0) put into q, k, v or a float mask here and there.
PyTorch's own backends disagree on such inputs (the math backend adds -inf to masked
scores, so an inf or NaN under the mask still poisons the row, and 0 x inf in P V
poisons rows that never see that key; its CPU flash kernel rounds and overflows
differently), so each case must agree with at least one of SDPA's math and flash
backends in the same dtype:
  - every NaN of ours is a NaN there too (rows PyTorch leaves NaN because of masked
    keys may be finite in ours: masked keys take no part, and tiles they fill are
    never computed);
  - no infinity where PyTorch is finite, and the finite values agree within the dtype's
    tolerance;
  - where both backends and a float64 reference in which masked keys take no part at all
    are NaN, ours is NaN too (a NaN row is never reported as a fully masked row's 0).
Defects this found: a row of only NaN scores taken for a fully masked row on the CPU
(output 0); an infinity in fp32 q / k / v turned into NaN by the CUDA kernels' 3-pass
TF32 split (csrc/cuda/flash_common.cuh, MmaTraits<float, 3>).
Runs on the CPU kernels, on the CUDA kernels through the CPU emulator, and on a GPU
when there is one (PyTorch's side always on the CPU). Not covered: magnitudes near the dtype's maximum (~3e38) in q or k, where the product
q . k overflows float32 before the softmax scale is applied on the bf16 tile paths,
while PyTorch scales first (benchmarks/NOTES.md, entry 13).
"""
import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_ext
import emu
from conftest import cuda_marks, emu_marks

SPECIALS = [float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 1e-40, 0.0]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def make_case(seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dt = rnd.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64])
    L, S, E = rnd.randint(1, 40), rnd.randint(1, 600), rnd.choice([1, 8, 64, 100])
    q, k, v = (torch.randn(1, 2, n, E, dtype=torch.float64, generator=g) for n in (L, S, S))
    for t in (q, k, v):
        if rnd.random() < 0.4:
            t[tuple(rnd.randrange(s) for s in t.shape)] = rnd.choice(SPECIALS)
    mask, r = None, rnd.random()
    if r < 0.3:
        mask = torch.randn(L, S, dtype=torch.float64, generator=g)
        if rnd.random() < 0.5:
            mask[rnd.randrange(L), rnd.randrange(S)] = rnd.choice(SPECIALS)
        mask = mask.to(dt)
    elif r < 0.5:
        mask = torch.rand(1, 1, L, S, generator=g) < 0.8
    causal = mask is None and rnd.random() < 0.3
    return dt, q.to(dt), k.to(dt), v.to(dt), mask, causal


def visible_only(q, k, v, mask, causal):
    """float64 attention in which masked keys take no part at all (no -inf added to their scores, no
    0 x inf in P V): NaN exactly where visible inputs make it NaN; a row that sees no key gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    L, S = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    vis = torch.ones(L, S, dtype=torch.bool)
    if causal:
        vis = torch.ones(L, S, dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        vis = vis & mask
    elif mask is not None:
        s = s + mask.double()
        vis = vis & ~(mask.double() == -float("inf"))
    s = torch.where(vis, s, -float("inf"))
    dead = ~vis.any(-1, keepdim=True)
    p = torch.softmax(torch.where(dead, 0.0, s), dim=-1)
    contrib = torch.where(vis.unsqueeze(-1), p.unsqueeze(-1) * v.unsqueeze(-3), 0.0)
    return torch.where(dead, 0.0, contrib.sum(-2))


def disagreement(ours, ref, dt):
    if (ours.isnan() & ~ref.isnan()).any():
        return f"NaN at {(ours.isnan() & ~ref.isnan()).sum().item()} places where PyTorch is not"
    if (ours.isinf() & ref.isfinite()).any():
        return "inf where PyTorch is finite"
    fin = ours.isfinite() & ref.isfinite()
    if fin.any():
        size = max(ref[fin].abs().max().item(), 1.0)
        err = (ours[fin] - ref[fin]).abs().max().item()
        if err > TOL[dt] * size:
            return f"error {err:.3g} (values up to {size:.3g})"
    return None


def run_ours(device, q, k, v, mask, causal):
    if device == "emu":  # the CUDA kernels on the CPU emulator (tests/emu.py)
        return emu.attention(q, k, v, mask, is_causal=causal).double()
    if device == "cuda":
        q, k, v = (t.cuda() for t in (q, k, v))
        mask = None if mask is None else mask.cuda()
    return attention_ext.attention(q, k, v, mask, is_causal=causal).double().cpu()


@pytest.mark.parametrize("device", ["cpu", pytest.param("emu", marks=emu_marks()),
                                    pytest.param("emu90", marks=emu_marks()),
                                    pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("block", range(4))
def test_special_values_match_a_pytorch_backend(device, block, monkeypatch):
    """'emu90': the emulator as an sm_90 device, so that the half-precision cases the Hopper kernels cover
    (no mask or causal, head dims up to 256) run through them."""
    if device == "emu90":
        monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
        device = "emu"
    failures = []
    for seed in range(block * 60, (block + 1) * 60):
        dt, q, k, v, mask, causal = make_case(seed)
        if dt == torch.float64 and device != "cpu":
            continue
        ours = run_ours(device, q, k, v, mask, causal)
        verdicts, nan_everywhere = [], visible_only(q, k, v, mask, causal).isnan()
        for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    ref = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal).double()
            except RuntimeError as e:  # a backend that does not take this input
                verdicts.append(f"{backend.name}: {str(e)[:60]}")
                continue
            verdicts.append(disagreement(ours, ref, dt))
            nan_everywhere &= ref.isnan()
        # NaN in every view (both backends and the visible-keys reference) must be NaN in ours: never a
        # finite value (such as the 0 of a row taken for fully masked) where the inputs make it NaN
        if (nan_everywhere & ~ours.isnan()).any():
            verdicts = [f"finite at {(nan_everywhere & ~ours.isnan()).sum().item()} places that are NaN in every view"]
        if all(v is not None for v in verdicts):
            failures.append(f"seed {seed} ({dt}, L={q.shape[-2]}, S={k.shape[-2]}, E={q.shape[-1]}, "
                            f"causal={causal}, mask={None if mask is None else mask.dtype}): {verdicts}")
    assert not failures, "\n".join(failures)

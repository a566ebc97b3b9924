"""Randomised differential test of the drop-in attention_ext.scaled_dot_product_attention against
torch.nn.functional.scaled_dot_product_attention, valid and invalid inputs alike.

Each case draws its inputs from its seed, from well-formed ones to ones PyTorch refuses: ranks 2 to 5,
batch dims equal, broadcast (1) or mismatched per operand, head counts that do or do not divide, with or
without enable_gqa, lengths and head dims from 0 (and past 256, where the drop-in hands over to PyTorch),
masks of every dtype (bool, float16 / 32 / 64, int) and of random shapes (broadcastable or not), is_causal
with and without a mask, scales from -1 to inf and NaN, dtypes mixed, dropout. The property:

* where PyTorch raises (its default kernel and its math path alike), the drop-in raises an ordinary Python
  exception (no crash, no hang), and where PyTorch returns, so does the drop-in; the exceptions are listed
  where the test makes them: what the drop-in refuses on purpose (a dropout probability outside [0, 1], a
  scale of inf or NaN, malformed inputs with an empty dimension other than the query / key head dim) and
  PyTorch's accidents, which it computes (enable_gqa with inputs of fewer than 3 dims, masks of fewer than 2
  dims in some kernels, a mask of more dims than a 2-D query, a mask with is_causal where the installed PyTorch
  applies both in some kernels);
* where both return, the same shape and dtype, and every element PyTorch's math path gives as a number is the
  same number (float64: 1e-10; float32: 2e-5 relative) in the output and, where the inputs take gradients, in
  every gradient. Where PyTorch gives NaN (a query row that sees no key) the drop-in gives 0 or NaN, nothing
  else.

With dropout only the shapes are compared (different random streams). CPU only. Values are compared with
PyTorch's math path (SDPBackend.MATH): its CPU flash kernel, which it picks by default for some of these,
returns NaN rows for is_causal with more queries than keys and a negative scale.
ATTENTION_EXT_FUZZ_CASES=n draws n cases.
"""
import math
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_ext
from attention_ext.functional import _torch_rejects_mask_with_causal

_CASES = int(os.environ.get("ATTENTION_EXT_FUZZ_CASES", "120"))
f16, f32, f64 = torch.float16, torch.float32, torch.float64


def draw(seed):
    r = random.Random(f"sdpa-{seed}")
    c = {"seed": seed}
    c["dtype"] = r.choice((f64, f64, f32))
    c["rank"] = r.choice((2, 3, 4, 4, 4, 5))
    lead = [r.randint(1, 3) for _ in range(max(0, c["rank"] - 3))]
    c["hq"] = r.choice((1, 2, 4, 6))
    c["hkv"] = r.choice((c["hq"], c["hq"], 1, 2, 3))
    c["enable_gqa"] = r.random() < 0.5
    c["L"], c["S"] = r.choice((0, 1, 3, 7, 7)), r.choice((0, 1, 4, 9, 9))
    c["E"] = r.choice((1, 8, 8, 16, 0, 300)) if r.random() < 0.3 else 8
    c["Ev"] = c["E"] if r.random() < 0.7 else r.choice((1, 5, 16, 0, 260))
    c["Ek"] = c["E"] if r.random() < 0.9 else c["E"] + 1   # key head dim mismatch
    # per operand: leading dims as the query's, broadcast (1) or mismatched
    c["lead"] = {}
    for name in ("q", "k", "v"):
        how = "same" if name == "q" else r.choice(("same", "same", "same", "ones", "bad"))
        c["lead"][name] = [1 if how == "ones" else (n + 1 if how == "bad" else n) for n in lead]
    if c["rank"] == 2:
        c["hq"] = c["hkv"] = 1
    c["ranks"] = {n: c["rank"] if r.random() < 0.93 else r.choice((2, 3, 4, 5)) for n in ("q", "k", "v")}
    c["mixed_dtype"] = r.choice((None, None, None, None, "k", "v"))
    u = r.random()
    c["mask"] = None if u < 0.35 else ("bool" if u < 0.65 else r.choice(("f32", "f64", "f16", "int", "same")))
    c["mask_rank"] = r.randint(0, c["rank"] + 1)
    c["mask_dims"] = [r.choice(("full", "full", "one", "bad")) for _ in range(6)]
    c["mask_grad"] = r.random() < 0.4
    c["keep"] = r.choice((0.9, 0.5, 0.1, 0.0))
    c["is_causal"] = r.random() < 0.3
    c["scale"] = r.choice((None, None, None, 0.5, 0.0, -1.0, 2.5, math.inf, math.nan))
    c["dropout_p"] = 0.0 if r.random() < 0.85 else r.choice((0.3, 1.0, -0.2))
    c["grad"] = r.random() < 0.7
    # one of PyTorch's causal biases (torch.nn.attention.bias) as the mask, for (L, S) or for wrong lengths
    c["causal_bias"] = None if r.random() < 0.85 else r.choice(("upper_left", "lower_right", "lower_right_wrong"))
    return c


def _shape(c, name):
    rank = c["ranks"][name]
    heads = c["hq"] if name == "q" else c["hkv"]
    n = c["L"] if name == "q" else c["S"]
    d = {"q": c["E"], "k": c["Ek"], "v": c["Ev"]}[name]
    full = [*c["lead"][name], heads, n, d]
    return full[len(full) - rank:] if rank <= len(full) else [2] * (rank - len(full)) + full


def make(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    ts = {}
    for name in ("q", "k", "v"):
        t_dt = f32 if (c["mixed_dtype"] == name and dt == f64) else (f64 if c["mixed_dtype"] == name else dt)
        ts[name] = torch.randn(_shape(c, name), generator=g, dtype=f64).to(t_dt)
    mask = None
    if c["mask"]:
        qs = _shape(c, "q")
        target = [*qs[:-1], c["S"]]  # (..., L, S) as the scores
        rank = c["mask_rank"]
        shape = []
        for i, n in enumerate(target[len(target) - rank:] if rank <= len(target) else [1] * (rank - len(target)) +
                              target):
            how = c["mask_dims"][i % 6]
            shape.append(n if how == "full" else (1 if how == "one" else n + 2))
        keep = torch.rand(shape, generator=g) < c["keep"] if shape else torch.rand((), generator=g) < c["keep"]
        if c["mask"] == "bool":
            mask = keep
        elif c["mask"] == "int":
            mask = keep.to(torch.int64)
        else:
            mdt = {"f32": f32, "f64": f64, "f16": f16, "same": dt}[c["mask"]]
            mask = torch.randn(keep.shape, generator=g, dtype=f64).masked_fill(~keep, -math.inf).to(mdt)
    if c["causal_bias"]:
        from torch.nn.attention.bias import causal_lower_right, causal_upper_left
        make_bias = causal_upper_left if c["causal_bias"] == "upper_left" else causal_lower_right
        mask = make_bias(c["L"], c["S"] + (1 if c["causal_bias"].endswith("wrong") else 0))
    return ts["q"], ts["k"], ts["v"], mask


def _is_bias(mask):
    from torch.nn.attention.bias import CausalBias
    return isinstance(mask, CausalBias)


def _call(fn, c, q, k, v, mask):
    """(output, gradients or None) or the exception raised."""
    leaves = []
    if c["grad"]:
        q, k, v = (t.detach().requires_grad_() if t.is_floating_point() else t for t in (q, k, v))
        leaves = [q, k, v]
        if mask is not None and mask.is_floating_point() and c["mask_grad"] and not _is_bias(mask):
            mask = mask.detach().requires_grad_()
            leaves.append(mask)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(c["seed"])
            out = fn(q, k, v, attn_mask=mask, dropout_p=c["dropout_p"], is_causal=c["is_causal"], scale=c["scale"],
                     enable_gqa=c["enable_gqa"])
            grads = None
            if leaves and out.numel() and out.requires_grad:
                gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=f64).to(out.dtype)
                grads = torch.autograd.grad(out, leaves, gout, allow_unused=True)
        return out, grads
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        return e


def _same_numbers(name, ours, theirs, dtype, where):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, \
        f"{name}: {tuple(ours.shape)} {ours.dtype} vs PyTorch's {tuple(theirs.shape)} {theirs.dtype}{where}"
    a, b = ours.detach().double(), theirs.detach().double()
    fin = torch.isfinite(b)
    tol = 1e-10 if dtype == f64 else 2e-5
    if bool(fin.any()):
        err = ((a[fin] - b[fin]).abs() / (1 + b[fin].abs())).max().item()
        assert err <= tol, f"{name}: differs from PyTorch by {err:.3g} (relative) where PyTorch gives numbers{where}"
    # where PyTorch gives NaN (rows that see no key) ours gives 0, or NaN where the inputs make every number NaN
    nan = torch.isnan(b)
    if bool(nan.any()):
        assert bool(((a[nan] == 0) | torch.isnan(a[nan])).all()), f"{name}: garbage where PyTorch gives NaN{where}"


@pytest.mark.parametrize("seed", range(_CASES), ids=[f"sdpa-{s}" for s in range(_CASES)])
def test_fuzz_dropin(seed, one_thread):
    c = draw(seed)
    q, k, v, mask = make(c)
    theirs = _call(F.scaled_dot_product_attention, c, q, k, v, mask)
    with sdpa_kernel(SDPBackend.MATH):  # the semantics (PyTorch's CPU flash kernel, picked by default for
        # some of these, returns NaN rows for is_causal with L > S and a negative scale)
        math_ = _call(F.scaled_dot_product_attention, c, q, k, v, mask)
    ours = _call(attention_ext.scaled_dot_product_attention, c, q, k, v, mask)
    where = f"\ncase {c}\nshapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} mask " \
            f"{None if mask is None else (tuple(mask.shape), mask.dtype)}"
    if isinstance(ours, Exception):
        assert str(ours), f"an exception without a message{where}"
    if v.numel() == 0 or any(n == 0 for t in (q, k) for n in t.shape[:-1]):
        # malformed inputs with an empty dimension: PyTorch checks and broadcasts them as it happens to (heads
        # that do not divide, mismatched batch dims, when the output is empty), the drop-in refuses them or
        # broadcasts them properly; only no crash. (A query / key head dim of 0 is compared: the op takes it.)
        return
    if not isinstance(theirs, Exception) and isinstance(ours, Exception):
        # refused on purpose where PyTorch lets it through: a dropout probability outside [0, 1] (PyTorch
        # ignores a negative one) and a scale of inf or NaN (PyTorch returns NaN)
        if not 0 <= c["dropout_p"] <= 1 or (c["scale"] is not None and not math.isfinite(c["scale"])):
            return
        raise AssertionError(f"PyTorch returns but the drop-in raises: {ours!s:.300}{where}")
    if isinstance(theirs, Exception):
        if not isinstance(math_, Exception):
            theirs = math_  # only PyTorch's default kernel refuses: the drop-in may return, as its math path
        elif isinstance(ours, Exception):
            return
        # PyTorch's accidents, which the drop-in computes: enable_gqa with inputs of fewer than 3 dims (PyTorch
        # indexes their heads dim), a mask of more dims than a 2-D query (its in-place add cannot grow the output)
        elif c["enable_gqa"] and min(t.dim() for t in (q, k, v)) < 3 and "out of range" in str(theirs):
            return
        elif "doesn't match the broadcast shape" in str(theirs):
            return
        # a mask of fewer than 2 dims: some PyTorch kernels (2.11's) index its last two dims
        elif mask is not None and mask.dim() < 2 and ("no dimensions" in str(theirs) or "out of range" in str(theirs)):
            return
        # is_causal with a mask: older PyTorch (2.11) applies both in its CPU flash kernel (4-D inputs) and
        # refuses in its math path (other ranks); the drop-in follows what a 4-D call does
        elif "should not be set when is_causal=True" in str(theirs) and not _torch_rejects_mask_with_causal():
            return
        else:
            raise AssertionError(f"PyTorch raises ({theirs!s:.200}) but the drop-in returns{where}")
    if isinstance(ours, Exception):
        return  # PyTorch's default kernel refused, its math path did not: the drop-in may refuse
    if not isinstance(math_, Exception):
        theirs = math_
    (o1, g1), (o2, g2) = ours, theirs
    if c["dropout_p"] > 0:
        assert o1.shape == o2.shape and o1.dtype == o2.dtype, where
        return
    # a NaN scale or inputs give NaN everywhere in PyTorch: nothing to compare but the shape
    _same_numbers("output", o1, o2, c["dtype"], where)
    assert (g1 is None) == (g2 is None), where
    for i, (a, b) in enumerate(zip(g1 or (), g2 or ())):
        assert (a is None) == (b is None), f"gradient {i}{where}"
        if a is not None:
            _same_numbers(f"gradient {i}", a, b, c["dtype"], where)
